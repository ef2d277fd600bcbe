//! Calls, the client side: the send path, the table of calls waiting for replies with their
//! deadlines, and [`RpcFuture`].
//!
//! Owns: call ids, pending calls, timeouts, fault injection, the in-flight counts
//! ([`activity`]), the payload layout of a call head. Uses the transport below to send and to
//! learn of lost peers. May not touch: handlers, references, gather — values that need the
//! reference layer are encoded inside the [`scope::ValueScope`] it registers.

pub(crate) mod activity;
pub mod client;
pub(crate) mod fault;
pub mod future;
pub(crate) mod payload;
pub(crate) mod pending;
pub(crate) mod scope;

pub(crate) use client::{Client, Delivery, Outgoing, TypedCall};
pub use client::{RawCall, RawReply};
pub(crate) use fault::FaultInjection;
pub use future::{RpcFuture, wait_all};
