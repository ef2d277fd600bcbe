//! The serving side of the binding: calls from other workers, handed by the agent's foreign
//! handlers to a queue the Python worker threads take them from ([`Front`]), and answered
//! through a [`Call`].

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use distrpc::Codec;
use distrpc::server::foreign::{ForeignCall, ForeignHandler, ForeignReply};
use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::buffers::{Held, Loan, held, lent};
use crate::value::PyValue;
use crate::{lock, msgpack};

/// A foreign call waiting for a Python worker thread, with its codec. (Queued calls left at
/// the end are dropped with the agent: their callers get the dropped reply's error.)
pub(crate) type Queued = (Codec, ForeignCall, ForeignReply);

/// A call as a Python worker thread gets it: `(call, function, payload, buffers, caller, the
/// referenced object for a method call, whether the result is kept)`. For a call by name
/// (MessagePack), `payload` is the decoded list of arguments and `buffers` is `None`.
pub(crate) type Taken = (
    Call,
    String,
    Py<PyAny>,
    Option<Vec<(usize, usize, Py<Held>)>>,
    u32,
    Option<Py<PyAny>>,
    bool,
);

/// Where the foreign handlers hand calls to the Python worker threads.
pub(crate) struct Front {
    /// The queued calls, and how many waiting threads are to wake without one (at shutdown).
    /// Each call wakes one waiting thread: idle threads wait on `ready`, not on a lock that a
    /// thread taking a call would then have to hand to the next (a second wake-up per call).
    pub(crate) queue: Mutex<(VecDeque<Queued>, usize)>,
    pub(crate) ready: Condvar,
}

impl Front {
    pub(crate) fn push(&self, queued: Queued) {
        lock(&self.queue).0.push_back(queued);
        self.ready.notify_one();
    }

    /// A queued call, if one is there now.
    pub(crate) fn try_pop(&self) -> Option<Queued> {
        lock(&self.queue).0.pop_front()
    }

    /// The next queued call, waiting up to `wait`; `None` if none came, or to wake a thread.
    pub(crate) fn pop(&self, wait: Duration) -> Option<Queued> {
        let deadline = std::time::Instant::now() + wait;
        let mut queue = lock(&self.queue);
        loop {
            if let Some(queued) = queue.0.pop_front() {
                return Some(queued);
            }
            if queue.1 > 0 {
                queue.1 -= 1;
                return None;
            }
            let left = deadline.checked_duration_since(std::time::Instant::now())?;
            queue = self
                .ready
                .wait_timeout(queue, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// The foreign handler of one codec, handing its calls to the [`Front`].
pub(crate) struct Queue {
    pub(crate) front: Arc<Front>,
    pub(crate) codec: Codec,
}

impl ForeignHandler for Queue {
    fn call(&self, call: ForeignCall, reply: ForeignReply) {
        self.front.push((self.codec, call, reply));
    }
}

/// A call as a Python thread takes it ([`Taken`]); `None` if a call by name's arguments did not
/// decode (that call is answered with the error).
pub(crate) fn taken(
    py: Python<'_>,
    codec: Codec,
    call: ForeignCall,
    reply: ForeignReply,
) -> PyResult<Option<Taken>> {
    let (payload, buffers) = match codec {
        Codec::MessagePack => match msgpack::decode(py, &call.payload, call.tensors) {
            Ok(args) => (args.unbind(), None),
            Err(e) => {
                let message = format!("the arguments of {}: {e}", call.function);
                py.detach(|| reply.err(remote_error("ValueError", message)));
                return Ok(None);
            }
        },
        _ => (
            PyBytes::new(py, &call.payload).into_any().unbind(),
            Some(held(py, call.tensors)?),
        ),
    };
    let this = match call.this {
        Some(value) => Some(PyValue::object(py, value)?),
        None => None,
    };
    let handle = Call {
        reply: Mutex::new(Some(reply)),
    };
    Ok(Some((
        handle,
        call.function,
        payload,
        buffers,
        call.from,
        this,
        call.keep,
    )))
}

/// A pickled call a Python worker thread runs: answered once with [`Call::reply`].
#[pyclass(frozen)]
pub(crate) struct Call {
    pub(crate) reply: Mutex<Option<ForeignReply>>,
}

#[pymethods]
impl Call {
    /// Sends the pickled result and its out-of-band buffers (an exception is pickled too:
    /// see `distrpc._internal`).
    ///
    /// The interpreter lock is kept while the reply goes: sending never waits (the socket is
    /// non-blocking; what does not fit is queued for the connection's writer) nor needs a
    /// thread that waits for the lock, and letting the lock go here handed it to another
    /// worker thread on every call under load (`rpc_async` at window 128: 19–22k calls/s with
    /// the hand-over, 29–31k without).
    fn reply(&self, payload: Vec<u8>, buffers: Vec<Loan>) -> PyResult<()> {
        let reply = self.take()?;
        reply.ok(payload, lent(buffers)?);
        Ok(())
    }

    /// Sends `result` of a call by name, in MessagePack (a `TypeError` if it has something
    /// MessagePack cannot carry; the call is still unanswered then).
    /// The interpreter lock is kept while it goes, as in [`Call::reply`].
    fn reply_named(&self, result: &Bound<'_, PyAny>) -> PyResult<()> {
        let (payload, tensors) = msgpack::encode(result)?;
        let reply = self.take()?;
        reply.ok(payload, tensors);
        Ok(())
    }

    /// Keeps `obj` as the value of the reference the call creates (`remote()`).
    fn keep(&self, py: Python<'_>, obj: Py<PyAny>) -> PyResult<()> {
        let reply = self.take()?;
        py.detach(|| reply.keep(Arc::new(PyValue(obj))));
        Ok(())
    }

    /// Answers with the exception the function raised (for a call whose result is kept: the
    /// reference's creation fails with it).
    fn fail(&self, py: Python<'_>, type_name: String, message: String) -> PyResult<()> {
        let reply = self.take()?;
        py.detach(|| reply.err(remote_error(&type_name, message)));
        Ok(())
    }
}

/// An exception raised by a Python function, for its caller (the worker and function are
/// filled in by distrpc).
pub(crate) fn remote_error(type_name: &str, message: String) -> distrpc::RemoteError {
    distrpc::RemoteError {
        worker: String::new(),
        function: String::new(),
        type_name: type_name.to_string(),
        message,
        backtrace: None,
    }
}

impl Call {
    fn take(&self) -> PyResult<ForeignReply> {
        lock(&self.reply)
            .take()
            .ok_or_else(|| PyRuntimeError::new_err("this call was answered already"))
    }
}
