//! The AVX2 + FMA + F16C parts of the quantized linear: dequantizing weight rows 8 codes a step
//! and the multiply of up to 3 rows of x with 4 dequantized weight rows.

use std::arch::x86_64::*;

use super::{Code, QuantWeight, ROWS, XROWS};

#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn multiply(
    x: &[f32],
    w: &[f32],
    kp: usize,
    mt: usize,
    tile: &mut [[f32; ROWS]; XROWS],
) {
    match mt {
        1 => rows::<1>(x, w, kp, tile),
        2 => rows::<2>(x, w, kp, tile),
        _ => rows::<3>(x, w, kp, tile),
    }
}

// MT x ROWS accumulators + MT rows of x + one weight register: 16 ymm at MT = 3. No
// closures inside: they would not inherit the target features, and every intrinsic in
// them would become a call.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn rows<const MT: usize>(x: &[f32], w: &[f32], kp: usize, tile: &mut [[f32; ROWS]; XROWS]) {
    let mut acc = [[_mm256_setzero_ps(); ROWS]; MT];
    let (xp, wp) = (x.as_ptr(), w.as_ptr());
    for c in (0..kp).step_by(8) {
        let mut xv = [_mm256_setzero_ps(); MT];
        for (i, v) in xv.iter_mut().enumerate() {
            *v = _mm256_loadu_ps(xp.add(i * kp + c));
        }
        for r in 0..ROWS {
            let wv = _mm256_loadu_ps(wp.add(r * kp + c));
            for (a, &xi) in acc.iter_mut().zip(&xv) {
                a[r] = _mm256_fmadd_ps(xi, wv, a[r]);
            }
        }
    }
    for (out, a) in tile.iter_mut().zip(&acc) {
        for (o, &v) in out.iter_mut().zip(a) {
            *o = sum8(v);
        }
    }
}

/// dst = codes (int8) * scale, 8 codes per step.
#[target_feature(enable = "avx2,fma")]
#[inline]
pub(super) unsafe fn dequantize_int8(codes: &[u8], scale: f32, dst: &mut [f32]) {
    let n = codes.len().min(dst.len());
    let s = _mm256_set1_ps(scale);
    let mut c = 0;
    while c + 8 <= n {
        let ints = _mm256_cvtepi8_epi32(_mm_loadl_epi64(codes.as_ptr().add(c) as *const __m128i));
        _mm256_storeu_ps(
            dst.as_mut_ptr().add(c),
            _mm256_mul_ps(_mm256_cvtepi32_ps(ints), s),
        );
        c += 8;
    }
    for i in c..n {
        dst[i] = f32::from(codes[i] as i8) * scale;
    }
}

/// dst = e4m3(codes) * scale, 8 codes per step.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(super) unsafe fn dequantize_e4m3(codes: &[u8], scale: f32, dst: &mut [f32]) {
    let n = codes.len().min(dst.len());
    // e4m3 -> fp16 is a shift (seee emmm -> s0eeeemmm0000000: the value times 2^-8, fp16
    // subnormals included), and F16C converts fp16 to fp32 in hardware. Moving the bits into
    // an fp32 directly would form fp32 subnormals for e = 0, each a microcode assist.
    let (magnitude, sign) = (_mm_set1_epi16(0x7f), _mm_set1_epi16(0x80));
    let s = _mm256_set1_ps(scale * 256.0);
    let mut c = 0;
    while c + 8 <= n {
        let bytes = _mm_cvtepu8_epi16(_mm_loadl_epi64(codes.as_ptr().add(c) as *const __m128i));
        let half = _mm_or_si128(
            _mm_slli_epi16::<7>(_mm_and_si128(bytes, magnitude)),
            _mm_slli_epi16::<8>(_mm_and_si128(bytes, sign)),
        );
        _mm256_storeu_ps(
            dst.as_mut_ptr().add(c),
            _mm256_mul_ps(_mm256_cvtph_ps(half), s),
        );
        c += 8;
    }
    for i in c..n {
        dst[i] = super::e4m3_to_f32(codes[i]) * scale;
    }
}

#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn sum8(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
}

impl QuantWeight<'_> {
    /// Rows n0..n0+rows dequantized into `w` [ROWS, kp] (rows past them zero).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dequantize_rows_avx2(
        &self,
        n0: usize,
        rows: usize,
        w: &mut [f32],
        kp: usize,
    ) {
        for (r, dst) in w.chunks_exact_mut(kp).enumerate() {
            if r < rows {
                self.for_each_segment(n0 + r, |c, end, s| {
                    let (codes, dst) = (&self.q[(n0 + r) * self.k..][c..end], &mut dst[c..end]);
                    match self.code {
                        Code::E4m3 => dequantize_e4m3(codes, s, dst),
                        Code::Int8 => dequantize_int8(codes, s, dst),
                    }
                });
            } else {
                dst.fill(0.0);
            }
        }
    }
}
