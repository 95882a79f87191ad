//! One scheduling step: decodes first, then chunked prefills of running requests, then new
//! (or preempted) requests in (priority, arrival) order, all under the token budget and
//! `max_num_seqs`. When a running request needs a block and none is free, the least urgent
//! running request (highest priority value, then newest) is preempted by recompute; if that is
//! the requester itself, it preempts itself.
//!
//! Cost per step is O(scheduled requests + scheduled tokens + block-table cells): nothing scans
//! the whole pool, and blocks are hashed only when they become full (in `update`).

use crate::error::{CoreError, CoreResult};
use crate::request::RequestStatus;
use crate::scheduler::Scheduler;
use crate::scheduler_output::SchedulerOutput;

impl Scheduler {
    /// Picks this step's batch and allocates its KV blocks. Every non-empty step must be
    /// followed by `update()` before the next `schedule()`.
    pub fn schedule(&mut self) -> CoreResult<SchedulerOutput> {
        if self.pending_update {
            let pending = self
                .last_scheduled
                .iter()
                .filter(|&&h| self.is_live(h))
                .count();
            if pending > 0 {
                return Err(CoreError::UpdatePending { pending });
            }
            self.last_scheduled.clear();
            self.last_sampled.clear();
        }
        self.recently_finished.clear();
        self.decisions.clear();
        self.budget = self.config.max_num_batched_tokens;

        // Pass 2 is skipped when pass 1 saw every running request and none was a prefill (the
        // common all-decode step), saving a second walk over the running set.
        if self.schedule_running(true) {
            self.schedule_running(false);
        }
        self.schedule_waiting();
        let out = self.build_output();

        for &(slot, _) in &self.decisions {
            self.step_tokens[slot] = 0;
        }
        for slot in std::mem::take(&mut self.preempted_this_step) {
            self.step_preempted[slot] = false;
        }
        self.pending_update = !out.is_empty();
        Ok(out)
    }

    /// One pass over running requests: decodes (`decodes == true`) or partial prefills.
    /// Returns true if a later pass may find work (a request of the other kind was skipped, or
    /// the pass stopped early).
    fn schedule_running(&mut self, decodes: bool) -> bool {
        let mut i = 0;
        let mut skipped_other_kind = false;
        while i < self.running.len() && self.budget > 0 {
            let slot = self.running[i];
            let req = self.req(slot);
            let pending = req.num_pending_tokens();
            if self.step_tokens[slot] > 0 || pending == 0 || req.is_decode() != decodes {
                skipped_other_kind |= pending > 0 && req.is_decode() != decodes;
                i += 1;
                continue;
            }
            let n = pending.min(self.budget);
            if self.ensure_blocks(slot, n) {
                self.decide(slot, n);
                i += 1;
            }
            // else: the request preempted itself and left `running`; the same `i` is the next one.
        }
        skipped_other_kind || i < self.running.len()
    }

    /// Admits waiting requests in order until one does not fit.
    fn schedule_waiting(&mut self) {
        let bs = self.config.block_size;
        while self.budget > 0 && self.running.len() < self.config.max_num_seqs {
            let Some((&key, &slot)) = self.waiting.iter().next() else {
                break;
            };
            if self.step_preempted[slot] {
                break; // do not re-admit what this step just preempted
            }
            let mut hits = std::mem::take(&mut self.hit_scratch);
            hits.clear();
            let req = self.slots[slot].as_mut().expect("live slot");
            let num_tokens = req.num_tokens();
            if self.pool.caching_enabled() {
                // At least one token must be computed, so the cache may cover (len - 1) tokens.
                let max_hit_blocks = (num_tokens - 1) / bs;
                crate::block_pool::extend_block_hashes(
                    &mut req.block_hashes,
                    &req.token_ids,
                    bs,
                    max_hit_blocks,
                );
                self.pool.find_cached_prefix(
                    &req.block_hashes,
                    &req.token_ids,
                    max_hit_blocks,
                    &mut hits,
                );
            }
            let computed = hits.len() * bs;
            let n = (num_tokens - computed).min(self.budget);
            let new_blocks = (computed + n).div_ceil(bs) - hits.len();
            if !self.pool.fits(hits.len(), hits.len() + new_blocks, &hits) {
                self.hit_scratch = hits;
                break;
            }
            if self.pool.caching_enabled() {
                self.pool.record_lookup(num_tokens, computed);
            }
            for &b in &hits {
                self.pool.take(b);
            }
            let cursor = self.pool.cursor_after_hits(&hits);
            let req = self.slots[slot].as_mut().expect("live slot");
            req.blocks.extend_from_slice(&hits);
            for index in hits.len()..hits.len() + new_blocks {
                req.blocks
                    .push(self.pool.allocate(index).expect("checked free blocks"));
            }
            req.num_computed_tokens = computed;
            req.cache_cursor = cursor;
            req.status = RequestStatus::Running;
            self.hit_scratch = hits;
            self.waiting.remove(&key);
            let pos = self
                .running
                .partition_point(|&s| self.req(s).urgency_key() < key);
            self.running.insert(pos, slot);
            self.decide(slot, n);
        }
    }

    /// Makes sure `slot` has blocks for `n` more tokens, preempting the least urgent running
    /// requests as needed. Returns false if `slot` itself had to be preempted.
    fn ensure_blocks(&mut self, slot: usize, n: usize) -> bool {
        let bs = self.config.block_size;
        let req = self.req(slot);
        let (have, want) = (req.blocks.len(), (req.num_computed_tokens + n).div_ceil(bs));
        while !self.pool.fits(have, want, &[]) {
            let victim = *self.running.last().expect("the requester is running");
            self.preempt(victim);
            if victim == slot {
                return false;
            }
        }
        for index in have..want {
            let b = self.pool.allocate(index).expect("checked free blocks");
            self.req_mut(slot).blocks.push(b);
        }
        true
    }

    /// Records that `slot` computes `n` tokens this step.
    fn decide(&mut self, slot: usize, n: usize) {
        self.step_tokens[slot] = n;
        self.budget -= n;
        self.decisions.push((slot, n));
    }

    /// Preempts a running request by recompute: frees its blocks tail-first, undoes its part of
    /// this step, and queues it again at its (priority, arrival) place.
    fn preempt(&mut self, slot: usize) {
        let pos = self.running_pos(slot);
        self.running.remove(pos);
        let n = std::mem::take(&mut self.step_tokens[slot]);
        if n > 0 {
            let at = self
                .decisions
                .iter()
                .position(|&(s, _)| s == slot)
                .expect("decided");
            self.decisions.remove(at);
            self.budget += n;
        }
        let req = self.slots[slot].as_mut().expect("live slot");
        let blocks = std::mem::take(&mut req.blocks);
        req.num_computed_tokens = 0;
        req.cache_cursor = Default::default();
        req.status = RequestStatus::Waiting;
        req.num_preemptions += 1;
        let key = req.urgency_key();
        self.pool.free_table(blocks);
        self.waiting.insert(key, slot);
        self.step_preempted[slot] = true;
        self.preempted_this_step.push(slot);
        self.num_preemptions += 1;
    }

    /// Turns the decisions into the batch arrays and advances each request's computed count.
    fn build_output(&mut self) -> SchedulerOutput {
        let bs = self.config.block_size;
        let num_tokens = self.config.max_num_batched_tokens - self.budget;
        let mut out = SchedulerOutput::with_capacity(self.decisions.len(), num_tokens);
        for &(slot, n) in &self.decisions {
            let req = self.slots[slot].as_mut().expect("live slot");
            let start = req.num_computed_tokens;
            let samples = start + n == req.num_tokens();
            let is_decode = req.is_decode();
            out.push_request(
                req.id,
                &req.token_ids,
                &req.blocks,
                bs,
                start,
                n,
                is_decode,
                samples,
            );
            req.num_computed_tokens += n;
            let handle = (slot, req.arrival);
            self.last_scheduled.push(handle);
            if samples {
                self.last_sampled.push(handle);
            }
        }
        out.alloc_block_tables();
        for (row, &(slot, _)) in self.decisions.iter().enumerate() {
            out.set_block_row(row, &self.slots[slot].as_ref().expect("live slot").blocks);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use crate::kv_placement::KvPlacement;
    use crate::scheduler::{NewRequest, Scheduler, SchedulerConfig};
    use crate::FinishReason;

    fn sched(num_blocks: usize, block_size: usize, budget: usize) -> Scheduler {
        Scheduler::new(SchedulerConfig {
            num_blocks,
            placement: KvPlacement::default(),
            block_size,
            max_num_seqs: 8,
            max_num_batched_tokens: budget,
            max_model_len: 512,
            enable_prefix_caching: true,
        })
        .unwrap()
    }

    fn add(s: &mut Scheduler, id: u64, prompt: Vec<i64>, max_tokens: i64) {
        let r = NewRequest {
            request_id: id,
            prompt_token_ids: prompt,
            max_tokens,
            ..Default::default()
        };
        s.add_request(r).unwrap();
    }

    /// A deterministic fake model: the next token depends only on the sequence position.
    fn fake_token(position: i32) -> i64 {
        (position as i64 * 7 + 3) % 50 + 100
    }

    /// Runs until idle; returns every request's output and the positions each request sampled at.
    fn run(s: &mut Scheduler) -> std::collections::BTreeMap<u64, Vec<u32>> {
        let mut outputs = std::collections::BTreeMap::new();
        let mut steps = 0;
        while s.has_unfinished() {
            let out = s.schedule().unwrap();
            let sampled: Vec<i64> = out
                .logits_indices
                .iter()
                .map(|&i| fake_token(out.positions[i as usize]))
                .collect();
            let ids = out.sample_request_ids.clone();
            let finished = s.update(&sampled).unwrap();
            for (id, _) in finished {
                outputs.insert(id, s.output_token_ids(id).unwrap().to_vec());
            }
            let _ = ids;
            s.check_invariants().unwrap();
            steps += 1;
            assert!(steps < 10_000, "no progress");
        }
        outputs
    }

    #[test]
    fn decodes_come_first() {
        let mut s = sched(64, 4, 10);
        add(&mut s, 1, vec![1, 2, 3, 4], 5);
        let out = s.schedule().unwrap();
        assert_eq!(
            (out.request_ids.clone(), out.sample_request_ids.clone()),
            (vec![1], vec![1])
        );
        assert_eq!(out.num_prefill_tokens, 4);
        s.update(&[9]).unwrap();
        add(&mut s, 2, (0..8).collect(), 5);
        let out = s.schedule().unwrap();
        assert_eq!(out.request_ids, vec![1, 2]);
        assert_eq!((out.num_decode_tokens, out.num_prefill_tokens), (1, 8));
        assert_eq!(out.query_start_loc, vec![0, 1, 9]);
        assert_eq!(out.input_ids[0], 9);
        assert_eq!(out.positions[0], 4);
        assert_eq!(out.seq_lens, vec![5, 8]);
        assert_eq!(out.logits_indices, vec![0, 8]);
        // Block tables: request 1 holds 2 blocks, request 2 holds 2 blocks.
        assert_eq!(out.max_blocks_per_request, 2);
        assert_eq!(out.slot_mapping[0], out.block_table_row(0)[1] as i64 * 4);
    }

    #[test]
    fn chunked_prefill_splits_and_samples_once() {
        let mut s = sched(64, 4, 4);
        add(&mut s, 1, (10..20).collect(), 2);
        let mut chunks = Vec::new();
        loop {
            let out = s.schedule().unwrap();
            chunks.push((out.positions.clone(), out.sample_request_ids.len()));
            let n = out.sample_request_ids.len();
            s.update(&vec![5; n]).unwrap();
            if n > 0 {
                break;
            }
        }
        assert_eq!(
            chunks,
            vec![
                (vec![0, 1, 2, 3], 0),
                (vec![4, 5, 6, 7], 0),
                (vec![8, 9], 1)
            ]
        );
        assert_eq!(s.output_token_ids(1).unwrap(), &[5]);
    }

    #[test]
    fn schedule_twice_without_update_is_an_error() {
        let mut s = sched(64, 4, 16);
        add(&mut s, 1, vec![1, 2], 3);
        s.schedule().unwrap();
        let e = s.schedule().unwrap_err();
        assert!(e.to_string().contains("update() must follow"));
        assert!(s
            .update(&[1, 2])
            .unwrap_err()
            .to_string()
            .contains("one entry per sample_request_id (1), got 2"));
        // Finishing the request clears the obligation.
        assert!(s.finish_request(1, FinishReason::Error));
        assert!(s.schedule().unwrap().is_empty());
        assert_eq!(s.num_free_blocks(), 64);
    }

    #[test]
    fn preemption_then_resume_gives_same_tokens() {
        // Reference: plenty of blocks.
        let prompts: Vec<Vec<i64>> = (0..4)
            .map(|r| (0..(6 + 3 * r)).map(|t| t * 3 + r).collect())
            .collect();
        let mut big = sched(256, 4, 32);
        for (i, p) in prompts.iter().enumerate() {
            add(&mut big, i as u64, p.clone(), 12);
        }
        let want = run(&mut big);
        assert_eq!(big.stats().num_preemptions, 0);
        // Tight pool: 9 blocks of 4 must preempt, and the outputs must not change.
        let mut small = sched(9, 4, 32);
        for (i, p) in prompts.iter().enumerate() {
            add(&mut small, i as u64, p.clone(), 12);
        }
        let got = run(&mut small);
        assert!(small.stats().num_preemptions > 0);
        assert_eq!(got, want);
        assert_eq!(small.num_free_blocks(), 9);
    }

    #[test]
    fn victim_is_least_urgent_then_newest() {
        let mut s = sched(4, 2, 64);
        add(&mut s, 1, vec![1, 2, 3], 4); // needs 3 blocks at its longest (6 tokens)
        add(&mut s, 2, vec![4], 4);
        let out = s.schedule().unwrap();
        assert_eq!(out.request_ids, vec![1, 2]);
        s.update(&[7, 7]).unwrap(); // 1 holds 2 blocks (4 tokens), 2 holds 1 block
        let out = s.schedule().unwrap(); // 1 fits in its block, 2 needs a 2nd block: the last free one
        s.update(&vec![7; out.sample_request_ids.len()]).unwrap();
        // Now 1 needs a 3rd block, none free: request 2 (newest) is preempted.
        let out = s.schedule().unwrap();
        assert_eq!(out.request_ids, vec![1]);
        assert_eq!(s.stats().num_preemptions, 1);
        assert_eq!(s.num_waiting(), 1);
        s.check_invariants().unwrap();
    }

    #[test]
    fn prefix_hits_are_counted_and_leave_one_token() {
        let mut s = sched(64, 4, 64);
        let prompt: Vec<i64> = (0..9).collect();
        add(&mut s, 1, prompt.clone(), 1);
        run(&mut s);
        assert_eq!(s.stats().prefix_cache_queries, 9);
        assert_eq!(s.stats().num_cached_blocks, 2);
        // Same 9-token prompt: floor(8/4) = 2 blocks hit, 1 token computed.
        add(&mut s, 2, prompt.clone(), 1);
        let out = s.schedule().unwrap();
        assert_eq!(out.positions, vec![8]);
        assert_eq!(out.num_prefill_tokens, 1);
        s.update(&[1]).unwrap();
        // An 8-token prompt: floor(7/4) = 1 block hit, 4 tokens computed.
        add(&mut s, 3, prompt[..8].to_vec(), 1);
        let out = s.schedule().unwrap();
        assert_eq!(out.positions, vec![4, 5, 6, 7]);
        s.update(&[1]).unwrap();
        let st = s.stats();
        assert_eq!(
            (st.prefix_cache_queries, st.prefix_cache_hits),
            (9 + 9 + 8, 8 + 4)
        );
    }

    #[test]
    fn generated_tokens_are_cached_too() {
        let mut s = sched(64, 4, 64);
        add(&mut s, 1, vec![1, 2, 3], 6);
        let out = run(&mut s);
        // KV of 3 + 6 - 1 = 8 tokens computed: 2 full blocks cached, the 2nd one mostly generated.
        assert_eq!(s.stats().num_cached_blocks, 2);
        let mut again = vec![1, 2, 3];
        again.extend(out[&1].iter().map(|&t| t as i64));
        add(&mut s, 2, again, 1);
        let step = s.schedule().unwrap();
        assert_eq!(step.positions, vec![8]);
    }

    #[test]
    fn abort_running_frees_blocks_and_skips_its_token() {
        let mut s = sched(16, 4, 64);
        add(&mut s, 1, (0..10).collect(), 5);
        add(&mut s, 2, (0..3).collect(), 5);
        let out = s.schedule().unwrap();
        assert_eq!(out.sample_request_ids, vec![1, 2]);
        assert!(s.abort(1));
        let finished = s.update(&[3, 3]).unwrap();
        assert!(finished.is_empty());
        assert_eq!(s.num_running(), 1);
        assert_eq!(s.output_token_ids(2).unwrap(), &[3]);
        s.check_invariants().unwrap();
        assert!(s.abort(2));
        assert_eq!(s.num_free_blocks(), 16);
    }

    #[test]
    fn stop_tokens_and_max_num_seqs() {
        let mut s = Scheduler::new(SchedulerConfig {
            num_blocks: 32,
            placement: KvPlacement::default(),
            block_size: 4,
            max_num_seqs: 1,
            max_num_batched_tokens: 64,
            max_model_len: 64,
            enable_prefix_caching: false,
        })
        .unwrap();
        let r = NewRequest {
            request_id: 1,
            prompt_token_ids: vec![1],
            max_tokens: 9,
            eos_token_id: Some(0),
            ..Default::default()
        };
        s.add_request(r).unwrap();
        let r = NewRequest {
            request_id: 2,
            prompt_token_ids: vec![1],
            max_tokens: 9,
            stop_token_ids: vec![5],
            ..Default::default()
        };
        s.add_request(r).unwrap();
        assert_eq!(s.schedule().unwrap().request_ids, vec![1]);
        assert_eq!(s.update(&[0]).unwrap(), vec![(1, FinishReason::Stop)]);
        assert_eq!(s.schedule().unwrap().request_ids, vec![2]);
        assert_eq!(s.update(&[4]).unwrap(), vec![]);
        s.schedule().unwrap();
        assert_eq!(s.update(&[5]).unwrap(), vec![(2, FinishReason::Stop)]);
        assert_eq!(s.stats().prefix_cache_queries, 0);
    }

    #[test]
    fn priority_orders_admission() {
        let mut s = sched(64, 4, 4);
        add(&mut s, 1, vec![1; 4], 1);
        s.add_request(NewRequest {
            request_id: 2,
            prompt_token_ids: vec![2; 4],
            max_tokens: 1,
            priority: -1,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(s.schedule().unwrap().request_ids, vec![2]);
    }
}
