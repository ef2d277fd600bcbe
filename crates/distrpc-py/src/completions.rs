//! The results of `rpc_async` calls, on their way to the Python thread that completes their
//! futures ([`Completions`]).
//!
//! Completing a Python future needs the interpreter lock, which a connection's reader must
//! never wait for: results are queued, and one Python thread takes them. While it waits, that
//! thread reads itself the connection of the latest `rpc_async` ([`Origin::serve`]): a reply
//! on it reaches the thread that completes its future directly, not through the reader task's
//! thread (a wake-up less per call). Results that arrive another way ring its doorbell.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use distrpc::server::foreign::Doorbell;
use distrpc::{Codec, Error, RawReply, Rpc, RpcFuture};

use crate::lock;

/// The result of an `rpc_async` (in its codec), under its token; token 0 wakes the thread.
pub(crate) type Completion = (u64, Codec, Result<RawReply, Error>);

/// Where `rpc_async` results wait for the Python thread that completes futures.
pub(crate) struct Completions {
    tx: Mutex<mpsc::Sender<Completion>>,
    rx: Mutex<mpsc::Receiver<Completion>>,
    next_token: AtomicU64,
    /// Results sent and not yet taken.
    queued: Arc<AtomicUsize>,
    /// Whether the thread reads a connection while it waits (then results ring `bell`).
    reading: Arc<AtomicBool>,
    bell: Arc<Doorbell>,
    /// The worker the latest `rpc_async` went to (its connection is looked up by the waiting
    /// thread, not on every call).
    last: Mutex<Option<String>>,
    /// Tokens of calls answered as expected ([`Completions::later_unless`]), not yet taken.
    answered: Arc<Mutex<Vec<u64>>>,
}

impl Completions {
    pub(crate) fn new() -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel();
        Ok(Self {
            tx: Mutex::new(tx),
            rx: Mutex::new(rx),
            next_token: AtomicU64::new(1),
            queued: Arc::default(),
            reading: Arc::default(),
            bell: Arc::new(Doorbell::new()?),
            last: Mutex::new(None),
            answered: Arc::default(),
        })
    }

    /// A token under which `fut`'s result (in `codec`) will come out of [`Completions::next`];
    /// `to`: the worker whose reply it is.
    pub(crate) fn later(&self, codec: Codec, fut: RpcFuture<RawReply>, to: &str) -> u64 {
        self.later_unless(codec, fut, to, None)
    }

    /// [`Completions::later`], except that a reply of exactly `expected` (its payload, no
    /// tensors) wakes nobody: its token goes among those [`Completions::answered`] returns.
    pub(crate) fn later_unless(
        &self,
        codec: Codec,
        fut: RpcFuture<RawReply>,
        to: &str,
        expected: Option<Vec<u8>>,
    ) -> u64 {
        let token = self.next_token.fetch_add(1, Ordering::Relaxed);
        {
            let mut last = lock(&self.last);
            if last.as_deref() != Some(to) {
                *last = Some(to.to_owned());
            }
        }
        let tx = lock(&self.tx).clone();
        let (queued, reading, bell) =
            (self.queued.clone(), self.reading.clone(), self.bell.clone());
        let answered = self.answered.clone();
        fut.add_done_callback(move |result| {
            if let (Some(expected), Ok(reply)) = (&expected, &result)
                && reply.tensors.is_empty()
                && reply.payload[..] == expected[..]
            {
                lock(&answered).push(token);
                return;
            }
            // Counted before the flag is read, as the waiting thread sets the flag before it
            // reads the count: one of the two sees the other.
            queued.fetch_add(1, Ordering::SeqCst);
            // The receiver goes only with the agent: nobody is left to complete.
            let _ = tx.send((token, codec, result));
            // (Not when the waiting thread read the reply itself: it looks next.)
            if reading.load(Ordering::SeqCst) && !bell.serving_here() {
                bell.ring();
            }
        });
        token
    }

    /// The tokens of the calls answered as expected since the last look
    /// ([`Completions::later_unless`]).
    pub(crate) fn answered(&self) -> Vec<u64> {
        std::mem::take(&mut *lock(&self.answered))
    }

    /// Wakes the waiting thread with `why` instead of a result (token 0).
    pub(crate) fn wake(&self, why: Error) {
        self.queued.fetch_add(1, Ordering::SeqCst);
        let _ = lock(&self.tx).send((0, Codec::Pickle, Err(why)));
        self.bell.ring();
    }

    /// A result there now, if any.
    pub(crate) fn try_next(&self) -> Option<Completion> {
        let next = lock(&self.rx).try_recv().ok();
        if next.is_some() {
            self.queued.fetch_sub(1, Ordering::SeqCst);
        }
        next
    }

    /// The next result, waiting up to `wait` — reading the connection to the latest call's
    /// worker (through `rpc`) meanwhile, unless a blocked caller reads it.
    pub(crate) fn next(&self, rpc: &Rpc, wait: Duration) -> Option<Completion> {
        let deadline = Instant::now() + wait;
        if self.queued.load(Ordering::SeqCst) == 0 {
            let to = lock(&self.last).clone();
            if let Some(origin) = to.and_then(|to| rpc.connection_to(to.as_str())) {
                self.reading.store(true, Ordering::SeqCst);
                let ready = || self.queued.load(Ordering::SeqCst) > 0;
                origin.serve(&ready, deadline, &self.bell);
                self.reading.store(false, Ordering::SeqCst);
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let next = lock(&self.rx).recv_timeout(left).ok();
        if next.is_some() {
            self.queued.fetch_sub(1, Ordering::SeqCst);
        }
        next
    }
}
