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

/// A doorbell for a thread that sleeps in `poll` on a socket (reading a connection while it
/// waits for work, see [`crate::server::foreign::Origin`]): ringing it wakes that thread, which
/// a condition variable could not. An `eventfd`.
///
/// ```
/// let bell = distrpc::server::foreign::Doorbell::new()?;
/// bell.ring();
/// bell.clear();
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Debug)]
pub struct Doorbell {
    fd: std::os::fd::OwnedFd,
    /// Set after each ring's write: [`Doorbell::clear`] reads the descriptor only then (a
    /// thread serving calls clears it before each wait, one system call per call otherwise).
    rung: std::sync::atomic::AtomicBool,
}

impl Doorbell {
    /// A doorbell, not rung.
    pub fn new() -> std::io::Result<Self> {
        use std::os::fd::FromRawFd;
        // SAFETY: eventfd takes no pointers; a non-negative result is a new descriptor we own.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` was just opened and nothing else owns it.
        Ok(Self {
            fd: unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) },
            rung: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Rings: the thread polling it (now or next) wakes up, until [`Doorbell::clear`].
    pub fn ring(&self) {
        use std::os::fd::AsRawFd;
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a valid u64 to our descriptor. It can only fail when the
        // counter is full (it is rung already), which is as good.
        unsafe { libc::write(self.fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
        // After the write: whenever the descriptor is readable, `rung` is or is about to be
        // set, so the clear that follows the wake-up it causes reads it.
        self.rung.store(true, std::sync::atomic::Ordering::Release);
    }

    /// Un-rings it (before waiting for it again).
    pub fn clear(&self) {
        use std::os::fd::AsRawFd;
        if !self.rung.swap(false, std::sync::atomic::Ordering::AcqRel) {
            return;
        }
        let mut n: u64 = 0;
        // SAFETY: reads at most 8 bytes into a valid u64; fails harmlessly when not rung.
        unsafe { libc::read(self.fd.as_raw_fd(), (&mut n as *mut u64).cast(), 8) };
    }

    /// Whether the calling thread is reading a connection with this doorbell now (inside
    /// [`Origin::serve`](crate::server::foreign::Origin::serve)): what it queues meanwhile
    /// for the doorbell's owner it takes itself, so no one is to be woken for it.
    pub fn serving_here(&self) -> bool {
        SERVING.with(|s| s.get() == self as *const Self as usize)
    }

    /// Marks the calling thread as reading with this doorbell until the guard drops.
    pub(crate) fn serving(&self) -> Serving {
        Serving(SERVING.with(|s| s.replace(self as *const Self as usize)))
    }

    pub(crate) fn fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        self.fd.as_raw_fd()
    }
}

thread_local! {
    /// The address of the doorbell this thread reads a connection with, 0 if none.
    static SERVING: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// See [`Doorbell::serving`]; restores what was marked before.
pub(crate) struct Serving(usize);

impl Drop for Serving {
    fn drop(&mut self) {
        SERVING.with(|s| s.set(self.0));
    }
}
