//! Python wrappers of MoE routing and the expert-parallel all-to-all plans and buffers.

use numpy::{PyArray1, PyArray2, PyArrayMethods, PyReadonlyArray2, PyUntypedArrayMethods};
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;

use super::{extract_ints, non_negative, py_err};
use crate::a2a::{plan_dispatch as plan_dispatch_rs, plan_receive as plan_receive_rs};
use crate::a2a_buffers::{A2aCapacity, PhaseHandle, PhaseRing};
use crate::error::CoreError as RustCoreError;
use crate::routing::route as route_rs;

/// Expert-sorted order and per-rank counts of one MoE layer's routing (see `_core.pyi`).
#[pyclass(module = "expertmesh._core", name = "RoutingPlan", frozen)]
pub(super) struct PyRoutingPlan {
    /// `[T*k]` pair ids sorted by expert (stable).
    #[pyo3(get)]
    sorted_pair_ids: Py<PyArray1<i64>>,
    /// `[T*k]` position of each pair in sorted order.
    #[pyo3(get)]
    pair_positions: Py<PyArray1<i64>>,
    /// `[E]` pairs per expert.
    #[pyo3(get)]
    tokens_per_expert: Py<PyArray1<i64>>,
    /// `[E+1]` offsets of each expert's pairs.
    #[pyo3(get)]
    expert_offsets: Py<PyArray1<i64>>,
    /// `[R]` distinct tokens sent to each rank.
    #[pyo3(get)]
    rank_send_counts: Py<PyArray1<i64>>,
}

/// Copies a `[T, k]` int32/int64 array (so no other thread can change it while the GIL is free).
fn read_topk_ids(obj: &Bound<'_, PyAny>) -> PyResult<(Vec<i64>, usize, usize)> {
    if let Ok(a) = obj.extract::<PyReadonlyArray2<'_, i32>>() {
        let shape = (a.shape()[0], a.shape()[1]);
        return Ok((
            a.as_array().iter().map(|&x| x.into()).collect(),
            shape.0,
            shape.1,
        ));
    }
    if let Ok(a) = obj.extract::<PyReadonlyArray2<'_, i64>>() {
        let shape = (a.shape()[0], a.shape()[1]);
        return Ok((a.as_array().iter().copied().collect(), shape.0, shape.1));
    }
    let ty = obj
        .get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_default();
    Err(PyTypeError::new_err(format!(
        "topk_ids must be a 2-D int32 or int64 numpy array [T, k], got {ty}"
    )))
}

#[pyfunction]
#[pyo3(signature = (topk_ids, num_experts, num_ranks=1))]
pub(super) fn route(
    py: Python<'_>,
    topk_ids: &Bound<'_, PyAny>,
    num_experts: i64,
    num_ranks: i64,
) -> PyResult<PyRoutingPlan> {
    let (ids, t, k) = read_topk_ids(topk_ids)?;
    let (e, r) = (
        non_negative("num_experts", num_experts)?,
        non_negative("num_ranks", num_ranks)?,
    );
    let plan = py
        .detach(move || route_rs(&ids, t, k, e, r))
        .map_err(py_err)?;
    Ok(PyRoutingPlan {
        sorted_pair_ids: PyArray1::from_vec(py, plan.sorted_pair_ids).unbind(),
        pair_positions: PyArray1::from_vec(py, plan.pair_positions).unbind(),
        tokens_per_expert: PyArray1::from_vec(py, plan.tokens_per_expert).unbind(),
        expert_offsets: PyArray1::from_vec(py, plan.expert_offsets).unbind(),
        rank_send_counts: PyArray1::from_vec(py, plan.rank_send_counts).unbind(),
    })
}

/// Shot 1 of the expert-parallel all-to-all, sending side (see `_core.pyi`).
#[pyclass(module = "expertmesh._core", name = "DispatchPlan", frozen)]
pub(super) struct PyDispatchPlan {
    /// `[S]` token of each send row, grouped by destination rank.
    #[pyo3(get)]
    send_token_ids: Py<PyArray1<i64>>,
    /// `[S, k]` local expert id on the destination per slot, -1 if elsewhere.
    #[pyo3(get)]
    send_local_experts: Py<PyArray2<i64>>,
    /// `[R]` rows per destination rank.
    #[pyo3(get)]
    send_counts: Py<PyArray1<i64>>,
    /// `[R+1]` offsets of each destination's rows.
    #[pyo3(get)]
    send_offsets: Py<PyArray1<i64>>,
}

#[pyfunction]
#[pyo3(signature = (topk_ids, num_experts, num_ranks))]
pub(super) fn plan_dispatch(
    py: Python<'_>,
    topk_ids: &Bound<'_, PyAny>,
    num_experts: i64,
    num_ranks: i64,
) -> PyResult<PyDispatchPlan> {
    let (ids, t, k) = read_topk_ids(topk_ids)?;
    let (e, r) = (
        non_negative("num_experts", num_experts)?,
        non_negative("num_ranks", num_ranks)?,
    );
    let plan = py
        .detach(move || plan_dispatch_rs(&ids, t, k, e, r))
        .map_err(py_err)?;
    let rows = plan.send_token_ids.len();
    Ok(PyDispatchPlan {
        send_token_ids: PyArray1::from_vec(py, plan.send_token_ids).unbind(),
        send_local_experts: PyArray1::from_vec(py, plan.send_local_experts)
            .reshape([rows, k])
            .expect("rows * k elements by construction")
            .unbind(),
        send_counts: PyArray1::from_vec(py, plan.send_counts).unbind(),
        send_offsets: PyArray1::from_vec(py, plan.send_offsets).unbind(),
    })
}

/// Shot 1, receiving side: receive offsets and the grouping by local expert (see `_core.pyi`).
#[pyclass(module = "expertmesh._core", name = "ReceivePlan", frozen)]
pub(super) struct PyReceivePlan {
    /// `[R+1]` prefix sums of the received counts.
    #[pyo3(get)]
    recv_offsets: Py<PyArray1<i64>>,
    /// `[Q]` valid pair ids (row * k + slot) sorted by local expert.
    #[pyo3(get)]
    sorted_pair_ids: Py<PyArray1<i64>>,
    /// `[El]` pairs per local expert.
    #[pyo3(get)]
    tokens_per_expert: Py<PyArray1<i64>>,
    /// `[El+1]` offsets of each local expert's pairs.
    #[pyo3(get)]
    expert_offsets: Py<PyArray1<i64>>,
}

#[pyfunction]
#[pyo3(signature = (recv_counts, recv_local_experts, experts_per_rank))]
pub(super) fn plan_receive(
    py: Python<'_>,
    recv_counts: &Bound<'_, PyAny>,
    recv_local_experts: &Bound<'_, PyAny>,
    experts_per_rank: i64,
) -> PyResult<PyReceivePlan> {
    let counts = extract_ints(recv_counts, "recv_counts")?;
    let (local, _, k) = read_topk_ids(recv_local_experts)?;
    let per_rank = non_negative("experts_per_rank", experts_per_rank)?;
    let plan = py
        .detach(move || plan_receive_rs(&counts, &local, k.max(1), per_rank))
        .map_err(py_err)?;
    Ok(PyReceivePlan {
        recv_offsets: PyArray1::from_vec(py, plan.recv_offsets).unbind(),
        sorted_pair_ids: PyArray1::from_vec(py, plan.sorted_pair_ids).unbind(),
        tokens_per_expert: PyArray1::from_vec(py, plan.tokens_per_expert).unbind(),
        expert_offsets: PyArray1::from_vec(py, plan.expert_offsets).unbind(),
    })
}

/// Worst-case all-to-all buffer sizes (see `_core.pyi`).
#[pyclass(module = "expertmesh._core", name = "A2aCapacity", frozen)]
pub(super) struct PyA2aCapacity {
    /// The Rust capacity.
    inner: A2aCapacity,
}

#[pymethods]
impl PyA2aCapacity {
    #[new]
    #[pyo3(signature = (*, max_tokens_per_rank, top_k, num_experts, num_ranks))]
    fn new(
        max_tokens_per_rank: i64,
        top_k: i64,
        num_experts: i64,
        num_ranks: i64,
    ) -> PyResult<Self> {
        let inner = A2aCapacity::new(
            non_negative("max_tokens_per_rank", max_tokens_per_rank)?,
            non_negative("top_k", top_k)?,
            non_negative("num_experts", num_experts)?,
            non_negative("num_ranks", num_ranks)?,
        )
        .map_err(py_err)?;
        Ok(PyA2aCapacity { inner })
    }
    #[getter]
    fn max_tokens_per_rank(&self) -> usize {
        self.inner.max_tokens_per_rank
    }
    #[getter]
    fn experts_per_rank(&self) -> usize {
        self.inner.experts_per_rank
    }
    #[getter]
    fn slot_rows(&self) -> usize {
        self.inner.slot_rows()
    }
    #[getter]
    fn max_send_rows(&self) -> usize {
        self.inner.max_send_rows()
    }
    #[getter]
    fn max_recv_rows(&self) -> usize {
        self.inner.max_recv_rows()
    }
    #[getter]
    fn max_recv_pairs(&self) -> usize {
        self.inner.max_recv_pairs()
    }
    fn recv_buffer_bytes(&self, row_bytes: i64, num_phases: i64) -> PyResult<usize> {
        Ok(self.inner.recv_buffer_bytes(
            non_negative("row_bytes", row_bytes)?,
            non_negative("num_phases", num_phases)?,
        ))
    }
    fn num_chunks(&self, max_tokens_any_rank: i64) -> PyResult<usize> {
        Ok(self
            .inner
            .num_chunks(non_negative("max_tokens_any_rank", max_tokens_any_rank)?))
    }
    fn check_send_counts(&self, send_counts: &Bound<'_, PyAny>) -> PyResult<()> {
        let counts = extract_ints(send_counts, "send_counts")?;
        self.inner.check_send_counts(&counts).map_err(py_err)
    }
    fn __repr__(&self) -> String {
        let c = &self.inner;
        format!(
            "A2aCapacity(max_tokens_per_rank={}, top_k={}, num_ranks={}, experts_per_rank={})",
            c.max_tokens_per_rank, c.top_k, c.num_ranks, c.experts_per_rank
        )
    }
}

/// Double-buffer phase bookkeeping (see `_core.pyi`).
#[pyclass(module = "expertmesh._core", name = "PhaseRing")]
pub(super) struct PyPhaseRing {
    /// The Rust ring.
    inner: PhaseRing,
}

/// An owned claim on one phase; `PhaseRing.release` takes the Rust handle out of it.
#[pyclass(module = "expertmesh._core", name = "PhaseHandle")]
pub(super) struct PyPhaseHandle {
    /// The claim, `None` once released.
    inner: Option<PhaseHandle>,
    /// Phase, kept for reading after release.
    #[pyo3(get)]
    phase: usize,
    /// Call sequence number, kept for reading after release.
    #[pyo3(get)]
    seq: u64,
}

#[pymethods]
impl PyPhaseHandle {
    #[getter]
    fn released(&self) -> bool {
        self.inner.is_none()
    }
    fn __repr__(&self) -> String {
        format!(
            "PhaseHandle(phase={}, seq={}, released={})",
            self.phase,
            self.seq,
            self.inner.is_none()
        )
    }
}

#[pymethods]
impl PyPhaseRing {
    #[new]
    #[pyo3(signature = (num_phases=2))]
    fn new(num_phases: i64) -> PyResult<Self> {
        let inner = PhaseRing::new(non_negative("num_phases", num_phases)?).map_err(py_err)?;
        Ok(PyPhaseRing { inner })
    }
    fn acquire(&mut self) -> PyResult<PyPhaseHandle> {
        let h = self.inner.acquire().map_err(py_err)?;
        Ok(PyPhaseHandle {
            phase: h.phase,
            seq: h.seq,
            inner: Some(h),
        })
    }
    fn release(&mut self, mut handle: PyRefMut<'_, PyPhaseHandle>) -> PyResult<()> {
        match handle.inner.take() {
            Some(h) => self.inner.release(h).map_err(py_err),
            None => Err(py_err(RustCoreError::ForeignPhaseHandle {
                phase: handle.phase,
                seq: handle.seq,
            })),
        }
    }
    #[getter]
    fn num_phases(&self) -> usize {
        self.inner.num_phases()
    }
    #[getter]
    fn next_seq(&self) -> u64 {
        self.inner.next_seq()
    }
    #[getter]
    fn num_in_flight(&self) -> usize {
        self.inner.num_in_flight()
    }
}
