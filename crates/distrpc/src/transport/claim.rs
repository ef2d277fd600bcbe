//! [`Claim`]: a blocked caller's hold on reading one connection.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use super::reader::{ReadEnd, ReadSide, Step};
use super::{Connection, Transport};

/// How long a claimant sleeps in `poll` before it looks whether its call ended some other way
/// (a shutdown, a failure seen by the writer): the bound on noticing those late.
const CLAIM_SLICE: Duration = Duration::from_millis(10);

/// A blocked caller's hold on reading one connection (see [`ReadSide`]): while it waits for its
/// reply, its own thread reads the connection and handles whatever arrives, so the reply needs
/// no hand-off from the reader task's thread. Dropping it hands reading back.
pub(crate) struct Claim {
    transport: Arc<Transport>,
    conn: Arc<Connection>,
    read: Arc<ReadSide>,
    deadline: Option<std::time::Instant>,
}

impl std::fmt::Debug for Claim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Claim")
            .field("conn", &self.conn.id)
            .finish()
    }
}

impl Claim {
    pub(super) fn new(
        transport: Arc<Transport>,
        conn: Arc<Connection>,
        read: Arc<ReadSide>,
        deadline: Option<std::time::Instant>,
    ) -> Self {
        Self {
            transport,
            conn,
            read,
            deadline,
        }
    }

    /// Reads the connection until `done` is set, the call's deadline passes or the connection
    /// ends — or `until`, if given, passes: then it returns `true`, and the claim can be driven
    /// again later. Spins for up to the caller's spin before sleeping in `poll`, unless the
    /// connection's replies lately came later than that ([`Connection::spins`]).
    pub(crate) fn drive(&self, done: &AtomicBool, until: Option<std::time::Instant>) -> bool {
        let spin = self.transport.spin.callers;
        if spin.is_zero() {
            return self.read_until(done, None, until);
        }
        let started = std::time::Instant::now();
        let spin_until = self.conn.spins().then(|| started + spin);
        let again = self.read_until(done, spin_until, until);
        if done.load(Ordering::Acquire) {
            self.conn.replied(started.elapsed() <= spin);
        }
        again
    }

    /// [`Claim::drive`], spinning until `spin_until` if given.
    fn read_until(
        &self,
        done: &AtomicBool,
        spin_until: Option<std::time::Instant>,
        until: Option<std::time::Instant>,
    ) -> bool {
        let is_done = || done.load(Ordering::Acquire);
        loop {
            match self.step() {
                None => return false,
                Some(false) => {
                    if is_done() {
                        return false;
                    }
                    let now = std::time::Instant::now();
                    if spin_until.is_some_and(|t| now < t) {
                        std::hint::spin_loop();
                        continue;
                    }
                    let left = match self.deadline {
                        Some(at) if at <= now => return false,
                        Some(at) => at - now,
                        None => CLAIM_SLICE,
                    };
                    let left = match until {
                        Some(at) if at <= now => return true,
                        Some(at) => left.min(at - now),
                        None => left,
                    };
                    self.read.poll_readable(left.min(CLAIM_SLICE));
                }
                Some(true) => {
                    if self.conn.calls_full() {
                        // The peer's calls fill the connection: it is read again only once
                        // one is answered, by the reader task.
                        return false;
                    }
                }
            }
            if is_done() {
                return false;
            }
        }
    }

    /// Reads and handles one frame: `Some(true)` if there was one, `Some(false)` if the socket
    /// is empty, `None` once the connection has ended.
    fn step(&self) -> Option<bool> {
        match self.read.step(true) {
            Step::Frame(frame) => {
                if let Err(e) = self.transport.on_frame(&self.conn, frame) {
                    self.transport.on_closed(&self.conn, ReadEnd::Malformed(e));
                    return None;
                }
                Some(true)
            }
            Step::Idle => Some(false),
            Step::Ended(Some(end)) => {
                self.transport.on_closed(&self.conn, end);
                None
            }
            Step::Ended(None) | Step::Claimed => None,
        }
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.read.release();
        // What came after our last read: the reader task let its wake-up go while we held
        // the claim. A connection full of the peer's calls is left to the reader task, woken
        // to wait for room.
        while !self.conn.calls_full() && self.step() == Some(true) {}
        if self.conn.calls_full() {
            self.read.wake_reader();
        }
    }
}
