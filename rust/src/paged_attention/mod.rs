//! Causal attention of a flat batch of query tokens over their requests' paged KV cache, on the
//! CPU, reading K and V in place from the cache blocks (no gather into a dense copy).
//!
//! The semantics are those of `paged_attention_ref` in kernels/expertmesh_kernels/attention.py
//! (the tests compare the two): request n's new tokens are q[qsl[n]..qsl[n+1]], its KV covers
//! positions 0..seq_lens[n], query i sits at seq_lens[n] - q_len + i, sees keys at or before
//! its position and, with a window W, fewer than W positions back. Softmax in fp32.
//!
//! Work is split into items: (request, KV head, up to `PREFILL_ROWS` query rows) for prefill,
//! and for a decode (one row) also by `DECODE_PARTITION` keys, so one long sequence still
//! spreads over the cores. Items write fp32 partials; a second pass merges them per token.
//! The split depends only on the batch, never on the thread count, so results are the same
//! on every rank however many cores it has.

use crate::attention_item::{Elem, ItemKeys, ItemQueries};
use crate::attention_tile::attend_item;
use crate::cpu_pool::for_each_mut;
use crate::error::{CoreError, CoreResult};

mod plan;
#[cfg(test)]
mod tests;

use plan::Item;

/// Query rows per prefill item: their K/V tile is converted once and used by all of them.
pub const PREFILL_ROWS: usize = 16;
/// Keys per decode item (vLLM's CPU and GPU kernels use 512 too).
pub const DECODE_PARTITION: usize = 512;

/// One call's inputs. Slices are flat, row-major; shapes in the field docs.
pub struct PagedAttention<'a, T> {
    /// Queries, [T, NH, D].
    pub q: &'a [T],
    /// K cache of the layer, [NB, B, NKV, D].
    pub k_cache: &'a [T],
    /// V cache of the layer, [NB, B, NKV, D].
    pub v_cache: &'a [T],
    /// Cache blocks of each request, [N, MB]; columns past a request's last block are unread.
    pub block_tables: &'a [i32],
    /// Prefix sums of new tokens per request, [N + 1].
    pub query_start_loc: &'a [i32],
    /// Tokens in each request's KV after this step (context + new), [N].
    pub seq_lens: &'a [i32],
    /// Query heads (NH).
    pub num_heads: usize,
    /// KV heads (NKV), dividing NH.
    pub num_kv_heads: usize,
    /// Head dimension (D).
    pub head_dim: usize,
    /// Tokens per cache block (B).
    pub block_size: usize,
    /// Score scale (usually D^-0.5).
    pub scale: f32,
    /// Sliding window W, if the layer has one.
    pub sliding_window: Option<usize>,
}

fn out_of_range(field: String, limit: String, value: usize) -> CoreError {
    CoreError::OutOfRange {
        field,
        limit,
        value: value as i128,
    }
}

impl<T: Elem> PagedAttention<'_, T> {
    fn num_tokens(&self) -> usize {
        self.query_start_loc.last().map_or(0, |&t| t as usize)
    }

    /// Checks every value the kernel indexes with, so a bad batch is an error, not a crash.
    fn validate(&self) -> CoreResult<()> {
        let (nh, nkv, d, bs) = (
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            self.block_size,
        );
        if nkv == 0 || nh % nkv != 0 || d == 0 || bs == 0 {
            return Err(out_of_range(
                "num_heads".into(),
                format!("a multiple of num_kv_heads ({nkv}) with head_dim, block_size >= 1"),
                nh,
            ));
        }
        let n = self.seq_lens.len();
        if self.query_start_loc.len() != n + 1 || self.query_start_loc[0] != 0 {
            return Err(out_of_range(
                "query_start_loc".into(),
                format!("N + 1 = {} entries starting at 0", n + 1),
                self.query_start_loc.len(),
            ));
        }
        let t = self.num_tokens();
        if self.q.len() != t * nh * d {
            return Err(out_of_range(
                "q".into(),
                format!("T * NH * D = {} elements", t * nh * d),
                self.q.len(),
            ));
        }
        let row = bs * nkv * d;
        if self.k_cache.len() != self.v_cache.len() || !self.k_cache.len().is_multiple_of(row) {
            return Err(out_of_range(
                "k_cache".into(),
                format!("the size of v_cache, a multiple of B * NKV * D = {row}"),
                self.k_cache.len(),
            ));
        }
        if let Some(0) = self.sliding_window {
            return Err(out_of_range("sliding_window".into(), ">= 1".into(), 0));
        }
        let num_blocks = self.k_cache.len() / row;
        let mb = self.block_tables.len().checked_div(n).unwrap_or(0);
        if self.block_tables.len() != n * mb {
            return Err(out_of_range(
                "block_tables".into(),
                format!("N * MB elements for N = {n}"),
                self.block_tables.len(),
            ));
        }
        for r in 0..n {
            let (lo, hi) = (self.query_start_loc[r], self.query_start_loc[r + 1]);
            if hi < lo || hi as usize > t {
                return Err(out_of_range(
                    format!("query_start_loc[{}]", r + 1),
                    format!("between {lo} and {t}"),
                    hi.max(0) as usize,
                ));
            }
            let q_len = (hi - lo) as usize;
            let ctx = self.seq_lens[r];
            if ctx < 0 || (ctx as usize) < q_len || ctx as usize > mb * bs {
                return Err(out_of_range(
                    format!("seq_lens[{r}]"),
                    format!("between its {q_len} new tokens and MB * B = {}", mb * bs),
                    ctx.max(0) as usize,
                ));
            }
            for (c, &block) in self.block_tables[r * mb..r * mb + (ctx as usize).div_ceil(bs)]
                .iter()
                .enumerate()
            {
                if block < 0 || block as usize >= num_blocks {
                    return Err(out_of_range(
                        format!("block_tables[{r}, {c}]"),
                        format!("a block id below {num_blocks}"),
                        block.max(0) as usize,
                    ));
                }
            }
        }
        Ok(())
    }

    /// Runs the attention into `out` ([T, NH, D]) and, if given, `lse` ([T, NH], natural-log
    /// log-sum-exp of the scaled scores), with `threads` workers (1: on the calling thread).
    pub fn run(&self, out: &mut [T], lse: Option<&mut [f32]>, threads: usize) -> CoreResult<()> {
        self.validate()?;
        let (nh, nkv, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let t = self.num_tokens();
        if out.len() != t * nh * d {
            return Err(out_of_range(
                "out".into(),
                format!("T * NH * D = {} elements", t * nh * d),
                out.len(),
            ));
        }
        if let Some(l) = &lse {
            if l.len() != t * nh {
                return Err(out_of_range(
                    "lse".into(),
                    format!("T * NH = {} elements", t * nh),
                    l.len(),
                ));
            }
        }
        let group = nh / nkv;
        let (items, parts) = self.plan();
        let m_of = |it: &Item| it.rows * it.kv_count * group; // query vectors of an item
        let sizes: Vec<usize> = items.iter().map(|it| m_of(it) * (d + 2)).collect();
        let mut partials = vec![0.0f32; sizes.iter().sum()];
        let mut chunks = Vec::with_capacity(items.len());
        let mut rest = partials.as_mut_slice();
        for &size in &sizes {
            let (head, tail) = rest.split_at_mut(size);
            chunks.push(head);
            rest = tail;
        }
        let mb = self
            .block_tables
            .len()
            .checked_div(self.seq_lens.len())
            .unwrap_or(0);
        let attend = |i: usize, chunk: &mut &mut [f32]| {
            let item = &items[i];
            // [rows, kv_count * G, D] scaled fp32 queries: a KV head's G heads are adjacent in q.
            let width = item.kv_count * group * d;
            let mut q = Vec::with_capacity(item.rows * width);
            for i in 0..item.rows {
                let base = ((item.token + i) * nh + item.kv_lo * group) * d;
                q.extend(
                    self.q[base..base + width]
                        .iter()
                        .map(|x| x.to_f32() * self.scale),
                );
            }
            let keys = ItemKeys {
                k_cache: self.k_cache,
                v_cache: self.v_cache,
                block_table: &self.block_tables[item.req * mb..(item.req + 1) * mb],
                block_size: self.block_size,
                num_kv_heads: nkv,
                kv_lo: item.kv_lo,
                kv_count: item.kv_count,
                head_dim: d,
                key_lo: item.key_lo,
                key_hi: item.key_hi,
            };
            let queries = ItemQueries {
                q: &q,
                rows: item.rows,
                group,
                first_pos: item.first_pos,
                window: self.sliding_window,
            };
            attend_item(&keys, &queries, chunk);
        };
        for_each_mut(threads, &mut chunks, attend);
        let chunks: Vec<&[f32]> = chunks.into_iter().map(|c| &*c).collect();
        let merge = |tok: usize, (out_row, lse_row): &mut (&mut [T], Option<&mut [f32]>)| {
            let mut acc = vec![0.0f32; d];
            for h in 0..nkv {
                let p = parts[tok * nkv + h];
                for g in 0..group {
                    let m = p.m0 + g;
                    // Partition i holds [M_i * D acc | M_i max | M_i sum].
                    let split = p.first..p.first + p.count;
                    let pieces = || {
                        items[split.clone()]
                            .iter()
                            .map(m_of)
                            .zip(&chunks[split.clone()])
                    };
                    let max = pieces()
                        .map(|(mi, c)| c[mi * d + m])
                        .fold(f32::NEG_INFINITY, f32::max);
                    let mut total = 0.0f32;
                    acc.fill(0.0);
                    for (mi, c) in pieces() {
                        let part_max = c[mi * d + m];
                        if part_max == f32::NEG_INFINITY {
                            continue;
                        }
                        let w = (part_max - max).exp();
                        total += w * c[mi * d + mi + m];
                        for (a, &x) in acc.iter_mut().zip(&c[m * d..(m + 1) * d]) {
                            *a += w * x;
                        }
                    }
                    let head = h * group + g;
                    let inv = if total > 0.0 { 1.0 / total } else { 0.0 };
                    for (o, a) in out_row[head * d..(head + 1) * d].iter_mut().zip(&acc) {
                        *o = T::from_f32(a * inv);
                    }
                    if let Some(l) = lse_row.as_deref_mut() {
                        l[head] = max + total.ln();
                    }
                }
            }
        };
        let lse_rows: Vec<Option<&mut [f32]>> = match lse {
            Some(l) => l.chunks_mut(nh).map(Some).collect(),
            None => (0..t).map(|_| None).collect(),
        };
        let mut rows: Vec<_> = out.chunks_mut(nh * d).zip(lse_rows).collect();
        for_each_mut(threads, &mut rows, merge);
        Ok(())
    }
}
