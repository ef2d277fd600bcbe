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
//!
//! Here: the [`Agent`] (calling, gathering, shutting down) and the launcher. Beside it:
//! [`buffers`] (memory lent and held without copies; [`dlpack`] hands it to torch), [`front`]
//! (calls from peers, queued for the Python worker threads), [`value`] (Python objects behind
//! references), [`rref`] (references as Python sees them), [`started`] (calls waited for
//! later by a thread that reads their reply itself), [`msgpack`].

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use distrpc::{Codec, Error, RawCall, RawReply, Rpc, RpcOptions};
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyBytes;

mod buffers;
mod completions;
mod dlpack;
mod front;
mod msgpack;
mod rref;
mod started;
mod value;
mod waits;

use buffers::{Held, Loan, Pickled, held, lent};
use completions::Completions;
use front::{Call, Front, Queue, Taken, taken};
use rref::PyRRef;
use value::PyValue;
use waits::sending;

/// How often a waiting `rpc_sync` looks for signals (Ctrl-C).
const SIGNAL_SLICE: Duration = Duration::from_millis(50);

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
        let front = Arc::new(Front::new()?);
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

    fn new(rpc: Rpc, front: Arc<Front>) -> PyResult<Agent> {
        let completions = Completions::new()
            .map_err(|e| PyRuntimeError::new_err(format!("cannot make a doorbell: {e}")))?;
        Ok(Agent {
            rpc,
            front,
            completions,
        })
    }

    /// A token under which `fut`'s result (in `codec`) will come out of
    /// [`Agent::next_completion`]; `to`: the worker whose reply it is.
    fn complete_later(&self, codec: Codec, fut: distrpc::RpcFuture<RawReply>, to: &str) -> u64 {
        self.completions.later(codec, fut, to)
    }
}

/// Waits for `fut` with the interpreter lock released, in slices, looking for signals in
/// between: Ctrl-C interrupts the wait (the call itself goes on; its late reply is dropped).
pub(crate) fn wait(py: Python<'_>, mut fut: distrpc::RpcFuture<RawReply>) -> PyResult<RawReply> {
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

/// An option in seconds that must be positive (`None`: not given).
fn positive(name: &str, seconds: Option<f64>) -> PyResult<Option<Duration>> {
    seconds
        .map(|s| match Duration::try_from_secs_f64(s) {
            Ok(d) if s > 0.0 => Ok(d),
            _ => Err(PyValueError::new_err(format!(
                "{name} {s}: a positive number of seconds"
            ))),
        })
        .transpose()
}

fn seconds(timeout: Option<f64>) -> PyResult<Option<Duration>> {
    timeout
        .map(|s| {
            Duration::try_from_secs_f64(s.max(0.0))
                .map_err(|e| PyValueError::new_err(format!("timeout {s}: {e}")))
        })
        .transpose()
}

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
    /// Completed `rpc_async` calls, for the Python thread that completes their futures.
    completions: Completions,
}

#[pymethods]
impl Agent {
    /// Binds this worker (rank 0 also its store, whose port [`PendingAgent::store_port`]
    /// gives: pass it to the others); [`PendingAgent::join`] then meets the group (torch's
    /// `init_rpc` is both), each waiting with the interpreter lock released.
    ///
    /// `auth_token`: the group's shared secret (else `DISTRPC_AUTH_TOKEN` or the file
    /// `DISTRPC_AUTH_TOKEN_FILE` names); `listen_ip`: the address to listen on (else the
    /// interface toward the store); `tls`: `(ca, cert, key)` PEM files for mutual TLS (else
    /// `DISTRPC_TLS_CA`, `DISTRPC_TLS_CERT`, `DISTRPC_TLS_KEY`); `max_queued_bytes`,
    /// `max_calls_in`, `max_builtin_elements`, `send_stall`, `liveness`, `busy_poll` and
    /// `spin_wait` (seconds): the [`RpcOptions`] of those names (`None`: their defaults).
    #[staticmethod]
    #[pyo3(signature = (
        name, rank, world_size, init_method, num_worker_threads, rpc_timeout,
        auth_token=None, listen_ip=None, tls=None, max_queued_bytes=None, max_calls_in=None,
        max_builtin_elements=None, send_stall=None, liveness=None, busy_poll=None,
        spin_wait=None
    ))]
    #[allow(clippy::too_many_arguments)]
    fn bind(
        py: Python<'_>,
        name: String,
        rank: usize,
        world_size: usize,
        init_method: String,
        num_worker_threads: usize,
        rpc_timeout: f64,
        auth_token: Option<String>,
        listen_ip: Option<String>,
        tls: Option<(String, String, String)>,
        max_queued_bytes: Option<usize>,
        max_calls_in: Option<usize>,
        max_builtin_elements: Option<usize>,
        send_stall: Option<f64>,
        liveness: Option<f64>,
        busy_poll: Option<f64>,
        spin_wait: Option<f64>,
    ) -> PyResult<PendingAgent> {
        let (mut options, front) = Agent::options(init_method, num_worker_threads, rpc_timeout)?;
        if let Some(token) = auth_token {
            options = options.auth_token(token);
        }
        if let Some(ip) = listen_ip {
            let ip = ip
                .parse()
                .map_err(|e| PyValueError::new_err(format!("listen_ip {ip:?}: {e}")))?;
            options = options.listen_ip(ip);
        }
        if let Some((ca, cert, key)) = tls {
            options = options.tls(ca, cert, key);
        }
        if let Some(bytes) = max_queued_bytes {
            options = options.max_queued_bytes(bytes);
        }
        if let Some(calls) = max_calls_in {
            options = options.max_calls_in(calls);
        }
        if let Some(n) = max_builtin_elements {
            options = options.max_builtin_elements(n);
        }
        if let Some(stall) = positive("send_stall", send_stall)? {
            options = options.send_stall(stall);
        }
        if let Some(bound) = liveness {
            // Whole seconds, at least 2; zero turns the watch off (RpcOptions::liveness).
            if bound != 0.0 && !(2.0..=86_400.0).contains(&bound) {
                return Err(PyValueError::new_err(format!(
                    "liveness {bound}: whole seconds from 2 to 86400, or 0 for none"
                )));
            }
            options = options.liveness(Duration::from_secs(bound as u64));
        }
        if let Some(spin) = positive("busy_poll", busy_poll)? {
            options = options.busy_poll(spin);
        }
        if let Some(spin) = spin_wait {
            let spin = Duration::try_from_secs_f64(spin).map_err(|_| {
                PyValueError::new_err(format!("spin_wait {spin}: seconds, zero or more"))
            })?;
            options = options.spin_wait(spin);
        }
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
        let fut = sending(py, || self.rpc.rpc_sync_raw_future(to, call, timeout));
        unpickled(py, wait(py, fut)?)
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
        let fut = sending(py, || self.rpc.rpc_sync_raw_future(to, call, timeout));
        let reply = wait(py, fut)?;
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
        let fut = sending(args.py(), || self.rpc.rpc_async_raw(to, call, timeout));
        Ok(self.complete_later(Codec::MessagePack, fut, to))
    }

    /// [`Agent::rpc_sync`] without waiting: returns a token, and the result comes out of
    /// [`Agent::next_completion`] under it.
    #[pyo3(signature = (to, function, payload, buffers, timeout=None))]
    fn rpc_async(
        &self,
        py: Python<'_>,
        to: &str,
        function: String,
        payload: Vec<u8>,
        buffers: Vec<Loan>,
        timeout: Option<f64>,
    ) -> PyResult<u64> {
        let (call, timeout) = pickled(function, payload, buffers, timeout)?;
        // Written from this thread when the connection is idle (sparing the writer task's
        // wake-up); while a write is under way, queued for the writer task, which gathers
        // what accumulates (a burst's calls) into one `writev`.
        let fut = sending(py, || self.rpc.rpc_async_raw_direct(to, call, timeout));
        Ok(self.complete_later(Codec::Pickle, fut, to))
    }

    /// [`Agent::rpc_async`] of a call whose answer is known beforehand: `expected`, the
    /// pickle of the result (a release's `None`), and nobody waits on soon. The callee
    /// answers with its next frame to this worker (`Rpc::rpc_async_raw_answered_later`), and
    /// when that answer comes, no thread wakes for it: the call's token is among those
    /// [`Agent::answered`] returns next. Any other outcome
    /// — a failure, another result — comes out of [`Agent::next_completion`] as any call's.
    #[pyo3(signature = (to, function, payload, buffers, expected, timeout=None))]
    #[allow(clippy::too_many_arguments)]
    fn rpc_async_expecting(
        &self,
        py: Python<'_>,
        to: &str,
        function: String,
        payload: Vec<u8>,
        buffers: Vec<Loan>,
        expected: Vec<u8>,
        timeout: Option<f64>,
    ) -> PyResult<u64> {
        let (call, timeout) = pickled(function, payload, buffers, timeout)?;
        // Written from this thread (nothing waits for this call: no writer task woken for
        // it), and answered with the callee's next frame to this worker (no reader woken).
        let fut = sending(py, || {
            self.rpc.rpc_async_raw_answered_later(to, call, timeout)
        });
        Ok(self
            .completions
            .later_unless(Codec::Pickle, fut, to, Some(expected)))
    }

    /// The tokens of the [`Agent::rpc_async_expecting`] calls answered as expected since the
    /// last look.
    fn answered(&self) -> Vec<u64> {
        self.completions.answered()
    }

    /// The next completed `rpc_async`, waiting up to `timeout` seconds (lock released).
    fn next_completion(&self, py: Python<'_>, timeout: f64) -> PyResult<Option<Completed>> {
        let wait = seconds(Some(timeout))?.unwrap_or_default();
        // As in `next_call`: what is there already is taken holding the interpreter lock.
        let ready = self.completions.try_next();
        let next = match ready {
            Some(done) => Some(done),
            None => py.detach(|| self.completions.next(&self.rpc, wait)),
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
        py: Python<'_>,
        to: &str,
        function: String,
        payload: Vec<u8>,
        buffers: Vec<Loan>,
        timeout: Option<f64>,
    ) -> PyResult<PyRRef> {
        let (call, timeout) = pickled(function, payload, buffers, timeout)?;
        Ok(PyRRef {
            rref: sending(py, || self.rpc.remote_raw(to, call, timeout)),
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
        py: Python<'_>,
        rref: &PyRRef,
        function: String,
        payload: Vec<u8>,
        buffers: Vec<Loan>,
        timeout: Option<f64>,
    ) -> PyResult<u64> {
        let (call, timeout) = pickled(function, payload, buffers, timeout)?;
        let fut = sending(py, || rref.rref.rpc_async_raw(call, timeout));
        Ok(self.complete_later(Codec::Pickle, fut, rref.rref.owner_name()))
    }

    /// Wakes `threads` threads waiting in [`Agent::next_call`] and the one in
    /// [`Agent::next_completion`], so that they see the worker stopping at once.
    fn wake(&self, threads: usize) {
        self.front.wake(threads);
        self.completions.wake(Error::ShutDown {
            worker: self.rpc.name().to_string(),
        });
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
        Agent::new(rpc, front)
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

/// Makes a group's TLS certificates in `dir` (what `distrpc cert` does): a CA, reused if
/// there, and `<name>.pem` / `<name>-key.pem` for each name.
#[pyfunction]
fn make_certificates(dir: std::path::PathBuf, names: Vec<String>) -> PyResult<()> {
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    distrpc::secure::tls::generate(&dir, &names).map_err(|e| PyRuntimeError::new_err(e.to_string()))
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
    m.add_function(wrap_pyfunction!(make_certificates, m)?)?;
    distrpc::set_wait_hook(waits::release_while_waiting);
    m.add_class::<Agent>()?;
    m.add_class::<PendingAgent>()?;
    m.add_class::<Call>()?;
    m.add_class::<Held>()?;
    m.add_class::<PyRRef>()?;
    m.add_class::<started::Started>()?;
    // Whether this extension was built without optimisation (`maturin develop` without
    // `--release`): the benchmark says so, as its figures would be about half as good.
    m.add("DEBUG_BUILD", cfg!(debug_assertions))?;
    Ok(())
}
