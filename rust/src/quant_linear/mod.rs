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
//! With bf16 x on a CPU with AVX-512 BF16 the rows are decoded to bf16 instead and multiplied
//! by VDPBF16PS, twice the multiply-adds per instruction (avx512.rs); otherwise AVX2 (avx2.rs).
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

/// K-blocks that columns [col_offset, col_offset + k) of a blocked row touch (0 with block_k 0,
/// which `QuantWeight::linear` refuses).
pub fn num_blocks(k: usize, block_k: usize, col_offset: usize) -> usize {
    if block_k == 0 {
        0
    } else {
        (col_offset + k).div_ceil(block_k)
    }
}

impl QuantWeight<'_> {
    /// K-blocks per row.
    pub fn num_blocks(&self) -> usize {
        num_blocks(self.k, self.block_k, self.col_offset)
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
            // SAFETY: Path::usable checked AVX2, FMA and F16C.
            unsafe { self.dequantize_rows_avx2(n0, rows, w, kp) };
            return;
        }
        let _ = simd;
        self.dequantize_rows_portable(n0, rows, w, kp);
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
    pub(super) fn for_each_segment(&self, row: usize, mut f: impl FnMut(usize, usize, f32)) {
        let scales = &self.scale[row * self.num_blocks()..];
        let (mut c, mut b) = (0, 0);
        while c < self.k {
            let end = ((b + 1) * self.block_k - self.col_offset).min(self.k);
            f(c, end, scales[b]);
            (c, b) = (end, b + 1);
        }
    }

    /// y [M, N] = x [M, K] · deq(q)ᵀ on up to `threads` threads, on the fastest path this CPU has.
    pub fn linear<T: Elem>(
        &self,
        x: &[T],
        m: usize,
        out: &mut [T],
        threads: usize,
    ) -> CoreResult<()> {
        self.linear_on(Path::best::<T>(), x, m, out, threads)
    }

    /// `linear` on a given path (`path` must be usable here: Path::usable).
    fn linear_on<T: Elem>(
        &self,
        path: Path,
        x: &[T],
        m: usize,
        out: &mut [T],
        threads: usize,
    ) -> CoreResult<()> {
        self.check()?;
        check_len("x (M x K)", x.len(), m * self.k)?;
        check_len("out (M x N)", out.len(), m * self.n)?;
        if m == 0 || self.n == 0 {
            return Ok(());
        }
        let out = TileSink::new(out, self.n);
        #[cfg(target_arch = "x86_64")]
        if path == Path::Bf16Dot {
            // SAFETY: Path::usable checked AVX-512 BF16 and that T is Bf16 (a repr(transparent) u16).
            let x = unsafe { std::slice::from_raw_parts(x.as_ptr() as *const u16, x.len()) };
            self.linear_bf16_dot(x, m, &out, threads);
            return Ok(());
        }
        let simd = path == Path::Avx2;
        let kp = self.k.next_multiple_of(16); // rows padded with zeros to whole 16-lane registers
        let mut xf = vec![0f32; m * kp];
        for (dst, src) in xf.chunks_exact_mut(kp).zip(x.chunks_exact(self.k.max(1))) {
            for (d, s) in dst.iter_mut().zip(src) {
                *d = s.to_f32();
            }
        }
        for_each_index(threads, self.n.div_ceil(TASK_ROWS), &|task| {
            let mut w = vec![0f32; ROWS * kp];
            let mut tile = [[0f32; ROWS]; XROWS];
            for n0 in (task * TASK_ROWS..((task + 1) * TASK_ROWS).min(self.n)).step_by(ROWS) {
                let rows = ROWS.min(self.n - n0);
                self.dequantize_rows(simd, n0, rows, &mut w, kp);
                for m0 in (0..m).step_by(XROWS) {
                    let mt = XROWS.min(m - m0);
                    multiply(simd, &xf[m0 * kp..(m0 + mt) * kp], &w, kp, mt, &mut tile);
                    out.store(&tile, m0, mt, n0, rows);
                }
            }
        });
        Ok(())
    }
}

/// The output [M, N], written by tasks that each own a disjoint range of columns.
struct TileSink<T> {
    /// Address of out[0][0].
    ptr: usize,
    /// Columns N.
    n: usize,
    /// The element type written.
    _elem: std::marker::PhantomData<T>,
}

impl<T: Elem> TileSink<T> {
    fn new(out: &mut [T], n: usize) -> Self {
        Self {
            ptr: out.as_mut_ptr() as usize,
            n,
            _elem: std::marker::PhantomData,
        }
    }

    /// out[m0 + i][n0 + r] = tile[i][r] for i < mt, r < rows, rounded to T.
    fn store(&self, tile: &[[f32; ROWS]; XROWS], m0: usize, mt: usize, n0: usize, rows: usize) {
        for (i, row) in tile.iter().enumerate().take(mt) {
            for (r, &v) in row.iter().enumerate().take(rows) {
                // SAFETY: the sink outlives the tasks (it borrows `out` in linear_on), each task
                // stores only its own columns [n0, n0 + rows), and (m0 + i, n0 + r) is inside [M, N].
                unsafe { *(self.ptr as *mut T).add((m0 + i) * self.n + n0 + r) = T::from_f32(v) };
            }
        }
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
        // SAFETY: Path::usable checked AVX2 and FMA; rows are kp long, kp a multiple of 16.
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

mod path;
use path::Path;

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;

#[cfg(test)]
mod tests;
