//! Python wrappers of the shared-memory all-to-all data path (parallel/shm.py).

use numpy::{
    PyArray1, PyReadonlyArray1, PyReadonlyArray2, PyReadwriteArray2, PyUntypedArrayMethods,
};
use pyo3::prelude::*;

use super::py_err;
use crate::moe_exchange::MoeDispatch;
use crate::shm_rows::{RowSource, SegmentLayout, ShmRows};

/// What a shared-memory MoE dispatch received (see `_core.pyi`).
#[pyclass(module = "expertmesh._core", name = "MoeDispatch", frozen)]
pub(super) struct PyMoeDispatch {
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
pub(super) struct PyShmRows {
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
