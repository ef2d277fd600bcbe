//! Python objects behind references: kept on their owner as [`PyValue`]s and pickled when
//! fetched, on whichever thread fetches them.

use std::sync::Arc;

use distrpc::server::value::{Reply, Value};
use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;

use crate::buffers::{Loan, lent};

/// Keeps a Python thread state on this thread for good (once per thread), so that entering
/// Python from a thread Python did not start — a connection's reader encoding a reference's
/// value — does not create and destroy one each time (an `mmap` and `munmap`, tens of µs).
/// Only on distrpc's own threads (named `distrpc…`), which enter Python nowhere else: none of
/// them can hold the interpreter lock here.
pub(crate) fn keep_thread_state() {
    if !std::thread::current()
        .name()
        .is_some_and(|n| n.starts_with("distrpc"))
    {
        return;
    }
    thread_local! {
        static KEPT: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }
    KEPT.with(|kept| {
        // SAFETY: the interpreter is running (this extension is loaded in it) and this thread
        // does not hold its lock (see above). `PyGILState_Ensure` makes (or finds)
        // this thread's state and takes the lock; `PyEval_SaveThread` lets the lock go and
        // keeps the state, whose count never returns to zero: later `Python::attach`es on this
        // thread reuse it.
        if !kept.get() && unsafe { pyo3::ffi::Py_IsInitialized() } != 0 {
            unsafe {
                pyo3::ffi::PyGILState_Ensure();
                pyo3::ffi::PyEval_SaveThread();
            }
            kept.set(true);
        }
    });
}

/// A Python object behind a reference, on its owner; pickled (under the interpreter lock) by
/// `distrpc._internal.serialize` when fetched.
pub(crate) struct PyValue(pub(crate) Py<PyAny>);

impl PyValue {
    /// The object behind `value`, which must be one of ours.
    pub(crate) fn object(py: Python<'_>, value: Arc<dyn Value>) -> PyResult<Py<PyAny>> {
        let any: Arc<dyn std::any::Any + Send + Sync> = value;
        any.downcast::<PyValue>()
            .map(|v| v.0.clone_ref(py))
            .map_err(|_| PyRuntimeError::new_err("the referenced value is not a Python object"))
    }
}

/// `distrpc._internal.serialize`, looked up once.
static SERIALIZE: pyo3::sync::PyOnceLock<Py<PyAny>> = pyo3::sync::PyOnceLock::new();

impl Value for PyValue {
    fn encode(&self) -> Result<Reply, String> {
        // Encoded where it is fetched: often a connection's reader thread, not a Python one.
        keep_thread_state();
        Python::attach(|py| -> PyResult<Reply> {
            let serialize = SERIALIZE.import(py, "distrpc._internal", "serialize")?;
            let (payload, buffers): (Vec<u8>, Vec<Loan>) =
                serialize.call1((self.0.clone_ref(py),))?.extract()?;
            Ok(Reply::new(payload, lent(buffers)?))
        })
        .map_err(|e| e.to_string())
    }

    fn type_name(&self) -> &'static str {
        "a Python object"
    }
}
