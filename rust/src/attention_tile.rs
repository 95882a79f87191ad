//! The inner loop of CPU paged attention (`paged_attention`): a few query vectors of one KV
//! head against a range of keys, with an online softmax, over tiles of `TILE` keys read
//! straight from the cache blocks (converted to fp32 in a small transposed tile, never copied
//! anywhere else).
//!
//! On AVX-512 CPUs (and D a multiple of 16) the work goes to the intrinsics kernel in
//! attention_avx512.rs. The portable kernel here is written over fixed 16-lane arrays so that
//! LLVM vectorizes it, and compiled twice (AVX2 + FMA, and the baseline for other CPUs); it is
//! also what the AVX-512 kernel is tested against.

use crate::attention_item::{reset_partials, Elem, ItemKeys, ItemQueries, TILE};

/// Attends one item and writes its partial result into `out` = [M*D acc | M max | M sum]
/// (M = rows * kv_count * group, ordered as `q`): unnormalised fp32 output, running max and sum of exp(score - max).
pub fn attend_item<T: Elem>(keys: &ItemKeys<'_, T>, queries: &ItemQueries<'_>, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if crate::attention_avx512::usable(keys.head_dim) {
            // SAFETY: usable() checked the CPU feature and the head dim the kernel needs.
            unsafe { crate::attention_avx512::attend_item(keys, queries, out) };
            return;
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: as above.
            unsafe { attend_avx2(keys, queries, out) };
            return;
        }
    }
    attend_impl::<T, false>(keys, queries, out);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn attend_avx2<T: Elem>(keys: &ItemKeys<'_, T>, queries: &ItemQueries<'_>, out: &mut [f32]) {
    attend_impl::<T, true>(keys, queries, out);
}

/// a * b + c; fused only where the caller is compiled with FMA (else `mul_add` is a libm call).
#[inline(always)]
fn fmadd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// e^x for x <= 0 to about 2e-7 relative, in plain arithmetic so 16 lanes vectorize
/// (libm's expf does not). Below -87 it returns about 1.6e-38 instead of less; masked lanes
/// are zeroed by the caller.
#[inline(always)]
fn exp_neg(x: f32) -> f32 {
    // Cody-Waite: x = n ln2 + y with ln2 in two parts, so y keeps its precision for large |x|.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.max(-87.0);
    let n = (x * std::f32::consts::LOG2_E + 0.5).floor();
    let y = x - n * LN2_HI - n * LN2_LO; // |y| <= ln2 / 2
    let mut p = 1.0 / 5040.0;
    p = p * y + 1.0 / 720.0;
    p = p * y + 1.0 / 120.0;
    p = p * y + 1.0 / 24.0;
    p = p * y + 1.0 / 6.0;
    p = p * y + 0.5;
    p = p * y + 1.0;
    p = p * y + 1.0;
    p * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// Hints the cache lines of one key row (all KV heads) into L1 ahead of use.
#[inline(always)]
fn prefetch_row<T>(row: &[T]) {
    #[cfg(target_arch = "x86_64")]
    for line in (0..std::mem::size_of_val(row)).step_by(64) {
        // SAFETY: a prefetch is only a hint; the address is inside `row`.
        unsafe {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
            _mm_prefetch::<_MM_HINT_T0>((row.as_ptr() as *const i8).add(line));
        }
    }
}

/// Sum of 16 lanes as a tree, which vectorizes (a running sum does not).
#[inline(always)]
fn lane_sum(x: &[f32; TILE]) -> f32 {
    let mut h = [0.0f32; 8];
    for i in 0..8 {
        h[i] = x[i] + x[i + 8];
    }
    let q = [h[0] + h[4], h[1] + h[5], h[2] + h[6], h[3] + h[7]];
    (q[0] + q[2]) + (q[1] + q[3])
}

#[inline(always)]
fn attend_impl<T: Elem, const FMA: bool>(
    keys: &ItemKeys<'_, T>,
    queries: &ItemQueries<'_>,
    out: &mut [f32],
) {
    let d = keys.head_dim;
    let heads = keys.kv_count * queries.group; // query heads per row
    let (acc, maxes, sums) = reset_partials(out, queries.rows * heads, d);
    let mut kt = vec![0.0f32; d * TILE]; // [D, TILE]: keys transposed, so scores are lane-wise
    let mut vt = vec![0.0f32; TILE * d]; // [TILE, D]
    let row_stride = keys.num_kv_heads * d;
    let mut bases = [0usize; TILE];
    let mut ahead = [0usize; TILE];

    // Tiles sit at absolute multiples of TILE, so a query's sum runs in the same order however
    // the batch around it is split.
    let mut t0 = keys.key_lo / TILE * TILE;
    while t0 < keys.key_hi {
        let j_lo = keys.key_lo.max(t0);
        let j_hi = keys.key_hi.min(t0 + TILE);
        let bases = &mut bases[..j_hi - j_lo];
        keys.key_offsets(j_lo, bases);
        let ahead = &mut ahead[..keys.key_hi.min(j_hi + TILE) - j_hi];
        if !ahead.is_empty() {
            keys.key_offsets(j_hi, ahead);
        }
        for &j in ahead.iter() {
            prefetch_row(&keys.k_cache[j..j + row_stride]);
            prefetch_row(&keys.v_cache[j..j + row_stride]);
        }
        for kv in keys.kv_lo..keys.kv_lo + keys.kv_count {
            kt.fill(0.0);
            vt.fill(0.0);
            for (jj, &base) in (j_lo - t0..).zip(bases.iter()) {
                let at = base + kv * d;
                for (x, k) in keys.k_cache[at..at + d].iter().enumerate() {
                    kt[x * TILE + jj] = k.to_f32();
                }
                for (dst, src) in vt[jj * d..(jj + 1) * d]
                    .iter_mut()
                    .zip(&keys.v_cache[at..at + d])
                {
                    *dst = src.to_f32();
                }
            }
            let head0 = (kv - keys.kv_lo) * queries.group;
            for r in 0..queries.rows {
                let Some((vis_lo, vis_hi)) = queries.visible(r, j_lo, j_hi) else {
                    continue;
                };
                for g in 0..queries.group {
                    let m = r * heads + head0 + g;
                    attend_tile::<FMA>(
                        &queries.q[m * d..(m + 1) * d],
                        &kt,
                        &vt,
                        (vis_lo - t0, vis_hi - t0),
                        &mut acc[m * d..(m + 1) * d],
                        &mut maxes[m],
                        &mut sums[m],
                    );
                }
            }
        }
        t0 += TILE;
    }
}

/// One query against one tile: scores, online-softmax update, weighted V rows added.
///
/// Accumulators are split (4 over D for the scores, 2 over keys for V) and kept in locals:
/// a single running accumulator is one long dependency chain of FMAs (through memory, for
/// `acc`), which measured several times slower than the loads it waits for.
#[inline(always)]
fn attend_tile<const FMA: bool>(
    q: &[f32],               // [D]
    kt: &[f32],              // [D, TILE]
    vt: &[f32],              // [TILE, D]
    visible: (usize, usize), // tile lanes this query sees
    acc: &mut [f32],         // [D]
    max: &mut f32,
    sum: &mut f32,
) {
    let d = q.len();
    let mut parts = [[0.0f32; TILE]; 4];
    let quads = d / 4 * 4;
    for x0 in (0..quads).step_by(4) {
        for (u, part) in parts.iter_mut().enumerate() {
            let qx = q[x0 + u];
            let k_lane: &[f32; TILE] = kt[(x0 + u) * TILE..(x0 + u + 1) * TILE].try_into().unwrap();
            for jj in 0..TILE {
                part[jj] = fmadd::<FMA>(qx, k_lane[jj], part[jj]);
            }
        }
    }
    for x in quads..d {
        let k_lane: &[f32; TILE] = kt[x * TILE..(x + 1) * TILE].try_into().unwrap();
        for jj in 0..TILE {
            parts[0][jj] = fmadd::<FMA>(q[x], k_lane[jj], parts[0][jj]);
        }
    }
    let mut s = [0.0f32; TILE];
    let mut tile_max = f32::NEG_INFINITY;
    for jj in 0..TILE {
        s[jj] = (parts[0][jj] + parts[1][jj]) + (parts[2][jj] + parts[3][jj]);
        if jj < visible.0 || jj >= visible.1 {
            s[jj] = f32::NEG_INFINITY;
        }
        tile_max = tile_max.max(s[jj]);
    }
    let new = max.max(tile_max);
    let mut p = [0.0f32; TILE];
    for jj in 0..TILE {
        let e = exp_neg(s[jj] - new);
        p[jj] = if s[jj] == f32::NEG_INFINITY { 0.0 } else { e };
    }
    let corr = if *max == new {
        1.0
    } else if *max == f32::NEG_INFINITY {
        0.0
    } else {
        (*max - new).exp()
    };
    *sum = *sum * corr + lane_sum(&p);
    *max = new;
    let chunks = d / TILE * TILE;
    for c in (0..chunks).step_by(TILE) {
        let mut even: [f32; TILE] = acc[c..c + TILE].try_into().unwrap();
        let mut odd = [0.0f32; TILE];
        for e in even.iter_mut() {
            *e *= corr;
        }
        for jj in (0..TILE).step_by(2) {
            let v0: &[f32; TILE] = vt[jj * d + c..jj * d + c + TILE].try_into().unwrap();
            let v1: &[f32; TILE] = vt[(jj + 1) * d + c..(jj + 1) * d + c + TILE]
                .try_into()
                .unwrap();
            for l in 0..TILE {
                even[l] = fmadd::<FMA>(p[jj], v0[l], even[l]);
                odd[l] = fmadd::<FMA>(p[jj + 1], v1[l], odd[l]);
            }
        }
        for l in 0..TILE {
            acc[c + l] = even[l] + odd[l];
        }
    }
    for x in chunks..d {
        let mut a = acc[x] * corr;
        for jj in 0..TILE {
            a = fmadd::<FMA>(p[jj], vt[jj * d + x], a);
        }
        acc[x] = a;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attention_item::Bf16;

    #[test]
    fn exp_neg_matches_libm() {
        let mut worst = 0.0f32;
        for i in 0..=80_000 {
            let x = -(i as f32) * 1e-3;
            let want = x.exp();
            worst = worst.max(((exp_neg(x) - want) / want).abs());
        }
        assert!(worst < 5e-7, "worst relative error {worst}");
        assert_eq!(exp_neg(0.0), 1.0);
    }

    /// The AVX-512 kernel against the portable one on one item with every edge: a partial
    /// first and last tile, a sliding window, several rows, heads and KV heads.
    #[test]
    fn avx512_equals_portable() {
        if !crate::attention_avx512::usable(32) {
            return;
        }
        let (nkv, group, d, bs, rows) = (2, 3, 32, 5, 7);
        let blocks = 40;
        let value = |i: usize| ((i * 7919 % 1013) as f32 / 1013.0 - 0.5) * 3.0;
        let k: Vec<Bf16> = (0..blocks * bs * nkv * d)
            .map(|i| Bf16::from_f32(value(i)))
            .collect();
        let v: Vec<Bf16> = (0..blocks * bs * nkv * d)
            .map(|i| Bf16::from_f32(value(i + 17)))
            .collect();
        let table: Vec<i32> = (0..blocks as i32).rev().collect();
        let q: Vec<f32> = (0..rows * nkv * group * d)
            .map(|i| value(i + 5) * 0.2)
            .collect();
        let keys = ItemKeys {
            k_cache: &k,
            v_cache: &v,
            block_table: &table,
            block_size: bs,
            num_kv_heads: nkv,
            kv_lo: 0,
            kv_count: nkv,
            head_dim: d,
            key_lo: 3,
            key_hi: 150,
        };
        let queries = ItemQueries {
            q: &q,
            rows,
            group,
            first_pos: 143,
            window: Some(90),
        };
        let len = rows * nkv * group * (d + 2);
        let (mut fast, mut portable) = (vec![0.0f32; len], vec![0.0f32; len]);
        attend_item(&keys, &queries, &mut fast);
        attend_impl::<Bf16, false>(&keys, &queries, &mut portable);
        for (i, (a, b)) in fast.iter().zip(&portable).enumerate() {
            assert!(
                (a - b).abs() <= 1e-5 * b.abs().max(1.0),
                "element {i}: {a} vs {b}"
            );
        }
    }
}
