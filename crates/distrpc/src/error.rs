//! The one public error type, [`Error`], and the remote failure it can carry, [`RemoteError`].

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A user function failed on the callee (torch's `RemoteException`): where, in what, and why.
///
/// The callee catches the error or panic, keeps serving, and sends this back; the caller gets it
/// as [`Error::Remote`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{type_name} in {function} on {worker}: {message}")]
pub struct RemoteError {
    /// Name of the worker the function ran on.
    pub worker: String,
    /// Registered name of the function.
    pub function: String,
    /// Rust type name of the error (`"panic"` for a panic).
    pub type_name: String,
    /// The error's message (its `Display`).
    pub message: String,
    /// The callee's backtrace, when one was captured (`RUST_BACKTRACE=1` on the callee).
    pub backtrace: Option<String>,
}

/// Everything that can go wrong in distrpc. Each variant tells the caller who failed and how.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The agent was shut down, or never initialized (torch: "RPC has not been initialized").
    #[error("RPC is shut down on {worker}: no calls can be made or served")]
    ShutDown {
        /// The local worker.
        worker: String,
    },
    /// No worker has this name (held as given) or rank (`rank N (world size is M)`).
    #[error("unknown worker {0}")]
    UnknownWorker(String),
    /// The callee has no function registered under this name.
    #[error("function {function:?} is not registered on {worker}")]
    UnknownFunction {
        /// The callee.
        worker: String,
        /// The name that was called.
        function: String,
    },
    /// Arguments did not decode as the function's parameter types on the callee, or the result
    /// did not decode as the caller's expected return type.
    #[error("{function} on {worker}: {what} do not match the function's types: {message}")]
    Decode {
        /// Where the decode failed.
        worker: String,
        /// The function.
        function: String,
        /// `"arguments"` or `"result"`.
        what: &'static str,
        /// The decoder's message.
        message: String,
    },
    /// A value could not be encoded.
    #[error("cannot encode {what} of {function}: {message}")]
    Encode {
        /// The function.
        function: String,
        /// `"arguments"` or `"result"`.
        what: &'static str,
        /// The encoder's message.
        message: String,
    },
    /// The call did not complete within its timeout (torch: "RPC ran for more than set timeout").
    #[error("{function} on {worker} ran for {elapsed:?}, more than its timeout of {timeout:?}")]
    Timeout {
        /// The callee.
        worker: String,
        /// The function.
        function: String,
        /// The timeout that ran out.
        timeout: Duration,
        /// How long the call ran before it was failed.
        elapsed: Duration,
    },
    /// The connection to the peer broke: its process died, or it shut down.
    #[error("worker {worker} is gone: {reason}")]
    PeerGone {
        /// The peer.
        worker: String,
        /// What happened to the connection.
        reason: String,
    },
    /// The user function failed on the callee.
    #[error(transparent)]
    Remote(#[from] RemoteError),
    /// A send failed on purpose: [`FaultInjection`](crate::FaultInjection) dropped it (torch's
    /// `INTENTIONAL_FAILURE`). A dropped `remote()` makes its reference report a creation
    /// timeout, as in torch.
    #[error("injected failure of a {kind:?} send to {worker}")]
    Injected {
        /// The peer.
        worker: String,
        /// The kind of message dropped.
        kind: distrpc_wire::Kind,
    },
    /// A message could not be sent (a frame the wire cannot carry, an undecodable reply).
    #[error("send to {worker} failed: {reason}")]
    SendFailed {
        /// The peer.
        worker: String,
        /// Why.
        reason: String,
    },
    /// A remote reference cannot be used: its `remote()` creation failed or timed out.
    #[error("RRef creation on {owner} failed: {reason}")]
    RRefCreation {
        /// The owner the value was to be created on.
        owner: String,
        /// Why.
        reason: String,
    },
    /// An operation only the owner of a remote reference can do was tried elsewhere.
    #[error("{operation} can only be called on the owner of the RRef; call it on {owner}")]
    NotOwner {
        /// The owner.
        owner: String,
        /// The operation.
        operation: &'static str,
    },
    /// Graceful shutdown found user references still held (with leak checking on); they were
    /// deleted, and the shutdown completed.
    #[error("leaking RRefs on {worker}: {references:?} were still held at shutdown")]
    RRefLeak {
        /// The worker.
        worker: String,
        /// The references, as `UserRRef(rref_id=..., fork_id=...)`.
        references: Vec<String>,
    },
    /// Rendezvous at init failed.
    #[error("rendezvous failed: {0}")]
    Rendezvous(String),
    /// An argument to distrpc itself is invalid (a bad worker name, a rank out of range, ...).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The callee cannot run calls encoded this way: a pickled call (a Python function) sent to
    /// a worker with no Python front, or a codec mark this build does not know.
    #[error("{worker} cannot run {function:?}: it has no handler for {codec} calls")]
    UnsupportedCodec {
        /// The callee.
        worker: String,
        /// The function called.
        function: String,
        /// The codec of the call (`Pickle`, or the unknown mark).
        codec: String,
    },
    /// A future's result will never come: what should have completed it was dropped first — a
    /// `then` callback or a result's `Deserialize` that panicked, say.
    #[error("the result was abandoned: {0}")]
    Abandoned(String),
    /// A blocking wait was attempted on one of distrpc's runtime threads, where it would
    /// deadlock; use `.await` there instead.
    #[error("blocking wait on a distrpc runtime thread would deadlock; await the future instead")]
    WouldBlock,
    /// A tensor was used with the wrong dtype or shape.
    #[error(transparent)]
    Tensor(#[from] distrpc_wire::TensorError),
    /// An I/O error outside any one call (binding a listener, ...).
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

impl Error {
    /// Whether this is a timeout.
    pub fn is_timeout(&self) -> bool {
        matches!(self, Error::Timeout { .. })
    }
}

/// Why the callee did not produce a result; sent in an `Exception` frame.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum Failure {
    UnknownFunction(String),
    Decode { function: String, message: String },
    Remote(RemoteError),
    ShutDown,
    Other(String),
    Codec { function: String, codec: String },
}

impl Failure {
    /// The caller's error for this failure reported by `worker`.
    pub(crate) fn into_error(self, worker: &str) -> Error {
        match self {
            Failure::UnknownFunction(function) => Error::UnknownFunction {
                worker: worker.to_string(),
                function,
            },
            Failure::Decode { function, message } => Error::Decode {
                worker: worker.to_string(),
                function,
                what: "arguments",
                message,
            },
            Failure::Remote(e) => Error::Remote(e),
            Failure::ShutDown => Error::ShutDown {
                worker: worker.to_string(),
            },
            Failure::Other(reason) => Error::SendFailed {
                worker: worker.to_string(),
                reason,
            },
            Failure::Codec { function, codec } => Error::UnsupportedCodec {
                worker: worker.to_string(),
                function,
                codec,
            },
        }
    }
}

/// The message of a caught panic (`panic!` payloads are `&str` or `String`).
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic with a non-string payload".to_string())
}
