//! Fuzzing the scheduler's public API with arbitrary values (property test).
//!
//! Random sequences of add / schedule / update / abort / finish / output_token_ids, with values
//! drawn from the whole range of their types (ids, token ids, max_tokens and priorities at and
//! beyond every limit, updates of the wrong length, calls out of order). The scheduler must
//! answer each call with `Ok` or a `CoreError`, never a panic; its invariants hold after every
//! call (each block of a sequence on the CP rank its index is placed on, when the pool is split);
//! and once every request is aborted, every KV block is free again.

use std::collections::HashSet;

use _core::{CoreError, FinishReason, KvPlacement, NewRequest, Scheduler, SchedulerConfig};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    Add(NewRequest),
    Schedule,
    /// `update` with exactly as many tokens as the last step sampled, these values cycled.
    UpdateMatching(Vec<i64>),
    /// `update` with any number of tokens.
    Update(Vec<i64>),
    Abort(u64),
    Finish(u64, u8),
    OutputTokens(u64),
}

/// Mostly values near the interesting small range, sometimes anything of the type.
fn int(small: std::ops::Range<i64>) -> impl Strategy<Value = i64> {
    prop_oneof![
        6 => small,
        1 => prop::sample::select(vec![i64::MIN, -1, i32::MAX as i64, i32::MAX as i64 + 1, u32::MAX as i64, i64::MAX]),
        1 => any::<i64>(),
    ]
}

fn id() -> impl Strategy<Value = u64> {
    prop_oneof![8 => 0u64..6, 1 => any::<u64>()]
}

fn new_request() -> impl Strategy<Value = NewRequest> {
    (
        id(),
        prop::collection::vec(int(0..4), 0..20),
        int(1..12),
        prop::collection::vec(int(0..4), 0..3),
        prop::option::of(int(0..4)),
        any::<bool>(),
        int(-2..3),
    )
        .prop_map(|(request_id, prompt_token_ids, max_tokens, stop_token_ids, eos_token_id, ignore_eos, priority)| {
            NewRequest { request_id, prompt_token_ids, max_tokens, stop_token_ids, eos_token_id, ignore_eos, priority }
        })
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => new_request().prop_map(Op::Add),
        4 => Just(Op::Schedule),
        4 => prop::collection::vec(int(0..4), 1..4).prop_map(Op::UpdateMatching),
        1 => prop::collection::vec(int(0..4), 0..6).prop_map(Op::Update),
        1 => id().prop_map(Op::Abort),
        1 => (id(), 0u8..4).prop_map(|(i, r)| Op::Finish(i, r)),
        1 => id().prop_map(Op::OutputTokens),
    ]
}

fn reason(r: u8) -> FinishReason {
    [FinishReason::Stop, FinishReason::Length, FinishReason::Abort, FinishReason::Error][r as usize % 4]
}

/// Cases per run: 2,000 in the test suite; `FUZZ_CASES=1000000` for a long session.
fn cases() -> u32 {
    std::env::var("FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(2000)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_calls_never_panic_and_never_leak_a_block(
        per_rank in 1usize..12,
        cp_size in 1usize..4,
        first_blocks in 0usize..3,
        block_size in 1usize..5,
        max_num_seqs in 1usize..5,
        budget in 1usize..20,
        max_model_len in 2usize..40,
        caching in any::<bool>(),
        ops in prop::collection::vec(op(), 1..80),
    ) {
        let config = SchedulerConfig {
            num_blocks: per_rank * cp_size, block_size, max_num_seqs, max_num_batched_tokens: budget, max_model_len,
            enable_prefix_caching: caching, placement: KvPlacement { cp_size, first_blocks },
        };
        let mut s = Scheduler::new(config).unwrap();
        let mut added: HashSet<u64> = HashSet::new();
        let mut last_sampled = 0usize;
        for op in ops {
            match op {
                Op::Add(req) => {
                    let rid = req.request_id;
                    if s.add_request(req).is_ok() {
                        added.insert(rid);
                    }
                }
                Op::Schedule => match s.schedule() {
                    Ok(out) => {
                        prop_assert!(out.num_tokens() <= budget);
                        last_sampled = out.sample_request_ids.len();
                    }
                    Err(e) => prop_assert!(matches!(e, CoreError::UpdatePending { .. }), "schedule: {e}"),
                },
                Op::UpdateMatching(values) => {
                    let tokens: Vec<i64> = values.iter().cycle().take(last_sampled).copied().collect();
                    let _ = s.update(&tokens);
                }
                Op::Update(tokens) => {
                    let _ = s.update(&tokens);
                }
                Op::Abort(rid) => {
                    s.abort(rid);
                }
                Op::Finish(rid, r) => {
                    s.finish_request(rid, reason(r));
                }
                Op::OutputTokens(rid) => {
                    let _ = s.output_token_ids(rid);
                }
            }
            prop_assert_eq!(s.check_invariants(), Ok(()));
        }
        for rid in added {
            s.abort(rid);
        }
        prop_assert!(!s.has_unfinished());
        prop_assert_eq!(s.num_free_blocks(), s.num_blocks(), "a block leaked");
        // And the scheduler still works: a fresh request runs to completion.
        s.add_request(NewRequest { request_id: 1 << 40, prompt_token_ids: vec![1], max_tokens: 1, ..Default::default() })
            .unwrap();
        let out = s.schedule().unwrap();
        prop_assert_eq!(out.sample_request_ids.clone(), vec![1u64 << 40]);
        let done = s.update(&[0]).unwrap();
        prop_assert_eq!(done, vec![(1u64 << 40, FinishReason::Length)]);
        prop_assert_eq!(s.num_free_blocks(), s.num_blocks());
    }
}
