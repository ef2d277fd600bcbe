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

static WAIT_HOOK: std::sync::OnceLock<fn(&mut dyn FnMut())> = std::sync::OnceLock::new();

/// Sets what runs around the waits a caller's thread makes inside a send (for room in a full
/// connection, see [`crate::RpcOptions::max_queued_bytes`]): the hook must call the function
/// it gets exactly once. A front whose threads hold a lock of their own while they call
/// distrpc lets it go there — the Python binding, its interpreter lock. Once per process;
/// `false` if a hook was already set.
///
/// ```
/// fn hook(wait: &mut dyn FnMut()) {
///     // let a lock go…
///     wait();
///     // …and take it back
/// }
/// let _ = distrpc::set_wait_hook(hook);
/// ```
pub fn set_wait_hook(hook: fn(&mut dyn FnMut())) -> bool {
    WAIT_HOOK.set(hook).is_ok()
}

/// Runs `wait` inside the hook of [`set_wait_hook`], if one is set.
pub(crate) fn around_wait(wait: &mut dyn FnMut()) {
    match WAIT_HOOK.get() {
        Some(hook) => hook(wait),
        None => wait(),
    }
}
