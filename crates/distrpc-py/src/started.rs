//! [`Started`]: a call sent now and waited for later by a thread that then reads the reply
//! itself, as `rpc_sync`'s caller does (one wake-up: no reader task handing the reply to the
//! thread completing futures, which hands it to the waiter). Between the send and the wait the
//! thread does other work — `DistributedOptimizer.step` steps this worker's own optimizer
//! while the owners step theirs — and the connection is not held meanwhile: it is claimed
//! when the wait begins, unless the reply came first ([`distrpc::RRef::rpc_start_raw`]).
//!
//! ```text
//!  handle.rpc_start(...) ─► send ─► (local work, other calls) ─► Started.wait ─► claim, read
//! ```

use std::sync::Mutex;

use distrpc::{RawReply, RpcFuture};
use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;

use crate::buffers::Pickled;
use crate::{lock, unpickled, wait};

/// A call started by `rpc_start`, waited for once with [`Started::wait`].
#[pyclass(module = "distrpc._core", frozen)]
pub(crate) struct Started(Mutex<Option<RpcFuture<RawReply>>>);

impl Started {
    pub(crate) fn new(fut: RpcFuture<RawReply>) -> Self {
        Self(Mutex::new(Some(fut)))
    }
}

#[pymethods]
impl Started {
    /// Waits for the pickled result and its buffers, reading it from the connection (lock
    /// released). A second wait is an error.
    fn wait(&self, py: Python<'_>) -> PyResult<Pickled> {
        let fut = lock(&self.0)
            .take()
            .ok_or_else(|| PyRuntimeError::new_err("this call was already waited for"))?;
        unpickled(py, wait(py, fut)?)
    }
}
