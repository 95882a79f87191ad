//! The Python module `expertmesh._core`: thin wrappers over the Rust API. This is the only file
//! that knows about Python. Real work (schedule, update, route) runs with the GIL released;
//! arrays are handed to numpy without copying (numpy takes ownership of the Rust `Vec`s).

use numpy::{
    PyArray1, PyArray2, PyArrayMethods, PyReadonlyArray1, PyReadonlyArray2, PyReadwriteArray2,
    PyUntypedArrayMethods,
};
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::a2a::{plan_dispatch as plan_dispatch_rs, plan_receive as plan_receive_rs};
use crate::a2a_buffers::{A2aCapacity, PhaseHandle, PhaseRing};
use crate::error::{check_at_least, CoreError as RustCoreError};
use crate::moe_exchange::MoeDispatch;
use crate::request::{FinishReason, MAX_TOKEN_ID};
use crate::routing::route as route_rs;
use crate::scheduler::{NewRequest, Scheduler, SchedulerConfig};
use crate::scheduler_output::SchedulerOutput;
use crate::shm_rows::{RowSource, SegmentLayout, ShmRows};

// The class is defined in expertmesh/errors.py, so the core's errors sit in the package's one
// hierarchy (ExpertMeshError); the core raises it by import.
pyo3::import_exception!(expertmesh.errors, CoreError);
pyo3::import_exception!(expertmesh.errors, CollectiveError);

fn py_err(e: RustCoreError) -> PyErr {
    match e {
        RustCoreError::PeerDied { .. } | RustCoreError::PeerTimeout { .. } => {
            CollectiveError::new_err(e.to_string())
        }
        _ => CoreError::new_err(e.to_string()),
    }
}

/// A Python int argument that must be >= 0, as usize (CoreError otherwise, not OverflowError).
fn non_negative(field: &str, value: i64) -> PyResult<usize> {
    check_at_least(field, value.into(), 0).map_err(py_err)?;
    Ok(value as usize)
}

/// Reads a 1-D int sequence: a numpy int64/int32 array (fast path) or any sequence of ints.
fn extract_ints(obj: &Bound<'_, PyAny>, field: &str) -> PyResult<Vec<i64>> {
    if let Ok(a) = obj.extract::<PyReadonlyArray1<'_, i64>>() {
        return Ok(a.as_array().to_vec());
    }
    if let Ok(a) = obj.extract::<PyReadonlyArray1<'_, i32>>() {
        return Ok(a.as_array().iter().map(|&x| x.into()).collect());
    }
    obj.extract::<Vec<i64>>().map_err(|_| {
        let ty = obj
            .get_type()
            .name()
            .map(|n| n.to_string())
            .unwrap_or_default();
        PyTypeError::new_err(format!(
            "{field} must be a sequence of ints or a 1-D int64/int32 array, got {ty}"
        ))
    })
}

/// The continuous-batching scheduler (see `_core.pyi`).
#[pyclass(module = "expertmesh._core", name = "Scheduler")]
struct PyScheduler {
    /// The Rust scheduler.
    inner: Scheduler,
    /// Set while a call runs; left set if it panicked, which makes later calls fail cleanly.
    busy_or_poisoned: bool,
}

impl PyScheduler {
    /// Runs `f` on the scheduler, with the GIL released if `detach`; poisons on panic.
    fn guarded<T: Send>(
        &mut self,
        py: Python<'_>,
        detach: bool,
        f: impl FnOnce(&mut Scheduler) -> Result<T, RustCoreError> + Send,
    ) -> PyResult<T> {
        if self.busy_or_poisoned {
            return Err(py_err(RustCoreError::Poisoned));
        }
        self.busy_or_poisoned = true;
        let inner = &mut self.inner;
        let result = if detach {
            py.detach(move || f(inner))
        } else {
            f(inner)
        };
        self.busy_or_poisoned = false;
        result.map_err(py_err)
    }
}

#[pymethods]
impl PyScheduler {
    #[new]
    #[pyo3(signature = (*, num_blocks, block_size, max_num_seqs, max_num_batched_tokens, max_model_len, enable_prefix_caching=true))]
    fn new(
        num_blocks: i64,
        block_size: i64,
        max_num_seqs: i64,
        max_num_batched_tokens: i64,
        max_model_len: i64,
        enable_prefix_caching: bool,
    ) -> PyResult<Self> {
        let config = SchedulerConfig {
            num_blocks: non_negative("num_blocks", num_blocks)?,
            block_size: non_negative("block_size", block_size)?,
            max_num_seqs: non_negative("max_num_seqs", max_num_seqs)?,
            max_num_batched_tokens: non_negative("max_num_batched_tokens", max_num_batched_tokens)?,
            max_model_len: non_negative("max_model_len", max_model_len)?,
            enable_prefix_caching,
        };
        Ok(PyScheduler {
            inner: Scheduler::new(config).map_err(py_err)?,
            busy_or_poisoned: false,
        })
    }

    #[pyo3(signature = (request_id, prompt_token_ids, *, max_tokens, stop_token_ids=Vec::new(), eos_token_id=None, ignore_eos=false, priority=0))]
    #[allow(clippy::too_many_arguments)]
    fn add_request(
        &mut self,
        py: Python<'_>,
        request_id: u64,
        prompt_token_ids: &Bound<'_, PyAny>,
        max_tokens: i64,
        stop_token_ids: Vec<i64>,
        eos_token_id: Option<i64>,
        ignore_eos: bool,
        priority: i64,
    ) -> PyResult<()> {
        let prompt_token_ids = extract_ints(prompt_token_ids, "prompt_token_ids")?;
        let new = NewRequest {
            request_id,
            prompt_token_ids,
            max_tokens,
            stop_token_ids,
            eos_token_id,
            ignore_eos,
            priority,
        };
        self.guarded(py, false, move |s| s.add_request(new))
    }

    fn schedule(&mut self, py: Python<'_>) -> PyResult<PySchedulerOutput> {
        let out = self.guarded(py, true, |s| s.schedule())?;
        Ok(PySchedulerOutput::new(py, out))
    }

    fn update(
        &mut self,
        py: Python<'_>,
        sampled_token_ids: &Bound<'_, PyAny>,
    ) -> PyResult<Vec<(u64, &'static str)>> {
        let tokens = extract_ints(sampled_token_ids, "sampled_token_ids")?;
        let finished = self.guarded(py, true, move |s| s.update(&tokens))?;
        Ok(finished
            .into_iter()
            .map(|(id, r)| (id, r.as_str()))
            .collect())
    }

    fn finish_request(&mut self, py: Python<'_>, request_id: u64, reason: &str) -> PyResult<bool> {
        let reason = match reason {
            "stop" => FinishReason::Stop,
            "abort" => FinishReason::Abort,
            "error" => FinishReason::Error,
            other => {
                return Err(py_err(RustCoreError::InvalidFinishReason {
                    reason: other.to_string(),
                }))
            }
        };
        self.guarded(py, false, move |s| Ok(s.finish_request(request_id, reason)))
    }

    fn abort(&mut self, py: Python<'_>, request_id: u64) -> PyResult<bool> {
        self.guarded(py, false, move |s| Ok(s.abort(request_id)))
    }

    fn has_unfinished(&self) -> bool {
        self.inner.has_unfinished()
    }

    #[getter]
    fn num_waiting(&self) -> usize {
        self.inner.num_waiting()
    }

    #[getter]
    fn num_running(&self) -> usize {
        self.inner.num_running()
    }

    #[getter]
    fn num_free_blocks(&self) -> usize {
        self.inner.num_free_blocks()
    }

    #[getter]
    fn num_blocks(&self) -> usize {
        self.inner.num_blocks()
    }

    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.inner.stats();
        let d = PyDict::new(py);
        d.set_item("prefix_cache_queries", s.prefix_cache_queries)?;
        d.set_item("prefix_cache_hits", s.prefix_cache_hits)?;
        d.set_item("num_preemptions", s.num_preemptions)?;
        d.set_item("num_free_blocks", s.num_free_blocks)?;
        d.set_item("num_cached_blocks", s.num_cached_blocks)?;
        Ok(d)
    }

    fn output_token_ids(&self, request_id: u64) -> PyResult<Vec<u32>> {
        self.inner
            .output_token_ids(request_id)
            .map(<[u32]>::to_vec)
            .map_err(py_err)
    }

    fn __repr__(&self) -> String {
        let c = self.inner.config();
        format!(
            "Scheduler(num_blocks={}, block_size={}, max_num_seqs={}, max_num_batched_tokens={}, \
             max_model_len={}, waiting={}, running={}, free_blocks={})",
            c.num_blocks,
            c.block_size,
            c.max_num_seqs,
            c.max_num_batched_tokens,
            c.max_model_len,
            self.inner.num_waiting(),
            self.inner.num_running(),
            self.inner.num_free_blocks()
        )
    }
}

/// One step's batch as numpy arrays (see `_core.pyi` for shapes).
#[pyclass(module = "expertmesh._core", name = "SchedulerOutput", frozen)]
struct PySchedulerOutput {
    /// `[N]` uint64 scheduled request ids in batch order.
    #[pyo3(get)]
    request_ids: Py<PyArray1<u64>>,
    /// `[T]` int32 token ids.
    #[pyo3(get)]
    input_ids: Py<PyArray1<i32>>,
    /// `[T]` int32 positions.
    #[pyo3(get)]
    positions: Py<PyArray1<i32>>,
    /// `[T]` int64 KV slots.
    #[pyo3(get)]
    slot_mapping: Py<PyArray1<i64>>,
    /// `[N+1]` int32 prefix sums of new tokens per request.
    #[pyo3(get)]
    query_start_loc: Py<PyArray1<i32>>,
    /// `[N]` int32 KV length after this step.
    #[pyo3(get)]
    seq_lens: Py<PyArray1<i32>>,
    /// `[N, MB]` int32 block tables padded with 0.
    #[pyo3(get)]
    block_tables: Py<PyArray2<i32>>,
    /// `[S]` uint64 requests that sample.
    #[pyo3(get)]
    sample_request_ids: Py<PyArray1<u64>>,
    /// `[S]` int32 index into T of each sampling request's last token.
    #[pyo3(get)]
    logits_indices: Py<PyArray1<i32>>,
    /// Prefill tokens in the batch.
    #[pyo3(get)]
    num_prefill_tokens: usize,
    /// Decode tokens in the batch.
    #[pyo3(get)]
    num_decode_tokens: usize,
    /// T == 0.
    #[pyo3(get)]
    is_empty: bool,
}

impl PySchedulerOutput {
    fn new(py: Python<'_>, out: SchedulerOutput) -> Self {
        let (n, mb) = (out.num_requests(), out.max_blocks_per_request);
        let is_empty = out.is_empty();
        let block_tables = PyArray1::from_vec(py, out.block_tables)
            .reshape([n, mb])
            .expect("n * mb elements by construction")
            .unbind();
        PySchedulerOutput {
            request_ids: PyArray1::from_vec(py, out.request_ids).unbind(),
            input_ids: PyArray1::from_vec(py, out.input_ids).unbind(),
            positions: PyArray1::from_vec(py, out.positions).unbind(),
            slot_mapping: PyArray1::from_vec(py, out.slot_mapping).unbind(),
            query_start_loc: PyArray1::from_vec(py, out.query_start_loc).unbind(),
            seq_lens: PyArray1::from_vec(py, out.seq_lens).unbind(),
            block_tables,
            sample_request_ids: PyArray1::from_vec(py, out.sample_request_ids).unbind(),
            logits_indices: PyArray1::from_vec(py, out.logits_indices).unbind(),
            num_prefill_tokens: out.num_prefill_tokens,
            num_decode_tokens: out.num_decode_tokens,
            is_empty,
        }
    }
}

#[pymethods]
impl PySchedulerOutput {
    fn __repr__(&self, py: Python<'_>) -> String {
        format!(
            "SchedulerOutput(num_requests={}, num_prefill_tokens={}, num_decode_tokens={}, num_samples={})",
            self.request_ids.bind(py).len(),
            self.num_prefill_tokens,
            self.num_decode_tokens,
            self.sample_request_ids.bind(py).len()
        )
    }
}

/// Expert-sorted order and per-rank counts of one MoE layer's routing (see `_core.pyi`).
#[pyclass(module = "expertmesh._core", name = "RoutingPlan", frozen)]
struct PyRoutingPlan {
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
fn route(
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
struct PyDispatchPlan {
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
fn plan_dispatch(
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
struct PyReceivePlan {
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
fn plan_receive(
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
struct PyA2aCapacity {
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
struct PyPhaseRing {
    /// The Rust ring.
    inner: PhaseRing,
}

/// An owned claim on one phase; `PhaseRing.release` takes the Rust handle out of it.
#[pyclass(module = "expertmesh._core", name = "PhaseHandle")]
struct PyPhaseHandle {
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

/// What a shared-memory MoE dispatch received (see `_core.pyi`).
#[pyclass(module = "expertmesh._core", name = "MoeDispatch", frozen)]
struct PyMoeDispatch {
    /// The Rust result, handed back to `combine_moe`.
    inner: MoeDispatch,
}

#[pymethods]
impl PyMoeDispatch {
    #[getter]
    fn pair_rows<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<i64>> {
        PyArray1::from_slice(py, &self.inner.pair_rows)
    }
    #[getter]
    fn expert_offsets<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<i64>> {
        PyArray1::from_slice(py, &self.inner.expert_offsets)
    }
    #[getter]
    fn send_counts(&self) -> Vec<usize> {
        self.inner.send_counts.clone()
    }
    #[getter]
    fn recv_counts(&self) -> Vec<usize> {
        self.inner.recv_counts.clone()
    }
    #[getter]
    fn num_pairs(&self) -> usize {
        self.inner.pair_ids.len()
    }
}

/// One rank's shared-memory rows (see `_core.pyi`): the data path of parallel/shm.py.
#[pyclass(module = "expertmesh._core", name = "ShmRows", frozen)]
struct PyShmRows {
    /// The Rust side, over the segments Python mapped.
    inner: ShmRows,
}

/// A source as Python passes it: (address, row stride, row bytes, rows, gather index or None).
type PySource<'py> = (
    usize,
    usize,
    usize,
    usize,
    Option<PyReadonlyArray1<'py, i64>>,
);

#[pymethods]
impl PyShmRows {
    #[new]
    #[pyo3(signature = (segments, rank, slot_rows, max_row_bytes, pids, timeout_s, num_phases=2))]
    fn new(
        segments: Vec<usize>,
        rank: usize,
        slot_rows: usize,
        max_row_bytes: usize,
        pids: Vec<i64>,
        timeout_s: f64,
        num_phases: usize,
    ) -> PyResult<Self> {
        let layout = SegmentLayout {
            world: segments.len(),
            phases: num_phases,
            slot_rows,
            max_row_bytes,
        };
        let timeout = std::time::Duration::from_secs_f64(timeout_s.max(0.0));
        // SAFETY: the contract in _core.pyi: the addresses are live mappings laid out as shm.py
        // lays them out, kept mapped by the caller (ShmTransport) while this object is used.
        let inner =
            unsafe { ShmRows::new(segments, layout, rank, pids, timeout) }.map_err(py_err)?;
        Ok(PyShmRows { inner })
    }
    #[getter]
    fn waited_s(&self) -> f64 {
        self.inner.waited_s()
    }
    #[getter]
    fn segment_bytes(&self) -> usize {
        self.inner.layout().bytes()
    }
    fn send(
        &self,
        py: Python<'_>,
        phase: usize,
        seq: u64,
        sources: Vec<PySource<'_>>,
        send_counts: Vec<usize>,
        packed: bool,
    ) -> PyResult<()> {
        let gathers: Vec<Option<&[i64]>> = sources
            .iter()
            .map(|s| s.4.as_ref().map(|a| a.as_slice()).transpose())
            .collect::<Result<_, _>>()?;
        let srcs: Vec<RowSource<'_>> = sources
            .iter()
            .zip(&gathers)
            .map(|(s, &gather)| RowSource {
                base: s.0,
                stride: s.1,
                width: s.2,
                rows: s.3,
                gather,
            })
            .collect();
        py.detach(|| self.inner.send(phase, seq, &srcs, &send_counts, packed))
            .map_err(py_err)
    }
    fn wait(&self, py: Python<'_>, phase: usize, seq: u64) -> PyResult<Vec<usize>> {
        py.detach(|| self.inner.wait(phase, seq)).map_err(py_err)
    }
    #[allow(clippy::too_many_arguments)]
    fn dispatch_moe(
        &self,
        py: Python<'_>,
        phase: usize,
        seq: u64,
        x: (usize, usize, usize, usize),
        ids: PyReadonlyArray2<'_, i64>,
        weights: PyReadonlyArray2<'_, f32>,
        num_experts: usize,
    ) -> PyResult<PyMoeDispatch> {
        let top_k = ids.shape()[1];
        let (ids, weights) = (ids.as_slice()?, weights.as_slice()?);
        let src = RowSource {
            base: x.0,
            stride: x.1,
            width: x.2,
            rows: x.3,
            gather: None,
        };
        let inner = py
            .detach(|| {
                self.inner
                    .dispatch_moe(phase, seq, src, ids, weights, top_k, num_experts)
            })
            .map_err(py_err)?;
        Ok(PyMoeDispatch { inner })
    }
    fn gather_pairs(
        &self,
        py: Python<'_>,
        phase: usize,
        dispatched: PyRef<'_, PyMoeDispatch>,
        mut out: PyReadwriteArray2<'_, u8>,
    ) -> PyResult<()> {
        let row_bytes = out.shape()[1];
        let out = out.as_slice_mut()?;
        let d = &dispatched.inner;
        py.detach(|| self.inner.gather_pairs(phase, d, row_bytes, out))
            .map_err(py_err)
    }
    fn combine_moe(
        &self,
        py: Python<'_>,
        phase: usize,
        seq: u64,
        dispatched: PyRef<'_, PyMoeDispatch>,
        y: PyReadonlyArray2<'_, f32>,
        mut out: PyReadwriteArray2<'_, f32>,
    ) -> PyResult<()> {
        let hidden = out.shape()[1];
        let (y, out) = (y.as_slice()?, out.as_slice_mut()?);
        let d = &dispatched.inner;
        py.detach(|| self.inner.combine_moe(phase, seq, d, y, hidden, out))
            .map_err(py_err)
    }
    fn add_rows_f32(
        &self,
        py: Python<'_>,
        phase: usize,
        counts: Vec<usize>,
        mut out: PyReadwriteArray2<'_, f32>,
        index: PyReadonlyArray1<'_, i64>,
    ) -> PyResult<()> {
        let cols = out.shape()[1];
        let out = out.as_slice_mut()?;
        let index = index.as_slice()?;
        py.detach(|| self.inner.add_rows_f32(phase, &counts, cols, out, index))
            .map_err(py_err)
    }
}

/// Panics inside Rust with the GIL released; tests use it to check a panic becomes a Python
/// exception (pyo3's PanicException) instead of aborting the interpreter.
#[pyfunction]
fn _panic_for_tests(py: Python<'_>, message: String) {
    py.detach(move || panic!("{message}"));
}

#[pymodule]
#[pyo3(name = "_core")]
fn core_module(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("CoreError", m.py().get_type::<CoreError>())?;
    // The largest token id the core stores; edge validation checks against it (limits.py).
    m.add("MAX_TOKEN_ID", MAX_TOKEN_ID)?;
    m.add_class::<PyScheduler>()?;
    m.add_class::<PySchedulerOutput>()?;
    m.add_class::<PyRoutingPlan>()?;
    m.add_function(wrap_pyfunction!(route, m)?)?;
    m.add_class::<PyDispatchPlan>()?;
    m.add_class::<PyReceivePlan>()?;
    m.add_class::<PyA2aCapacity>()?;
    m.add_class::<PyPhaseRing>()?;
    m.add_class::<PyPhaseHandle>()?;
    m.add_class::<PyShmRows>()?;
    m.add_class::<PyMoeDispatch>()?;
    m.add_function(wrap_pyfunction!(plan_dispatch, m)?)?;
    m.add_function(wrap_pyfunction!(plan_receive, m)?)?;
    // setattr, not add: keeps the test hook out of __all__.
    m.setattr("_panic_for_tests", wrap_pyfunction!(_panic_for_tests, m)?)?;
    Ok(())
}
