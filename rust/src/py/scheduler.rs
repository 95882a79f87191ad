//! Python wrappers of the scheduler and its per-step output.

use numpy::{PyArray1, PyArray2, PyArrayMethods, PyUntypedArrayMethods};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::{extract_ints, non_negative, py_err};
use crate::error::{check_at_least, CoreError as RustCoreError};
use crate::kv_placement::KvPlacement;
use crate::request::FinishReason;
use crate::scheduler::{NewRequest, Scheduler, SchedulerConfig};
use crate::scheduler_output::SchedulerOutput;

/// The continuous-batching scheduler (see `_core.pyi`).
#[pyclass(module = "expertmesh._core", name = "Scheduler")]
pub(super) struct PyScheduler {
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
    #[pyo3(signature = (*, num_blocks, block_size, max_num_seqs, max_num_batched_tokens, max_model_len, enable_prefix_caching=true, context_parallel_size=1, cp_first_blocks=0))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        num_blocks: i64,
        block_size: i64,
        max_num_seqs: i64,
        max_num_batched_tokens: i64,
        max_model_len: i64,
        enable_prefix_caching: bool,
        context_parallel_size: i64,
        cp_first_blocks: i64,
    ) -> PyResult<Self> {
        let config = SchedulerConfig {
            num_blocks: non_negative("num_blocks", num_blocks)?,
            placement: placement(context_parallel_size, cp_first_blocks)?,
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

    fn cached_prefix_blocks(
        &mut self,
        py: Python<'_>,
        token_ids: &Bound<'_, PyAny>,
    ) -> PyResult<Vec<u32>> {
        let tokens = extract_ints(token_ids, "token_ids")?;
        self.guarded(py, false, move |s| s.cached_prefix_blocks(&tokens))
    }

    fn pin_prefix(
        &mut self,
        py: Python<'_>,
        transfer_id: u64,
        token_ids: &Bound<'_, PyAny>,
    ) -> PyResult<Vec<u32>> {
        let tokens = extract_ints(token_ids, "token_ids")?;
        self.guarded(py, false, move |s| s.pin_prefix(transfer_id, &tokens))
    }

    fn import_prefix(
        &mut self,
        py: Python<'_>,
        transfer_id: u64,
        token_ids: &Bound<'_, PyAny>,
        have: usize,
        count: usize,
    ) -> PyResult<(usize, Vec<u32>)> {
        let tokens = extract_ints(token_ids, "token_ids")?;
        let got = self.guarded(py, false, move |s| {
            s.import_prefix(transfer_id, &tokens, have, count)
        })?;
        Ok((got.first, got.blocks))
    }

    fn unpin(&mut self, py: Python<'_>, transfer_id: u64) -> PyResult<bool> {
        self.guarded(py, false, move |s| Ok(s.unpin(transfer_id)))
    }

    fn discard(&mut self, py: Python<'_>, transfer_id: u64) -> PyResult<bool> {
        self.guarded(py, false, move |s| Ok(s.discard(transfer_id)))
    }

    #[getter]
    fn num_pinned_transfers(&self) -> usize {
        self.inner.num_pinned_transfers()
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

    #[getter]
    fn blocks_per_rank(&self) -> usize {
        self.inner.blocks_per_rank()
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

fn placement(cp_size: i64, first_blocks: i64) -> PyResult<KvPlacement> {
    check_at_least("context_parallel_size", cp_size.into(), 1).map_err(py_err)?;
    Ok(KvPlacement {
        cp_size: cp_size as usize,
        first_blocks: non_negative("cp_first_blocks", first_blocks)?,
    })
}

/// The most of a sequence's first `num_blocks` KV blocks that one CP rank holds.
#[pyfunction]
#[pyo3(signature = (num_blocks, *, context_parallel_size, cp_first_blocks))]
pub(super) fn kv_blocks_per_rank(
    num_blocks: i64,
    context_parallel_size: i64,
    cp_first_blocks: i64,
) -> PyResult<usize> {
    let num_blocks = non_negative("num_blocks", num_blocks)?;
    Ok(placement(context_parallel_size, cp_first_blocks)?.max_per_rank(num_blocks))
}

/// One step's batch as numpy arrays (see `_core.pyi` for shapes).
#[pyclass(module = "expertmesh._core", name = "SchedulerOutput", frozen)]
pub(super) struct PySchedulerOutput {
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
