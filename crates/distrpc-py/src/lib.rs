//! `distrpc._core`: the Python binding of distrpc. Thin on purpose: it moves bytes between the
//! Rust agent and the pure-Python package (`python/distrpc`), which carries torch's API, the
//! pickler and the worker threads that run Python functions. The interpreter lock is released
//! around every wait and all Rust work.
//!
//! ```text
//!  rpc_sync(to, fn, args) ─ pickle ─► Agent.rpc_sync ─(GIL released)─► distrpc ─► peer
//!  peer's pickled call ─► ForeignHandler ─► queue ─► Agent.next_call (a Python worker thread)
//!        ─► unpickle, run, pickle ─► Call.reply ─► distrpc ─► caller
//! ```
//!
//! Calls by name (`rpc_sync(to, "name", args)`, `@distrpc.function(name=...)`) travel in
//! MessagePack as Rust functions' do ([`msgpack`]), so Python and Rust workers call each other.

use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use distrpc::server::foreign::{ForeignCall, ForeignHandler, ForeignReply};
use distrpc::server::value::{Reply, Value};
use distrpc::{Codec, DType, Error, RRef, RawCall, RawReply, Rpc, RpcOptions, Tensor};
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyBytes;

mod msgpack;

/// Memory a Python object owns (an array's buffer, taken out of band by the pickler), lent to
/// a tensor without a copy: the tensor's bytes are written to the socket from it.
struct Lent {
    addr: usize,
    len: usize,
    /// Keeps the memory alive; released (under the interpreter lock) when the tensor goes.
    _owner: Py<PyAny>,
}

impl AsRef<[u8]> for Lent {
    fn as_ref(&self) -> &[u8] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: the Python side hands `(address, length, owner)` of a contiguous buffer of
        // `owner` (distrpc._internal, from the array's interface); `owner` keeps it alive for as
        // long as this `Lent` lives. Python code may still write to it meanwhile, as it may to
        // a tensor torch is sending.
        unsafe { std::slice::from_raw_parts(self.addr as *const u8, self.len) }
    }
}

/// A buffer the pickler took out of band, as Python lends it: `(address, length, owner)`.
type Loan = (usize, usize, Py<PyAny>);

/// Tensors of the buffers `(address, length, owner)` the pickler took out of band.
fn lent(buffers: Vec<Loan>) -> PyResult<Vec<Tensor>> {
    buffers
        .into_iter()
        .map(|(addr, len, owner)| {
            let bytes = Bytes::from_owner(Lent {
                addr,
                len,
                _owner: owner,
            });
            Tensor::from_bytes(DType::U8, vec![len], bytes)
                .map_err(|e| PyValueError::new_err(e.to_string()))
        })
        .collect()
}

/// Keeps a received tensor's memory (a slice of the receive buffer) alive while Python views it.
#[pyclass(frozen)]
struct Held {
    _tensor: Tensor,
}

/// Received tensors for Python: `(address, length, owner)` each, viewed without a copy by
/// distrpc._internal.
fn held(py: Python<'_>, tensors: Vec<Tensor>) -> PyResult<Vec<(usize, usize, Py<Held>)>> {
    tensors
        .into_iter()
        .map(|t| {
            let (addr, len) = (t.data().as_ptr() as usize, t.data().len());
            Ok((addr, len, Py::new(py, Held { _tensor: t })?))
        })
        .collect()
}

/// A pickled result as Python gets it: the pickle and its out-of-band buffers.
type Pickled = (Py<PyBytes>, Vec<(usize, usize, Py<Held>)>);

/// How often a waiting `rpc_sync` looks for signals (Ctrl-C).
const SIGNAL_SLICE: Duration = Duration::from_millis(50);

/// A foreign call waiting for a Python worker thread, with its codec. (Queued calls left at
/// the end are dropped with the agent: their callers get the dropped reply's error.)
type Queued = (Codec, ForeignCall, ForeignReply);

/// A call as a Python worker thread gets it: `(call, function, payload, buffers, caller, the
/// referenced object for a method call, whether the result is kept)`. For a call by name
/// (MessagePack), `payload` is the decoded list of arguments and `buffers` is `None`.
type Taken = (
    Call,
    String,
    Py<PyAny>,
    Option<Vec<(usize, usize, Py<Held>)>>,
    u32,
    Option<Py<PyAny>>,
    bool,
);

/// Where the foreign handlers hand calls to the Python worker threads.
struct Front {
    /// The queued calls, and how many waiting threads are to wake without one (at shutdown).
    /// Each call wakes one waiting thread: idle threads wait on `ready`, not on a lock that a
    /// thread taking a call would then have to hand to the next (a second wake-up per call).
    queue: Mutex<(std::collections::VecDeque<Queued>, usize)>,
    ready: std::sync::Condvar,
}

impl Front {
    fn push(&self, queued: Queued) {
        lock(&self.queue).0.push_back(queued);
        self.ready.notify_one();
    }

    /// A queued call, if one is there now.
    fn try_pop(&self) -> Option<Queued> {
        lock(&self.queue).0.pop_front()
    }

    /// The next queued call, waiting up to `wait`; `None` if none came, or to wake a thread.
    fn pop(&self, wait: Duration) -> Option<Queued> {
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
struct Queue {
    front: Arc<Front>,
    codec: Codec,
}

impl ForeignHandler for Queue {
    fn call(&self, call: ForeignCall, reply: ForeignReply) {
        self.front.push((self.codec, call, reply));
    }
}

/// A call as a Python thread takes it ([`Taken`]); `None` if a call by name's arguments did not
/// decode (that call is answered with the error).
fn taken(
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

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn error(e: Error) -> PyErr {
    PyRuntimeError::new_err(e.to_string())
}

impl Agent {
    /// The options of a worker whose foreign calls go to the returned [`Front`].
    fn options(
        init_method: String,
        num_worker_threads: usize,
        rpc_timeout: f64,
    ) -> PyResult<(RpcOptions, Arc<Front>)> {
        let front = Arc::new(Front {
            queue: Mutex::new((std::collections::VecDeque::new(), 0)),
            ready: std::sync::Condvar::new(),
        });
        let queue = |codec| Queue {
            front: front.clone(),
            codec,
        };
        let timeout = seconds(Some(rpc_timeout))?.unwrap_or_default();
        let options = RpcOptions::default()
            .init_method(init_method)
            .num_worker_threads(num_worker_threads)
            .rpc_timeout(timeout)
            .foreign(Codec::Pickle, Arc::new(queue(Codec::Pickle)))
            .foreign(Codec::MessagePack, Arc::new(queue(Codec::MessagePack)));
        Ok((options, front))
    }

    fn new(rpc: Rpc, front: Arc<Front>) -> Agent {
        let (done_tx, done_rx) = mpsc::channel();
        Agent {
            rpc,
            front,
            done_tx: Mutex::new(done_tx),
            done_rx: Mutex::new(done_rx),
            next_token: std::sync::atomic::AtomicU64::new(1),
        }
    }

    /// A token under which `fut`'s result (in `codec`) will come out of
    /// [`Agent::next_completion`].
    fn complete_later(&self, codec: Codec, fut: distrpc::RpcFuture<RawReply>) -> u64 {
        let token = self
            .next_token
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let done = lock(&self.done_tx).clone();
        fut.add_done_callback(move |result| {
            // The receiver goes only with the agent: nobody is left to complete.
            let _ = done.send((token, codec, result));
        });
        token
    }
}

/// Waits for `fut` with the interpreter lock released, in slices, looking for signals in
/// between: Ctrl-C interrupts the wait (the call itself goes on; its late reply is dropped).
fn wait(py: Python<'_>, mut fut: distrpc::RpcFuture<RawReply>) -> PyResult<RawReply> {
    loop {
        match py.detach(|| fut.wait_timeout(SIGNAL_SLICE)) {
            Ok(result) => return result.map_err(error),
            Err(pending) => {
                fut = pending;
                py.check_signals()?;
            }
        }
    }
}

/// A call by name of a Rust function, or of a Python one registered with
/// `@distrpc.function(name=...)`: `args` in MessagePack, arrays in the tensor table.
fn named(
    function: String,
    args: &Bound<'_, PyAny>,
    timeout: Option<f64>,
) -> PyResult<(RawCall, Option<Duration>)> {
    let (payload, tensors) = msgpack::encode(args)?;
    let call = RawCall {
        codec: Codec::MessagePack,
        function,
        payload,
        tensors,
    };
    Ok((call, seconds(timeout)?))
}

/// A call of a pickled Python function (its out-of-band `buffers` lent, not copied) and its
/// timeout in seconds, as every calling method takes them from Python.
fn pickled(
    function: String,
    payload: Vec<u8>,
    buffers: Vec<Loan>,
    timeout: Option<f64>,
) -> PyResult<(RawCall, Option<Duration>)> {
    let call = RawCall {
        codec: Codec::Pickle,
        function,
        payload,
        tensors: lent(buffers)?,
    };
    Ok((call, seconds(timeout)?))
}

/// A pickled result for Python: its bytes, and its tensors viewed where they were received.
fn unpickled(py: Python<'_>, reply: RawReply) -> PyResult<Pickled> {
    Ok((
        PyBytes::new(py, &reply.payload).unbind(),
        held(py, reply.tensors)?,
    ))
}

fn seconds(timeout: Option<f64>) -> PyResult<Option<Duration>> {
    timeout
        .map(|s| {
            Duration::try_from_secs_f64(s.max(0.0))
                .map_err(|e| PyValueError::new_err(format!("timeout {s}: {e}")))
        })
        .transpose()
}

/// The result of an `rpc_async` (in its codec), queued for the Python thread that completes
/// futures.
type Completion = (u64, Codec, Result<RawReply, Error>);

/// A completed `rpc_async` as Python gets it: `(token, None, pickle, buffers)`,
/// `(token, None, value, None)` for a call by name, or `(token, error message, None, [])`.
type Completed = (
    u64,
    Option<String>,
    Option<Py<PyAny>>,
    Option<Vec<(usize, usize, Py<Held>)>>,
);

/// One worker of a group, as Python sees it.
#[pyclass(frozen)]
struct Agent {
    rpc: Rpc,
    /// Where the foreign handlers hand calls.
    front: Arc<Front>,
    /// Completed `rpc_async` calls: completing a Python future needs the interpreter lock,
    /// which the connection's reader must never wait for, so a Python thread takes them here.
    done_tx: Mutex<mpsc::Sender<Completion>>,
    done_rx: Mutex<mpsc::Receiver<Completion>>,
    next_token: std::sync::atomic::AtomicU64,
}

#[pymethods]
impl Agent {
    /// Joins the group (torch's `init_rpc`), waiting with the interpreter lock released.
    #[staticmethod]
    #[pyo3(signature = (name, rank, world_size, init_method, num_worker_threads, rpc_timeout))]
    fn init(
        py: Python<'_>,
        name: String,
        rank: usize,
        world_size: usize,
        init_method: String,
        num_worker_threads: usize,
        rpc_timeout: f64,
    ) -> PyResult<Agent> {
        let (options, front) = Agent::options(init_method, num_worker_threads, rpc_timeout)?;
        let rpc = py
            .detach(|| Rpc::init(&name, rank, world_size, options))
            .map_err(error)?;
        Ok(Agent::new(rpc, front))
    }

    /// The first half of [`Agent::init`]: binds this worker (rank 0 also its store, whose
    /// port [`PendingAgent::store_port`] gives: pass it to the others), without meeting the
    /// group yet.
    #[staticmethod]
    #[pyo3(signature = (name, rank, world_size, init_method, num_worker_threads, rpc_timeout))]
    fn bind(
        py: Python<'_>,
        name: String,
        rank: usize,
        world_size: usize,
        init_method: String,
        num_worker_threads: usize,
        rpc_timeout: f64,
    ) -> PyResult<PendingAgent> {
        let (options, front) = Agent::options(init_method, num_worker_threads, rpc_timeout)?;
        let pending = py
            .detach(|| Rpc::bind(&name, rank, world_size, options))
            .map_err(error)?;
        Ok(PendingAgent {
            pending: Mutex::new(Some((pending, front))),
        })
    }

    /// This worker's name.
    #[getter]
    fn name(&self) -> String {
        self.rpc.name().to_string()
    }

    /// This worker's rank.
    #[getter]
    fn rank(&self) -> u32 {
        self.rpc.rank()
    }

    /// Every worker, as `(rank, name)` in rank order.
    fn worker_infos(&self) -> Vec<(u32, String)> {
        self.rpc
            .worker_infos()
            .iter()
            .map(|w| (w.id, w.name.clone()))
            .collect()
    }

    /// The default timeout, in seconds (0: none).
    fn rpc_timeout(&self) -> f64 {
        self.rpc.rpc_timeout().as_secs_f64()
    }

    /// Sets the default timeout, in seconds (0: none).
    fn set_rpc_timeout(&self, timeout: f64) -> PyResult<()> {
        self.rpc
            .set_rpc_timeout(seconds(Some(timeout))?.unwrap_or_default());
        Ok(())
    }

    /// The agent's metrics and reference counts, by torch's keys.
    fn metrics(&self) -> std::collections::BTreeMap<String, i64> {
        (*self.rpc.metrics()).clone()
    }

    /// The next call for this worker, waiting up to `timeout` seconds (lock released): see
    /// [`Taken`]; `None` if none came (or a call by name's arguments did not decode: that
    /// call is answered with the error).
    fn next_call(&self, py: Python<'_>, timeout: f64) -> PyResult<Option<Taken>> {
        let wait = seconds(Some(timeout))?.unwrap_or_default();
        // A call already queued is taken without letting the interpreter lock go: under load a
        // thread runs call after call without a hand-over of the lock between them.
        let ready = self.front.try_pop();
        let next = match ready {
            Some(queued) => Some(queued),
            None => py.detach(|| self.front.pop(wait)),
        };
        let Some((codec, call, reply)) = next else {
            return Ok(None);
        };
        taken(py, codec, call, reply)
    }

    /// Calls `function` (pickled in `payload`, with its out-of-band `buffers`) on `to` and
    /// waits for its pickled result.
    #[pyo3(signature = (to, function, payload, buffers, timeout=None))]
    fn rpc_sync(
        &self,
        py: Python<'_>,
        to: &str,
        function: String,
        payload: Vec<u8>,
        buffers: Vec<Loan>,
        timeout: Option<f64>,
    ) -> PyResult<Pickled> {
        let (call, timeout) = pickled(function, payload, buffers, timeout)?;
        let reply = wait(py, self.rpc.rpc_sync_raw_future(to, call, timeout))?;
        unpickled(py, reply)
    }

    /// Calls the function registered as `function` on `to` (a Rust function, or a Python one
    /// registered by name) with `args` in MessagePack, and waits for its decoded result.
    #[pyo3(signature = (to, function, args, timeout=None))]
    fn rpc_sync_named<'py>(
        &self,
        py: Python<'py>,
        to: &str,
        function: String,
        args: &Bound<'py, PyAny>,
        timeout: Option<f64>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let (call, timeout) = named(function, args, timeout)?;
        let reply = wait(py, self.rpc.rpc_sync_raw_future(to, call, timeout))?;
        msgpack::decode(py, &reply.payload, reply.tensors)
    }

    /// [`Agent::rpc_sync_named`] without waiting: a token, as [`Agent::rpc_async`].
    #[pyo3(signature = (to, function, args, timeout=None))]
    fn rpc_async_named(
        &self,
        to: &str,
        function: String,
        args: &Bound<'_, PyAny>,
        timeout: Option<f64>,
    ) -> PyResult<u64> {
        let (call, timeout) = named(function, args, timeout)?;
        let fut = self.rpc.rpc_async_raw(to, call, timeout);
        Ok(self.complete_later(Codec::MessagePack, fut))
    }

    /// [`Agent::rpc_sync`] without waiting: returns a token, and the result comes out of
    /// [`Agent::next_completion`] under it.
    #[pyo3(signature = (to, function, payload, buffers, timeout=None))]
    fn rpc_async(
        &self,
        to: &str,
        function: String,
        payload: Vec<u8>,
        buffers: Vec<Loan>,
        timeout: Option<f64>,
    ) -> PyResult<u64> {
        let (call, timeout) = pickled(function, payload, buffers, timeout)?;
        let fut = self.rpc.rpc_async_raw(to, call, timeout);
        Ok(self.complete_later(Codec::Pickle, fut))
    }

    /// The next completed `rpc_async`, waiting up to `timeout` seconds (lock released).
    fn next_completion(&self, py: Python<'_>, timeout: f64) -> PyResult<Option<Completed>> {
        let wait = seconds(Some(timeout))?.unwrap_or_default();
        // As in `next_call`: what is there already is taken holding the interpreter lock.
        let ready = lock(&self.done_rx).try_recv().ok(); // (the lock goes with this statement)
        let next = match ready {
            Some(done) => Some(done),
            None => py.detach(|| lock(&self.done_rx).recv_timeout(wait).ok()),
        };
        // Token 0 is a wake-up ([`Agent::wake`]), not a call.
        let Some((token @ 1.., codec, result)) = next else {
            return Ok(None);
        };
        Ok(Some(match (result, codec) {
            (Ok(reply), Codec::MessagePack) => {
                match msgpack::decode(py, &reply.payload, reply.tensors) {
                    Ok(value) => (token, None, Some(value.unbind()), None),
                    Err(e) => (token, Some(e.to_string()), None, None),
                }
            }
            (Ok(reply), _) => {
                let (payload, buffers) = unpickled(py, reply)?;
                (token, None, Some(payload.into_any()), Some(buffers))
            }
            (Err(e), _) => (token, Some(e.to_string()), None, None),
        }))
    }

    /// `remote()`: the callee keeps the result of the pickled call behind the returned
    /// reference.
    #[pyo3(signature = (to, function, payload, buffers, timeout=None))]
    fn remote(
        &self,
        to: &str,
        function: String,
        payload: Vec<u8>,
        buffers: Vec<Loan>,
        timeout: Option<f64>,
    ) -> PyResult<PyRRef> {
        let (call, timeout) = pickled(function, payload, buffers, timeout)?;
        Ok(PyRRef {
            rref: self.rpc.remote_raw(to, call, timeout),
        })
    }

    /// The reference in a pickle `fork` made on worker `sender` (rank).
    fn rref_from_fork(&self, fork: Vec<u8>, sender: u32) -> PyResult<PyRRef> {
        let rref = self.rpc.rref_from_fork(&fork, sender).map_err(error)?;
        Ok(PyRRef { rref })
    }

    /// A reference owned here to `obj` (torch's `RRef(value)`).
    fn rref(&self, obj: Py<PyAny>) -> PyRRef {
        PyRRef {
            rref: self.rpc.rref_value(Arc::new(PyValue(obj))),
        }
    }

    /// A method call on `rref`'s object without waiting: a token, as [`Agent::rpc_async`].
    #[pyo3(signature = (rref, function, payload, buffers, timeout=None))]
    fn rref_rpc_async(
        &self,
        rref: &PyRRef,
        function: String,
        payload: Vec<u8>,
        buffers: Vec<Loan>,
        timeout: Option<f64>,
    ) -> PyResult<u64> {
        let (call, timeout) = pickled(function, payload, buffers, timeout)?;
        Ok(self.complete_later(Codec::Pickle, rref.rref.rpc_async_raw(call, timeout)))
    }

    /// Wakes `threads` threads waiting in [`Agent::next_call`] and the one in
    /// [`Agent::next_completion`], so that they see the worker stopping at once.
    fn wake(&self, threads: usize) {
        lock(&self.front.queue).1 += threads;
        self.front.ready.notify_all();
        let stopped = Err(Error::ShutDown {
            worker: self.rpc.name().to_string(),
        });
        let _ = lock(&self.done_tx).send((0, Codec::Pickle, stopped));
    }

    /// Gathers `payload` (a pickled object) from every worker in `names` (all if `None`):
    /// `{name: payload}`, the same on every one of them (torch's `_all_gather`).
    #[pyo3(signature = (payload, names=None, timeout=None))]
    fn all_gather(
        &self,
        py: Python<'_>,
        payload: Vec<u8>,
        names: Option<Vec<String>>,
        timeout: Option<f64>,
    ) -> PyResult<std::collections::BTreeMap<String, Py<PyBytes>>> {
        let timeout = seconds(timeout)?;
        let value = serde_bytes::ByteBuf::from(payload);
        let gathered = py
            .detach(|| match (names, timeout) {
                (None, None) => self.rpc.all_gather(&value),
                (names, timeout) => {
                    let names = names.unwrap_or_else(|| {
                        self.rpc
                            .worker_infos()
                            .iter()
                            .map(|w| w.name.clone())
                            .collect()
                    });
                    let names: Vec<&str> = names.iter().map(String::as_str).collect();
                    let timeout = timeout.unwrap_or_else(|| self.rpc.rpc_timeout());
                    self.rpc.all_gather_among(&value, &names, timeout)
                }
            })
            .map_err(error)?;
        Ok(gathered
            .into_iter()
            .map(|(name, bytes)| (name, PyBytes::new(py, &bytes).unbind()))
            .collect())
    }

    /// Waits until every worker in `names` has reached this barrier (torch's `_barrier`).
    fn barrier(&self, py: Python<'_>, names: Vec<String>) -> PyResult<()> {
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        py.detach(|| self.rpc.barrier(&names)).map_err(error)
    }

    /// Graceful shutdown with the group (bounded by `timeout` seconds, 0: none), or a local
    /// stop.
    #[pyo3(signature = (graceful=true, timeout=0.0))]
    fn shutdown(&self, py: Python<'_>, graceful: bool, timeout: f64) -> PyResult<()> {
        let timeout = seconds(Some(timeout))?.unwrap_or_default();
        if graceful {
            py.detach(|| self.rpc.shutdown_timeout(timeout))
                .map_err(error)
        } else {
            py.detach(|| self.rpc.shutdown_local());
            Ok(())
        }
    }
}

/// A worker bound but not yet in its group ([`Agent::bind`]).
#[pyclass(frozen)]
struct PendingAgent {
    pending: Mutex<Option<(distrpc::PendingRpc, Arc<Front>)>>,
}

#[pymethods]
impl PendingAgent {
    /// The port of the store rank 0 hosts over TCP (`None` for a file store).
    #[getter]
    fn store_port(&self) -> Option<u16> {
        lock(&self.pending)
            .as_ref()
            .and_then(|(p, _)| p.store_addr())
            .map(|a| a.port())
    }

    /// Meets the group (once), waiting with the interpreter lock released.
    fn join(&self, py: Python<'_>) -> PyResult<Agent> {
        let (pending, front) = lock(&self.pending)
            .take()
            .ok_or_else(|| PyRuntimeError::new_err("this worker joined already"))?;
        let rpc = py.detach(|| pending.join()).map_err(error)?;
        Ok(Agent::new(rpc, front))
    }
}

/// A pickled call a Python worker thread runs: answered once with [`Call::reply`].
#[pyclass(frozen)]
struct Call {
    reply: Mutex<Option<ForeignReply>>,
}

#[pymethods]
impl Call {
    /// Sends the pickled result and its out-of-band buffers (an exception is pickled too:
    /// see `distrpc._internal`).
    fn reply(&self, py: Python<'_>, payload: Vec<u8>, buffers: Vec<Loan>) -> PyResult<()> {
        let reply = self.take()?;
        let tensors = lent(buffers)?;
        py.detach(|| reply.ok(payload, tensors));
        Ok(())
    }

    /// Sends `result` of a call by name, in MessagePack (a `TypeError` if it has something
    /// MessagePack cannot carry; the call is still unanswered then).
    fn reply_named(&self, py: Python<'_>, result: &Bound<'_, PyAny>) -> PyResult<()> {
        let (payload, tensors) = msgpack::encode(result)?;
        let reply = self.take()?;
        py.detach(|| reply.ok(payload, tensors));
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
fn remote_error(type_name: &str, message: String) -> distrpc::RemoteError {
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

/// Keeps a Python thread state on this thread for good (once per thread), so that entering
/// Python from a thread Python did not start — a connection's reader encoding a reference's
/// value — does not create and destroy one each time (an `mmap` and `munmap`, tens of µs).
/// Only on distrpc's own threads (named `distrpc…`), which enter Python nowhere else: none of
/// them can hold the interpreter lock here.
fn keep_thread_state() {
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
struct PyValue(Py<PyAny>);

impl PyValue {
    /// The object behind `value`, which must be one of ours.
    fn object(py: Python<'_>, value: Arc<dyn Value>) -> PyResult<Py<PyAny>> {
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

/// A remote reference, as Python sees it (`distrpc.rpc.RRef` wraps it).
#[pyclass(frozen)]
struct PyRRef {
    rref: RRef<()>,
}

#[pymethods]
impl PyRRef {
    /// The owner, as `(rank, name)`.
    fn owner(&self) -> (u32, String) {
        let owner = self.rref.owner();
        (owner.id, owner.name)
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
        let reply = py
            .detach(|| self.rref.to_here_raw(timeout))
            .map_err(error)?;
        unpickled(py, reply)
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
        let reply = py
            .detach(|| self.rref.rpc_sync_raw(call, timeout))
            .map_err(error)?;
        unpickled(py, reply)
    }

    /// Runs the pickled call on the owner with the object as its subject, keeping the result
    /// there behind a new reference.
    #[pyo3(signature = (function, payload, buffers, timeout=None))]
    fn remote(
        &self,
        function: String,
        payload: Vec<u8>,
        buffers: Vec<Loan>,
        timeout: Option<f64>,
    ) -> PyResult<PyRRef> {
        let (call, timeout) = pickled(function, payload, buffers, timeout)?;
        Ok(PyRRef {
            rref: self.rref.remote_raw(call, timeout),
        })
    }

    /// Forks this reference for a pickle being made (the receiver rebuilds it with
    /// `Agent.rref_from_fork`).
    fn fork(&self, py: Python<'_>) -> PyResult<Py<PyBytes>> {
        let bytes = self.rref.fork_raw().map_err(error)?;
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

/// Starts `nproc` processes of `command` as `distrpc launch` does (torchrun's environment:
/// `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`; output prefixed by rank;
/// one failure stops the others) and waits for them, with the interpreter lock released.
/// Returns 0, or the exit code of the rank that failed (128 + signal if it was killed).
#[pyfunction]
#[pyo3(signature = (nproc, command, master_addr="127.0.0.1".to_string(), master_port=0))]
fn launch(
    py: Python<'_>,
    nproc: usize,
    command: Vec<String>,
    master_addr: String,
    master_port: u16,
) -> PyResult<i32> {
    use std::os::unix::process::ExitStatusExt;
    let (program, args) = command
        .split_first()
        .ok_or_else(|| PyValueError::new_err("no command to launch"))?;
    if nproc == 0 {
        return Err(PyValueError::new_err("nproc must be at least 1"));
    }
    let launch = distrpc::launch::Launch::new(nproc, program)
        .args(args)
        .master_addr(master_addr)
        .master_port(master_port);
    match py.detach(|| launch.run()) {
        Ok(()) => Ok(0),
        Err(distrpc::launch::LaunchError::Failed { rank, status }) => {
            eprintln!(
                "distrpc.launch: rank {rank} failed ({status}); the other ranks were stopped"
            );
            Ok(status
                .code()
                .unwrap_or_else(|| 128 + status.signal().unwrap_or(0)))
        }
        Err(e) => Err(PyRuntimeError::new_err(e.to_string())),
    }
}

/// `obj` in MessagePack as a call by name sends it (arrays excepted: they travel beside a
/// call, not inside bytes).
#[pyfunction]
fn msgpack_dumps<'py>(py: Python<'py>, obj: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyBytes>> {
    let (payload, tensors) = msgpack::encode(obj)?;
    if !tensors.is_empty() {
        return Err(PyValueError::new_err(
            "arrays travel beside a call, not inside MessagePack bytes",
        ));
    }
    Ok(PyBytes::new(py, &payload))
}

/// The object MessagePack `data` encodes, decoded as a call by name's arguments are (bounded:
/// malformed data is a `ValueError`).
#[pyfunction]
fn msgpack_loads<'py>(py: Python<'py>, data: &[u8]) -> PyResult<Bound<'py, PyAny>> {
    msgpack::decode(py, data, Vec::new())
}

/// The Rust side of `distrpc`.
#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(launch, m)?)?;
    m.add_function(wrap_pyfunction!(msgpack_dumps, m)?)?;
    m.add_function(wrap_pyfunction!(msgpack_loads, m)?)?;
    m.add_class::<Agent>()?;
    m.add_class::<PendingAgent>()?;
    m.add_class::<Call>()?;
    m.add_class::<Held>()?;
    m.add_class::<PyRRef>()?;
    // Whether this extension was built without optimisation (`maturin develop` without
    // `--release`): the benchmark says so, as its figures would be about half as good.
    m.add("DEBUG_BUILD", cfg!(debug_assertions))?;
    Ok(())
}
