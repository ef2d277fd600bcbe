//! The process-wide tokio runtime that drives every agent's sockets and async handlers.
//!
//! One runtime serves all the [`Rpc`](crate::Rpc)s of a process, so that hundreds of workers in
//! one process (tests, scale simulations) cost a handful of threads, not hundreds. Sync handlers
//! never run here: they run on each agent's handler pool.

use std::cell::Cell;
use std::sync::OnceLock;

use tokio::runtime::{Handle, Runtime};

static RUNTIME: OnceLock<Runtime> = OnceLock::new();

thread_local! {
    static ON_RUNTIME: Cell<bool> = const { Cell::new(false) };
}

/// Starts the runtime if it is not running yet.
pub(crate) fn start() -> std::io::Result<Handle> {
    if let Some(rt) = RUNTIME.get() {
        return Ok(rt.handle().clone());
    }
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get().min(4));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .thread_name("distrpc-io")
        .on_thread_start(|| ON_RUNTIME.with(|c| c.set(true)))
        .enable_all()
        .build()?;
    // If another thread won the race, its runtime is kept and ours is dropped here.
    let _ = RUNTIME.set(rt);
    Ok(handle())
}

/// The runtime's handle.
pub(crate) fn handle() -> Handle {
    match RUNTIME.get() {
        Some(rt) => rt.handle().clone(),
        // Only agents call this, and an agent exists only after `start` succeeded in init.
        None => unreachable!("distrpc runtime used before Rpc::init started it"),
    }
}

/// Whether the current thread is one of the runtime's threads, where blocking would deadlock.
pub(crate) fn on_runtime_thread() -> bool {
    ON_RUNTIME.with(Cell::get)
}

/// Runs `fut` to completion on the runtime from a thread that may block. Inside some other
/// tokio runtime's context (where `block_on` would panic), it blocks a scoped helper thread.
pub(crate) fn block_on<F>(fut: F) -> F::Output
where
    F: std::future::Future + Send,
    F::Output: Send,
{
    if Handle::try_current().is_err() {
        return handle().block_on(fut);
    }
    std::thread::scope(|s| match s.spawn(|| handle().block_on(fut)).join() {
        Ok(out) => out,
        Err(panic) => std::panic::resume_unwind(panic),
    })
}
