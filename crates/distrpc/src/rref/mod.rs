//! Remote references (torch's `RRef`): values that live on one worker (the owner) and are used
//! from others through user references, with distributed reference counting.
//!
//! This module holds the protocol's bookkeeping, [`ledger`]: a state machine without I/O whose
//! every flow is unit-tested. The user-facing `RRef<T>` and `Rpc::remote` are built on it.

pub mod ledger;

pub use ledger::{Control, Effect, ForkId, GlobalId, Ledger, LedgerError, LedgerInfo, RRefId};
