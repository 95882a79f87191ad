//! The AVX-512 BF16 path, for bf16 activations on CPUs that have VDPBF16PS (AMD Zen 4 and
//! later, Intel Cooper Lake / Sapphire Rapids and later): codes are decoded exactly to bf16
//! (no scale: int8 and e4m3 values both fit bf16's 8-bit significand), VDPBF16PS forms two
//! exact bf16 products per fp32 lane, and each K-block's sum is scaled once into an fp32 total.
//! It does twice the multiply-adds per instruction of the AVX2 path's fp32 FMAs, which is what
//! decode at batch sizes of a few dozen, compute-bound on 2 cores, needs (bench/quant/).
//!
//! `linear_bf16_dot` drives it: x copied once into the layout below, then per task 4 weight
//! rows decoded and multiplied with every row of x, as in the AVX2 path.
//!
//! Both operands are laid out in "segments": each K-block's columns start on a 32-column
//! boundary and are padded with zeros to one, so a 32-column step never straddles two scales.

use std::arch::x86_64::*;

use super::{Code, QuantWeight, TileSink, ROWS, TASK_ROWS, XROWS};
use crate::attention_item::Elem;
use crate::cpu_pool::for_each_index;

/// The e4m3 subnormals m · 2^-9 (m = 0..7) as bf16 bits, padded to one zmm of lookups.
const E4M3_SUBNORMALS_BF16: [u16; 32] = {
    let mut t = [0u16; 32];
    let bits = [0, 0x3b00, 0x3b80, 0x3bc0, 0x3c00, 0x3c20, 0x3c40, 0x3c60];
    let mut m = 0;
    while m < 8 {
        t[m] = bits[m];
        m += 1;
    }
    t
};

/// Columns per VDPBF16PS step (32 bf16 = one zmm).
pub(super) const STEP: usize = 32;

/// One K-block's columns: [start, end) in the weight, starting at `dst` in the padded layout.
#[derive(Clone, Copy)]
pub(super) struct Segment {
    /// First column in the weight.
    pub start: usize,
    /// One past the last column in the weight.
    pub end: usize,
    /// First column in the padded layout (a multiple of STEP).
    pub dst: usize,
}

impl Segment {
    /// Padded columns the segment occupies (a multiple of STEP).
    pub fn padded(&self) -> usize {
        (self.end - self.start).next_multiple_of(STEP)
    }
}

/// dst = the codes as bf16 bits, exactly (int8 16 a step, e4m3 32 a step).
#[target_feature(enable = "avx512f,avx512bf16,avx512bw,avx512vl")]
pub(super) unsafe fn decode_bf16(code: Code, codes: &[u8], dst: &mut [u16]) {
    let n = codes.len().min(dst.len());
    let mut c = 0;
    match code {
        Code::Int8 => {
            while c + 16 <= n {
                let bytes = _mm_loadu_si128(codes.as_ptr().add(c) as *const __m128i);
                let values = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes));
                let bf = std::mem::transmute::<__m256bh, __m256i>(_mm512_cvtneps_pbh(values));
                _mm256_storeu_si256(dst.as_mut_ptr().add(c) as *mut __m256i, bf);
                c += 16;
            }
        }
        Code::E4m3 => {
            // Integer only: a normal code seee emmm is bf16 s eeeeeeee mmm0000 with the exponent
            // rebiased by 120 (the magnitude shifted left 4, plus 120 << 7); the 8 subnormal
            // magnitudes (m · 2^-9) come from a table. The sign moves to bit 15.
            let table = _mm512_loadu_si512(E4M3_SUBNORMALS_BF16.as_ptr() as *const __m512i);
            let (low7, bias, sign, eight) = (
                _mm512_set1_epi16(0x7f),
                _mm512_set1_epi16(120 << 7),
                _mm512_set1_epi16(0x80),
                _mm512_set1_epi16(8),
            );
            while c + 32 <= n {
                let wide = _mm512_cvtepu8_epi16(_mm256_loadu_si256(
                    codes.as_ptr().add(c) as *const __m256i
                ));
                let mag = _mm512_and_si512(wide, low7);
                let normal = _mm512_add_epi16(_mm512_slli_epi16::<4>(mag), bias);
                let subnormal = _mm512_permutexvar_epi16(mag, table); // index mag < 8 where used
                let value =
                    _mm512_mask_blend_epi16(_mm512_cmplt_epu16_mask(mag, eight), normal, subnormal);
                let bits =
                    _mm512_or_si512(value, _mm512_slli_epi16::<8>(_mm512_and_si512(wide, sign)));
                _mm512_storeu_si512(dst.as_mut_ptr().add(c) as *mut __m512i, bits);
                c += 32;
            }
        }
    }
    for i in c..n {
        dst[i] = (super::decode(code, codes[i]).to_bits() >> 16) as u16; // exact: <= 4 significant bits
    }
}

/// tile[i][r] = Σ_b scale[b][r] · (x[i] · w[r] over segment b), for mt rows of x and ROWS rows
/// of w (both bf16 bits with row stride kp, in the segment layout); `scales` [segments][ROWS].
#[target_feature(enable = "avx512f,avx512bf16,avx512bw,avx512vl")]
pub(super) unsafe fn multiply(
    x: &[u16],
    w: &[u16],
    kp: usize,
    mt: usize,
    segments: &[Segment],
    scales: &[[f32; ROWS]],
    tile: &mut [[f32; ROWS]; XROWS],
) {
    match mt {
        1 => rows::<1>(x, w, kp, segments, scales, tile),
        2 => rows::<2>(x, w, kp, segments, scales, tile),
        _ => rows::<3>(x, w, kp, segments, scales, tile),
    }
}

// 2 x MT x ROWS accumulators (the block's and the total) + MT rows of x + one weight register:
// 28 zmm at MT = 3. No closures inside (they would not inherit the target features).
#[target_feature(enable = "avx512f,avx512bf16,avx512bw,avx512vl")]
#[inline]
unsafe fn rows<const MT: usize>(
    x: &[u16],
    w: &[u16],
    kp: usize,
    segments: &[Segment],
    scales: &[[f32; ROWS]],
    tile: &mut [[f32; ROWS]; XROWS],
) {
    let mut total = [[_mm512_setzero_ps(); ROWS]; MT];
    let (xp, wp) = (x.as_ptr(), w.as_ptr());
    for (seg, scale) in segments.iter().zip(scales) {
        let mut acc = [[_mm512_setzero_ps(); ROWS]; MT];
        for c in (seg.dst..seg.dst + seg.padded()).step_by(STEP) {
            let mut xv: [__m512bh; MT] = std::mem::zeroed();
            for (i, v) in xv.iter_mut().enumerate() {
                *v = load_bf16(xp.add(i * kp + c));
            }
            for r in 0..ROWS {
                let wv = load_bf16(wp.add(r * kp + c));
                for (a, &xi) in acc.iter_mut().zip(&xv) {
                    a[r] = _mm512_dpbf16_ps(a[r], xi, wv);
                }
            }
        }
        for (t, a) in total.iter_mut().zip(&acc) {
            for r in 0..ROWS {
                t[r] = _mm512_fmadd_ps(a[r], _mm512_set1_ps(scale[r]), t[r]);
            }
        }
    }
    for (out, t) in tile.iter_mut().zip(&total) {
        for (o, &v) in out.iter_mut().zip(t) {
            *o = _mm512_reduce_add_ps(v);
        }
    }
}

/// 32 bf16 values (as bits) from `p`, unaligned.
#[target_feature(enable = "avx512f,avx512bf16")]
#[inline]
unsafe fn load_bf16(p: *const u16) -> __m512bh {
    std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(p as *const __m512i))
}

impl QuantWeight<'_> {
    /// y [M, N] = x [M, K] · deq(q)ᵀ for bf16 x (as bits) on this path, into `out`.
    pub(super) fn linear_bf16_dot<T: Elem>(
        &self,
        x: &[u16],
        m: usize,
        out: &TileSink<T>,
        threads: usize,
    ) {
        let mut segments = Vec::new();
        let mut kp = 0;
        self.for_each_segment(0, |start, end, _| {
            let seg = Segment {
                start,
                end,
                dst: kp,
            };
            kp += seg.padded();
            segments.push(seg);
        });
        let kp = kp.max(STEP);
        let mut x16 = vec![0u16; m * kp]; // x in the segment layout, zero padded
        for (dst, src) in x16.chunks_exact_mut(kp).zip(x.chunks_exact(self.k.max(1))) {
            for seg in &segments {
                dst[seg.dst..seg.dst + seg.end - seg.start]
                    .copy_from_slice(&src[seg.start..seg.end]);
            }
        }
        let kb = self.num_blocks();
        for_each_index(threads, self.n.div_ceil(TASK_ROWS), &|task| {
            let mut w = vec![0u16; ROWS * kp];
            let mut scales = vec![[0f32; ROWS]; segments.len()]; // [KB][ROWS]; 0 for rows past N
            let mut tile = [[0f32; ROWS]; XROWS];
            for n0 in (task * TASK_ROWS..((task + 1) * TASK_ROWS).min(self.n)).step_by(ROWS) {
                let rows = ROWS.min(self.n - n0);
                for (b, sc) in scales.iter_mut().enumerate() {
                    for (r, s) in sc.iter_mut().enumerate() {
                        *s = if r < rows {
                            self.scale[(n0 + r) * kb + b]
                        } else {
                            0.0
                        };
                    }
                }
                for r in 0..rows {
                    let codes = &self.q[(n0 + r) * self.k..];
                    for seg in &segments {
                        // SAFETY: Path::usable checked AVX-512 BF16.
                        unsafe {
                            decode_bf16(
                                self.code,
                                &codes[seg.start..seg.end],
                                &mut w[r * kp + seg.dst..],
                            )
                        };
                    }
                }
                for m0 in (0..m).step_by(XROWS) {
                    let mt = XROWS.min(m - m0);
                    // SAFETY: as above; rows are kp long in the segment layout.
                    unsafe {
                        multiply(
                            &x16[m0 * kp..(m0 + mt) * kp],
                            &w,
                            kp,
                            mt,
                            &segments,
                            &scales,
                            &mut tile,
                        )
                    };
                    out.store(&tile, m0, mt, n0, rows);
                }
            }
        });
    }
}
