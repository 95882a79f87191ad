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

use crate::attention_tile::{attend_item, Elem, ItemKeys, ItemQueries};
use crate::cpu_pool::for_each_mut;
use crate::error::{CoreError, CoreResult};

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

/// One unit of parallel work: some query rows of one request and KV head, against some keys.
struct Item {
    /// Request index.
    req: usize,
    /// First KV head.
    kv_lo: usize,
    /// KV heads (all of them for a decode, one for prefill rows).
    kv_count: usize,
    /// Token index (into q) of the first row.
    token: usize,
    /// Query rows.
    rows: usize,
    /// Position of the first row.
    first_pos: usize,
    /// Keys covered: `key_lo..key_hi`.
    key_lo: usize,
    /// One past the last key covered.
    key_hi: usize,
}

/// Where a token's partial results are, per KV head: items `first..first + count` (the key
/// partitions, in order), query vectors `m0..m0 + G` of each.
#[derive(Clone, Copy, Default)]
struct TokenParts {
    /// Index of the first item.
    first: usize,
    /// Items (key partitions) to merge.
    count: usize,
    /// The index, within those items, of the token's first query head of this KV head.
    m0: usize,
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

    /// The items of the batch and, per (token, KV head), where its partials will be.
    fn plan(&self) -> (Vec<Item>, Vec<TokenParts>) {
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
                    let (kv_lo, kv_count, token, rows) = (0, nkv, start, 1);
                    items.push(Item {
                        req: r,
                        kv_lo,
                        kv_count,
                        token,
                        rows,
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
                    let (kv_lo, kv_count, token) = (h, 1, start + c);
                    items.push(Item {
                        req: r,
                        kv_lo,
                        kv_count,
                        token,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attention_tile::Bf16;
    use proptest::prelude::*;

    /// A batch with shuffled cache blocks, as the block pool hands them out.
    struct Batch {
        q: Vec<f32>,
        k: Vec<f32>,
        v: Vec<f32>,
        tables: Vec<i32>,
        qsl: Vec<i32>,
        lens: Vec<i32>,
        nh: usize,
        nkv: usize,
        d: usize,
        bs: usize,
    }

    fn values(seed: &mut u64, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| {
                *seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((*seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 4.0
            })
            .collect()
    }

    fn batch(
        q_lens: &[usize],
        ctx_extra: &[usize],
        nkv: usize,
        group: usize,
        d: usize,
        bs: usize,
        seed: u64,
    ) -> Batch {
        let mut seed = seed;
        let nh = nkv * group;
        let lens: Vec<usize> = q_lens.iter().zip(ctx_extra).map(|(q, c)| q + c).collect();
        let mb = lens.iter().map(|l| l.div_ceil(bs)).max().unwrap_or(0);
        let num_blocks = lens.iter().map(|l| l.div_ceil(bs)).sum::<usize>() + 1;
        // Blocks in reverse order, so a kernel reading the wrong block cannot pass.
        let mut next = num_blocks;
        let mut tables = vec![-1i32; q_lens.len() * mb];
        for (r, l) in lens.iter().enumerate() {
            for c in 0..l.div_ceil(bs) {
                next -= 1;
                tables[r * mb + c] = next as i32;
            }
        }
        let t: usize = q_lens.iter().sum();
        let mut qsl = vec![0i32];
        for q in q_lens {
            qsl.push(qsl.last().unwrap() + *q as i32);
        }
        Batch {
            q: values(&mut seed, t * nh * d),
            k: values(&mut seed, num_blocks * bs * nkv * d),
            v: values(&mut seed, num_blocks * bs * nkv * d),
            tables,
            qsl,
            lens: lens.iter().map(|&l| l as i32).collect(),
            nh,
            nkv,
            d,
            bs,
        }
    }

    fn call<'a, T: Elem>(
        b: &'a Batch,
        q: &'a [T],
        k: &'a [T],
        v: &'a [T],
        window: Option<usize>,
    ) -> PagedAttention<'a, T> {
        PagedAttention {
            q,
            k_cache: k,
            v_cache: v,
            block_tables: &b.tables,
            query_start_loc: &b.qsl,
            seq_lens: &b.lens,
            num_heads: b.nh,
            num_kv_heads: b.nkv,
            head_dim: b.d,
            block_size: b.bs,
            scale: 1.0 / (b.d as f32).sqrt(),
            sliding_window: window,
        }
    }

    /// Straightforward f64 attention, token by token.
    fn reference(b: &Batch, window: Option<usize>) -> (Vec<f64>, Vec<f64>) {
        let (nh, nkv, d, bs) = (b.nh, b.nkv, b.d, b.bs);
        let mb = b.tables.len() / b.lens.len();
        let t = *b.qsl.last().unwrap() as usize;
        let (mut out, mut lse) = (vec![0.0; t * nh * d], vec![0.0; t * nh]);
        let scale = 1.0 / (d as f64).sqrt();
        for r in 0..b.lens.len() {
            let (lo, hi, ctx) = (b.qsl[r] as usize, b.qsl[r + 1] as usize, b.lens[r] as usize);
            for tok in lo..hi {
                let pos = ctx - (hi - lo) + (tok - lo);
                for h in 0..nh {
                    let kvh = h / (nh / nkv);
                    let keys: Vec<usize> = (0..=pos)
                        .filter(|&j| window.is_none_or(|w| pos - j < w))
                        .collect();
                    let at = |j: usize| {
                        ((b.tables[r * mb + j / bs] as usize * bs + j % bs) * nkv + kvh) * d
                    };
                    let scores: Vec<f64> = keys
                        .iter()
                        .map(|&j| {
                            (0..d)
                                .map(|x| b.q[(tok * nh + h) * d + x] as f64 * b.k[at(j) + x] as f64)
                                .sum::<f64>()
                                * scale
                        })
                        .collect();
                    let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let total: f64 = scores.iter().map(|s| (s - max).exp()).sum();
                    for (s, &j) in scores.iter().zip(&keys) {
                        for x in 0..d {
                            out[(tok * nh + h) * d + x] +=
                                (s - max).exp() / total * b.v[at(j) + x] as f64;
                        }
                    }
                    lse[tok * nh + h] = max + total.ln();
                }
            }
        }
        (out, lse)
    }

    fn run_f32(b: &Batch, window: Option<usize>, threads: usize) -> (Vec<f32>, Vec<f32>) {
        let t = *b.qsl.last().unwrap() as usize;
        let (mut out, mut lse) = (vec![0.0f32; t * b.nh * b.d], vec![0.0f32; t * b.nh]);
        call(b, &b.q, &b.k, &b.v, window)
            .run(&mut out, Some(&mut lse), threads)
            .unwrap();
        (out, lse)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn equals_reference(
            reqs in prop::collection::vec((1usize..40, 0usize..1200), 1..4),
            nkv in 1usize..3, group in 1usize..4, d in prop::sample::select(vec![4usize, 16, 20, 32, 64]),
            bs in prop::sample::select(vec![1usize, 3, 16]), window in prop::option::of(1usize..700),
            seed in any::<u64>(),
        ) {
            let (q_lens, extra): (Vec<usize>, Vec<usize>) = reqs.into_iter().unzip();
            let b = batch(&q_lens, &extra, nkv, group, d, bs, seed);
            let (want, want_lse) = reference(&b, window);
            let (got, got_lse) = run_f32(&b, window, 1);
            for (g, w) in got.iter().zip(&want) {
                prop_assert!((*g as f64 - w).abs() < 2e-5, "out {g} vs {w}");
            }
            for (g, w) in got_lse.iter().zip(&want_lse) {
                prop_assert!((*g as f64 - w).abs() < 2e-5 * w.abs().max(1.0), "lse {g} vs {w}");
            }
            // The split of work depends on the batch only: any thread count, same bits.
            let (par, par_lse) = run_f32(&b, window, 3);
            prop_assert_eq!(par, got);
            prop_assert_eq!(par_lse, got_lse);
        }
    }

    #[test]
    fn bf16_cache_and_queries() {
        let b = batch(&[1, 37, 1], &[700, 5, 0], 2, 3, 16, 16, 7);
        let to_bf16 = |x: &[f32]| x.iter().map(|&v| Bf16::from_f32(v)).collect::<Vec<_>>();
        let (q, k, v) = (to_bf16(&b.q), to_bf16(&b.k), to_bf16(&b.v));
        // The reference on the same bf16-rounded values; the output is then rounded once.
        let rounded = Batch {
            q: q.iter().map(|x| x.to_f32()).collect(),
            k: k.iter().map(|x| x.to_f32()).collect(),
            v: v.iter().map(|x| x.to_f32()).collect(),
            tables: b.tables.clone(),
            qsl: b.qsl.clone(),
            lens: b.lens.clone(),
            ..b
        };
        let (want, _) = reference(&rounded, None);
        let mut out = vec![Bf16(0); want.len()];
        call(&rounded, &q, &k, &v, None)
            .run(&mut out, None, 2)
            .unwrap();
        for (g, w) in out.iter().zip(&want) {
            assert!(
                (g.to_f32() as f64 - w).abs() <= w.abs() / 128.0 + 1e-6,
                "{} vs {w}",
                g.to_f32()
            );
        }
    }

    #[test]
    fn bad_batches_are_errors_naming_the_value() {
        let b = batch(&[3, 1], &[4, 20], 1, 2, 4, 4, 1);
        let mut out = vec![0.0f32; 4 * 2 * 4];
        let mut tables = b.tables.clone();
        tables[1] = 999;
        let bad_block = PagedAttention {
            block_tables: &tables,
            ..call(&b, &b.q, &b.k, &b.v, None)
        };
        let err = bad_block.run(&mut out, None, 1).unwrap_err().to_string();
        assert!(
            err.contains("block_tables[0, 1]") && err.contains("999"),
            "{err}"
        );
        let lens = [2, 21];
        let short = PagedAttention {
            seq_lens: &lens,
            ..call(&b, &b.q, &b.k, &b.v, None)
        };
        let err = short.run(&mut out, None, 1).unwrap_err().to_string();
        assert!(
            err.contains("seq_lens[0]") && err.contains("got 2"),
            "{err}"
        );
        let err = call(&b, &b.q, &b.k, &b.v, None)
            .run(&mut out[1..], None, 1)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("out must be T * NH * D = 32 elements, got 31"),
            "{err}"
        );
    }
}
