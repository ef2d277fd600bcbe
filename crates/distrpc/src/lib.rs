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
//! # Layout
//! - [`rpc`]: [`Rpc`], the user's handle: init, calls, gather, barrier, shutdown.
//! - [`mod@function`]: [`Function`] and [`Method`] handles and the registry; `#[distrpc::function]`
//!   fills it.
//! - [`mod@rref`]: remote references ([`RRef`]) and their bookkeeping.
//! - [`future`]: [`RpcFuture`] and [`wait_all`].
//! - `agent` (private): connections, pending calls, timeouts, dispatch, failure detection.
//! - `rendezvous`, `gather`, `pool`, `runtime` (private): init, all_gather, the handler pool,
//!   the shared tokio runtime.
//! - [`builtin`]: `aten::` tensor functions; [`launch`]: the process launcher.
//! - Frames, tensors and the codec live in the `distrpc-wire` crate, re-exported here.

extern crate self as distrpc;

mod agent;
pub mod builtin;
mod connection;
pub mod error;
pub mod function;
pub mod future;
mod gather;
pub mod launch;
mod net;
pub mod options;
mod pool;
mod rendezvous;
pub mod rpc;
pub mod rref;
mod runtime;
mod sync;
pub mod worker;

pub(crate) use distrpc_wire::{codec, tensor};

pub use distrpc_macros::function;
pub use distrpc_wire::ops;
pub use distrpc_wire::{DType, Element, Tensor, TensorError};
pub use error::{Error, RemoteError};
pub use function::{Function, Method};
pub use future::{RpcFuture, wait_all};
pub use options::{FaultInjection, MessageKind, RpcOptions};
pub use rendezvous::STORE_FD_ENV;
pub use rpc::{PendingRpc, Rpc};
pub use rref::RRef;
pub use worker::{To, WorkerInfo};

/// The README's example, compiled and run as a doctest so that it stays true.
#[doc = include_str!("../../../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;

#[doc(hidden)]
pub mod __private {
    pub use crate::function::{Registration, Value, async_handler, method_handler, sync_handler};
    pub use inventory;
}
