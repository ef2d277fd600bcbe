//! Locking, the one way distrpc does it.

use std::sync::{Mutex, MutexGuard};

/// Locks `m`, even if a thread panicked while holding it.
///
/// Every critical section in distrpc is a handful of map, queue or counter updates that leave the
/// data consistent at every step (no invariant spans two of them), and user code never runs
/// under one of these locks; so the data behind a poisoned lock is still valid, and refusing it
/// would only turn one panic (already reported as a remote error) into many.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
