//! The Python module `expertmesh._core`: thin wrappers over the Rust API. This module (py/) is
//! the only code that knows about Python. Real work (schedule, update, route) runs with the GIL released;
//! arrays are handed to numpy without copying (numpy takes ownership of the Rust `Vec`s).

use numpy::PyReadonlyArray1;
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;

use crate::error::{check_at_least, CoreError as RustCoreError};
use crate::request::MAX_TOKEN_ID;

mod attention;
mod moe;
mod quant;
mod scheduler;
mod shm;

use moe::{
    plan_dispatch, plan_receive, route, PyA2aCapacity, PyDispatchPlan, PyPhaseHandle, PyPhaseRing,
    PyReceivePlan, PyRoutingPlan,
};
use scheduler::{PyScheduler, PySchedulerOutput};
use shm::{PyMoeDispatch, PyShmRows};

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
    m.add_function(wrap_pyfunction!(scheduler::kv_blocks_per_rank, m)?)?;
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
    m.add_function(wrap_pyfunction!(attention::paged_attention, m)?)?;
    m.add_function(wrap_pyfunction!(quant::quant_linear, m)?)?;
    m.add_function(wrap_pyfunction!(attention::use_openmp, m)?)?;
    // setattr, not add: keeps the test hook out of __all__.
    m.setattr("_panic_for_tests", wrap_pyfunction!(_panic_for_tests, m)?)?;
    Ok(())
}
