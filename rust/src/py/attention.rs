//! Python wrapper of the CPU paged attention (kernels/expertmesh_kernels/cpu_attention.py).

use numpy::{PyReadonlyArray1, PyReadonlyArray2, PyUntypedArrayMethods};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use super::py_err;
use crate::attention_item::{Bf16, Elem};
use crate::paged_attention::PagedAttention;

/// Tensor addresses and sizes as the launcher passes them: the launcher has checked dtype,
/// device, contiguity and shape; the kernel checks every value it indexes with.
struct Buffers {
    /// Output [T, NH, D], q's dtype.
    out: usize,
    /// Queries [T, NH, D].
    q: usize,
    /// K cache [NB, B, NKV, D].
    k_cache: usize,
    /// V cache [NB, B, NKV, D].
    v_cache: usize,
    /// Log-sum-exp [T, NH] fp32, when asked for.
    lse: Option<usize>,
}

/// Everything else a call passes: shapes (T, NH, NKV, D, NB, B), the batch metadata, options.
struct Call<'a> {
    /// (T, NH, NKV, D, NB, B).
    dims: (usize, usize, usize, usize, usize, usize),
    /// Block tables [N, MB].
    tables: &'a [i32],
    /// Query start offsets [N + 1].
    qsl: &'a [i32],
    /// KV lengths after this step [N].
    lens: &'a [i32],
    /// Score scale.
    scale: f32,
    /// Sliding window, if any.
    sliding_window: Option<usize>,
    /// Worker threads.
    threads: usize,
}

/// Runs the kernel on element type `T` over the buffers (GIL released by the caller).
///
/// # Safety
/// Each address must point to a live, contiguous CPU buffer of `T` of the size implied by
/// the shapes (`lse`: fp32), not written by anything else during the call.
unsafe fn run<T: Elem>(b: &Buffers, c: &Call<'_>) -> Result<(), crate::error::CoreError> {
    let (t, nh, nkv, d, nb, bs) = c.dims;
    let cache = nb * bs * nkv * d;
    let attn = PagedAttention {
        q: std::slice::from_raw_parts(b.q as *const T, t * nh * d),
        k_cache: std::slice::from_raw_parts(b.k_cache as *const T, cache),
        v_cache: std::slice::from_raw_parts(b.v_cache as *const T, cache),
        block_tables: c.tables,
        query_start_loc: c.qsl,
        seq_lens: c.lens,
        num_heads: nh,
        num_kv_heads: nkv,
        head_dim: d,
        block_size: bs,
        scale: c.scale,
        sliding_window: c.sliding_window,
    };
    let out = std::slice::from_raw_parts_mut(b.out as *mut T, t * nh * d);
    let lse = b
        .lse
        .map(|p| std::slice::from_raw_parts_mut(p as *mut f32, t * nh));
    attn.run(out, lse, c.threads)
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
    // SAFETY (both arms): the launcher passes contiguous CPU tensors of this dtype and shapes.
    let call = Call {
        dims,
        tables,
        qsl,
        lens,
        scale,
        sliding_window,
        threads,
    };
    let result = match dtype {
        "float32" => py.detach(|| unsafe { run::<f32>(&buffers, &call) }),
        "bfloat16" => py.detach(|| unsafe { run::<Bf16>(&buffers, &call) }),
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
