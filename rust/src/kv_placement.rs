//! Which context-parallel (CP) rank holds each KV block of a sequence.
//!
//! Placement is by the block's index in its sequence, so it never changes while a sequence
//! grows. The first `first_blocks` blocks of every sequence live on CP rank 0 (short requests
//! run there alone, with ordinary attention); after them blocks go round in periods of 2N:
//! offset j = (index - first_blocks) mod 2N goes to rank j for j < N and to rank 2N-1-j
//! otherwise -- the zigzag that balances causal work, since rank i holds pieces i and 2N-1-i
//! of every 2N. The pool gives each rank an equal run of block ids, so a block id names its
//! rank; the model runner reads placement off the ids and never recomputes this rule.

/// Where a sequence's KV blocks live when a replica's KV cache is split over CP ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvPlacement {
    /// CP ranks the cache is split over (1: one rank holds every block).
    pub cp_size: usize,
    /// Leading blocks of every sequence that CP rank 0 holds before the zigzag starts.
    pub first_blocks: usize,
}

impl Default for KvPlacement {
    fn default() -> Self {
        KvPlacement {
            cp_size: 1,
            first_blocks: 0,
        }
    }
}

impl KvPlacement {
    /// The CP rank holding block `index` of a sequence.
    pub fn rank_of(&self, index: usize) -> usize {
        if self.cp_size == 1 || index < self.first_blocks {
            return 0;
        }
        let j = (index - self.first_blocks) % (2 * self.cp_size);
        if j < self.cp_size {
            j
        } else {
            2 * self.cp_size - 1 - j
        }
    }

    /// Blocks with a sequence index in [lo, hi) that CP rank `rank` holds.
    pub fn count_on(&self, rank: usize, lo: usize, hi: usize) -> usize {
        if lo >= hi {
            return 0;
        }
        if self.cp_size == 1 {
            return if rank == 0 { hi - lo } else { 0 };
        }
        let m = self.first_blocks;
        let head = if rank == 0 {
            hi.min(m).saturating_sub(lo)
        } else {
            0
        };
        let (a, b) = (lo.max(m) - m, hi.max(m) - m); // zigzag offsets [a, b)
        let period = 2 * self.cp_size;
        // Offsets j in [0, x) with j mod period == c.
        let below = |x: usize, c: usize| if x <= c { 0 } else { (x - c - 1) / period + 1 };
        let tail = |c: usize| below(b, c) - below(a, c);
        head + tail(rank) + tail(period - 1 - rank)
    }

    /// The most blocks any one rank holds of a sequence of `num_blocks` blocks.
    pub fn max_per_rank(&self, num_blocks: usize) -> usize {
        (0..self.cp_size)
            .map(|r| self.count_on(r, 0, num_blocks))
            .max()
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn first_blocks_stay_on_rank_0_then_the_zigzag_balances_the_ranks() {
        let p = KvPlacement {
            cp_size: 4,
            first_blocks: 3,
        };
        let owners: Vec<usize> = (0..3 + 16).map(|i| p.rank_of(i)).collect();
        assert_eq!(owners[..3], [0, 0, 0]);
        assert_eq!(owners[3..11], [0, 1, 2, 3, 3, 2, 1, 0]);
        for r in 0..4 {
            assert_eq!(p.count_on(r, 3, 19), 4);
        }
        assert_eq!(p.max_per_rank(19), 7);
    }

    #[test]
    fn one_rank_holds_everything() {
        let p = KvPlacement::default();
        assert_eq!(p.rank_of(1000), 0);
        assert_eq!(p.count_on(0, 5, 12), 7);
        assert_eq!(p.max_per_rank(9), 9);
    }

    proptest! {
        #[test]
        fn counts_agree_with_rank_of(cp in 1usize..6, first in 0usize..9, lo in 0usize..60, len in 0usize..80) {
            let p = KvPlacement { cp_size: cp, first_blocks: first };
            let hi = lo + len;
            for r in 0..cp {
                let want = (lo..hi).filter(|&i| p.rank_of(i) == r).count();
                prop_assert_eq!(p.count_on(r, lo, hi), want);
            }
        }
    }
}
