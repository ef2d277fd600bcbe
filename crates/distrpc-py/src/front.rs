//! The serving side of the binding: calls from other workers, handed by the agent's foreign
//! handlers to a queue the Python worker threads take them from ([`Front`]), and answered
//! through a [`Call`].

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use distrpc::Codec;
use distrpc::server::foreign::{
    Doorbell, ForeignCall, ForeignHandler, ForeignReply, IdleReaders, Origin,
};
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
///
/// An idle thread waits in one of two ways. One of them at a time reads the connection the
/// latest call came in on itself ([`Origin::serve`]): the peer's next call — in a conversation,
/// the likely next one — wakes it directly from the socket, and it runs the call with no
/// hand-off (the reader task's thread would otherwise read it and wake a worker thread: a
/// second wake-up on the call's path). The others sleep on `ready`. A call that arrives another
/// way (read by the reader task, or from another peer) rings the reading thread's doorbell,
/// and wakes a sleeper only for the calls beyond the one that thread takes.
pub(crate) struct Front {
    pub(crate) queue: Mutex<Waiting>,
    pub(crate) ready: Condvar,
    bell: Arc<Doorbell>,
}

/// The queued calls and who waits for them.
#[derive(Default)]
pub(crate) struct Waiting {
    calls: VecDeque<Queued>,
    /// How many waiting threads are to wake without a call (at shutdown).
    pub(crate) wakes: usize,
    /// How the waiting threads wait (one reads the connection of the latest call).
    readers: IdleReaders,
}

impl Front {
    pub(crate) fn new() -> std::io::Result<Self> {
        Ok(Self {
            queue: Mutex::new(Waiting::default()),
            ready: Condvar::new(),
            bell: Arc::new(Doorbell::new()?),
        })
    }

    pub(crate) fn push(&self, queued: Queued) {
        let origin = queued.2.origin();
        let mut w = lock(&self.queue);
        w.calls.push_back(queued);
        let queued = w.calls.len();
        w.readers
            .arrived(origin, queued, Some(&self.bell), &self.ready);
    }

    /// Wakes `threads` waiting threads without a call (at shutdown).
    pub(crate) fn wake(&self, threads: usize) {
        lock(&self.queue).wakes += threads;
        self.ready.notify_all();
        self.bell.ring();
    }

    /// A queued call, if one is there now.
    pub(crate) fn try_pop(&self) -> Option<Queued> {
        lock(&self.queue).calls.pop_front()
    }

    /// The next queued call, waiting up to `wait`; `None` if none came, or to wake a thread.
    pub(crate) fn pop(&self, wait: Duration) -> Option<Queued> {
        let deadline = std::time::Instant::now() + wait;
        let mut w = lock(&self.queue);
        let mut may_read = true;
        loop {
            if let Some(queued) = w.calls.pop_front() {
                return Some(queued);
            }
            if w.wakes > 0 {
                w.wakes -= 1;
                drop(w);
                Origin::let_go();
                return None;
            }
            if may_read && let Some(origin) = w.readers.start_reading() {
                may_read = false;
                w = self.read_while_waiting(w, &origin, deadline);
                continue;
            }
            if Origin::keeps() {
                // This thread kept the connection of the call it ran: others read it now.
                drop(w);
                Origin::let_go();
                w = lock(&self.queue);
                continue;
            }
            let left = deadline.checked_duration_since(std::time::Instant::now())?;
            w.readers.asleep();
            w = self
                .ready
                .wait_timeout(w, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
            w.readers.awake();
        }
    }

    /// Waits for a call by reading `origin`'s connection (see the type's docs; this thread is
    /// the reading one of [`IdleReaders`]), if it can; the calls it read are in the queue after
    /// it, and sleeping threads are woken for all but the one this thread takes.
    fn read_while_waiting<'a>(
        &'a self,
        w: std::sync::MutexGuard<'a, Waiting>,
        origin: &Origin,
        deadline: std::time::Instant,
    ) -> std::sync::MutexGuard<'a, Waiting> {
        drop(w);
        let ready = || {
            let w = lock(&self.queue);
            !w.calls.is_empty() || w.wakes > 0
        };
        origin.serve(&ready, deadline, &self.bell);
        let mut w = lock(&self.queue);
        let queued = w.calls.len();
        w.readers.stopped_reading(queued, &self.ready);
        w
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
