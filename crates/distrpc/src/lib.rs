//! distrpc: distributed RPC with remote references, in Rust — what `torch.distributed.rpc` does,
//! faster and with failures reported at once.
//!
//! A group of named workers (processes, or many in one process) rendezvous through a store hosted
//! by rank 0, then call registered functions on each other synchronously ([`Rpc::rpc_sync`]) or
//! asynchronously ([`Rpc::rpc_async`] → [`RpcFuture`]). Tensors travel beside the message, never
//! copied into it. A failed function comes back as a typed [`Error::Remote`]; a dead peer fails
//! every call waiting on it at once; [`Rpc::shutdown`] stops the group without losing a call.
//!
//! ```
//! use distrpc::{Rpc, RpcOptions, Tensor, builtin};
//!
//! #[distrpc::function]
//! fn scale(t: Tensor, by: f32) -> Result<Tensor, distrpc::TensorError> {
//!     distrpc::ops::mul(&t, &Tensor::scalar(by))
//! }
//!
//! let rpc = Rpc::init("worker0", 0, 1, RpcOptions::default().init_method("tcp://127.0.0.1:0"))?;
//! let x = Tensor::from_slice(&[1.0f32, 2.0]);
//! let y = rpc.rpc_sync(0, scale, (x.clone(), 3.0))?;          // by rank, name or WorkerInfo
//! let z = rpc.rpc_async("worker0", builtin::add, (x, y)).wait()?;
//! assert_eq!(z.as_slice::<f32>()?, &[4.0, 8.0]);
//! rpc.shutdown()?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Layers
//!
//! ```text
//!  api          rpc (Rpc), options, builtin, launch
//!    │
//!  node         the layers of one worker wired together; shutdown, metrics
//!    │
//!  rref/        ledger (no I/O), context, service (a router service), RRef
//!  collective/  gather, barrier (registry entries, calls through the client)
//!    │
//!  server/      registry, handlers, execution (inline / pool / task), router, replies
//!    │
//!  call/        client send path, pending calls and deadlines, RpcFuture, fault injection
//!    │
//!  transport/   connections, reader/writer, the blocked caller's claim, dial/accept/hello
//!    │
//!  support      function (typed handles: a name and types, nothing more), rendezvous
//!               (+ distrpc-store), worker, error, runtime, pool, sync, net
//!  distrpc-wire frames, tensors, codec (no I/O)
//! ```
//!
//! Every dependency points down. What a lower layer must call above it is a trait it defines
//! and the upper layer implements and registers: the transport hands frames to an
//! `Inbound` (the server's router) and tells `LossListener`s of lost peers (the client, gather);
//! the client encodes and decodes values inside a `ValueScope` (the reference service, so that
//! references fork); the router hands message kinds to a `Service` (the reference service).
//! Each folder's `mod.rs` says what it owns and what it may not touch.

extern crate self as distrpc;

pub mod builtin;
pub mod call;
mod collective;
pub mod error;
pub mod function;
pub mod launch;
mod metrics;
mod net;
mod node;
pub mod options;
mod pool;
mod rendezvous;
pub mod rpc;
pub mod rref;
mod runtime;
pub mod server;
mod shutdown;
mod sync;
mod transport;
pub mod worker;

/// [`RpcFuture`] and [`wait_all`], where they always were.
pub mod future {
    pub use crate::call::future::{RpcFuture, wait_all};
}

pub(crate) use distrpc_wire::{codec, tensor};

pub use call::{RawCall, RawReply, RpcFuture, wait_all};
pub use distrpc_macros::function;
/// What keeps a group closed to outsiders: the auth token's handshake and mutual TLS
/// (certificates for a group: [`secure::tls::generate`]).
pub use distrpc_secure as secure;
pub use distrpc_wire::codec::TENSOR_EXT;
pub use distrpc_wire::ops;
pub use distrpc_wire::{Codec, DType, Element, Tensor, TensorError};
pub use error::{Error, RemoteError};
pub use function::{Function, Method, NoLocal};
#[cfg(feature = "fault-injection")]
pub use options::FaultInjection;
pub use options::{MessageKind, RpcOptions};
pub use rendezvous::STORE_FD_ENV;
pub use rpc::{Metrics, PendingRpc, Rpc};
pub use rref::RRef;
pub use sync::set_wait_hook;
pub use worker::{To, WorkerInfo};

/// The README's example, compiled and run as a doctest so that it stays true.
#[doc = include_str!("../../../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;

#[doc(hidden)]
pub mod __private {
    pub use crate::server::handler::{
        async_handler, async_method_handler, method_handler, sync_handler,
    };
    pub use crate::server::registry::Registration;
    pub use crate::server::value::{KeepOpaque, KeepSerialized, Keeper, Value};
    pub use inventory;
}
