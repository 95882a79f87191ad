//! Liveness and consistency of the scheduler under random load (property test).
//!
//! A small KV pool, random arrivals / prompts / max_tokens / priorities / aborts, and a fake
//! model that returns random tokens and keeps a fake KV cache (slot -> (token, position)). Every
//! step checks that each scheduled request's whole context is in its blocks (so prefix hits and
//! preemption never hand out wrong KV); at the end every request has finished exactly once with
//! a reason and every block is free.

use std::collections::HashMap;

use _core::{CoreError, FinishReason, KvPlacement, NewRequest, Scheduler, SchedulerConfig};
use proptest::prelude::*;

#[derive(Debug, Clone)]
struct Arrival {
    step: usize,
    prompt: Vec<i64>,
    max_tokens: i64,
    priority: i64,
    abort_after: Option<usize>,
    eos: Option<i64>,
}

fn arrival() -> impl Strategy<Value = Arrival> {
    let eos = proptest::option::weighted(0.3, Just(2i64));
    (
        0usize..10,
        proptest::collection::vec(0i64..2, 1..14),
        1i64..12,
        0i64..3,
        proptest::option::weighted(0.15, 0usize..15),
        eos,
    )
        .prop_map(
            |(step, prompt, max_tokens, priority, abort_after, eos)| Arrival {
                step,
                prompt,
                max_tokens,
                priority,
                abort_after,
                eos,
            },
        )
}

/// xorshift: the fake model's randomness, seeded by proptest.
fn next_rand(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn every_request_finishes_and_no_block_leaks(
        per_rank in 4usize..16,
        cp_size in 1usize..4,
        first_blocks in 0usize..3,
        block_size in 1usize..5,
        max_num_seqs in 1usize..6,
        budget in 1usize..24,
        caching in any::<bool>(),
        arrivals in proptest::collection::vec(arrival(), 1..16),
        seed in 1u64..u64::MAX,
    ) {
        let num_blocks = per_rank * cp_size;
        let config = SchedulerConfig {
            num_blocks, block_size, max_num_seqs, max_num_batched_tokens: budget,
            max_model_len: 40, enable_prefix_caching: caching, placement: KvPlacement { cp_size, first_blocks },
        };
        let mut s = Scheduler::new(config).unwrap();
        let mut rng = seed;
        let mut kv: Vec<Option<(i32, i32)>> = vec![None; num_blocks * block_size];
        let mut seqs: HashMap<u64, Vec<i64>> = HashMap::new(); // all known tokens per live request
        let mut finished: HashMap<u64, FinishReason> = HashMap::new();
        let mut added_at: HashMap<u64, usize> = HashMap::new();
        let mut step = 0usize;
        loop {
            for (id, a) in arrivals.iter().enumerate().filter(|(_, a)| a.step == step) {
                let req = NewRequest {
                    request_id: id as u64, prompt_token_ids: a.prompt.clone(), max_tokens: a.max_tokens,
                    eos_token_id: a.eos, priority: a.priority, ..Default::default()
                };
                match s.add_request(req) {
                    Ok(()) => { seqs.insert(id as u64, a.prompt.clone()); added_at.insert(id as u64, step); }
                    Err(CoreError::NeverFits { .. } | CoreError::NeverFitsOnRank { .. } | CoreError::ExceedsModelLen { .. }) => {}
                    Err(e) => prop_assert!(false, "unexpected error {e}"),
                }
            }
            for (id, a) in arrivals.iter().enumerate() {
                let id = id as u64;
                if a.abort_after.is_some_and(|d| added_at.get(&id).is_some_and(|&t| t + d == step)) && s.abort(id) {
                    prop_assert!(finished.insert(id, FinishReason::Abort).is_none());
                    seqs.remove(&id);
                }
            }
            if !s.has_unfinished() && step > 10 {
                break;
            }
            let out = s.schedule().unwrap();
            prop_assert!(out.num_tokens() <= budget);
            prop_assert!(s.num_running() <= max_num_seqs);
            // The fake model writes this step's KV, then checks every request's full context.
            for n in 0..out.num_requests() {
                let (lo, hi) = (out.query_start_loc[n] as usize, out.query_start_loc[n + 1] as usize);
                for t in lo..hi {
                    kv[out.slot_mapping[t] as usize] = Some((out.input_ids[t], out.positions[t]));
                }
            }
            for n in 0..out.num_requests() {
                let seq = &seqs[&out.request_ids[n]];
                let row = out.block_table_row(n);
                let seq_len = out.seq_lens[n] as usize;
                let q_len = (out.query_start_loc[n + 1] - out.query_start_loc[n]) as usize;
                prop_assert!(seq_len <= seq.len());
                prop_assert_eq!(out.positions[out.query_start_loc[n] as usize] as usize, seq_len - q_len);
                for pos in 0..seq_len {
                    let slot = row[pos / block_size] as usize * block_size + pos % block_size;
                    prop_assert_eq!(kv[slot], Some((seq[pos] as i32, pos as i32)), "request {} pos {}", out.request_ids[n], pos);
                }
            }
            let sampled: Vec<i64> = out.sample_request_ids.iter().map(|_| (next_rand(&mut rng) % 5) as i64).collect();
            for (&id, &t) in out.sample_request_ids.iter().zip(&sampled) {
                seqs.get_mut(&id).unwrap().push(t);
            }
            for (id, reason) in s.update(&sampled).unwrap() {
                prop_assert!(matches!(reason, FinishReason::Stop | FinishReason::Length));
                let out_len = s.output_token_ids(id).unwrap().len();
                prop_assert!(out_len >= 1 && out_len as i64 <= arrivals[id as usize].max_tokens);
                prop_assert!(finished.insert(id, reason).is_none(), "request {} finished twice", id);
                seqs.remove(&id);
            }
            prop_assert!(s.check_invariants().is_ok(), "{:?}", s.check_invariants());
            step += 1;
            prop_assert!(step < 3000, "no progress after {} steps", step);
        }
        if std::env::var("LIVENESS_DEBUG").is_ok() { eprintln!("steps={step} added={} stats={:?}", added_at.len(), s.stats()); }
        prop_assert_eq!(finished.len(), added_at.len(), "every added request finishes exactly once");
        prop_assert_eq!(s.num_free_blocks(), num_blocks);
        prop_assert_eq!(s.num_waiting() + s.num_running(), 0);
        prop_assert!(s.check_invariants().is_ok());
    }
}
