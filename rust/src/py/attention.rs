//! Python wrapper of the CPU paged attention (kernels/expertmesh_kernels/cpu_attention.py).

use numpy::{PyReadonlyArray1, PyReadonlyArray2, PyUntypedArrayMethods};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use super::py_err;
use crate::attention_tile::{Bf16, Elem};
use crate::paged_attention::PagedAttention;

/// Tensor addresses and sizes as the launcher passes them: the launcher has checked dtype,
/// device, contiguity and shape; the kernel checks every value it indexes with.
struct Buffers {
    out: usize,
    q: usize,
    k_cache: usize,
    v_cache: usize,
    lse: Option<usize>,
}

/// Runs the kernel on element type `T` over the buffers (GIL released by the caller).
///
/// # Safety
/// Each address must point to a live, contiguous CPU buffer of `T` of the size implied by
/// the shapes (`lse`: fp32), not written by anything else during the call.
#[allow(clippy::too_many_arguments)]
unsafe fn run<T: Elem>(
    b: &Buffers,
    dims: (usize, usize, usize, usize, usize, usize),
    block_tables: &[i32],
    query_start_loc: &[i32],
    seq_lens: &[i32],
    scale: f32,
    sliding_window: Option<usize>,
    threads: usize,
) -> Result<(), crate::error::CoreError> {
    let (t, nh, nkv, d, nb, bs) = dims;
    let cache = nb * bs * nkv * d;
    let attn = PagedAttention {
        q: std::slice::from_raw_parts(b.q as *const T, t * nh * d),
        k_cache: std::slice::from_raw_parts(b.k_cache as *const T, cache),
        v_cache: std::slice::from_raw_parts(b.v_cache as *const T, cache),
        block_tables,
        query_start_loc,
        seq_lens,
        num_heads: nh,
        num_kv_heads: nkv,
        head_dim: d,
        block_size: bs,
        scale,
        sliding_window,
    };
    let out = std::slice::from_raw_parts_mut(b.out as *mut T, t * nh * d);
    let lse = b
        .lse
        .map(|p| std::slice::from_raw_parts_mut(p as *mut f32, t * nh));
    attn.run(out, lse, threads)
}

/// Paged attention over tensors given by address; see `_core.pyi`.
#[pyfunction]
#[pyo3(signature = (dtype, out, q, k_cache, v_cache, dims, block_tables, query_start_loc, seq_lens, scale, sliding_window=None, lse=None, threads=1))]
#[allow(clippy::too_many_arguments)]
pub(super) fn paged_attention(
    py: Python<'_>,
    dtype: &str,
    out: usize,
    q: usize,
    k_cache: usize,
    v_cache: usize,
    dims: (usize, usize, usize, usize, usize, usize),
    block_tables: PyReadonlyArray2<'_, i32>,
    query_start_loc: PyReadonlyArray1<'_, i32>,
    seq_lens: PyReadonlyArray1<'_, i32>,
    scale: f32,
    sliding_window: Option<usize>,
    lse: Option<usize>,
    threads: usize,
) -> PyResult<()> {
    let buffers = Buffers {
        out,
        q,
        k_cache,
        v_cache,
        lse,
    };
    let rows = block_tables.shape()[0];
    let (tables, qsl, lens) = (
        block_tables.as_slice()?,
        query_start_loc.as_slice()?,
        seq_lens.as_slice()?,
    );
    if rows != lens.len() {
        return Err(PyValueError::new_err(format!(
            "block_tables must have one row per request ({}), got {rows}",
            lens.len()
        )));
    }
    let result = match dtype {
        // SAFETY: the launcher passes contiguous CPU tensors of this dtype and these shapes.
        "float32" => py.detach(|| unsafe {
            run::<f32>(
                &buffers,
                dims,
                tables,
                qsl,
                lens,
                scale,
                sliding_window,
                threads,
            )
        }),
        "bfloat16" => py.detach(|| unsafe {
            run::<Bf16>(
                &buffers,
                dims,
                tables,
                qsl,
                lens,
                scale,
                sliding_window,
                threads,
            )
        }),
        other => {
            return Err(PyValueError::new_err(format!(
                "dtype must be \"float32\" or \"bfloat16\", got {other:?}"
            )))
        }
    };
    result.map_err(py_err)
}

/// Runs the core's parallel CPU loops on the OpenMP runtime at `library` (torch's libgomp,
/// already loaded) instead of a rayon pool of their own; see `_core.pyi`.
#[pyfunction]
pub(super) fn use_openmp(library: &str) -> PyResult<()> {
    crate::cpu_pool::use_openmp(library).map_err(py_err)
}
