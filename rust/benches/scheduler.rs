//! One engine step of the scheduler: `schedule()` + `update()` with N running decode requests.
//!
//! Steady state of continuous batching: every request decodes one token per step; requests have
//! staggered lengths, so a few finish each step and are replaced by new 16-token prompts (whose
//! prefill joins the step). Prefix caching is on, so full blocks are hashed and registered as
//! they fill. Run: `cargo bench --bench scheduler`.

use std::hint::black_box;
use std::time::Duration;

use _core::{NewRequest, Scheduler, SchedulerConfig};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};

const PROMPT_LEN: usize = 16;
const MAX_TOKENS: i64 = 512;
const BLOCK_SIZE: usize = 16;

struct Load {
    sched: Scheduler,
    next_id: u64,
    sampled: Vec<i64>,
}

impl Load {
    fn new(num_requests: usize) -> Self {
        let blocks_per_request = (PROMPT_LEN + MAX_TOKENS as usize).div_ceil(BLOCK_SIZE);
        let sched = Scheduler::new(SchedulerConfig {
            num_blocks: num_requests * blocks_per_request + 64,
            placement: Default::default(),
            block_size: BLOCK_SIZE,
            max_num_seqs: num_requests,
            max_num_batched_tokens: num_requests + 4 * PROMPT_LEN,
            max_model_len: 1024,
            enable_prefix_caching: true,
        })
        .unwrap();
        let mut load = Load {
            sched,
            next_id: 0,
            sampled: Vec::new(),
        };
        for i in 0..num_requests {
            // Staggered lengths so that finishes spread evenly over steps.
            load.add(1 + (i as i64 * 7919) % MAX_TOKENS);
        }
        // Warm up until everything is decoding.
        while load.sched.num_waiting() > 0 || load.sched.num_running() < num_requests {
            load.step();
        }
        for _ in 0..2 * MAX_TOKENS {
            load.step();
        }
        load
    }

    fn add(&mut self, max_tokens: i64) {
        let id = self.next_id;
        self.next_id += 1;
        let prompt = (0..PROMPT_LEN as i64)
            .map(|t| (id as i64 * 31 + t) % 30_000)
            .collect();
        let req = NewRequest {
            request_id: id,
            prompt_token_ids: prompt,
            max_tokens,
            ignore_eos: true,
            ..Default::default()
        };
        self.sched.add_request(req).unwrap();
    }

    fn step(&mut self) {
        let out = self.sched.schedule().unwrap();
        self.sampled.clear();
        self.sampled.extend(
            out.sample_request_ids
                .iter()
                .map(|&id| (id % 30_000) as i64),
        );
        let finished = self.sched.update(&self.sampled).unwrap();
        for _ in 0..finished.len() {
            self.add(MAX_TOKENS);
        }
        black_box(out);
    }
}

fn bench_step(c: &mut Criterion) {
    let mut group = c.benchmark_group("schedule_update_step");
    group
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(30);
    for n in [256usize, 1024, 4096] {
        let mut load = Load::new(n);
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| load.step())
        });
        let out = load.sched.schedule().unwrap();
        eprintln!(
            "n={n}: last step decode tokens {}, prefill tokens {}, preemptions {}",
            out.num_decode_tokens,
            out.num_prefill_tokens,
            load.sched.stats().num_preemptions
        );
    }
    group.finish();
}

criterion_group!(benches, bench_step);
criterion_main!(benches);
