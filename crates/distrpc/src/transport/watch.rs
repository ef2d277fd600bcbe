//! [`Watch`]: the bound on what a thread may leave undone on a connection it reads for its work.
//!
//! A thread that read a call itself keeps the connection claimed while it runs the call (the
//! peer's next frames wait in the socket for it: no wake-up of the reader task), and frames
//! nobody waits for go with the connection's next write ([`Connection::send_lazy`]). Both save
//! wake-ups when the call is quick and the next write comes soon; neither may last when they
//! do not. A task ticks every [`TICK`] while some connection has either: a claim still busy
//! with the same call at a second tick is taken back for the reader task, frames still waiting
//! at a second tick are written. So what a thread leaves undone waits at most two ticks.
//!
//! ```text
//!  busy claim / lazy frame ──► watch(conn) ──► tick: seen ─► tick: take back / write
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::Notify;

use super::{Connection, SendError, Transport};
use crate::sync::lock;
use distrpc_wire::OutFrame;

/// How often the watch looks while something is watched.
pub(crate) const TICK: Duration = Duration::from_millis(5);

/// Ticks with nothing watched before the task sleeps until something is (waking it costs a
/// wake-up of the runtime; a tick costs less).
const IDLE_TICKS: u32 = 100;

/// The connections with something to look at, and the task that looks (see the module docs).
#[derive(Default)]
pub(crate) struct Watch {
    conns: Mutex<Vec<Weak<Connection>>>,
    wake: Notify,
    /// Busy claims taken back: a metric.
    taken_back: AtomicU64,
}

impl Watch {
    /// Starts the watching task among `transport`'s tasks.
    pub(crate) fn start(self: &Arc<Self>, transport: &Arc<Transport>) {
        let (watch, t) = (self.clone(), transport.clone());
        transport.tasks.spawn(async move {
            tokio::select! {
                () = watch.run() => {}
                () = t.tasks.cancelled() => {}
            }
        });
    }

    /// Sends `frame`, which no thread waits on, with `conn`'s next write, or at the watch's
    /// second tick ([`Connection::defer`]).
    pub(crate) fn defer(&self, conn: &Arc<Connection>, frame: OutFrame) -> Result<(), SendError> {
        conn.defer(frame)?;
        self.watch(conn);
        Ok(())
    }

    /// Sends `frame`, the answer to a call its caller waits on no sooner than the watch's
    /// second tick (a context's release), with `conn`'s next write or at that tick
    /// ([`Connection::defer_later`]): from any thread, and not when a serving thread sleeps.
    pub(crate) fn defer_later(
        &self,
        conn: &Arc<Connection>,
        frame: OutFrame,
    ) -> Result<(), SendError> {
        conn.defer_later(frame)?;
        self.watch(conn);
        Ok(())
    }

    /// Sends `frame`, which no thread waits on (a control message's acknowledgement): from the
    /// thread that serves `conn` ([`Connection::served_here`]), which writes again soon, with
    /// that write — the answer to the peer's next call, often: one wake-up of the peer instead
    /// of two — or when that thread sleeps or stops reading, or at the watch's second tick;
    /// from any other thread at once.
    pub(crate) fn send_lazy(
        &self,
        conn: &Arc<Connection>,
        frame: OutFrame,
    ) -> Result<(), SendError> {
        if conn.served_here() {
            self.defer(conn, frame)
        } else {
            conn.send(frame, true, false)
        }
    }

    /// `conn` has a busy claim or lazy frames: they are looked at within two ticks.
    pub(crate) fn watch(&self, conn: &Arc<Connection>) {
        if conn.watched.swap(true, Ordering::AcqRel) {
            return;
        }
        let mut conns = lock(&self.conns);
        conns.push(Arc::downgrade(conn));
        if conns.len() == 1 {
            drop(conns);
            self.wake.notify_one();
        }
    }

    /// How many busy claims it took back (their threads ran a call longer than a tick).
    pub(crate) fn taken_back(&self) -> u64 {
        self.taken_back.load(Ordering::Relaxed)
    }

    async fn run(&self) {
        loop {
            while lock(&self.conns).is_empty() {
                self.wake.notified().await;
            }
            let mut ticks = tokio::time::interval(TICK);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut idle = 0;
            while idle < IDLE_TICKS {
                ticks.tick().await;
                if self.look() {
                    idle = 0;
                } else {
                    idle += 1;
                }
            }
        }
    }

    /// One tick: looks at every watched connection; whether any is still watched.
    fn look(&self) -> bool {
        let conns = std::mem::take(&mut *lock(&self.conns));
        let mut still = Vec::new();
        for weak in conns {
            let Some(conn) = weak.upgrade() else {
                continue;
            };
            // Cleared first: whoever gives it something new meanwhile watches it again.
            conn.watched.store(false, Ordering::Release);
            let busy = match conn.read.get().and_then(|read| read.watch_busy()) {
                Some(true) => true,
                Some(false) => {
                    self.taken_back.fetch_add(1, Ordering::Relaxed);
                    false
                }
                None => false,
            };
            let lazy = conn.watch_lazy();
            if (busy || lazy) && !conn.watched.swap(true, Ordering::AcqRel) {
                still.push(weak);
            }
        }
        let mut conns = lock(&self.conns);
        conns.extend(still);
        !conns.is_empty()
    }
}
