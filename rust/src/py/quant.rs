//! Python wrapper of the CPU quantized linear layer (kernels/expertmesh_kernels/quant.py's launcher).

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use super::py_err;
use crate::attention_item::{Bf16, Elem};
use crate::error::CoreResult;
use crate::quant_linear::{num_blocks, Code, QuantWeight};

/// The call's shapes: (M, N, K, block_k, col_offset).
type Dims = (usize, usize, usize, usize, usize);

/// The weight whose values and scales lie at addresses `q` and `scale`.
///
/// # Safety
/// Both addresses must point to live, contiguous CPU buffers of the sizes the dims imply
/// (q: N·K bytes; scale: N·KB f32), unchanged while the weight is in use.
unsafe fn weight_at<'a>(code: Code, q: usize, scale: usize, dims: Dims) -> QuantWeight<'a> {
    let (_, n, k, block_k, col_offset) = dims;
    let kb = num_blocks(k, block_k, col_offset);
    QuantWeight {
        code,
        q: std::slice::from_raw_parts(q as *const u8, n * k),
        scale: std::slice::from_raw_parts(scale as *const f32, n * kb),
        n,
        k,
        block_k,
        col_offset,
    }
}

/// Runs `w` on element type `T` (GIL released by the caller).
///
/// # Safety
/// `x` and `out` must point to live, contiguous CPU buffers of `T` (M·K and M·N elements),
/// `out` not read or written by anything else meanwhile.
unsafe fn run<T: Elem>(
    w: &QuantWeight,
    out: usize,
    x: usize,
    m: usize,
    threads: usize,
) -> CoreResult<()> {
    let x = std::slice::from_raw_parts(x as *const T, m * w.k);
    let out = std::slice::from_raw_parts_mut(out as *mut T, m * w.n);
    w.linear(x, m, out, threads)
}

/// y = x · deq(q)ᵀ over tensors given by address; see `_core.pyi`.
#[pyfunction]
#[pyo3(signature = (code, dtype, out, x, q, scale, dims, threads=1))]
#[allow(clippy::too_many_arguments)]
pub(super) fn quant_linear(
    py: Python<'_>,
    code: &str,
    dtype: &str,
    out: usize,
    x: usize,
    q: usize,
    scale: usize,
    dims: Dims,
    threads: usize,
) -> PyResult<()> {
    let code = match code {
        "fp8" => Code::E4m3,
        "int8" => Code::Int8,
        other => {
            return Err(PyValueError::new_err(format!(
                "code must be \"fp8\" or \"int8\", got {other:?}"
            )))
        }
    };
    // SAFETY (here and both arms): the launcher passes contiguous CPU tensors of this dtype and shapes.
    let w = unsafe { weight_at(code, q, scale, dims) };
    let m = dims.0;
    let result = match dtype {
        "float32" => py.detach(|| unsafe { run::<f32>(&w, out, x, m, threads) }),
        "bfloat16" => py.detach(|| unsafe { run::<Bf16>(&w, out, x, m, threads) }),
        other => {
            return Err(PyValueError::new_err(format!(
                "dtype must be \"float32\" or \"bfloat16\", got {other:?}"
            )))
        }
    };
    result.map_err(py_err)
}
