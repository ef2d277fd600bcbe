//! The process-wide tokio runtime that drives every agent's sockets and async handlers.
//!
//! One runtime serves all the [`Rpc`](crate::Rpc)s of a process, so that hundreds of workers in
//! one process (tests, scale simulations) cost a handful of threads, not hundreds. Sync handlers
//! run on each agent's handler pool, except quick ones, which run inline on the reader task that
//! received their call ([`as_reader`]); a blocking wait inside one is allowed by [`blocking`].

use std::cell::{Cell, RefCell};
use std::sync::Arc;
use std::sync::OnceLock;

use tokio::runtime::{Handle, Runtime};

static RUNTIME: OnceLock<Runtime> = OnceLock::new();

/// Starts another reader task for a connection.
pub(crate) type HandOff = Arc<dyn Fn() + Send + Sync>;

/// What a connection's reader task is doing on this thread.
enum Reading {
    /// Handling a frame; a blocking wait inside may hand reading off with this.
    Frame(HandOff),
    /// A blocking wait inside handed reading off: the task must stop reading.
    HandedOff,
}

thread_local! {
    static ON_RUNTIME: Cell<bool> = const { Cell::new(false) };
    static READING: RefCell<Option<Reading>> = const { RefCell::new(None) };
}

/// Runs `f` for a connection's reader task handling one frame, during which a sync handler may
/// run inline (see [`reading_inline`]). Returns `f`'s output, and whether a blocking wait inside
/// handed reading off to a new task (started with `hand_off`): the calling task must then stop.
pub(crate) fn as_reader<R>(hand_off: &HandOff, f: impl FnOnce() -> R) -> (R, bool) {
    READING.with(|r| *r.borrow_mut() = Some(Reading::Frame(hand_off.clone())));
    let out = f();
    let handed_off = READING.with(|r| matches!(r.borrow_mut().take(), Some(Reading::HandedOff)));
    (out, handed_off)
}

/// Whether this thread is a reader task handling a frame, where a quick sync handler may run.
pub(crate) fn reading_inline() -> bool {
    READING.with(|r| matches!(*r.borrow(), Some(Reading::Frame(_))))
}

/// Whether a blocking wait on this thread handed its reader task's reading off.
pub(crate) fn handed_off() -> bool {
    READING.with(|r| matches!(*r.borrow(), Some(Reading::HandedOff)))
}

/// Runs a blocking wait on this thread. Off the runtime it simply runs. On a runtime thread it
/// runs only inside a reader task's frame (a handler that was quick until now, a future's
/// callback): reading is handed to a new task, the runtime's other work moves to another thread
/// for the wait (tokio's `block_in_place`), and the frame's task stops reading when it is done.
/// Anywhere else on the runtime it returns `None`: blocking there could deadlock.
pub(crate) fn blocking<R>(f: impl FnOnce() -> R) -> Option<R> {
    if !on_runtime_thread() {
        return Some(f());
    }
    let allowed = READING.with(|r| {
        let mut r = r.borrow_mut();
        match r.take() {
            Some(Reading::Frame(hand_off)) => {
                *r = Some(Reading::HandedOff);
                drop(r);
                hand_off();
                true
            }
            other => {
                let handed = matches!(other, Some(Reading::HandedOff));
                *r = other;
                handed
            }
        }
    });
    allowed.then(|| tokio::task::block_in_place(f))
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

/// The tasks of one worker on the shared runtime: spawned there, tracked so that shutdown can
/// wait for them, and cancelled together (signal, then wait: the two steps of a shutdown).
#[derive(Clone, Debug)]
pub(crate) struct Tasks {
    rt: Handle,
    tracker: tokio_util::task::TaskTracker,
    cancel: tokio_util::sync::CancellationToken,
}

impl Tasks {
    pub(crate) fn new(rt: Handle) -> Self {
        Self {
            rt,
            tracker: tokio_util::task::TaskTracker::new(),
            cancel: tokio_util::sync::CancellationToken::new(),
        }
    }

    /// Runs `fut` as a tracked task.
    pub(crate) fn spawn<F>(&self, fut: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        self.tracker.spawn_on(fut, &self.rt);
    }

    /// Resolves once [`Tasks::cancel`] was called: every task's loop selects on it.
    pub(crate) fn cancelled(&self) -> tokio_util::sync::WaitForCancellationFuture<'_> {
        self.cancel.cancelled()
    }

    /// The runtime the tasks run on.
    pub(crate) fn handle(&self) -> &Handle {
        &self.rt
    }

    /// No more tasks are expected: [`Tasks::wait`] ends once the running ones have.
    pub(crate) fn close(&self) {
        self.tracker.close();
    }

    /// Signals every task to stop.
    pub(crate) fn cancel(&self) {
        self.cancel.cancel();
    }

    /// Waits (bounded by `timeout`) until every task has ended; only off the runtime.
    pub(crate) fn wait(&self, timeout: std::time::Duration) {
        let tracker = self.tracker.clone();
        let _ = block_on(async { tokio::time::timeout(timeout, tracker.wait()).await });
    }
}
