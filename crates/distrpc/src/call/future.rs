//! [`RpcFuture`]: the result of a call that may not have arrived yet (torch's `Future`).
//!
//! It can be waited on from a plain thread ([`RpcFuture::wait`]), awaited in async code, chained
//! ([`RpcFuture::then`]) and waited on in groups ([`wait_all`]). It completes exactly once: with
//! the value, the remote error, a timeout, or the loss of the peer; the agent guarantees one of
//! these happens, so a wait always ends.

use crate::sync::lock;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use crate::error::Error;

type Callback<T> = Box<dyn FnOnce(Result<T, Error>) + Send>;

enum State<T> {
    Pending {
        waker: Option<Waker>,
        callback: Option<Callback<T>>,
    },
    Ready(Result<T, Error>),
    Taken,
}

struct Slot<T> {
    state: Mutex<State<T>>,
    ready: Condvar,
    /// Set once the state is no longer pending, so that a spinning waiter need not lock.
    done: AtomicBool,
    /// A thread sleeps on `ready` (set under the lock): only then is it notified, sparing the
    /// system call otherwise.
    sleeping: AtomicBool,
    /// How long a blocking wait spins before it parks (the busy-poll latency option).
    spin: Duration,
}

impl<T> Slot<T> {
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        lock(&self.state)
    }
}

/// The completing side of an [`RpcFuture`]. Dropped without completing (a callback that
/// panicked, a path that forgot it), it fails the future with [`Error::Abandoned`], so that no
/// wait on it lasts forever.
pub(crate) struct Completer<T> {
    /// `None` once completed.
    slot: Option<Arc<Slot<T>>>,
}

impl<T> Completer<T> {
    /// Completes the future. Completing twice keeps the first result.
    pub(crate) fn complete(mut self, result: Result<T, Error>) {
        if let Some(slot) = self.slot.take() {
            Self::set(&slot, result);
        }
    }

    fn set(slot: &Slot<T>, result: Result<T, Error>) {
        let mut state = slot.lock();
        match std::mem::replace(&mut *state, State::Taken) {
            State::Pending { waker, callback } => {
                if let Some(cb) = callback {
                    drop(state);
                    cb(result);
                    return;
                }
                *state = State::Ready(result);
                slot.done.store(true, Ordering::Release);
                let sleeping = slot.sleeping.load(Ordering::Relaxed);
                drop(state);
                if sleeping {
                    slot.ready.notify_all();
                }
                if let Some(w) = waker {
                    w.wake();
                }
            }
            done => *state = done,
        }
    }
}

impl<T> Drop for Completer<T> {
    fn drop(&mut self) {
        if let Some(slot) = self.slot.take() {
            let reason = if std::thread::panicking() {
                "what was to complete it panicked"
            } else {
                "what was to complete it was dropped"
            };
            Self::set(&slot, Err(Error::Abandoned(reason.into())));
        }
    }
}

/// A value that a call will produce.
///
/// ```no_run
/// # fn demo(rpc: &distrpc::Rpc) -> Result<(), distrpc::Error> {
/// use distrpc::builtin;
/// use distrpc::Tensor;
///
/// let x = Tensor::from_slice(&[1.0f32, 2.0]);
/// let fut = rpc.rpc_async("worker1", builtin::add, (x.clone(), x));
/// let doubled = fut.then(|r| r.map(|t| t.shape().to_vec()));
/// assert_eq!(doubled.wait()?, vec![2]);
/// # Ok(()) }
/// ```
#[must_use = "a future does nothing unless waited on; dropping it does not cancel the call"]
pub struct RpcFuture<T> {
    slot: Arc<Slot<T>>,
    /// For a blocking or started call: how the caller reads its reply on the connection it
    /// comes on.
    claim: Option<crate::transport::Reading>,
}

impl<T> fmt::Debug for RpcFuture<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RpcFuture")
            .field("done", &self.is_done())
            .finish()
    }
}

impl<T> RpcFuture<T> {
    /// Whether the result has arrived.
    pub fn is_done(&self) -> bool {
        !matches!(*self.slot.lock(), State::Pending { .. })
    }
}

impl<T: Send + 'static> RpcFuture<T> {
    /// A pending future and the handle that completes it.
    pub(crate) fn pending() -> (Self, Completer<T>) {
        Self::pending_spinning(Duration::ZERO)
    }

    /// A pending future whose blocking wait spins for up to `spin` before parking.
    pub(crate) fn pending_spinning(spin: Duration) -> (Self, Completer<T>) {
        let slot = Arc::new(Slot {
            state: Mutex::new(State::Pending {
                waker: None,
                callback: None,
            }),
            ready: Condvar::new(),
            done: AtomicBool::new(false),
            sleeping: AtomicBool::new(false),
            spin,
        });
        (
            Self {
                slot: slot.clone(),
                claim: None,
            },
            Completer { slot: Some(slot) },
        )
    }

    /// A future that is already complete.
    pub fn ready(result: Result<T, Error>) -> Self {
        let (fut, done) = Self::pending();
        done.complete(result);
        fut
    }

    /// Blocks the calling thread until the result arrives.
    ///
    /// Called on one of distrpc's runtime threads it returns [`Error::WouldBlock`] instead of
    /// deadlocking. Called inside a sync handler it lets the handler pool start another thread
    /// while it waits, so nested calls cannot starve the pool.
    pub fn wait(self) -> Result<T, Error> {
        crate::runtime::blocking(|| self.wait_here()).unwrap_or(Err(Error::WouldBlock))
    }

    fn wait_here(mut self) -> Result<T, Error> {
        // Counted as blocked before anything else: while this thread reads its reply (through
        // the claim) it may read and queue the next request of a nested chain, which the pool
        // must have a thread for.
        let _blocked = (!self.slot.done.load(Ordering::Acquire)).then(crate::pool::enter_blocking);
        if let Some(claim) = self.claim.take().and_then(|r| self.unless_done(r)) {
            // Read the reply on this thread (spinning first with the latency options).
            claim.drive(&self.slot.done, None);
        }
        if !self.slot.spin.is_zero() {
            // Trade a core for latency: poll the flag instead of sleeping for a wake-up.
            let until = std::time::Instant::now() + self.slot.spin;
            while !self.slot.done.load(Ordering::Acquire) && std::time::Instant::now() < until {
                std::hint::spin_loop();
            }
        }
        let mut state = self.slot.lock();
        if matches!(*state, State::Pending { .. }) {
            self.slot.sleeping.store(true, Ordering::Relaxed);
            while matches!(*state, State::Pending { .. }) {
                state = self
                    .slot
                    .ready
                    .wait(state)
                    .unwrap_or_else(|e| e.into_inner());
            }
        }
        match std::mem::replace(&mut *state, State::Taken) {
            State::Ready(result) => result,
            // `wait` and `poll` take the result only once, and `wait` consumes the future.
            _ => Err(Error::InvalidArgument("future result already taken".into())),
        }
    }

    /// [`RpcFuture::wait`] for at most `timeout`: the result, or the future back if it has not
    /// come yet (wait again later). For a caller that must look up between waits — a Python
    /// front checking for Ctrl-C, say.
    ///
    /// ```
    /// use std::time::Duration;
    /// use distrpc::RpcFuture;
    ///
    /// let fut = RpcFuture::ready(Ok(7));
    /// assert_eq!(fut.wait_timeout(Duration::from_millis(100)).ok().unwrap().unwrap(), 7);
    /// ```
    pub fn wait_timeout(mut self, timeout: Duration) -> Result<Result<T, Error>, Self> {
        let until = std::time::Instant::now() + timeout;
        let waited = crate::runtime::blocking(|| {
            let _blocked = crate::pool::enter_blocking();
            // Not done by `until`: the claim reads on at the next wait. (Otherwise the call
            // ended, or its connection: the claim has nothing more to read.)
            if let Some(claim) = self.claim.take().and_then(|r| self.unless_done(r))
                && claim.drive(&self.slot.done, Some(until))
            {
                self.claim = Some(crate::transport::Reading::Now(claim));
            }
            let mut state = self.slot.lock();
            self.slot.sleeping.store(true, Ordering::Relaxed);
            while matches!(*state, State::Pending { .. }) {
                state = crate::sync::wait_until(&self.slot.ready, state, Some(until)).ok()?;
            }
            Some(match std::mem::replace(&mut *state, State::Taken) {
                State::Ready(result) => result,
                _ => Err(Error::InvalidArgument("future result already taken".into())),
            })
        });
        match waited {
            Some(Some(result)) => Ok(result),
            Some(None) => Err(self),
            None => Ok(Err(Error::WouldBlock)),
        }
    }

    /// [`RpcFuture::wait`] for at most `timeout` (zero: no limit); `None` if it ran out. For
    /// waits with no deadline of their own (a local value still being created).
    pub(crate) fn wait_within(self, timeout: Duration) -> Option<Result<T, Error>> {
        if timeout.is_zero() {
            return Some(self.wait());
        }
        let deadline = std::time::Instant::now() + timeout;
        let wait = || {
            let _blocked = crate::pool::enter_blocking();
            let mut state = self.slot.lock();
            self.slot.sleeping.store(true, Ordering::Relaxed);
            while matches!(*state, State::Pending { .. }) {
                state = crate::sync::wait_until(&self.slot.ready, state, Some(deadline)).ok()?;
            }
            match std::mem::replace(&mut *state, State::Taken) {
                State::Ready(result) => Some(result),
                _ => Some(Err(Error::InvalidArgument(
                    "future result already taken".into(),
                ))),
            }
        };
        crate::runtime::blocking(wait).unwrap_or(Some(Err(Error::WouldBlock)))
    }

    /// Lets [`RpcFuture::wait`] read the reply through `claim`.
    pub(crate) fn with_claim(mut self, claim: Option<crate::transport::Reading>) -> Self {
        self.claim = claim;
        self
    }

    /// The claim [`RpcFuture::with_claim`] gave, to move onto a future derived from this one.
    pub(crate) fn take_claim(&mut self) -> Option<crate::transport::Reading> {
        self.claim.take()
    }

    /// The claim `reading` holds or takes now, unless the result is already here (a claim
    /// left for later is then never taken).
    fn unless_done(&self, reading: crate::transport::Reading) -> Option<crate::transport::Claim> {
        if self.slot.done.load(Ordering::Acquire) {
            return None;
        }
        reading.claim()
    }

    /// Calls `f` with the result, on the thread that completes this future (at once if it is
    /// already complete) — torch's `add_done_callback`, for a callback whose own result no one
    /// waits for (unlike [`RpcFuture::then`], it makes no new future). `f` often runs on an
    /// I/O thread, so it must not block; a panic in it is caught and logged there.
    ///
    /// ```no_run
    /// # fn demo(rpc: &distrpc::Rpc) {
    /// use distrpc::builtin;
    ///
    /// rpc.rpc_async("worker1", builtin::ones, (vec![2], distrpc::DType::F32))
    ///     .add_done_callback(|r| println!("ones: {:?}", r.map(|t| t.shape().to_vec())));
    /// # }
    /// ```
    pub fn add_done_callback(self, f: impl FnOnce(Result<T, Error>) + Send + 'static) {
        let mut state = self.slot.lock();
        match std::mem::replace(&mut *state, State::Taken) {
            State::Pending { waker, .. } => {
                *state = State::Pending {
                    waker,
                    callback: Some(Box::new(f)),
                };
            }
            State::Ready(result) => {
                drop(state);
                f(result);
            }
            State::Taken => f(Err(Error::InvalidArgument(
                "future result already taken".into(),
            ))),
        }
    }

    /// A future of `f` applied to this one's result. `f` runs on the thread that completes
    /// this future (often an I/O thread), so it must not block; it runs at once if the result
    /// is already here.
    pub fn then<U, F>(self, f: F) -> RpcFuture<U>
    where
        U: Send + 'static,
        F: FnOnce(Result<T, Error>) -> Result<U, Error> + Send + 'static,
    {
        let (next, done) = RpcFuture::pending();
        self.add_done_callback(move |r| done.complete(f(r)));
        next
    }
}

impl<T> Future for RpcFuture<T> {
    type Output = Result<T, Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // Awaited, the reply comes through the reader task.
        self.claim = None;
        let mut state = self.slot.lock();
        match &mut *state {
            State::Pending { waker, .. } => {
                *waker = Some(cx.waker().clone());
                Poll::Pending
            }
            State::Ready(_) => match std::mem::replace(&mut *state, State::Taken) {
                State::Ready(result) => Poll::Ready(result),
                _ => Poll::Pending,
            },
            State::Taken => Poll::Ready(Err(Error::InvalidArgument(
                "future polled after it completed".into(),
            ))),
        }
    }
}

/// Waits for every future and returns their values in order, or the first error (torch's
/// `torch.futures.wait_all`). Every future is waited on even when one fails.
pub fn wait_all<T: Send + 'static>(
    futures: impl IntoIterator<Item = RpcFuture<T>>,
) -> Result<Vec<T>, Error> {
    let mut values = Vec::new();
    let mut first_err = None;
    for f in futures {
        match f.wait() {
            Ok(v) => values.push(v),
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(values),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_then_and_wait_all() {
        let (f, done) = RpcFuture::<i32>::pending();
        let g = f.then(|r| r.map(|x| x * 2));
        assert!(!g.is_done());
        std::thread::spawn(move || done.complete(Ok(21)));
        assert_eq!(g.wait().unwrap(), 42);

        let futs = (0..3).map(|i| RpcFuture::ready(Ok(i)));
        assert_eq!(wait_all(futs).unwrap(), vec![0, 1, 2]);
        let failing = vec![
            RpcFuture::ready(Ok(1)),
            RpcFuture::ready(Err(Error::UnknownWorker("w9".into()))),
        ];
        assert!(matches!(wait_all(failing), Err(Error::UnknownWorker(_))));
    }

    /// Regression: a completer dropped without completing (a `then` callback that panicked)
    /// left its future pending forever.
    #[test]
    fn a_dropped_completer_fails_its_future() {
        let (f, done) = RpcFuture::<i32>::pending();
        drop(done);
        assert!(matches!(f.wait(), Err(Error::Abandoned(_))));
        let (f, done) = RpcFuture::<i32>::pending();
        let g = f.then(|_| -> Result<i32, Error> { panic!("in a callback") });
        let completing = std::thread::spawn(move || done.complete(Ok(1)));
        assert!(
            completing.join().is_err(),
            "the callback's panic reached its thread"
        );
        assert!(matches!(g.wait(), Err(Error::Abandoned(m)) if m.contains("panicked")));
    }

    #[test]
    fn completing_twice_keeps_the_first() {
        let (f, done) = RpcFuture::<i32>::pending();
        let again = Completer {
            slot: done.slot.clone(),
        };
        done.complete(Ok(1));
        again.complete(Ok(2));
        assert_eq!(f.wait().unwrap(), 1);
    }
}
