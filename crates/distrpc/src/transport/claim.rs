//! [`Claim`]: a thread's hold on reading one connection — a blocked caller's (for its reply,
//! [`Claim::drive`]) or an idle thread's (for the peer's next call, [`Claim::serve`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;
use std::time::Instant;

use super::crowd;
use super::reader::{ReadEnd, ReadSide, Reader, Step};
use super::{Connection, Transport};
use crate::sync::Doorbell;

/// How long a claimant sleeps in `poll` before it looks whether its call ended some other way
/// (a shutdown, a failure seen by the writer): the bound on noticing those late.
const CLAIM_SLICE: Duration = Duration::from_millis(10);

/// How [`Claim::read_until`] ended.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Ended {
    /// Its `until` passed.
    Until,
    /// What it waited for came with a frame it read.
    Read,
    /// Otherwise: what it waited for came some other way, the claim's deadline passed, it was
    /// taken over, the connection ended or filled.
    Otherwise,
}

/// A thread's hold on reading one connection (see [`ReadSide`]): while a blocked caller waits
/// for its reply, or an idle thread of a front for its next call, that thread reads the
/// connection and handles whatever arrives, so what it waits for needs no hand-off from the
/// reader task's thread. Dropping it hands reading back.
pub(crate) struct Claim {
    transport: Arc<Transport>,
    conn: Arc<Connection>,
    read: Arc<ReadSide>,
    /// The claim's token ([`ReadSide::claim`]).
    token: u64,
    /// Whether it is a waiting thread's ([`Claim::serve`]).
    serves: bool,
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
        (token, serves): (u64, bool),
        deadline: Option<std::time::Instant>,
    ) -> Self {
        Self {
            transport,
            conn,
            read,
            token,
            serves,
            deadline,
        }
    }

    /// The claim, to be served until `deadline`.
    fn until(mut self, deadline: Instant) -> Self {
        self.deadline = Some(deadline);
        self
    }

    /// Reads the connection until `done` is set, the call's deadline passes or the connection
    /// ends — or `until`, if given, passes: then it returns `true`, and the claim can be driven
    /// again later. Spins for up to the caller's spin before sleeping in `poll`, unless the
    /// connection's replies lately came later than that ([`Connection::spins`]).
    pub(crate) fn drive(&self, done: &AtomicBool, until: Option<std::time::Instant>) -> bool {
        let is_done = || done.load(Ordering::Acquire);
        let spin = self.transport.spin.callers;
        if spin.is_zero() {
            return self.read_until(&is_done, None, until, None, &mut false) == Ended::Until;
        }
        let started = std::time::Instant::now();
        // The spin the host allows now (see `crowd::budget`).
        let spin = crowd::budget(spin);
        let spins = self.conn.replies.spins().then_some(spin);
        let mut waited = false;
        let ended = self.read_until(&is_done, spins, until, None, &mut waited);
        // (A reply there before the wait began is not noted: see `SpinHint::note_wait`.)
        if is_done() {
            self.conn
                .replies
                .note_wait(waited, started.elapsed() <= spin);
        }
        ended == Ended::Until
    }

    /// Reads the connection, for a thread waiting for work, until `ready()`, the claim's
    /// deadline passes, `bell` rings (a caller took the claim over, or the thread's work came
    /// another way), the connection ends or its peer's calls fill it. Spins
    /// as [`Claim::drive`] does (adapting to how soon the peer's calls lately came), then
    /// sleeps in `poll` on the socket and the bell. Returns whether it ended on a frame it read
    /// (the work is a call it read itself).
    fn serve(&self, ready: &dyn Fn() -> bool, bell: &Doorbell) -> bool {
        let spin = self.transport.spin.callers;
        let started = std::time::Instant::now();
        let spins = !spin.is_zero() && self.conn.calls.spins();
        let spin = crowd::budget(spin);
        let ended = self.conn.serving(|| {
            let spin = spins.then_some(spin);
            self.read_until(ready, spin, None, Some(bell), &mut false)
        });
        if ready() {
            self.conn.calls.note(started.elapsed() <= spin);
        }
        ended == Ended::Read
    }

    /// [`Claim::drive`] until `ready()`, spinning for `spin` if given — from the start, and
    /// again after each frame it handles (the peer is busy with this connection: its next
    /// frame, an answer to what this one asked, likely comes within the spin too) — waking for
    /// `bell` if given. Sets `waited` if it found the socket empty before `ready()` (else
    /// what it waited for was there already).
    fn read_until(
        &self,
        is_done: &dyn Fn() -> bool,
        spin: Option<Duration>,
        until: Option<std::time::Instant>,
        bell: Option<&Doorbell>,
        waited: &mut bool,
    ) -> Ended {
        let mut spinning = crowd::Spin::new(spin);
        loop {
            match self.step() {
                None => return Ended::Otherwise,
                Some(false) => {
                    if is_done() {
                        return Ended::Otherwise;
                    }
                    *waited = true;
                    let now = std::time::Instant::now();
                    if spinning.going(now) {
                        std::hint::spin_loop();
                        continue;
                    }
                    let left = match self.deadline {
                        Some(at) if at <= now => return Ended::Otherwise,
                        Some(at) => at - now,
                        None => CLAIM_SLICE,
                    };
                    let left = match until {
                        Some(at) if at <= now => return Ended::Until,
                        Some(at) => left.min(at - now),
                        None => left,
                    };
                    if self.serves {
                        // Before this thread sleeps: what waits for company goes now.
                        self.conn.flush_lazy();
                    }
                    if self.read.poll_readable(left.min(CLAIM_SLICE), bell) {
                        return Ended::Otherwise;
                    }
                }
                Some(true) => {
                    if spin.is_some() {
                        spinning = crowd::Spin::new(spin);
                    }
                    if self.conn.calls_full() {
                        // The peer's calls fill the connection: it is read again only once
                        // one is answered, by the reader task.
                        return Ended::Otherwise;
                    }
                    if is_done() {
                        // What else came with it is handled now, not left behind a call this
                        // thread runs while it keeps the claim (a fetch of the value the
                        // call makes is then answered with the call's acknowledgement).
                        while self.step_buffered() == Some(true) {}
                        return Ended::Read;
                    }
                }
            }
        }
    }

    /// Reads and handles one frame: `Some(true)` if there was one, `Some(false)` if the socket
    /// is empty, `None` once the connection has ended.
    fn step(&self) -> Option<bool> {
        self.step_as(Reader::Claimant(self.token))
    }

    fn step_as(&self, who: Reader) -> Option<bool> {
        self.handle(self.read.step(who))
    }

    /// [`Claim::step`] among the bytes read already: the socket is not read.
    fn step_buffered(&self) -> Option<bool> {
        self.handle(self.read.step_buffered(Reader::Claimant(self.token)))
    }

    /// Handles a step's frame, or its end: as [`Claim::step`] says.
    fn handle(&self, step: Step) -> Option<bool> {
        match step {
            Step::Frame(frame) => {
                if self.serves {
                    self.transport.read_waiting.fetch_add(1, Ordering::Relaxed);
                }
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

/// A caller's way to read its own reply: a [`Claim`] taken before the request left (a call
/// waited for at once), or one to take when the caller starts waiting (a call started before
/// other work of the caller's: holding the connection meanwhile would leave what else comes on
/// it — the replies to the caller's other calls among them — unread).
pub(crate) enum Reading {
    /// Claimed before the request left.
    Now(Claim),
    /// To claim when the caller waits.
    Later {
        transport: Arc<Transport>,
        conn: Arc<Connection>,
        deadline: Option<Instant>,
    },
}

impl Reading {
    /// The claim, taken now if it was left for later; `None` if another caller holds the
    /// connection (its reader delivers the reply) or the connection ended.
    pub(crate) fn claim(self) -> Option<Claim> {
        match self {
            Reading::Now(claim) => Some(claim),
            Reading::Later {
                transport,
                conn,
                deadline,
            } => transport.claim(&conn, deadline, None),
        }
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if !self.read.release(self.token) {
            return; // taken over: its new holder reads on
        }
        // What came after our last read: the reader task was not woken for it while we held
        // the claim. A connection full of the peer's calls is left to the reader task, woken
        // to wait for room.
        while !self.conn.calls_full() && self.step_as(Reader::Leaving) == Some(true) {}
        if self.conn.calls_full() {
            self.read.wake_reader();
        }
    }
}

/// The connection a call came in on
/// ([`ForeignReply::origin`](crate::server::foreign::ForeignReply::origin)), for a thread that
/// waits for the next call — a front's, or the pool's — to read meanwhile ([`Origin::serve`]).
/// Holds the connection weakly.
#[derive(Clone)]
pub struct Origin {
    transport: Arc<Transport>,
    conn: Weak<Connection>,
}

impl std::fmt::Debug for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let peer = self.conn.upgrade().map(|c| c.peer);
        f.debug_struct("Origin").field("peer", &peer).finish()
    }
}

impl Origin {
    pub(crate) fn new(transport: &Arc<Transport>, conn: &Arc<Connection>) -> Self {
        Self {
            transport: transport.clone(),
            conn: Arc::downgrade(conn),
        }
    }

    /// Reads the connection on the calling thread, handling what arrives as its reader task
    /// would (a call for the front reaches its handler on this thread), until `ready()`,
    /// `until`, `bell` rings, the connection ends, or the peer's calls fill it. Returns `false`
    /// at once, having read nothing, when it cannot: another thread reads the connection now
    /// (a caller waiting for its reply, another waiting thread), it ended, is TLS, or is full.
    ///
    /// The thread spins for up to [`RpcOptions::spin_wait`](crate::RpcOptions::spin_wait)
    /// (unless the peer's calls lately came later than that), then sleeps in `poll` on the
    /// socket: the peer's next frame wakes it directly; it polls again after each frame it
    /// handles. Ring `bell` to wake it for work that arrives some other way (it is cleared
    /// first; meanwhile [`Doorbell::serving_here`] tells that thread that what it queues is its
    /// own). A thread of this worker that calls the peer and blocks on the reply takes the
    /// connection over (ringing `bell`): `serve` then returns.
    ///
    /// When it returns on a call it read itself, the thread keeps the connection while it runs
    /// that call, if the connection's calls have lately been quick (each under 500 µs, from
    /// read to the next `serve`): the peer's next frames wait in the socket for its next
    /// `serve` on that connection, which goes on reading them with no new claim. Anyone may
    /// take a kept connection over meanwhile; the transport's watch takes it back for the
    /// reader task if the call still runs at its second tick (within 10 ms). A thread that
    /// is going to sleep or block otherwise must [`Origin::let_go`] first.
    pub fn serve(&self, ready: &dyn Fn() -> bool, until: Instant, bell: &Arc<Doorbell>) -> bool {
        let Some(conn) = self.conn.upgrade() else {
            return false;
        };
        // A claim kept on another connection ends here (dropped).
        let kept = match KEPT.with(|k| k.borrow_mut().take()) {
            Some(mut kept) if Arc::ptr_eq(&kept.conn, &conn) => kept
                .claim
                .take()
                .filter(|c| c.read.unbusy(c.token, bell.clone())),
            _ => None,
        };
        if conn.calls_full() {
            return false;
        }
        let claim = match kept {
            Some(claim) => claim.until(until),
            None => match self.transport.claim(&conn, Some(until), Some(bell.clone())) {
                Some(claim) => claim,
                None => return false,
            },
        };
        bell.clear();
        // Until the claim is dropped (which reads what is left), this thread is the one the
        // calls it reads are for.
        let serving = bell.serving();
        if claim.serve(ready, bell) {
            // A call this thread read, and runs next: while it runs, the claim is kept if the
            // connection's calls have lately been quick — the peer's next frames wait in the
            // socket for this thread instead of waking the reader task.
            let keep = conn.runs.spins() && claim.read.busy(claim.token);
            if keep {
                self.transport.watch.watch(&conn);
            }
            let claim = keep.then_some(claim);
            KEPT.with(|k| {
                *k.borrow_mut() = Some(Kept {
                    claim,
                    conn: conn.clone(),
                    read_at: Instant::now(),
                })
            });
        } else {
            drop(claim);
            conn.flush_lazy();
        }
        drop(serving);
        true
    }

    /// Whether this thread keeps a connection claimed while it runs a call it read there.
    pub fn keeps() -> bool {
        KEPT.with(|k| k.borrow().as_ref().is_some_and(|k| k.claim.is_some()))
    }

    /// Ends the claim this thread kept while it ran a call it read ([`Origin::serve`]), if it
    /// kept one: the connection's reader task reads it again. Call it before the thread sleeps
    /// or blocks some other way, without holding a lock the connection's frames' handlers take
    /// (what came meanwhile is handled on this thread first).
    pub fn let_go() {
        // Dropped outside the borrow: its last read may run handlers that look at it.
        let kept = KEPT.with(|k| k.borrow_mut().take());
        drop(kept);
    }
}

/// Reads what has arrived on `conn` if this thread keeps it while running a call it read
/// there ([`Origin::serve`]): about to answer that call, the thread handles first what the
/// peer sent meanwhile — a fetch of the value the call makes, say, which is then answered in
/// the same write as the call.
pub(crate) fn catch_up(conn: &Arc<Connection>) {
    // Taken out while the frames are handled: a handler may end it (a blocking wait lets it
    // go).
    let Some(kept) = KEPT.with(|k| k.borrow_mut().take()) else {
        return;
    };
    if let Some(claim) = kept
        .claim
        .as_ref()
        .filter(|_| Arc::ptr_eq(&kept.conn, conn))
    {
        conn.serving(|| while !conn.calls_full() && claim.step() == Some(true) {});
    }
    let left = KEPT.with(|k| {
        let mut k = k.borrow_mut();
        match *k {
            None => k.replace(kept),
            Some(_) => Some(kept), // a handler kept another: this one ends (outside the borrow)
        }
    });
    drop(left);
}

/// The longest a call may run, while its thread keeps its connection claimed, for the
/// connection's next calls to keep it too ([`Connection::runs`]).
const QUICK: Duration = Duration::from_micros(500);

/// What a thread that read a call itself ([`Origin::serve`]) keeps while it runs it.
struct Kept {
    /// The connection's claim, busy, if kept.
    claim: Option<Claim>,
    conn: Arc<Connection>,
    /// When the call was read.
    read_at: Instant,
}

impl Drop for Kept {
    /// Notes how long the call ran, ends the claim if it is still kept, and writes what
    /// waited for company (after the claim: what it reads last may add to it).
    fn drop(&mut self) {
        self.conn.runs.note(self.read_at.elapsed() <= QUICK);
        drop(self.claim.take());
        self.conn.flush_lazy();
    }
}

thread_local! {
    static KEPT: std::cell::RefCell<Option<Kept>> = const { std::cell::RefCell::new(None) };
}
