//! A linear layer with a weight-only quantized weight on the CPU: y = x · deq(q)ᵀ, where
//! deq(q)[n][c] = value(q[n][c]) · scale[n][(c + col_offset) / block_k] and the codes are
//! fp8 e4m3 (block scales) or int8 (one scale per row: one block as wide as the row) -- the
//! layouts of kernels/expertmesh_kernels/quant.py.
//!
//! Why here: torch converts fp8 to wider types one element at a time on the CPU (13 ms for a
//! 4096x1024 weight on the 2-core VM), and its int8-weight kernel slows down as rows grow
//! (bench/quant/). Here 4 weight rows at a time are dequantized into an L1-sized fp32 buffer
//! and every row of x is multiplied with them before the next 4 are read: the weight is read
//! from memory once, as bytes, whatever M is. Accumulation is fp32; the output is rounded once.
//! e4m3 NaN codes (0x7f, 0xff; never produced by quantization) read as ±480.

use crate::attention_item::Elem;
use crate::cpu_pool::for_each_index;
use crate::error::{CoreError, CoreResult};

/// Weight rows dequantized together (one task holds them in its buffer).
const ROWS: usize = 4;
/// Rows of x multiplied per pass over the buffer (ROWS x XROWS accumulators).
const XROWS: usize = 3;
/// Weight rows per parallel task.
const TASK_ROWS: usize = 32;

/// What the weight's bytes encode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    /// fp8 e4m3fn.
    E4m3,
    /// Signed 8-bit integers.
    Int8,
}

/// A quantized weight [N, K] with its scales, borrowed from the caller's tensors.
#[derive(Clone, Copy)]
pub struct QuantWeight<'a> {
    /// What each byte of `q` encodes.
    pub code: Code,
    /// Codes [N, K], row-major.
    pub q: &'a [u8],
    /// Scales [N, KB]: row n's scale for its K-block b.
    pub scale: &'a [f32],
    /// Output features N.
    pub n: usize,
    /// Input features K.
    pub k: usize,
    /// Input features per scale block.
    pub block_k: usize,
    /// Position of column 0 inside its first block (0 <= col_offset < block_k).
    pub col_offset: usize,
}

/// One e4m3fn code as fp32 (exact).
#[inline(always)]
pub fn e4m3_to_f32(code: u8) -> f32 {
    let bits = (u32::from(code & 0x7f) << 20) | (u32::from(code & 0x80) << 24);
    f32::from_bits(bits) * f32::from_bits(0x7b80_0000) // 2^120 moves the exponent bias from 127 to 7
}

/// One code as fp32 (exact).
#[inline(always)]
fn decode(code: Code, byte: u8) -> f32 {
    match code {
        Code::E4m3 => e4m3_to_f32(byte),
        Code::Int8 => f32::from(byte as i8),
    }
}

impl QuantWeight<'_> {
    /// K-blocks per row.
    pub fn num_blocks(&self) -> usize {
        (self.col_offset + self.k).div_ceil(self.block_k)
    }

    fn check(&self) -> CoreResult<()> {
        if self.block_k == 0 {
            return Err(CoreError::OutOfRange {
                field: "block_k".into(),
                limit: ">= 1".into(),
                value: 0,
            });
        }
        if self.col_offset >= self.block_k {
            return Err(CoreError::OutOfRange {
                field: "col_offset".into(),
                limit: format!("< block_k ({})", self.block_k),
                value: self.col_offset as i128,
            });
        }
        check_len("weight (N x K)", self.q.len(), self.n * self.k)?;
        check_len(
            "scale (N x KB)",
            self.scale.len(),
            self.n * self.num_blocks(),
        )
    }

    /// Dequantizes row `row` into `dst[..K]` (fp32).
    fn dequantize_row(&self, row: usize, dst: &mut [f32]) {
        let codes = &self.q[row * self.k..][..self.k];
        self.for_each_segment(row, |c, end, s| {
            for (d, &byte) in dst[c..end].iter_mut().zip(&codes[c..end]) {
                *d = decode(self.code, byte) * s;
            }
        });
    }

    /// Rows n0..n0+rows into `w` [ROWS, kp] (rows past them zero), vectorized where AVX2 is.
    fn dequantize_rows(&self, simd: bool, n0: usize, rows: usize, w: &mut [f32], kp: usize) {
        #[cfg(target_arch = "x86_64")]
        if simd {
            // SAFETY: simd_usable() checked AVX2 and F16C.
            unsafe { self.dequantize_rows_avx2(n0, rows, w, kp) };
            return;
        }
        let _ = simd;
        self.dequantize_rows_portable(n0, rows, w, kp);
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dequantize_rows_avx2(&self, n0: usize, rows: usize, w: &mut [f32], kp: usize) {
        for (r, dst) in w.chunks_exact_mut(kp).enumerate() {
            if r < rows {
                self.for_each_segment(n0 + r, |c, end, s| {
                    let (codes, dst) = (&self.q[(n0 + r) * self.k..][c..end], &mut dst[c..end]);
                    match self.code {
                        Code::E4m3 => avx2::dequantize_e4m3(codes, s, dst),
                        Code::Int8 => avx2::dequantize_int8(codes, s, dst),
                    }
                });
            } else {
                dst.fill(0.0);
            }
        }
    }

    fn dequantize_rows_portable(&self, n0: usize, rows: usize, w: &mut [f32], kp: usize) {
        for (r, dst) in w.chunks_exact_mut(kp).enumerate() {
            if r < rows {
                self.dequantize_row(n0 + r, dst);
            } else {
                dst.fill(0.0);
            }
        }
    }

    /// Calls f(first column, end column, scale) for each K-block segment of row `row`.
    #[inline(always)]
    fn for_each_segment(&self, row: usize, mut f: impl FnMut(usize, usize, f32)) {
        let scales = &self.scale[row * self.num_blocks()..];
        let (mut c, mut b) = (0, 0);
        while c < self.k {
            let end = ((b + 1) * self.block_k - self.col_offset).min(self.k);
            f(c, end, scales[b]);
            (c, b) = (end, b + 1);
        }
    }

    /// y [M, N] = x [M, K] · deq(q)ᵀ on up to `threads` threads.
    pub fn linear<T: Elem>(
        &self,
        x: &[T],
        m: usize,
        out: &mut [T],
        threads: usize,
    ) -> CoreResult<()> {
        self.check()?;
        check_len("x (M x K)", x.len(), m * self.k)?;
        check_len("out (M x N)", out.len(), m * self.n)?;
        let kp = self.k.next_multiple_of(16); // rows padded with zeros to whole 16-lane registers
        let mut xf = vec![0f32; m * kp];
        for (dst, src) in xf.chunks_exact_mut(kp).zip(x.chunks_exact(self.k.max(1))) {
            for (d, s) in dst.iter_mut().zip(src) {
                *d = s.to_f32();
            }
        }
        let out_ptr = out.as_mut_ptr() as usize;
        let simd = simd_usable();
        for_each_index(threads, self.n.div_ceil(TASK_ROWS), &|task| {
            let mut w = vec![0f32; ROWS * kp];
            let mut tile = [[0f32; ROWS]; XROWS];
            for n0 in (task * TASK_ROWS..((task + 1) * TASK_ROWS).min(self.n)).step_by(ROWS) {
                let rows = ROWS.min(self.n - n0);
                self.dequantize_rows(simd, n0, rows, &mut w, kp);
                for m0 in (0..m).step_by(XROWS) {
                    let mt = XROWS.min(m - m0);
                    multiply(simd, &xf[m0 * kp..(m0 + mt) * kp], &w, kp, mt, &mut tile);
                    for (i, row) in tile.iter().enumerate().take(mt) {
                        for (r, &v) in row.iter().enumerate().take(rows) {
                            // SAFETY: tasks own disjoint column ranges [n0, n0 + rows) of `out`,
                            // which outlives for_each_index; (m0 + i, n0 + r) is inside [M, N].
                            unsafe {
                                *(out_ptr as *mut T).add((m0 + i) * self.n + n0 + r) =
                                    T::from_f32(v)
                            };
                        }
                    }
                }
            }
        });
        Ok(())
    }
}

fn check_len(field: &'static str, got: usize, expected: usize) -> CoreResult<()> {
    if got == expected {
        return Ok(());
    }
    Err(CoreError::LengthMismatch {
        field,
        expected,
        got,
    })
}

/// AVX2 + FMA + F16C (every x86 server CPU since 2013; AVX-512 adds too little to a kernel that
/// waits on dequantization to be worth a second, separately tested copy).
fn simd_usable() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// tile[i][r] = x[i] · w[r] for mt rows of x and ROWS rows of w (both with row stride kp).
fn multiply(
    simd: bool,
    x: &[f32],
    w: &[f32],
    kp: usize,
    mt: usize,
    tile: &mut [[f32; ROWS]; XROWS],
) {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: simd_usable() checked AVX2 and FMA; rows are kp long, kp a multiple of 16.
        unsafe { avx2::multiply(x, w, kp, mt, tile) };
        return;
    }
    let _ = simd;
    for (i, out) in tile.iter_mut().enumerate().take(mt) {
        for (r, o) in out.iter_mut().enumerate() {
            *o = x[i * kp..(i + 1) * kp]
                .iter()
                .zip(&w[r * kp..(r + 1) * kp])
                .map(|(a, b)| a * b)
                .sum();
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{ROWS, XROWS};

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
    unsafe fn rows<const MT: usize>(
        x: &[f32],
        w: &[f32],
        kp: usize,
        tile: &mut [[f32; ROWS]; XROWS],
    ) {
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
            let ints =
                _mm256_cvtepi8_epi32(_mm_loadl_epi64(codes.as_ptr().add(c) as *const __m128i));
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attention_item::Bf16;

    /// Every finite e4m3fn code against its definition: (-1)^s 2^(e-7) (1 + m/8), subnormals 2^-6 m/8.
    #[test]
    fn e4m3_codes_decode_exactly() {
        for code in 0u8..=255 {
            if code & 0x7f == 0x7f {
                continue; // NaN
            }
            let (s, e, m) = (code >> 7, i32::from((code >> 3) & 0xf), f32::from(code & 7));
            let mag = if e == 0 {
                2f32.powi(-6) * m / 8.0
            } else {
                2f32.powi(e - 7) * (1.0 + m / 8.0)
            };
            assert_eq!(
                e4m3_to_f32(code),
                if s == 1 { -mag } else { mag },
                "code {code:#x}"
            );
        }
    }

    fn reference(w: &QuantWeight<'_>, x: &[f64], m: usize) -> Vec<f64> {
        let mut out = vec![0f64; m * w.n];
        for i in 0..m {
            for n in 0..w.n {
                out[i * w.n + n] = (0..w.k)
                    .map(|c| {
                        let s = w.scale[n * w.num_blocks() + (c + w.col_offset) / w.block_k];
                        x[i * w.k + c] * f64::from(decode(w.code, w.q[n * w.k + c])) * f64::from(s)
                    })
                    .sum();
            }
        }
        out
    }

    /// Deterministic pseudo-random values (an LCG), so the test needs no crate.
    fn values(len: usize, seed: u64) -> Vec<u64> {
        let mut state = seed;
        (0..len)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                state >> 33
            })
            .collect()
    }

    #[test]
    fn int8_codes_decode_as_signed_bytes() {
        assert_eq!(decode(Code::Int8, 0x81), -127.0);
        assert_eq!(decode(Code::Int8, 0x7f), 127.0);
    }

    #[test]
    fn linear_matches_the_f64_reference_for_odd_shapes_offsets_and_threads() {
        // int8 is the same layout with one block per row (block_k = K, scale [N, 1]).
        for &(code, m, n, k, block_k, col_offset) in &[
            (Code::E4m3, 1, 1, 1, 1, 0),
            (Code::E4m3, 3, 5, 17, 4, 3),
            (Code::E4m3, 7, 37, 100, 48, 32),
            (Code::E4m3, 13, 64, 256, 128, 0),
            (Code::E4m3, 6, 9, 33, 16, 15),
            (Code::Int8, 5, 11, 70, 70, 0),
            (Code::Int8, 4, 8, 256, 256, 0),
        ] {
            let q: Vec<u8> = values(n * k, 1)
                .iter()
                .map(|v| (v % 256) as u8 & !0x7f | (v % 0x7e) as u8)
                .collect();
            let kb = (col_offset + k).div_ceil(block_k);
            let scale: Vec<f32> = values(n * kb, 2)
                .iter()
                .map(|v| 0.01 + (v % 100) as f32 / 1000.0)
                .collect();
            let w = QuantWeight {
                code,
                q: &q,
                scale: &scale,
                n,
                k,
                block_k,
                col_offset,
            };
            let x: Vec<f32> = values(m * k, 3)
                .iter()
                .map(|v| (v % 2001) as f32 / 1000.0 - 1.0)
                .collect();
            let want = reference(&w, &x.iter().map(|&v| f64::from(v)).collect::<Vec<_>>(), m);
            let mut first = vec![0f32; m * n];
            w.linear(&x, m, &mut first, 1).unwrap();
            for (got, want) in first.iter().zip(&want) {
                assert!(
                    (f64::from(*got) - want).abs() <= 1e-5 * (1.0 + want.abs()),
                    "{got} vs {want}"
                );
            }
            let mut threaded = vec![0f32; m * n];
            w.linear(&x, m, &mut threaded, 3).unwrap();
            assert_eq!(first, threaded, "the thread count changes no bit");
            let xb: Vec<Bf16> = x.iter().map(|&v| Bf16::from_f32(v)).collect();
            let mut out_b = vec![Bf16(0); m * n];
            w.linear(&xb, m, &mut out_b, 2).unwrap();
            let want_b = reference(
                &w,
                &xb.iter().map(|v| f64::from(v.to_f32())).collect::<Vec<_>>(),
                m,
            );
            for (got, want) in out_b.iter().zip(&want_b) {
                assert!(
                    (f64::from(got.to_f32()) - want).abs() <= 2f64.powi(-8) * want.abs() + 1e-6
                );
            }
        }
    }

    #[test]
    fn bad_shapes_are_errors_naming_the_sizes() {
        let (q, scale) = (vec![0u8; 12], vec![1f32; 3]);
        let w = QuantWeight {
            code: Code::E4m3,
            q: &q,
            scale: &scale,
            n: 3,
            k: 4,
            block_k: 4,
            col_offset: 0,
        };
        let err = w.linear(&[0f32; 7], 2, &mut [0f32; 6], 1).unwrap_err();
        assert_eq!(err.to_string(), "x (M x K) must have 8 elements, got 7");
        let bad = QuantWeight { col_offset: 4, ..w };
        assert!(bad
            .linear(&[0f32; 8], 2, &mut [0f32; 6], 1)
            .unwrap_err()
            .to_string()
            .contains("col_offset"));
        let short = QuantWeight {
            scale: &scale[..2],
            ..w
        };
        assert_eq!(
            short
                .linear(&[0f32; 8], 2, &mut [0f32; 6], 1)
                .unwrap_err()
                .to_string(),
            "scale (N x KB) must have 3 elements, got 2"
        );
    }
}
