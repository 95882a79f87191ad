//! Prefix blocks handed from one engine to another (disaggregated prefill and decode).
//!
//! Prefill side: [`Scheduler::pin_prefix`] holds the cached full blocks of a prompt under a
//! transfer id, so no allocation can evict them while a decode engine copies their KV;
//! [`Scheduler::unpin`] lets them go (they stay cached, as any finished request's blocks do).
//!
//! Decode side: [`Scheduler::cached_prefix_blocks`] says how many leading blocks of a prompt it
//! already holds, so only the others travel; [`Scheduler::import_prefix`] registers the blocks
//! that arrived after those in its own prefix cache and pins them until the caller has written
//! their KV and unpins; the request added next finds them as ordinary prefix hits. Whatever goes
//! wrong on the way (evictions meanwhile, no free blocks) imports less, never a wrong block: the
//! request then computes what is missing.
//!
//! The pins are owned here, keyed by transfer id: released by `unpin`, counted as owners by
//! `check_invariants`.

use crate::block_pool::{extend_block_hashes, BlockId, CacheCursor};
use crate::error::{check_in_range, CoreError, CoreResult};
use crate::request::{check_token_ids, TokenId};
use crate::scheduler::Scheduler;

/// Blocks registered by [`Scheduler::import_prefix`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportedBlocks {
    /// Index in the prompt of the first imported block.
    pub first: usize,
    /// The blocks, for prompt blocks `first..first + blocks.len()`; their KV is the caller's to write.
    pub blocks: Vec<BlockId>,
}

fn tokens_of(token_ids: &[i64]) -> CoreResult<Vec<TokenId>> {
    check_in_range(
        || "len(token_ids)".into(),
        token_ids.len() as i128,
        1,
        i32::MAX as i128,
    )?;
    check_token_ids("token_ids", token_ids)?;
    Ok(token_ids.iter().map(|&t| t as TokenId).collect())
}

impl Scheduler {
    /// Chained hashes of the blocks of `tokens` a prefix hit may cover: (len - 1) / B, since
    /// at least one token is always computed.
    fn hit_hashes(&self, tokens: &[TokenId]) -> Vec<u64> {
        let mut hashes = Vec::new();
        let bs = self.config.block_size;
        extend_block_hashes(&mut hashes, tokens, bs, (tokens.len() - 1) / bs);
        hashes
    }

    /// The cached blocks of the longest prefix of `token_ids` this engine holds.
    pub fn cached_prefix_blocks(&self, token_ids: &[i64]) -> CoreResult<Vec<BlockId>> {
        let tokens = tokens_of(token_ids)?;
        let hashes = self.hit_hashes(&tokens);
        let mut hits = Vec::new();
        self.pool
            .find_cached_prefix(&hashes, &tokens, hashes.len(), &mut hits);
        Ok(hits)
    }

    fn check_new_transfer(&self, transfer_id: u64) -> CoreResult<()> {
        if self.pins.contains_key(&transfer_id) {
            return Err(CoreError::DuplicateTransfer { transfer_id });
        }
        Ok(())
    }

    /// Pins the cached prefix of `token_ids` under `transfer_id`; returns its blocks in order.
    pub fn pin_prefix(&mut self, transfer_id: u64, token_ids: &[i64]) -> CoreResult<Vec<BlockId>> {
        self.check_new_transfer(transfer_id)?;
        let blocks = self.cached_prefix_blocks(token_ids)?;
        for &b in &blocks {
            self.pool.take(b);
        }
        self.pins.insert(transfer_id, blocks.clone());
        Ok(blocks)
    }

    /// Registers prompt blocks `[have, have + count)` of `token_ids` in the prefix cache and
    /// pins them under `transfer_id` until [`Scheduler::unpin`]. `have` is what
    /// [`Scheduler::cached_prefix_blocks`] said before the transfer. Imports nothing if those
    /// `have` blocks are no longer all cached; starts later if more are cached now; stops at
    /// the free blocks there are.
    pub fn import_prefix(
        &mut self,
        transfer_id: u64,
        token_ids: &[i64],
        have: usize,
        count: usize,
    ) -> CoreResult<ImportedBlocks> {
        self.check_new_transfer(transfer_id)?;
        let tokens = tokens_of(token_ids)?;
        let hashes = self.hit_hashes(&tokens);
        if have + count > hashes.len() {
            let limit = format!(
                "<= {} (the prompt's blocks a prefix hit can use)",
                hashes.len()
            );
            return Err(CoreError::out_of_range(
                "have + count",
                limit,
                (have + count) as i128,
            ));
        }
        let mut hits = Vec::new();
        self.pool
            .find_cached_prefix(&hashes, &tokens, have + count, &mut hits);
        let mut imported = ImportedBlocks {
            first: hits.len(),
            blocks: Vec::new(),
        };
        if hits.len() < have {
            self.pins.insert(transfer_id, Vec::new());
            return Ok(imported);
        }
        for &b in &hits {
            self.pool.take(b); // off the free queue: allocating below must not evict the chain
        }
        let wanted = have + count - hits.len();
        while imported.blocks.len() < wanted {
            let Some(b) = self.pool.allocate(hits.len() + imported.blocks.len()) else {
                break;
            };
            imported.blocks.push(b);
        }
        let mut cursor = if hits.is_empty() {
            CacheCursor::default()
        } else {
            self.pool.cursor_after_hits(&hits)
        };
        let table: Vec<BlockId> = hits.iter().chain(&imported.blocks).copied().collect();
        self.pool
            .register_full_blocks(&mut cursor, &table, &hashes, &tokens, table.len());
        for &b in &hits {
            self.pool.free(b);
        }
        self.pins.insert(transfer_id, imported.blocks.clone());
        Ok(imported)
    }

    /// Releases a transfer's pins; false if `transfer_id` holds none.
    pub fn unpin(&mut self, transfer_id: u64) -> bool {
        match self.pins.remove(&transfer_id) {
            Some(blocks) => {
                self.pool.free_table(blocks);
                true
            }
            None => false,
        }
    }

    /// Releases a transfer's pins and drops its blocks from the prefix cache: for imported
    /// blocks whose KV could not be written. False if `transfer_id` holds none.
    pub fn discard(&mut self, transfer_id: u64) -> bool {
        match self.pins.remove(&transfer_id) {
            Some(blocks) => {
                for &b in &blocks {
                    self.pool.uncache(b);
                }
                self.pool.free_table(blocks);
                true
            }
            None => false,
        }
    }

    /// Transfers holding pins.
    pub fn num_pinned_transfers(&self) -> usize {
        self.pins.len()
    }
}

#[cfg(test)]
mod tests {
    use crate::scheduler::{NewRequest, Scheduler};
    use crate::scheduler_config::test_support::config;

    fn run_prompt(s: &mut Scheduler, id: u64, prompt: &[i64]) {
        s.add_request(NewRequest {
            request_id: id,
            prompt_token_ids: prompt.to_vec(),
            max_tokens: 1,
            stop_token_ids: Vec::new(),
            eos_token_id: None,
            ignore_eos: true,
            priority: 0,
        })
        .unwrap();
        while s.has_unfinished() {
            let out = s.schedule().unwrap();
            let n = out.sample_request_ids.len();
            s.update(&vec![7; n]).unwrap();
        }
    }

    fn prompt(len: usize, salt: i64) -> Vec<i64> {
        (0..len as i64).map(|i| (i * 31 + salt) % 1000).collect()
    }

    #[test]
    fn pinned_blocks_survive_any_allocation_and_unpin_returns_them() {
        let mut s = Scheduler::new(config(8, 4)).unwrap();
        let p = prompt(13, 1); // 3 blocks a hit can use
        run_prompt(&mut s, 1, &p);
        let pinned = s.pin_prefix(9, &p).unwrap();
        assert_eq!(pinned.len(), 3);
        assert!(s.pin_prefix(9, &p).is_err()); // a transfer id is used once
        run_prompt(&mut s, 2, &prompt(20, 2)); // needs 5 of the 5 unpinned blocks: evicts all else
        assert_eq!(s.cached_prefix_blocks(&p).unwrap(), pinned);
        s.check_invariants().unwrap();
        assert!(s.unpin(9) && !s.unpin(9));
        assert_eq!(s.num_free_blocks(), 8);
        s.check_invariants().unwrap();
    }

    #[test]
    fn import_registers_only_missing_blocks_and_requests_hit_them() {
        let mut s = Scheduler::new(config(16, 4)).unwrap();
        let p = prompt(17, 3); // 4 hit blocks
        run_prompt(&mut s, 1, &p[..9]); // caches block 0 and 1
        assert_eq!(s.cached_prefix_blocks(&p).unwrap().len(), 2);
        let got = s.import_prefix(5, &p, 2, 2).unwrap();
        assert_eq!((got.first, got.blocks.len()), (2, 2));
        s.check_invariants().unwrap();
        assert!(s.unpin(5));
        let cached = s.cached_prefix_blocks(&p).unwrap();
        assert_eq!(&cached[2..], &got.blocks[..]);
        let (queries, hits) = s.pool.cache_counters();
        run_prompt(&mut s, 2, &p);
        let (queries2, hits2) = s.pool.cache_counters();
        assert_eq!((queries2 - queries, hits2 - hits), (17, 16));
        s.check_invariants().unwrap();
        assert!(s.import_prefix(6, &p, 3, 2).is_err()); // past the blocks a hit can use
    }

    #[test]
    fn a_discarded_import_leaves_nothing_cached() {
        let mut s = Scheduler::new(config(8, 4)).unwrap();
        let p = prompt(13, 6);
        let got = s.import_prefix(1, &p, 0, 3).unwrap();
        assert_eq!(got.blocks.len(), 3);
        assert_eq!(s.cached_prefix_blocks(&p).unwrap().len(), 3);
        assert!(s.discard(1) && !s.discard(1));
        assert!(s.cached_prefix_blocks(&p).unwrap().is_empty());
        assert_eq!(s.num_free_blocks(), 8);
        s.check_invariants().unwrap();
    }

    #[test]
    fn import_after_an_eviction_imports_nothing_and_a_full_pool_imports_less() {
        let mut s = Scheduler::new(config(6, 4)).unwrap();
        let p = prompt(21, 4); // 5 hit blocks
        run_prompt(&mut s, 1, &p[..5]); // caches block 0
        run_prompt(&mut s, 2, &prompt(24, 5)); // evicts it
        let got = s.import_prefix(1, &p, 1, 4).unwrap();
        assert!(got.blocks.is_empty());
        assert!(s.unpin(1));
        s.pin_prefix(2, &prompt(24, 5)).unwrap(); // 5 blocks pinned: 1 free
        let got = s.import_prefix(3, &p, 0, 5).unwrap();
        assert_eq!((got.first, got.blocks.len()), (0, 1));
        s.check_invariants().unwrap();
        assert!(s.unpin(2) && s.unpin(3));
        assert_eq!(s.num_free_blocks(), 6);
        assert_eq!(s.num_pinned_transfers(), 0);
    }
}
