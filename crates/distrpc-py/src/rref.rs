//! Remote references as Python sees them ([`PyRRef`]; `distrpc.rpc.RRef` wraps it).

use distrpc::RRef;
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::buffers::{Loan, Pickled};
use crate::started::Started;
use crate::value::PyValue;
use crate::waits::sending;
use crate::{error, pickled, seconds, unpickled, wait};

/// A remote reference, as Python sees it (`distrpc.rpc.RRef` wraps it).
#[pyclass(frozen)]
pub(crate) struct PyRRef {
    pub(crate) rref: RRef<()>,
}

#[pymethods]
impl PyRRef {
    /// The owner, as `(rank, name)`.
    fn owner(&self) -> (u32, String) {
        let owner = self.rref.owner();
        (owner.id, owner.name)
    }

    /// The owner's rank (what `owner()[0]` says, without making the name's string).
    #[getter]
    fn owner_id(&self) -> u32 {
        self.rref.owner().id
    }

    /// Whether this worker owns the value.
    fn is_owner(&self) -> bool {
        self.rref.is_owner()
    }

    /// Whether the owner has confirmed this reference.
    fn confirmed_by_owner(&self) -> bool {
        self.rref.confirmed_by_owner()
    }

    /// The pickled value and its buffers, fetched from the owner (lock released).
    #[pyo3(signature = (timeout=None))]
    fn to_here(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<Pickled> {
        let timeout = seconds(timeout)?;
        let fut = sending(py, || self.rref.to_here_raw_future(timeout));
        unpickled(py, wait(py, fut)?)
    }

    /// The object itself, on its owner.
    fn local_value(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        let value = py.detach(|| self.rref.local_value_raw()).map_err(error)?;
        PyValue::object(py, value)
    }

    /// Runs the pickled call on the owner with the object as its subject; waits.
    #[pyo3(signature = (function, payload, buffers, timeout=None))]
    fn rpc_sync(
        &self,
        py: Python<'_>,
        function: String,
        payload: Vec<u8>,
        buffers: Vec<Loan>,
        timeout: Option<f64>,
    ) -> PyResult<Pickled> {
        let (call, timeout) = pickled(function, payload, buffers, timeout)?;
        let fut = sending(py, || self.rref.rpc_sync_raw_future(call, timeout));
        unpickled(py, wait(py, fut)?)
    }

    /// Runs the pickled call on the owner with the object as its subject without waiting; the
    /// thread that waits for it (`Started.wait`) reads the reply itself.
    #[pyo3(signature = (function, payload, buffers, timeout=None))]
    fn rpc_start(
        &self,
        py: Python<'_>,
        function: String,
        payload: Vec<u8>,
        buffers: Vec<Loan>,
        timeout: Option<f64>,
    ) -> PyResult<Started> {
        let (call, timeout) = pickled(function, payload, buffers, timeout)?;
        let fut = sending(py, || self.rref.rpc_start_raw(call, timeout));
        Ok(Started::new(fut))
    }

    /// Runs the pickled call on the owner with the object as its subject, keeping the result
    /// there behind a new reference.
    #[pyo3(signature = (function, payload, buffers, timeout=None))]
    fn remote(
        &self,
        py: Python<'_>,
        function: String,
        payload: Vec<u8>,
        buffers: Vec<Loan>,
        timeout: Option<f64>,
    ) -> PyResult<PyRRef> {
        let (call, timeout) = pickled(function, payload, buffers, timeout)?;
        Ok(PyRRef {
            rref: sending(py, || self.rref.remote_raw(call, timeout)),
        })
    }

    /// Forks this reference for a pickle being made for worker `to` (the receiver rebuilds it
    /// with `Agent.rref_from_fork`); without `to`, the worker distrpc is encoding a message
    /// for on this thread, if any.
    #[pyo3(signature = (to=None))]
    fn fork(&self, py: Python<'_>, to: Option<u32>) -> PyResult<Py<PyBytes>> {
        let bytes = self.rref.fork_raw(to).map_err(error)?;
        Ok(PyBytes::new(py, &bytes).unbind())
    }

    /// Waits (lock released) until the owner has confirmed this received reference; whether
    /// it did within `timeout` seconds (0: no limit).
    fn wait_confirmed(&self, py: Python<'_>, timeout: f64) -> PyResult<bool> {
        let timeout = seconds(Some(timeout))?.unwrap_or_default();
        Ok(py.detach(|| self.rref.wait_confirmed(timeout)))
    }

    fn __repr__(&self) -> String {
        self.rref.to_string()
    }
}
