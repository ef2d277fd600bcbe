//! [`IdleReaders`]: how the idle threads of a work queue (the handler pool's, a front's) wait —
//! one of them reads the connection the latest work came in on ([`Origin::serve`]), the others
//! sleep on the queue's condition variable.

use std::sync::Condvar;

use super::claim::Origin;
use crate::sync::Doorbell;

/// The waiting side of a work queue, kept under the queue's lock. The thread that reads a
/// connection takes the peer's next call with no hand-off from the connection's reader task;
/// work that arrives another way rings its doorbell (it is awake, or as cheap to wake as a
/// sleeper) and wakes a sleeper only for the work beyond the one that thread takes.
///
/// ```
/// use std::collections::VecDeque;
/// use std::sync::{Condvar, Mutex};
/// use distrpc::server::foreign::IdleReaders;
///
/// #[derive(Default)]
/// struct Queue {
///     items: VecDeque<u32>,
///     readers: IdleReaders,
/// }
/// let (queue, ready) = (Mutex::new(Queue::default()), Condvar::new());
/// // A producer: queue the item, wake whoever is to take it (no connection, no doorbell here).
/// let mut q = queue.lock().unwrap();
/// q.items.push_back(7);
/// let queued = q.items.len();
/// q.readers.arrived(None, queued, None, &ready);
/// // A consumer with nothing to read sleeps on `ready` between `asleep` and `awake`.
/// assert!(q.readers.start_reading().is_none());
/// assert_eq!(q.items.pop_front(), Some(7));
/// ```
#[derive(Debug, Default)]
pub struct IdleReaders {
    /// Threads sleeping on the condition variable.
    sleepers: usize,
    /// Whether a thread reads a connection now.
    reading: bool,
    /// The connection the latest work came in on.
    last: Option<Origin>,
}

impl IdleReaders {
    /// Work came in on `origin` (if known); `queued` items wait now. Wakes whoever is to take
    /// it — no one if the calling thread is the reading one (it takes what it queued when it
    /// stops reading).
    pub fn arrived(
        &mut self,
        origin: Option<Origin>,
        queued: usize,
        bell: Option<&Doorbell>,
        sleepers: &Condvar,
    ) {
        if origin.is_some() {
            self.last = origin;
        }
        if bell.is_some_and(Doorbell::serving_here) {
            return;
        }
        let reading = self.reading && bell.is_some();
        if reading && let Some(bell) = bell {
            bell.ring();
        }
        if queued > usize::from(reading) && self.sleepers > 0 {
            sleepers.notify_one();
        }
    }

    /// The connection for the calling thread to read while it waits, if no thread reads one
    /// now; the thread is then the reading one until [`IdleReaders::stopped_reading`].
    pub fn start_reading(&mut self) -> Option<Origin> {
        let origin = self.last.clone().filter(|_| !self.reading)?;
        self.reading = true;
        Some(origin)
    }

    /// The reading thread stopped reading with `queued` items waiting: it takes one, sleepers
    /// are woken for the rest.
    pub fn stopped_reading(&mut self, queued: usize, sleepers: &Condvar) {
        self.reading = false;
        for _ in 1..queued.min(self.sleepers + 1) {
            sleepers.notify_one();
        }
    }

    /// A thread goes to sleep on the condition variable.
    pub fn asleep(&mut self) {
        self.sleepers += 1;
    }

    /// A sleeping thread woke.
    pub fn awake(&mut self) {
        self.sleepers -= 1;
    }
}
