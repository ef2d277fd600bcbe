//! Remote references (torch's `RRef`): values that live on one worker (the owner) and are used
//! from others through user references, with distributed reference counting.
//!
//! - [`ledger`]: the protocol's bookkeeping, a state machine without I/O, unit-tested flow by
//!   flow (its module docs draw the fork protocol).
//! - `context`: the owner's values and waiting for confirmations (no I/O either).
//! - `service`: the live side — serves the reference message kinds for the router, sends the
//!   ledger's control messages through the client, and is the scope references fork in.
//! - `remote`: `remote()`, `RRef(value)` and `to_here()`.
//! - [`RRef`]: the user's handle; methods, forks through serde.
//!
//! An `RRef` inside the arguments or result of a call is forked when it is serialized (only
//! possible inside an RPC encode) and becomes a new user reference (or an owner handle, on the
//! owner) when it is deserialized. A callee's function runs only once every reference in its
//! arguments is confirmed by its owner.
//!
//! Owns: reference ids, values behind references, the fork protocol. Uses the server (it is a
//! service of the router, and runs handlers for remote and method calls) and the client. May
//! not touch: `Rpc` or gather.

pub(crate) mod context;
mod creation;
mod handle;
pub mod ledger;
mod raw;
pub(crate) mod remote;
pub(crate) mod service;

use bytes::{Buf, BufMut};

pub use handle::RRef;
pub use ledger::{Control, Effect, ForkId, GlobalId, Ledger, LedgerError, LedgerInfo, RRefId};
pub(crate) use raw::{from_fork, local as local_raw, raw_remote};
pub(crate) use service::RRefService;

/// Writes a global id (12 bytes: rank, counter).
pub(crate) fn put_id(out: &mut Vec<u8>, id: GlobalId) {
    out.put_u32_le(id.created_on);
    out.put_u64_le(id.local_id);
}

/// Reads a global id written by [`put_id`].
pub(crate) fn get_id(buf: &mut &[u8]) -> Option<GlobalId> {
    if buf.len() < 12 {
        return None;
    }
    Some(GlobalId {
        created_on: buf.get_u32_le(),
        local_id: buf.get_u64_le(),
    })
}
