//! The interpreter lock around distrpc's waits inside a send: a call made with the lock held
//! (`rpc_async`, `remote`, the send of an `rpc_sync`) may have to wait for room on a full
//! connection ([`distrpc::RpcOptions::max_queued_bytes`]); the lock goes for that wait, so
//! that this process's other threads — those answering the peer's calls among them — go on.
//!
//! ```text
//!  Python thread (lock held) ─► sending(py, send) ─► distrpc: connection full
//!                                                     └► hook: lock let go ─► wait ─► lock back
//! ```

use std::cell::Cell;

use pyo3::Python;

thread_local! {
    /// Whether this thread holds the interpreter lock inside [`sending`].
    static HOLDS_LOCK: Cell<bool> = const { Cell::new(false) };
}

/// Runs `send` (which may wait for room on a connection) with the interpreter lock released
/// around any such wait.
pub(crate) fn sending<R>(_py: Python<'_>, send: impl FnOnce() -> R) -> R {
    struct Reset(bool);
    impl Drop for Reset {
        fn drop(&mut self) {
            HOLDS_LOCK.set(self.0);
        }
    }
    let _reset = Reset(HOLDS_LOCK.replace(true));
    send()
}

/// distrpc's wait hook (see [`distrpc::set_wait_hook`]): lets the interpreter lock go for
/// the wait when this thread holds it inside [`sending`].
pub(crate) fn release_while_waiting(wait: &mut dyn FnMut()) {
    if !HOLDS_LOCK.get() {
        return wait();
    }
    HOLDS_LOCK.set(false);
    // SAFETY: inside `sending` this thread holds the interpreter lock (it has a `Python`
    // token), and it takes it back before `sending` returns.
    let state = unsafe { pyo3::ffi::PyEval_SaveThread() };
    wait();
    // SAFETY: `state` is this thread's, saved just above.
    unsafe { pyo3::ffi::PyEval_RestoreThread(state) };
    HOLDS_LOCK.set(true);
}
