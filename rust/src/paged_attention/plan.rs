//! How a batch is cut into work items, and where each token's partial results land.

use super::{PagedAttention, DECODE_PARTITION, PREFILL_ROWS};
use crate::attention_item::Elem;

/// One unit of parallel work: some query rows of one request and KV head, against some keys.
pub(super) struct Item {
    /// Request index.
    pub(super) req: usize,
    /// First KV head.
    pub(super) kv_lo: usize,
    /// KV heads (all of them for a decode, one for prefill rows).
    pub(super) kv_count: usize,
    /// Token index (into q) of the first row.
    pub(super) token: usize,
    /// Query rows.
    pub(super) rows: usize,
    /// Position of the first row.
    pub(super) first_pos: usize,
    /// Keys covered: `key_lo..key_hi`.
    pub(super) key_lo: usize,
    /// One past the last key covered.
    pub(super) key_hi: usize,
}

/// Where a token's partial results are, per KV head: items `first..first + count` (the key
/// partitions, in order), query vectors `m0..m0 + G` of each.
#[derive(Clone, Copy, Default)]
pub(super) struct TokenParts {
    /// Index of the first item.
    pub(super) first: usize,
    /// Items (key partitions) to merge.
    pub(super) count: usize,
    /// The index, within those items, of the token's first query head of this KV head.
    pub(super) m0: usize,
}

impl<T: Elem> PagedAttention<'_, T> {
    /// The items of the batch and, per (token, KV head), where its partials will be.
    pub(super) fn plan(&self) -> (Vec<Item>, Vec<TokenParts>) {
        let nkv = self.num_kv_heads;
        let mut items = Vec::new();
        let mut parts = vec![TokenParts::default(); self.num_tokens() * nkv];
        for r in 0..self.seq_lens.len() {
            let start = self.query_start_loc[r] as usize;
            let q_len = self.query_start_loc[r + 1] as usize - start;
            let ctx = self.seq_lens[r] as usize;
            let first_pos = ctx - q_len;
            let window_lo = |pos: usize| {
                self.sliding_window
                    .map_or(0, |w| (pos + 1).saturating_sub(w))
            };
            let group = self.num_heads / nkv;
            if q_len == 1 {
                // All KV heads in one item: a block's rows are read once, in address order.
                let first = items.len();
                let mut lo = window_lo(first_pos);
                while lo < ctx {
                    let hi = ((lo / DECODE_PARTITION + 1) * DECODE_PARTITION).min(ctx);
                    items.push(Item {
                        req: r,
                        kv_lo: 0,
                        kv_count: nkv,
                        token: start,
                        rows: 1,
                        first_pos,
                        key_lo: lo,
                        key_hi: hi,
                    });
                    lo = hi;
                }
                for h in 0..nkv {
                    parts[start * nkv + h] = TokenParts {
                        first,
                        count: items.len() - first,
                        m0: h * group,
                    };
                }
                continue;
            }
            for h in 0..nkv {
                for c in (0..q_len).step_by(PREFILL_ROWS) {
                    let rows = PREFILL_ROWS.min(q_len - c);
                    let pos = first_pos + c;
                    for i in 0..rows {
                        parts[(start + c + i) * nkv + h] = TokenParts {
                            first: items.len(),
                            count: 1,
                            m0: i * group,
                        };
                    }
                    items.push(Item {
                        req: r,
                        kv_lo: h,
                        kv_count: 1,
                        token: start + c,
                        rows,
                        first_pos: pos,
                        key_lo: window_lo(pos),
                        key_hi: pos + rows,
                    });
                }
            }
        }
        (items, parts)
    }
}
