//! [`RpcOptions`]: how a worker joins the group and runs calls (torch's
//! `TensorPipeRpcBackendOptions`), and, with the `fault-injection` feature, `FaultInjection`
//! (torch's faulty agent options).

use std::convert::Infallible;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

#[cfg(feature = "fault-injection")]
pub use crate::call::fault::FaultInjection;
#[cfg(not(feature = "fault-injection"))]
use crate::call::fault::FaultInjection;
pub use crate::call::fault::MessageKind;

use crate::server::foreign::ForeignHandler;
use crate::server::handler::{Handler, named_sync_handler};
use distrpc_wire::Codec;

/// torch's default RPC timeout.
pub const DEFAULT_RPC_TIMEOUT: Duration = Duration::from_secs(60);
/// torch's default number of worker threads.
pub const DEFAULT_NUM_WORKER_THREADS: usize = 16;
/// How long a peer may stay silent at the TCP level (its host gone, the network cut: no
/// FIN, no RST) before its connection is declared dead; see [`RpcOptions::liveness`].
pub const DEFAULT_LIVENESS: Duration = Duration::from_secs(10);
/// How long a thread blocked on its own call polls for the reply before it sleeps; see
/// [`RpcOptions::spin_wait`].
pub const DEFAULT_SPIN_WAIT: Duration = Duration::from_millis(2);
/// torch's default init method.
pub const DEFAULT_INIT_METHOD: &str = "env://";
/// Bytes a connection may hold for its peer before callers wait ([`RpcOptions::max_queued_bytes`]).
pub const DEFAULT_MAX_QUEUED_BYTES: usize = 256 << 20;
/// How many of one peer's calls a worker takes at once ([`RpcOptions::max_calls_in`]).
pub const DEFAULT_MAX_CALLS_IN: usize = 16384;
/// How long a waiting caller gives a peer that reads nothing ([`RpcOptions::send_stall`]).
pub const DEFAULT_SEND_STALL: Duration = Duration::from_secs(30);

/// Options of [`Rpc::init`](crate::Rpc::init). Defaults match torch: 16 worker threads, a 60 s
/// timeout, `env://` rendezvous.
///
/// ```
/// use std::time::Duration;
/// use distrpc::RpcOptions;
///
/// let options = RpcOptions::default()
///     .num_worker_threads(4)
///     .rpc_timeout(Duration::from_secs(5))
///     .init_method("tcp://127.0.0.1:29500")
///     .register("double", |(x,): (i64,)| x * 2);
/// ```
#[derive(Clone)]
pub struct RpcOptions {
    pub(crate) num_worker_threads: usize,
    pub(crate) rpc_timeout: Duration,
    pub(crate) init_method: String,
    pub(crate) max_frame_bytes: u64,
    pub(crate) listen_ip: Option<IpAddr>,
    pub(crate) faults: FaultInjection,
    pub(crate) check_rref_leaks: bool,
    pub(crate) busy_poll: Duration,
    pub(crate) spin_wait: Duration,
    pub(crate) liveness: Duration,
    pub(crate) functions: Vec<(Arc<str>, Handler)>,
    pub(crate) foreign: Vec<(Codec, Arc<dyn ForeignHandler>)>,
    pub(crate) auth: Auth,
    pub(crate) tls: TlsFiles,
    pub(crate) max_queued_bytes: usize,
    pub(crate) send_stall: Duration,
    pub(crate) max_calls_in: usize,
    pub(crate) max_builtin_elements: usize,
}

/// Where a worker's auth token comes from.
#[derive(Clone, Default)]
pub(crate) enum Auth {
    /// `DISTRPC_AUTH_TOKEN`, else the file `DISTRPC_AUTH_TOKEN_FILE` names, else none.
    #[default]
    Env,
    /// [`RpcOptions::auth_token`].
    Token(String),
}

/// Where a worker's TLS certificates come from: `DISTRPC_TLS_CA`, `DISTRPC_TLS_CERT` and
/// `DISTRPC_TLS_KEY` (none: no TLS), or [`RpcOptions::tls`].
#[derive(Clone, Debug, Default)]
pub(crate) enum TlsFiles {
    #[default]
    Env,
    Paths {
        ca: std::path::PathBuf,
        cert: std::path::PathBuf,
        key: std::path::PathBuf,
    },
}

impl RpcOptions {
    /// What protects the group's connections, from these options and the environment.
    pub(crate) fn security(&self) -> Result<distrpc_secure::Security, crate::Error> {
        let invalid = |e: distrpc_secure::TlsError| crate::Error::InvalidArgument(e.to_string());
        let tls = match &self.tls {
            TlsFiles::Env => distrpc_secure::Tls::from_env().map_err(invalid)?,
            TlsFiles::Paths { ca, cert, key } => {
                Some(distrpc_secure::Tls::from_pem_files(ca, cert, key).map_err(invalid)?)
            }
        };
        Ok(distrpc_secure::Security {
            auth: self.auth.secret()?,
            tls,
        })
    }
}

impl Auth {
    /// The group's secret, if it has one.
    pub(crate) fn secret(&self) -> Result<Option<distrpc_secure::Secret>, crate::Error> {
        let invalid = |e: distrpc_secure::AuthError| crate::Error::InvalidArgument(e.to_string());
        match self {
            Auth::Env => distrpc_secure::Secret::from_env().map_err(invalid),
            Auth::Token(token) => distrpc_secure::Secret::new(token)
                .map(Some)
                .map_err(invalid),
        }
    }
}

impl Default for RpcOptions {
    fn default() -> Self {
        Self {
            num_worker_threads: DEFAULT_NUM_WORKER_THREADS,
            rpc_timeout: DEFAULT_RPC_TIMEOUT,
            init_method: DEFAULT_INIT_METHOD.to_string(),
            max_frame_bytes: distrpc_wire::Limits::default().max_body,
            listen_ip: None,
            faults: FaultInjection::default(),
            check_rref_leaks: false,
            busy_poll: Duration::ZERO,
            spin_wait: DEFAULT_SPIN_WAIT,
            liveness: DEFAULT_LIVENESS,
            functions: Vec::new(),
            foreign: Vec::new(),
            auth: Auth::Env,
            tls: TlsFiles::Env,
            max_queued_bytes: DEFAULT_MAX_QUEUED_BYTES,
            send_stall: DEFAULT_SEND_STALL,
            max_calls_in: DEFAULT_MAX_CALLS_IN,
            max_builtin_elements: distrpc_wire::ops::DEFAULT_MAX_ELEMENTS,
        }
    }
}

impl fmt::Debug for RpcOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RpcOptions")
            .field("num_worker_threads", &self.num_worker_threads)
            .field("rpc_timeout", &self.rpc_timeout)
            .field("init_method", &self.init_method)
            .field("max_frame_bytes", &self.max_frame_bytes)
            .field("listen_ip", &self.listen_ip)
            .field("faults", &self.faults)
            .field("check_rref_leaks", &self.check_rref_leaks)
            .field("busy_poll", &self.busy_poll)
            .field("spin_wait", &self.spin_wait)
            .field("liveness", &self.liveness)
            .field("tls", &self.tls)
            .field("max_queued_bytes", &self.max_queued_bytes)
            .field("send_stall", &self.send_stall)
            .field("max_calls_in", &self.max_calls_in)
            .field("max_builtin_elements", &self.max_builtin_elements)
            .field(
                "auth",
                &match self.auth {
                    Auth::Env => "from the environment",
                    Auth::Token(_) => "a token (not shown)",
                },
            )
            .field(
                "foreign",
                &self.foreign.iter().map(|(c, _)| c).collect::<Vec<_>>(),
            )
            .field(
                "functions",
                &self.functions.iter().map(|(n, _)| n).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl RpcOptions {
    /// How many sync handlers may run at once (handlers blocked in nested calls do not count).
    pub fn num_worker_threads(mut self, n: usize) -> Self {
        self.num_worker_threads = n;
        self
    }

    /// Default timeout of every call; zero means no timeout.
    pub fn rpc_timeout(mut self, timeout: Duration) -> Self {
        self.rpc_timeout = timeout;
        self
    }

    /// The configured default call timeout.
    #[deprecated(
        note = "one name for the default timeout everywhere: `Rpc::rpc_timeout()` reads it, \
                         `RpcOptions::rpc_timeout(d)` and `Rpc::set_rpc_timeout(d)` set it"
    )]
    pub fn timeout(&self) -> Duration {
        self.rpc_timeout
    }

    /// Where to rendezvous: `env://` (default; `MASTER_ADDR`, `MASTER_PORT`), `tcp://host:port`
    /// (rank 0 hosts the store there; port 0 picks a free one, see [`Rpc::bind`]) or
    /// `file:///path`.
    ///
    /// [`Rpc::bind`]: crate::Rpc::bind
    pub fn init_method(mut self, init_method: impl Into<String>) -> Self {
        self.init_method = init_method.into();
        self
    }

    /// Largest frame body this worker accepts; a larger one closes the connection that sent
    /// it. Default 4 GiB.
    pub fn max_frame_bytes(mut self, n: u64) -> Self {
        self.max_frame_bytes = n;
        self
    }

    /// The address to listen on for peers. By default: loopback when the rendezvous address is
    /// loopback (or a file), otherwise every interface, advertising the one that reaches the
    /// rendezvous host.
    pub fn listen_ip(mut self, ip: IpAddr) -> Self {
        self.listen_ip = Some(ip);
        self
    }

    /// Whether graceful shutdown reports user references the application still holds (torch's
    /// `_ignore_rref_leak = False`). Off by default, as in torch. Either way they are deleted.
    pub fn check_rref_leaks(mut self, on: bool) -> Self {
        self.check_rref_leaks = on;
        self
    }

    /// The latency option: a thread blocked on a call (`rpc_sync`, `to_here`, `wait`) polls its
    /// socket for the reply for up to `spin` before it sleeps, and each connection's reader
    /// keeps polling for up to `spin` after its last frame, which saves the wake-up of a
    /// sleeping thread (tens of microseconds on an idle core) at the price of busy cores. Off
    /// (zero) by default.
    pub fn busy_poll(mut self, spin: Duration) -> Self {
        self.busy_poll = spin;
        self
    }

    /// How long a thread blocked on its own call (`rpc_sync`, `to_here`, a blocking call of
    /// the Python front) polls its socket for the reply before it sleeps, default
    /// [`DEFAULT_SPIN_WAIT`]; zero: it sleeps at once. The same for an idle pool (or front)
    /// thread waiting for the next call on the connection the last one came in on
    /// ([`Origin::serve`](crate::server::foreign::Origin::serve)). Unlike
    /// [`RpcOptions::busy_poll`], no reader task spins, and a thread spins only while it has
    /// nothing to do but wait: a reply (a call) that comes within the spin is read by the
    /// thread that needs it, without waking a sleeping thread (tens of microseconds on an idle
    /// virtual CPU), at the price of that much CPU time per wait that lasts longer. The spin
    /// starts again after each frame the waiting thread handles (a fetch of a reference's
    /// value it answered, a control message): the peer is busy with this connection. Each
    /// connection stops spinning for replies (for calls) after a few in a row came later than
    /// the spin, until one comes within it again. The host decides the rest: a spin lasts all
    /// of `spin` while the distrpc processes busy on the host (those that waited for a reply
    /// or a call in the last 20 ms, this user's, any group) fit its CPUs — a trainer and its
    /// parameter server keep their CPUs from halting between calls, and the work after each
    /// reply runs on a warm one — and a tenth of it while they outnumber the CPUs (four
    /// stages of a model on two CPUs would spin on the cores each other's work needs). And a
    /// spin ends as soon as the host has more runnable threads than CPUs: there the spinning
    /// thread takes the core the work it waits for needs (four workers of a model-parallel
    /// training step on two CPUs spun 3.8 ms of CPU per step away, and the step was slower for
    /// it).
    ///
    /// ```
    /// use std::time::Duration;
    ///
    /// let options = distrpc::RpcOptions::default().spin_wait(Duration::ZERO);
    /// # let _ = options;
    /// ```
    pub fn spin_wait(mut self, spin: Duration) -> Self {
        self.spin_wait = spin;
        self
    }

    /// The liveness bound: a connection whose peer stops answering at the TCP level — its host
    /// vanished or the network between was cut, so no FIN or RST ever comes — is closed within
    /// about this long, and every call waiting on that peer fails with
    /// [`Error::PeerGone`](crate::Error::PeerGone), even calls with no timeout. The kernel does
    /// the watching (TCP keepalive probes once the connection is idle for half the bound, and
    /// `TCP_USER_TIMEOUT` for unanswered data and probes), so it costs nothing per call. A live
    /// peer whose process is merely busy or stopped still answers at the TCP level and is not
    /// affected. Whole seconds, at least 2; zero turns it off. Default [`DEFAULT_LIVENESS`].
    pub fn liveness(mut self, bound: Duration) -> Self {
        self.liveness = bound;
        self
    }

    /// How many bytes a connection may hold for its peer (default 256 MiB). Past this, a call
    /// made on the caller's own thread (`rpc_sync`, `rpc_async`, `remote`) waits until the
    /// peer reads — backpressure — and fails with [`Error::SendFailed`](crate::Error) if it
    /// reads nothing for [`RpcOptions::send_stall`]; replies and messages sent from handlers
    /// never wait, and past four times this the connection is closed as stuck. A single frame
    /// larger than this is still sent, alone.
    ///
    /// ```
    /// let options = distrpc::RpcOptions::default().max_queued_bytes(64 << 20);
    /// ```
    pub fn max_queued_bytes(mut self, bytes: usize) -> Self {
        self.max_queued_bytes = bytes;
        self
    }

    /// How many of one peer's calls (and reference messages) a worker takes at once — queued
    /// or running, not yet answered (default 16 384). With that many, the worker stops
    /// reading the peer's connection until one is answered, so TCP pushes back on the peer
    /// instead of the worker queueing without bound. (A peer's nested calls that wait on
    /// replies queued behind the calls it sent can then wait for one another: keep it well
    /// above the calls in flight a program makes. And a connection not read for longer than
    /// half the liveness bound, its window full, is dropped by the kernel's user timeout.)
    ///
    /// ```
    /// let options = distrpc::RpcOptions::default().max_calls_in(1024);
    /// ```
    pub fn max_calls_in(mut self, calls: usize) -> Self {
        self.max_calls_in = calls.max(1);
        self
    }

    /// How long a call waiting for room ([`RpcOptions::max_queued_bytes`]) gives a peer that
    /// reads none of what is queued for it before failing (default 30 s).
    pub fn send_stall(mut self, stall: Duration) -> Self {
        self.send_stall = stall;
        self
    }

    /// The most elements a builtin's result may have (`aten::ones`, a broadcasting
    /// `aten::add`, …; default 2^28): past it, or when the memory cannot be had, the call
    /// fails with an error instead of exhausting the worker. Process-wide: the last worker
    /// initialised in a process sets it.
    ///
    /// ```
    /// let options = distrpc::RpcOptions::default().max_builtin_elements(1 << 24);
    /// ```
    pub fn max_builtin_elements(mut self, n: usize) -> Self {
        self.max_builtin_elements = n;
        self
    }

    /// Mutual TLS on every connection — worker to worker, worker to store — with the group's
    /// CA: `ca` (PEM) is the CA's certificate, `cert` and `key` (PEM) this worker's, signed by
    /// it (`distrpc cert DIR worker0 worker1 …` makes them). Both ends check the other's
    /// certificate; a connection that fails is closed and logged. Without this option a worker
    /// takes the files `DISTRPC_TLS_CA`, `DISTRPC_TLS_CERT` and `DISTRPC_TLS_KEY` name, if
    /// set. With an auth token as well, its handshake runs inside TLS. A TLS connection gives
    /// up the plain one's direct socket paths (its own tasks encrypt and decrypt).
    ///
    /// ```no_run
    /// let options = distrpc::RpcOptions::default()
    ///     .tls("certs/ca.pem", "certs/worker1.pem", "certs/worker1-key.pem");
    /// ```
    pub fn tls(
        mut self,
        ca: impl Into<std::path::PathBuf>,
        cert: impl Into<std::path::PathBuf>,
        key: impl Into<std::path::PathBuf>,
    ) -> Self {
        self.tls = TlsFiles::Paths {
            ca: ca.into(),
            cert: cert.into(),
            key: key.into(),
        };
        self
    }

    /// The group's shared secret: every connection — worker to worker, worker to store — is
    /// opened only after both ends prove they know it (an HMAC-SHA256 challenge–response,
    /// before anything else is read), and a connection that fails is closed and logged. At
    /// least 16 bytes; every worker of the group needs the same. Without this option a worker
    /// takes the token from `DISTRPC_AUTH_TOKEN`, or from the file `DISTRPC_AUTH_TOKEN_FILE`
    /// names (what `distrpc launch` sets), and a group with neither authenticates nothing.
    ///
    /// ```
    /// let options = distrpc::RpcOptions::default().auth_token("the group's shared secret");
    /// assert!(format!("{options:?}").contains("not shown"));
    /// ```
    pub fn auth_token(mut self, token: impl Into<String>) -> Self {
        self.auth = Auth::Token(token.into());
        self
    }

    /// Injects faults into this worker's sends, for tests of failure handling (feature
    /// `fault-injection`).
    #[cfg(feature = "fault-injection")]
    pub fn faults(mut self, faults: FaultInjection) -> Self {
        self.faults = faults;
        self
    }

    /// Hands every call encoded in `codec` (a Python pickle) to `handler`: how a front (the
    /// Python binding) runs calls Rust cannot read. A worker without a handler for a codec
    /// answers such calls with [`Error::UnsupportedCodec`](crate::Error::UnsupportedCodec).
    ///
    /// A handler for [`Codec::MessagePack`] gets the MessagePack calls whose function is not
    /// registered in Rust: the front's own functions by name, which Rust calls through a
    /// [`Function::named`](crate::Function::named) handle like any other.
    pub fn foreign(mut self, codec: Codec, handler: Arc<dyn ForeignHandler>) -> Self {
        self.foreign.retain(|(c, _)| *c != codec);
        self.foreign.push((codec, handler));
        self
    }

    /// Registers a closure under `name`, callable through [`Function::named`]. It runs on the
    /// handler pool; a panic becomes a remote error.
    ///
    /// [`Function::named`]: crate::Function::named
    pub fn register<A, R, F>(self, name: &str, f: F) -> Self
    where
        A: DeserializeOwned + 'static,
        R: Serialize + Send + Sync + 'static,
        F: Fn(A) -> R + Send + Sync + 'static,
    {
        self.register_fallible(name, move |a| Ok::<R, Infallible>(f(a)))
    }

    /// Registers a closure that returns `Result`; an `Err` reaches the caller as
    /// [`Error::Remote`](crate::Error::Remote).
    pub fn register_fallible<A, R, E, F>(mut self, name: &str, f: F) -> Self
    where
        A: DeserializeOwned + 'static,
        R: Serialize + Send + Sync + 'static,
        E: fmt::Display + 'static,
        F: Fn(A) -> Result<R, E> + Send + Sync + 'static,
    {
        let name: Arc<str> = name.into();
        let handler = named_sync_handler(name.clone(), f);
        self.functions.push((name, handler));
        self
    }
}
