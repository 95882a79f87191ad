//! Continuous batching: request admission, the per-step bookkeeping after sampling, finishing.
//! The step itself (`schedule`) lives in `schedule_step.rs`.
//!
//! Requests live in a slab (`slots`) so the hot loops index instead of hashing ids; a request is
//! named internally by (slot, arrival), and arrival numbers are never reused, so a stale handle
//! to a finished request can never reach a newer request in the same slot.

use std::collections::{BTreeMap, HashMap};

use crate::block_pool::{extend_block_hashes, BlockId, BlockPool};
use crate::error::{check_at_least, check_in_range, CoreError, CoreResult};
use crate::request::{FinishReason, Request, RequestStatus, TokenId, MAX_TOKEN_ID};
pub use crate::scheduler_config::{NewRequest, SchedulerConfig, SchedulerStats};

/// Internal handle of a live request: (slot, arrival).
pub(crate) type Handle = (usize, u64);

/// The continuous-batching scheduler (semantics: module docs here and in `schedule_step.rs`,
/// and the `Scheduler` docstrings in `python/expertmesh/_core.pyi`).
#[derive(Debug)]
pub struct Scheduler {
    /// Limits.
    pub(crate) config: SchedulerConfig,
    /// KV blocks and prefix cache.
    pub(crate) pool: BlockPool,
    /// Live requests by slot.
    pub(crate) slots: Vec<Option<Request>>,
    /// Empty slots to reuse.
    pub(crate) free_slots: Vec<usize>,
    /// request id -> slot of every live request.
    pub(crate) index: HashMap<u64, usize>,
    /// Waiting requests by (priority, arrival) -> slot.
    pub(crate) waiting: BTreeMap<(i64, u64), usize>,
    /// Running request slots, sorted by (priority, arrival): the last one is the preemption victim.
    pub(crate) running: Vec<usize>,
    /// Next arrival number.
    pub(crate) next_arrival: u64,
    /// Preemptions so far.
    pub(crate) num_preemptions: u64,
    /// Requests computed in the last step; `update()` caches their newly full blocks.
    pub(crate) last_scheduled: Vec<Handle>,
    /// Requests that sample in the last step, in `sample_request_ids` order.
    pub(crate) last_sampled: Vec<Handle>,
    /// The last step still needs its `update()`.
    pub(crate) pending_update: bool,
    /// Generated tokens of requests finished since the last `schedule()`.
    pub(crate) recently_finished: HashMap<u64, Vec<TokenId>>,
    /// Per slot: tokens scheduled in the step being built (0 = not scheduled).
    pub(crate) step_tokens: Vec<usize>,
    /// Per slot: preempted during the step being built (not re-admitted in the same step).
    pub(crate) step_preempted: Vec<bool>,
    /// Slots preempted in the step being built (to clear `step_preempted`).
    pub(crate) preempted_this_step: Vec<usize>,
    /// The step being built: (slot, new tokens), in batch order.
    pub(crate) decisions: Vec<(usize, usize)>,
    /// Token budget left in the step being built.
    pub(crate) budget: usize,
    /// Scratch for prefix-cache hits.
    pub(crate) hit_scratch: Vec<u32>,
    /// Blocks pinned per KV transfer id (kv_transfer.rs): owners besides the requests.
    pub(crate) pins: HashMap<u64, Vec<BlockId>>,
}

impl Scheduler {
    /// A scheduler with an empty queue and all blocks free.
    pub fn new(config: SchedulerConfig) -> CoreResult<Self> {
        check_at_least("max_num_seqs", config.max_num_seqs as i128, 1)?;
        check_at_least(
            "max_num_batched_tokens",
            config.max_num_batched_tokens as i128,
            1,
        )?;
        check_in_range(
            || "max_model_len".into(),
            config.max_model_len as i128,
            1,
            i32::MAX as i128,
        )?;
        check_in_range(
            || "num_blocks".into(),
            config.num_blocks as i128,
            1,
            i32::MAX as i128,
        )?;
        let pool = BlockPool::with_placement(
            config.num_blocks,
            config.block_size,
            config.enable_prefix_caching,
            config.placement,
        )?;
        Ok(Scheduler {
            config,
            pool,
            slots: Vec::new(),
            free_slots: Vec::new(),
            index: HashMap::new(),
            waiting: BTreeMap::new(),
            running: Vec::new(),
            next_arrival: 0,
            num_preemptions: 0,
            last_scheduled: Vec::new(),
            last_sampled: Vec::new(),
            pending_update: false,
            recently_finished: HashMap::new(),
            step_tokens: Vec::new(),
            step_preempted: Vec::new(),
            preempted_this_step: Vec::new(),
            decisions: Vec::new(),
            budget: 0,
            hit_scratch: Vec::new(),
            pins: HashMap::new(),
        })
    }

    /// The limits this scheduler was built with.
    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    /// Validates and queues a request.
    pub fn add_request(&mut self, new: NewRequest) -> CoreResult<()> {
        if self.index.contains_key(&new.request_id) {
            return Err(CoreError::DuplicateRequest {
                request_id: new.request_id,
            });
        }
        let arrival = self.next_arrival;
        let request = new.into_request(&self.config, arrival)?;
        self.next_arrival += 1;
        let slot = match self.free_slots.pop() {
            Some(s) => {
                self.slots[s] = Some(request);
                s
            }
            None => {
                self.slots.push(Some(request));
                self.step_tokens.push(0);
                self.step_preempted.push(false);
                self.slots.len() - 1
            }
        };
        let (id, key) = (self.req(slot).id, self.req(slot).urgency_key());
        self.index.insert(id, slot);
        self.waiting.insert(key, slot);
        Ok(())
    }

    pub(crate) fn req(&self, slot: usize) -> &Request {
        self.slots[slot].as_ref().expect("live slot")
    }

    pub(crate) fn req_mut(&mut self, slot: usize) -> &mut Request {
        self.slots[slot].as_mut().expect("live slot")
    }

    /// True if the handle still names the same live request.
    pub(crate) fn is_live(&self, (slot, arrival): Handle) -> bool {
        matches!(&self.slots[slot], Some(r) if r.arrival == arrival)
    }

    /// Position of a running slot in `running` (binary search by urgency).
    pub(crate) fn running_pos(&self, slot: usize) -> usize {
        let key = self.req(slot).urgency_key();
        let pos = self
            .running
            .partition_point(|&s| self.req(s).urgency_key() < key);
        debug_assert_eq!(self.running[pos], slot);
        pos
    }

    /// Consumes the last step's sampled tokens (one per `sample_request_ids` entry, same order):
    /// caches newly computed full blocks, appends the tokens, stops finished requests.
    /// Returns the requests that finished, with reason "stop" or "length".
    pub fn update(&mut self, sampled_token_ids: &[i64]) -> CoreResult<Vec<(u64, FinishReason)>> {
        if sampled_token_ids.len() != self.last_sampled.len() {
            return Err(CoreError::SampleCountMismatch {
                expected: self.last_sampled.len(),
                got: sampled_token_ids.len(),
            });
        }
        for (i, &t) in sampled_token_ids.iter().enumerate() {
            check_in_range(
                || format!("sampled_token_ids[{i}]"),
                t.into(),
                0,
                MAX_TOKEN_ID.into(),
            )?;
        }
        let scheduled = std::mem::take(&mut self.last_scheduled);
        if self.pool.caching_enabled() {
            for &h in &scheduled {
                if self.is_live(h) {
                    self.cache_computed_blocks(h.0);
                }
            }
        }
        self.last_scheduled = scheduled;
        self.last_scheduled.clear();
        let mut finished = Vec::new();
        let sampled = std::mem::take(&mut self.last_sampled);
        for (&h, &token) in sampled.iter().zip(sampled_token_ids) {
            if !self.is_live(h) {
                continue; // finished by the caller between schedule() and update()
            }
            if let Some(reason) = self.req_mut(h.0).append_and_check_stop(token as TokenId) {
                finished.push((self.req(h.0).id, reason));
                self.finish_slot(h.0, reason);
            }
        }
        self.last_sampled = sampled;
        self.last_sampled.clear();
        self.pending_update = false;
        Ok(finished)
    }

    /// Offers a request's full computed blocks to the prefix cache (hashing each block once).
    fn cache_computed_blocks(&mut self, slot: usize) {
        let bs = self.config.block_size;
        let req = self.slots[slot].as_mut().expect("live slot");
        let num_full = req.num_computed_tokens / bs;
        if num_full <= req.cache_cursor.offered {
            return;
        }
        extend_block_hashes(&mut req.block_hashes, &req.token_ids, bs, num_full);
        self.pool.register_full_blocks(
            &mut req.cache_cursor,
            &req.blocks,
            &req.block_hashes,
            &req.token_ids,
            num_full,
        );
    }

    /// Ends a request in any state; frees its blocks tail-first. False if the id is unknown.
    pub fn finish_request(&mut self, request_id: u64, reason: FinishReason) -> bool {
        match self.index.get(&request_id) {
            Some(&slot) => {
                self.finish_slot(slot, reason);
                true
            }
            None => false,
        }
    }

    /// `finish_request(id, Abort)`.
    pub fn abort(&mut self, request_id: u64) -> bool {
        self.finish_request(request_id, FinishReason::Abort)
    }

    fn finish_slot(&mut self, slot: usize, _reason: FinishReason) {
        match self.req(slot).status {
            RequestStatus::Running => {
                let pos = self.running_pos(slot);
                self.running.remove(pos);
            }
            RequestStatus::Waiting => {
                let key = self.req(slot).urgency_key();
                self.waiting.remove(&key);
            }
        }
        let mut req = self.slots[slot].take().expect("live slot");
        self.pool.free_table(std::mem::take(&mut req.blocks));
        self.index.remove(&req.id);
        self.free_slots.push(slot);
        let output = req.token_ids.split_off(req.num_prompt_tokens);
        self.recently_finished.insert(req.id, output);
    }

    /// Generated tokens of a live request, or of one finished since the last `schedule()`.
    pub fn output_token_ids(&self, request_id: u64) -> CoreResult<&[TokenId]> {
        if let Some(&slot) = self.index.get(&request_id) {
            return Ok(self.req(slot).output_token_ids());
        }
        self.recently_finished
            .get(&request_id)
            .map(Vec::as_slice)
            .ok_or(CoreError::UnknownRequest { request_id })
    }

    /// Any request not finished yet.
    pub fn has_unfinished(&self) -> bool {
        !self.index.is_empty()
    }
    /// Requests waiting (including preempted ones).
    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }
    /// Requests running (holding blocks).
    pub fn num_running(&self) -> usize {
        self.running.len()
    }
    /// Blocks with no owner.
    pub fn num_free_blocks(&self) -> usize {
        self.pool.num_free_blocks()
    }
    /// Blocks in the pool.
    pub fn num_blocks(&self) -> usize {
        self.pool.num_blocks()
    }
    /// KV blocks each CP rank holds (all of them without context parallelism).
    pub fn blocks_per_rank(&self) -> usize {
        self.pool.blocks_per_rank()
    }

    /// Counters for monitoring.
    pub fn stats(&self) -> SchedulerStats {
        let (queries, hits) = self.pool.cache_counters();
        SchedulerStats {
            prefix_cache_queries: queries,
            prefix_cache_hits: hits,
            num_preemptions: self.num_preemptions,
            num_free_blocks: self.pool.num_free_blocks() as u64,
            num_cached_blocks: self.pool.num_cached_blocks() as u64,
        }
    }

    /// Checks that block ownership matches the requests (O(all blocks); for tests).
    pub fn check_invariants(&self) -> Result<(), String> {
        self.pool.check_invariants()?;
        let mut owners = vec![0u32; self.pool.num_blocks()];
        for req in self.slots.iter().flatten() {
            let want = req.num_computed_tokens.div_ceil(self.config.block_size);
            if req.status == RequestStatus::Waiting && !req.blocks.is_empty() {
                return Err(format!("waiting request {} holds blocks", req.id));
            }
            if req.status == RequestStatus::Running && req.blocks.len() < want {
                return Err(format!(
                    "request {} computed {} tokens in {} blocks",
                    req.id,
                    req.num_computed_tokens,
                    req.blocks.len()
                ));
            }
            for (index, &b) in req.blocks.iter().enumerate() {
                owners[b as usize] += 1;
                let want_rank = self.config.placement.rank_of(index);
                if self.pool.rank_of_block(b) != want_rank {
                    return Err(format!(
                        "request {}: block {index} is {b} on CP rank {}, placement says {want_rank}",
                        req.id,
                        self.pool.rank_of_block(b)
                    ));
                }
            }
        }
        for &b in self.pins.values().flatten() {
            owners[b as usize] += 1;
        }
        for (b, &n) in owners.iter().enumerate() {
            if self.pool.ref_count(b as u32) != n {
                return Err(format!(
                    "block {b}: ref count {} but {n} owners",
                    self.pool.ref_count(b as u32)
                ));
            }
        }
        if self.running.len() + self.waiting.len() != self.index.len() {
            return Err("running + waiting != live requests".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduler_config::test_support::{config, new_request};

    #[test]
    fn rejects_bad_config() {
        let mut c = config(4, 4);
        c.max_num_seqs = 0;
        assert_eq!(
            Scheduler::new(c).unwrap_err().to_string(),
            "max_num_seqs must be >= 1, got 0"
        );
        assert!(Scheduler::new(config(0, 4)).is_err());
        assert!(Scheduler::new(config(4, 0)).is_err());
    }

    #[test]
    fn abort_waiting_and_unknown() {
        let mut s = Scheduler::new(config(4, 4)).unwrap();
        s.add_request(new_request(1, 3, 2)).unwrap();
        assert!(s.abort(1));
        assert!(!s.abort(1));
        assert!(!s.has_unfinished());
        assert_eq!(s.output_token_ids(1).unwrap(), &[] as &[u32]);
        s.check_invariants().unwrap();
        // The id can be reused once finished.
        s.add_request(new_request(1, 3, 2)).unwrap();
    }
}
