//! The wire format of distrpc, with no I/O and no async runtime.
//!
//! A message travels as one [`frame`]: a fixed header, a table of tensor descriptors, the
//! MessagePack payload, then each tensor's bytes at a 64-byte aligned offset. Tensors are never
//! copied into the payload: the payload refers to them by index in the message's tensor table
//! ([`codec`]), the sender writes them with vectored writes, and the receiver hands them out as
//! slices of its receive buffer.
//!
//! # Layout
//! - [`frame`]: header, message kinds, limits, encoding to I/O slices and checked decoding.
//! - [`deframe`]: a byte stream, split anywhere, back into frames (what a connection reads).
//! - [`aligned`]: 64-byte aligned receive buffers that become [`bytes::Bytes`] without a copy.
//! - [`tensor`]: the [`Tensor`] type, its dtypes and zero-copy `ndarray` views.
//! - [`ops`]: the tensor arithmetic behind the builtin functions.
//! - [`codec`]: serde encoding with a thread-local tensor table, as torch's RPC pickler does.

pub mod aligned;
pub mod codec;
pub mod deframe;
pub mod frame;
pub mod ops;
pub mod tensor;

pub use codec::{CodecError, decode, encode};
pub use frame::{Codec, Frame, FrameError, Header, Kind, Limits, OutFrame};
pub use tensor::{DType, Element, Tensor, TensorError};
