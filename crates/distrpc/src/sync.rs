//! Locking, the one way distrpc does it.

use std::sync::{Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Instant;

/// Locks `m`, even if a thread panicked while holding it.
///
/// Every critical section in distrpc is a handful of map, queue or counter updates that leave the
/// data consistent at every step (no invariant spans two of them), and user code never runs
/// under one of these locks; so the data behind a poisoned lock is still valid, and refusing it
/// would only turn one panic (already reported as a remote error) into many.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Sleeps on `cv` until woken or until `deadline` (`None`: no deadline), tolerating poison as
/// [`lock`] does. `Err` hands the guard back without sleeping once the deadline has passed: the
/// caller gives up. Callers loop, re-checking their condition after every wake-up.
pub(crate) fn wait_until<'a, T>(
    cv: &Condvar,
    guard: MutexGuard<'a, T>,
    deadline: Option<Instant>,
) -> Result<MutexGuard<'a, T>, MutexGuard<'a, T>> {
    let Some(deadline) = deadline else {
        return Ok(cv.wait(guard).unwrap_or_else(|e| e.into_inner()));
    };
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(guard);
    }
    Ok(cv
        .wait_timeout(guard, left)
        .unwrap_or_else(|e| e.into_inner())
        .0)
}

/// Locks `l` for reading, tolerating poison as [`lock`] does.
pub(crate) fn read<T>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|e| e.into_inner())
}

/// Locks `l` for writing, tolerating poison as [`lock`] does.
pub(crate) fn write<T>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|e| e.into_inner())
}
