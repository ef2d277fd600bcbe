//! Collectives: `all_gather` and `barrier` among the workers of a group (torch's
//! `_all_gather`, `_barrier`), and the sum shutdown uses to learn that nothing is in flight.
//!
//! Owns: gather rounds. A service like any other: its functions are registry entries, its
//! messages calls sent through the client, and it learns of lost peers from the transport. May
//! not touch: references, `Rpc`.

mod gather;

pub(crate) use gather::{Gather, all_gather, barrier, sum};
