//! Paged KV blocks with reference counts and a prefix cache.
//!
//! A full block is cached under a chained hash of (parent hash, its tokens). Blocks whose ref
//! count drops to 0 go to the back of an LRU free queue and keep their hash, so a later request
//! with the same prefix can take them back; allocation pops the least recently freed block and
//! only then evicts its hash. A hit is trusted only after checking the block's stored tokens and
//! that its parent is the block matched just before it (same id, same allocation generation), so
//! a 64-bit hash collision can never hand out KV computed for other tokens.
//!
//! Under context parallelism the pool is split into equal runs of block ids, one per CP rank
//! (each rank's KV cache holds only its run), with one free queue each: block `index` of a
//! sequence is allocated from the run of the rank [`KvPlacement`] gives it. A prefix hit
//! needs no care: a chained hash fixes the block's index, so the cached block is on the
//! right rank already.

use crate::block_hash::HashToBlock;
pub use crate::block_hash::{extend_block_hashes, hash_block, BlockHash, BlockId, ROOT_HASH};
use crate::error::{check_at_least, CoreError, CoreResult};
use crate::free_queue::FreeQueue;
pub use crate::kv_placement::KvPlacement;
use crate::request::TokenId;

/// A cached block as of one allocation: stale once the block is reallocated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CachedRef {
    /// The block.
    pub block: BlockId,
    /// Its allocation generation when it was referenced.
    pub generation: u32,
}

/// How far one request's blocks have been offered to the prefix cache.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheCursor {
    /// Leading full blocks already offered.
    pub offered: usize,
    /// The cached block that stands for the last offered block (None before the first).
    pub tail: Option<CachedRef>,
    /// A hash collision stopped the chain: later blocks of this request are never cached.
    pub broken: bool,
}

/// Bookkeeping of one block.
#[derive(Debug, Clone)]
struct BlockMeta {
    /// Owners; 0 means the block sits in the free queue.
    ref_count: u32,
    /// Hash the block is cached under, if any (kept while free, until reallocation).
    hash: Option<BlockHash>,
    /// Parent block (as cached when this one was registered); None for a first block.
    parent: Option<CachedRef>,
    /// Bumped on every allocation so stale parent references stop matching.
    generation: u32,
}

/// The KV block pool. See the module docs.
#[derive(Debug, Clone)]
pub struct BlockPool {
    /// Tokens per block.
    block_size: usize,
    /// Whether full blocks are cached by hash.
    enable_caching: bool,
    /// Per-block state, indexed by `BlockId`.
    meta: Vec<BlockMeta>,
    /// `[NB * B]` tokens of each cached block, to verify hits.
    cached_tokens: Vec<TokenId>,
    /// Hash -> cached block.
    cache: HashToBlock,
    /// Which CP rank holds each block index of a sequence.
    placement: KvPlacement,
    /// Block ids per CP rank: rank r holds ids [r * per_rank, (r + 1) * per_rank).
    per_rank: usize,
    /// Per CP rank: its blocks with ref count 0 (as ids within the rank's run), least
    /// recently freed first.
    free: Vec<FreeQueue>,
    /// Tokens looked up in the prefix cache.
    queries: u64,
    /// Tokens found in the prefix cache.
    hits: u64,
}

impl BlockPool {
    /// A pool of `num_blocks` free blocks of `block_size` tokens, all on one rank.
    pub fn new(num_blocks: usize, block_size: usize, enable_caching: bool) -> CoreResult<Self> {
        Self::with_placement(
            num_blocks,
            block_size,
            enable_caching,
            KvPlacement::default(),
        )
    }

    /// A pool of `num_blocks` free blocks split evenly over `placement.cp_size` ranks.
    pub fn with_placement(
        num_blocks: usize,
        block_size: usize,
        enable_caching: bool,
        placement: KvPlacement,
    ) -> CoreResult<Self> {
        check_at_least("num_blocks", num_blocks as i128, 1)?;
        check_at_least("block_size", block_size as i128, 1)?;
        check_at_least("context_parallel_size", placement.cp_size as i128, 1)?;
        if !num_blocks.is_multiple_of(placement.cp_size) {
            let limit = format!("a multiple of context_parallel_size {}", placement.cp_size);
            return Err(CoreError::out_of_range(
                "num_blocks",
                limit,
                num_blocks as i128,
            ));
        }
        if num_blocks > FreeQueue::MAX_BLOCKS {
            let limit = format!("<= {}", FreeQueue::MAX_BLOCKS);
            return Err(CoreError::out_of_range(
                "num_blocks",
                limit,
                num_blocks as i128,
            ));
        }
        let meta = vec![
            BlockMeta {
                ref_count: 0,
                hash: None,
                parent: None,
                generation: 0
            };
            num_blocks
        ];
        let cached_tokens = if enable_caching {
            vec![0; num_blocks * block_size]
        } else {
            Vec::new()
        };
        Ok(BlockPool {
            block_size,
            enable_caching,
            meta,
            cached_tokens,
            cache: HashToBlock::default(),
            placement,
            per_rank: num_blocks / placement.cp_size,
            free: (0..placement.cp_size)
                .map(|_| FreeQueue::full(num_blocks / placement.cp_size))
                .collect(),
            queries: 0,
            hits: 0,
        })
    }

    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }
    /// Blocks in the pool.
    pub fn num_blocks(&self) -> usize {
        self.meta.len()
    }
    /// Blocks with ref count 0 (cached or not), on every rank; all of them can be allocated.
    pub fn num_free_blocks(&self) -> usize {
        self.free.iter().map(FreeQueue::len).sum()
    }
    /// Where each block index of a sequence is allocated.
    pub fn placement(&self) -> KvPlacement {
        self.placement
    }
    /// Blocks each CP rank holds.
    pub fn blocks_per_rank(&self) -> usize {
        self.per_rank
    }
    /// The CP rank whose KV cache holds `block`.
    pub fn rank_of_block(&self, block: BlockId) -> usize {
        block as usize / self.per_rank
    }

    /// Whether blocks [lo, hi) of a sequence can be allocated now, leaving alone the free
    /// blocks in `reserved` (cached blocks about to be taken).
    pub fn fits(&self, lo: usize, hi: usize, reserved: &[BlockId]) -> bool {
        (0..self.placement.cp_size).all(|r| {
            let held = reserved
                .iter()
                .filter(|&&b| self.rank_of_block(b) == r && self.ref_count(b) == 0)
                .count();
            self.placement.count_on(r, lo, hi) + held <= self.free[r].len()
        })
    }
    /// Blocks currently findable by hash.
    pub fn num_cached_blocks(&self) -> usize {
        self.cache.len()
    }
    /// Whether prefix caching is on.
    pub fn caching_enabled(&self) -> bool {
        self.enable_caching
    }
    /// Owners of `block`.
    pub fn ref_count(&self, block: BlockId) -> u32 {
        self.meta[block as usize].ref_count
    }
    /// (tokens looked up, tokens hit) since creation.
    pub fn cache_counters(&self) -> (u64, u64) {
        (self.queries, self.hits)
    }
    /// Adds one prefix lookup to the counters.
    pub fn record_lookup(&mut self, query_tokens: usize, hit_tokens: usize) {
        self.queries += query_tokens as u64;
        self.hits += hit_tokens as u64;
    }

    /// Takes the least recently freed block for block `index` of a sequence from the rank
    /// that holds that index (evicting its cached hash), or None if all of that rank's are owned.
    pub fn allocate(&mut self, index: usize) -> Option<BlockId> {
        let rank = self.placement.rank_of(index);
        let b = self.free[rank].pop_front()? + (rank * self.per_rank) as BlockId;
        let m = &mut self.meta[b as usize];
        if let Some(h) = m.hash.take() {
            // A block carries a hash only while the cache maps that hash to it.
            self.cache.remove(&h);
        }
        m.parent = None;
        m.generation = m.generation.wrapping_add(1);
        m.ref_count = 1;
        Some(b)
    }

    /// Adds an owner to a cached block found by [`BlockPool::find_cached_prefix`].
    pub fn take(&mut self, block: BlockId) {
        if self.meta[block as usize].ref_count == 0 {
            let rank = self.rank_of_block(block);
            self.free[rank].remove(block - (rank * self.per_rank) as BlockId);
        }
        self.meta[block as usize].ref_count += 1;
    }

    /// Drops one owner; at 0 the block goes to the back of the free queue, keeping its hash.
    pub fn free(&mut self, block: BlockId) {
        let m = &mut self.meta[block as usize];
        assert!(m.ref_count > 0, "block {block} freed with ref count 0");
        m.ref_count -= 1;
        if m.ref_count == 0 {
            let rank = block as usize / self.per_rank;
            self.free[rank].push_back(block - (rank * self.per_rank) as BlockId);
        }
    }

    /// Drops `block` from the prefix cache: its KV is not what its hash says.
    pub fn uncache(&mut self, block: BlockId) {
        let m = &mut self.meta[block as usize];
        if let Some(h) = m.hash.take() {
            self.cache.remove(&h);
        }
        m.parent = None;
    }

    /// Frees a request's whole block table, tail first, so its prefix stays cached longest.
    pub fn free_table(&mut self, table: Vec<BlockId>) {
        for &b in table.iter().rev() {
            self.free(b);
        }
    }

    fn reference(&self, block: BlockId) -> CachedRef {
        CachedRef {
            block,
            generation: self.meta[block as usize].generation,
        }
    }

    fn tokens_of(&self, block: BlockId) -> &[TokenId] {
        let start = block as usize * self.block_size;
        &self.cached_tokens[start..start + self.block_size]
    }

    /// True if `block` holds exactly `tokens` and was computed right after `parent`.
    fn verifies(&self, block: BlockId, parent: Option<CachedRef>, tokens: &[TokenId]) -> bool {
        let m = &self.meta[block as usize];
        let parent_ok = match (m.parent, parent) {
            (None, None) => true,
            (Some(p), Some(q)) => p == q && self.meta[p.block as usize].generation == p.generation,
            _ => false,
        };
        parent_ok && self.tokens_of(block) == tokens
    }

    /// Appends to `out` the cached blocks for the longest verified prefix of `tokens`, at most
    /// `max_blocks` blocks. `hashes` are the chained hashes of the full blocks of `tokens`.
    /// Takes no ownership (see [`BlockPool::take`]).
    pub fn find_cached_prefix(
        &self,
        hashes: &[BlockHash],
        tokens: &[TokenId],
        max_blocks: usize,
        out: &mut Vec<BlockId>,
    ) {
        if !self.enable_caching {
            return;
        }
        let mut parent = None;
        for (i, h) in hashes.iter().take(max_blocks).enumerate() {
            let Some(&b) = self.cache.get(h) else { break };
            let block_tokens = &tokens[i * self.block_size..(i + 1) * self.block_size];
            if !self.verifies(b, parent, block_tokens) {
                break;
            }
            out.push(b);
            parent = Some(self.reference(b));
        }
    }

    /// Cursor for a request whose first `hits` blocks came from the cache (`hits` non-empty).
    pub fn cursor_after_hits(&self, hits: &[BlockId]) -> CacheCursor {
        CacheCursor {
            offered: hits.len(),
            tail: hits.last().map(|&b| self.reference(b)),
            broken: false,
        }
    }

    /// Offers a request's computed full blocks `[cursor.offered, num_full)` to the cache.
    /// `blocks`, `hashes` and `tokens` are the request's block table, block hashes and tokens.
    /// A block whose hash is already cached by another (verified equal) block is left uncached
    /// and the cached one stands for it; a collision stops the chain for this request.
    pub fn register_full_blocks(
        &mut self,
        cursor: &mut CacheCursor,
        blocks: &[BlockId],
        hashes: &[BlockHash],
        tokens: &[TokenId],
        num_full: usize,
    ) {
        if !self.enable_caching {
            return;
        }
        let bs = self.block_size;
        while cursor.offered < num_full && !cursor.broken {
            let i = cursor.offered;
            let (b, h, block_tokens) = (blocks[i], hashes[i], &tokens[i * bs..(i + 1) * bs]);
            let canonical = match self.cache.get(&h) {
                Some(&c) if c == b => Some(c),
                Some(&c) => self.verifies(c, cursor.tail, block_tokens).then_some(c),
                None => {
                    let m = &mut self.meta[b as usize];
                    debug_assert!(m.hash.is_none(), "block {b} registered twice");
                    m.hash = Some(h);
                    m.parent = cursor.tail;
                    self.cached_tokens[b as usize * bs..(b as usize + 1) * bs]
                        .copy_from_slice(block_tokens);
                    self.cache.insert(h, b);
                    Some(b)
                }
            };
            match canonical {
                Some(c) => cursor.tail = Some(self.reference(c)),
                None => cursor.broken = true,
            }
            cursor.offered += 1;
        }
    }

    /// Checks every internal invariant; for tests. Returns a description of the first violation.
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut queued = vec![false; self.meta.len()];
        for (rank, free) in self.free.iter().enumerate() {
            for local in free.walk()? {
                let b = rank * self.per_rank + local as usize;
                if std::mem::replace(&mut queued[b], true) {
                    return Err(format!("block {b} is in the free queue twice"));
                }
            }
        }
        for (i, m) in self.meta.iter().enumerate() {
            if queued[i] != (m.ref_count == 0) {
                return Err(format!(
                    "block {i}: in free queue = {}, ref count = {}",
                    queued[i], m.ref_count
                ));
            }
            if let Some(h) = m.hash {
                if self.cache.get(&h) != Some(&(i as u32)) {
                    return Err(format!(
                        "block {i} claims hash {h:#x} but the cache disagrees"
                    ));
                }
            }
        }
        for (h, &blk) in &self.cache {
            if self.meta[blk as usize].hash != Some(*h) {
                return Err(format!(
                    "cache entry {h:#x} -> block {blk} whose hash differs"
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
