//! The AVX-512 tile kernel of CPU paged attention, in intrinsics (attention_tile.rs holds the
//! contract, the portable kernel the tests compare this with, and the dispatch).
//!
//! Per tile of 16 keys and KV head: the 16 key rows are converted to fp32 and transposed in
//! registers (16x16 blocks), so a query's 16 scores are one register built by D broadcast
//! FMAs; softmax runs on that register (exp by polynomial + `scalef`); V rows are added with
//! the 16 weights broadcast. Everything a tile touches stays in L1.
//! Measured: bench/attention/README.md.

use std::arch::x86_64::*;

use crate::attention_item::{reset_partials, Elem, ItemKeys, ItemQueries, TILE};

/// How many tiles ahead the next keys' cache lines are requested.
const PREFETCH_TILES: usize = 2;

/// Whether this kernel can run here: AVX-512F, and D a multiple of 16 (whole registers).
pub fn usable(head_dim: usize) -> bool {
    head_dim.is_multiple_of(16) && std::arch::is_x86_feature_detected!("avx512f")
}

/// 16 elements at `p` as fp32.
#[inline(always)]
unsafe fn load16<T: Elem>(p: *const T) -> __m512 {
    if T::IS_BF16 {
        let bits = _mm512_cvtepu16_epi32(_mm256_loadu_si256(p as *const __m256i));
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(bits))
    } else {
        _mm512_loadu_ps(p as *const f32)
    }
}

/// In-place transpose of a 16x16 fp32 block held as 16 row registers.
#[inline(always)]
unsafe fn transpose16(r: &mut [__m512; 16]) {
    let mut t = [_mm512_setzero_ps(); 16];
    for i in 0..8 {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    // u[4i + k], 128-bit lane L: column 4L + k, rows 4i..4i+3.
    let mut u = [_mm512_setzero_ps(); 16];
    for i in 0..4 {
        let (a, b) = (_mm512_castps_pd(t[4 * i]), _mm512_castps_pd(t[4 * i + 2]));
        let (c, d) = (
            _mm512_castps_pd(t[4 * i + 1]),
            _mm512_castps_pd(t[4 * i + 3]),
        );
        u[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
        u[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
        u[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(c, d));
        u[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(c, d));
    }
    // A 4x4 transpose of 128-bit lanes per k.
    for k in 0..4 {
        let x0 = _mm512_shuffle_f32x4::<0x44>(u[k], u[4 + k]);
        let x1 = _mm512_shuffle_f32x4::<0xEE>(u[k], u[4 + k]);
        let x2 = _mm512_shuffle_f32x4::<0x44>(u[8 + k], u[12 + k]);
        let x3 = _mm512_shuffle_f32x4::<0xEE>(u[8 + k], u[12 + k]);
        r[k] = _mm512_shuffle_f32x4::<0x88>(x0, x2);
        r[4 + k] = _mm512_shuffle_f32x4::<0xDD>(x0, x2);
        r[8 + k] = _mm512_shuffle_f32x4::<0x88>(x1, x3);
        r[12 + k] = _mm512_shuffle_f32x4::<0xDD>(x1, x3);
    }
}

/// e^x per lane for x <= 0 (as `exp_neg` in attention_tile.rs: Cody-Waite, degree-7 poly).
#[inline(always)]
unsafe fn exp16(x: __m512) -> __m512 {
    let x = _mm512_max_ps(x, _mm512_set1_ps(-87.0));
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
        _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
    );
    let y = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_359_4), x);
    let y = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.121_944_4e-4), y);
    let mut p = _mm512_set1_ps(1.0 / 5040.0);
    for c in [
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
        1.0,
        1.0,
    ] {
        p = _mm512_fmadd_ps(p, y, _mm512_set1_ps(c));
    }
    _mm512_scalef_ps(p, n)
}

/// The AVX-512 `attend_item` (same contract as attention_tile::attend_item).
///
/// # Safety
/// The CPU must have AVX-512F and `keys.head_dim % 16 == 0` (see [`usable`]).
#[target_feature(enable = "avx512f")]
pub unsafe fn attend_item<T: Elem>(
    keys: &ItemKeys<'_, T>,
    queries: &ItemQueries<'_>,
    out: &mut [f32],
) {
    let d = keys.head_dim;
    let heads = keys.kv_count * queries.group;
    let (acc, maxes, sums) = reset_partials(out, queries.rows * heads, d);
    let mut kt = vec![0.0f32; d * TILE]; // [D, TILE]
    let mut vt = vec![0.0f32; TILE * d]; // [TILE, D]
    let row_stride = keys.num_kv_heads * d;
    let (k_cache, v_cache) = (keys.k_cache, keys.v_cache);
    let mut bases = [0usize; TILE]; // cache offset of each lane's key
    let mut ahead = [0usize; TILE];
    let mut work: Vec<(usize, __mmask16)> = Vec::with_capacity(queries.rows * heads); // (query, visible lanes)
    let mut t0 = keys.key_lo / TILE * TILE;
    while t0 < keys.key_hi {
        let (j_lo, j_hi) = (keys.key_lo.max(t0), keys.key_hi.min(t0 + TILE));
        let lanes = j_lo - t0..j_hi - t0;
        keys.key_offsets(j_lo, &mut bases[lanes.clone()]);
        let next = (j_hi + (PREFETCH_TILES - 1) * TILE).min(keys.key_hi);
        let ahead = &mut ahead[..keys.key_hi.min(j_hi + PREFETCH_TILES * TILE) - next];
        if !ahead.is_empty() {
            keys.key_offsets(next, ahead);
        }
        for &at in ahead.iter() {
            for line in (0..row_stride * std::mem::size_of::<T>()).step_by(64) {
                _mm_prefetch::<_MM_HINT_T0>((k_cache[at..].as_ptr() as *const i8).add(line));
                _mm_prefetch::<_MM_HINT_T0>((v_cache[at..].as_ptr() as *const i8).add(line));
            }
        }
        for kv in keys.kv_lo..keys.kv_lo + keys.kv_count {
            // Every offset was checked when the batch was validated (rows inside the cache).
            let (kp, vp, vtp) = (k_cache.as_ptr(), v_cache.as_ptr(), vt.as_mut_ptr());
            for c in (0..d).step_by(16) {
                let mut r = [_mm512_setzero_ps(); 16];
                if lanes.len() == TILE {
                    // A whole tile: constant bounds, so `r` stays in registers.
                    for jj in 0..TILE {
                        let at = bases[jj] + kv * d + c;
                        r[jj] = load16(kp.add(at));
                        _mm512_storeu_ps(vtp.add(jj * d + c), load16(vp.add(at)));
                    }
                } else {
                    for jj in lanes.clone() {
                        let at = bases[jj] + kv * d + c;
                        r[jj] = load16(kp.add(at));
                        _mm512_storeu_ps(vtp.add(jj * d + c), load16(vp.add(at)));
                    }
                }
                transpose16(&mut r);
                for (x, row) in r.iter().enumerate() {
                    _mm512_storeu_ps(kt[(c + x) * TILE..].as_mut_ptr(), *row);
                }
            }
            if lanes.len() < TILE {
                for jj in (0..TILE).filter(|jj| !lanes.contains(jj)) {
                    vt[jj * d..(jj + 1) * d].fill(0.0); // weight 0 must not meet a stale NaN
                }
            }
            let head0 = (kv - keys.kv_lo) * queries.group;
            work.clear();
            for r in 0..queries.rows {
                if let Some((vis_lo, vis_hi)) = queries.visible(r, j_lo, j_hi) {
                    let mask = (((1u32 << (vis_hi - t0)) - 1) & !((1u32 << (vis_lo - t0)) - 1))
                        as __mmask16;
                    work.extend((0..queries.group).map(|g| (r * heads + head0 + g, mask)));
                }
            }
            let state = State {
                q: queries.q.as_ptr(),
                acc: acc.as_mut_ptr(),
                maxes: maxes.as_mut_ptr(),
                sums: sums.as_mut_ptr(),
            };
            for batch in work.chunks(4) {
                match batch.len() {
                    4 => attend_tiles::<4>(batch, &state, &kt, &vt, d),
                    3 => attend_tiles::<3>(batch, &state, &kt, &vt, d),
                    2 => attend_tiles::<2>(batch, &state, &kt, &vt, d),
                    _ => attend_tiles::<1>(batch, &state, &kt, &vt, d),
                }
            }
        }
        t0 += TILE;
    }
}

/// An item's per-query arrays (query vector m at `q + m * D`, and so on), raw because the
/// queries of one batch are updated together; each m appears once per batch.
struct State {
    /// Scaled fp32 query vectors [M, D].
    q: *const f32,
    /// Unnormalised outputs [M, D].
    acc: *mut f32,
    /// Running max score per query [M].
    maxes: *mut f32,
    /// Running sum of exp(score - max) per query [M].
    sums: *mut f32,
}

/// NQ queries against one tile, interleaved so their dependency chains overlap and each
/// K/V register load serves all NQ (see attention_tile::attend_tile for the algorithm).
#[inline(always)]
#[allow(clippy::needless_range_loop)] // one index walks several arrays at once
unsafe fn attend_tiles<const NQ: usize>(
    batch: &[(usize, __mmask16)], // (query index m, visible lanes), NQ of them
    st: &State,
    kt: &[f32], // [D, TILE]
    vt: &[f32], // [TILE, D]
    d: usize,
) {
    let (kp, vp) = (kt.as_ptr(), vt.as_ptr());
    // Plain loops, not array::from_fn: a closure is not compiled with this function's target
    // features, so the intrinsics inside it become calls (measured 1.5x slower).
    let mut qs = [st.q; NQ];
    for i in 0..NQ {
        qs[i] = st.q.add(batch[i].0 * d);
    }
    let mut even = [_mm512_setzero_ps(); NQ];
    let mut odd = [_mm512_setzero_ps(); NQ];
    for x in (0..d).step_by(2) {
        let (k0, k1) = (
            _mm512_loadu_ps(kp.add(x * TILE)),
            _mm512_loadu_ps(kp.add((x + 1) * TILE)),
        );
        for i in 0..NQ {
            even[i] = _mm512_fmadd_ps(_mm512_set1_ps(*qs[i].add(x)), k0, even[i]);
            odd[i] = _mm512_fmadd_ps(_mm512_set1_ps(*qs[i].add(x + 1)), k1, odd[i]);
        }
    }
    let mut w = [[0.0f32; TILE]; NQ];
    let mut corr = [0.0f32; NQ];
    for i in 0..NQ {
        let (m, mask) = batch[i];
        let scores = _mm512_mask_blend_ps(
            mask,
            _mm512_set1_ps(f32::NEG_INFINITY),
            _mm512_add_ps(even[i], odd[i]),
        );
        let old = *st.maxes.add(m);
        let new = old.max(_mm512_reduce_max_ps(scores));
        let p = _mm512_maskz_mov_ps(mask, exp16(_mm512_sub_ps(scores, _mm512_set1_ps(new))));
        // exp(old - new): 1 when the max did not move, 0 before the first visible key.
        corr[i] = if old == f32::NEG_INFINITY {
            0.0
        } else {
            _mm512_cvtss_f32(exp16(_mm512_set1_ps(old - new)))
        };
        *st.sums.add(m) = *st.sums.add(m) * corr[i] + _mm512_reduce_add_ps(p);
        *st.maxes.add(m) = new;
        _mm512_storeu_ps(w[i].as_mut_ptr(), p);
    }
    for c in (0..d).step_by(16) {
        let mut a = [_mm512_setzero_ps(); NQ];
        for i in 0..NQ {
            a[i] = _mm512_mul_ps(
                _mm512_loadu_ps(st.acc.add(batch[i].0 * d + c)),
                _mm512_set1_ps(corr[i]),
            );
        }
        for jj in 0..TILE {
            let v = _mm512_loadu_ps(vp.add(jj * d + c));
            for i in 0..NQ {
                a[i] = _mm512_fmadd_ps(_mm512_set1_ps(w[i][jj]), v, a[i]);
            }
        }
        for i in 0..NQ {
            _mm512_storeu_ps(st.acc.add(batch[i].0 * d + c), a[i]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transpose16_transposes() {
        if !std::arch::is_x86_feature_detected!("avx512f") {
            return;
        }
        let m: Vec<f32> = (0..256).map(|i| i as f32).collect();
        let mut out = [0.0f32; 256];
        // SAFETY: AVX-512F checked above; every pointer is inside its 256-element array.
        unsafe {
            let mut r = [_mm512_setzero_ps(); 16];
            for (i, row) in r.iter_mut().enumerate() {
                *row = _mm512_loadu_ps(m[i * 16..].as_ptr());
            }
            transpose16(&mut r);
            for (i, row) in r.iter().enumerate() {
                _mm512_storeu_ps(out[i * 16..].as_mut_ptr(), *row);
            }
        }
        for i in 0..16 {
            for j in 0..16 {
                assert_eq!(out[i * 16 + j], m[j * 16 + i], "out[{i}][{j}]");
            }
        }
    }
}
