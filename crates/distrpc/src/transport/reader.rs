//! The receiving side of a connection: frames checked against the limits before any
//! allocation, read by the connection's reader task or by a blocked caller that claimed it.
//!
//! ```text
//!  socket ──► reader task ─┐
//!                          ├─ header → Limits check → aligned body → Frame::decode ──► inbound
//!  socket ──► claimant ────┘   (a blocked caller reading its own reply; the task then waits)
//! ```

use crate::sync::{Doorbell, lock};
use std::sync::{Arc, Mutex, MutexGuard};

use super::socket::ReadHalf;
use distrpc_wire::deframe::Deframer;
use distrpc_wire::{Frame, Limits};
use std::os::fd::RawFd;
use tokio::sync::Notify;

/// Why a reader stopped.
#[derive(Debug)]
pub(crate) enum ReadEnd {
    /// The peer closed the connection between frames.
    Closed,
    /// The socket failed.
    Io(std::io::Error),
    /// The peer sent bytes that are not a valid frame.
    Malformed(String),
}

impl std::fmt::Display for ReadEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadEnd::Closed => f.write_str("connection closed by the peer"),
            ReadEnd::Io(e) => write!(f, "connection failed: {e}"),
            ReadEnd::Malformed(e) => write!(f, "malformed frame: {e}"),
        }
    }
}

/// Turns the bytes of a socket into frames: a [`Deframer`] (which checks each frame against the
/// limits before allocating for it, and keeps tensors 64-byte aligned) fed from the socket. It
/// never waits: [`FrameReader::try_next`] takes what the socket has right now, so any thread may
/// drive it (the connection's reader task, or a caller waiting for its reply).
///
/// While a large body arrives, the socket's low-water mark is raised, so that the reader is
/// woken for pieces of up to [`LOWAT_MAX`] bytes rather than for every segment.
pub(crate) struct FrameReader {
    frames: Deframer,
    /// The socket's receive low-water mark as last set (1: the kernel's default).
    lowat: usize,
}

/// How many times the reader task tries the read side's lock before sleeping on it.
const SPINS: u32 = 200;

impl FrameReader {
    pub(crate) fn new(limits: Limits) -> Self {
        Self {
            frames: Deframer::new(limits),
            lowat: 1,
        }
    }

    /// Changes the limits for the frames not yet read (see [`Deframer::set_limits`]).
    pub(crate) fn set_limits(&mut self, limits: Limits) {
        self.frames.set_limits(limits);
    }

    /// The next frame, reading from the socket `src` without waiting. `Ok(None)` means `src`
    /// has nothing more right now.
    pub(crate) fn try_next(&mut self, src: RawFd) -> Result<Option<Frame>, ReadEnd> {
        let malformed = |e: distrpc_wire::FrameError| ReadEnd::Malformed(e.to_string());
        loop {
            if let Some(frame) = self.frames.next_frame().map_err(malformed)? {
                self.wake_for(src, self.frames.large_remaining());
                return Ok(Some(frame));
            }
            let dst = self.frames.read_buf();
            match recv_uninit(src, dst) {
                Ok(0) if self.frames.holds_bytes() => {
                    return Err(ReadEnd::Malformed(
                        "connection closed inside a frame".into(),
                    ));
                }
                Ok(0) => return Err(ReadEnd::Closed),
                // SAFETY: `recv` initialised the first `n` bytes of `read_buf`'s slice.
                Ok(n) => unsafe { self.frames.filled(n) },
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    self.wake_for(src, self.frames.large_remaining());
                    return Ok(None);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(ReadEnd::Io(e)),
            }
        }
    }

    /// The next frame among the bytes read already, without reading the socket.
    fn buffered(&mut self) -> Result<Option<Frame>, ReadEnd> {
        let malformed = |e: distrpc_wire::FrameError| ReadEnd::Malformed(e.to_string());
        self.frames.next_frame().map_err(malformed)
    }

    /// While a large body arrives, the socket `fd` wakes its reader for pieces of up to
    /// [`LOWAT_MAX`] bytes of the `rest` still to come, not for every segment; for one byte
    /// again once it is in (`None`). Set only when it changes.
    fn wake_for(&mut self, fd: RawFd, rest: Option<usize>) {
        let want = rest.map_or(1, |r| r.clamp(1, LOWAT_MAX));
        if want != self.lowat {
            set_lowat(fd, want);
            self.lowat = want;
        }
    }

    /// [`FrameReader::wake_for`] on `src`'s socket, if it has one, for the part of a large
    /// body's rest (`bytes`) it does not hold yet: never past what is sure to come, as a
    /// record is never shorter than its plaintext.
    fn expect<R: FrameSource>(&mut self, src: &R, bytes: Option<usize>) {
        if let Some((fd, held)) = src.socket() {
            self.wake_for(fd, bytes.map(|b| b.saturating_sub(held)));
        }
    }

    /// The next frame from any stream (a TLS stream; a socket before it is split), waiting
    /// for its bytes.
    pub(crate) async fn next_from<R>(&mut self, src: &mut R) -> Result<Frame, ReadEnd>
    where
        R: FrameSource,
    {
        let malformed = |e: distrpc_wire::FrameError| ReadEnd::Malformed(e.to_string());
        loop {
            if let Some(frame) = self.frames.next_frame().map_err(malformed)? {
                self.expect(src, None);
                return Ok(frame);
            }
            self.expect(src, self.frames.large_remaining());
            let n = {
                let mut buf = tokio::io::ReadBuf::uninit(self.frames.read_buf());
                std::future::poll_fn(|cx| std::pin::Pin::new(&mut *src).poll_read(cx, &mut buf))
                    .await
                    .map_err(ReadEnd::Io)?;
                buf.filled().len()
            };
            if n == 0 {
                return Err(if self.frames.holds_bytes() {
                    ReadEnd::Malformed("connection closed inside a frame".into())
                } else {
                    ReadEnd::Closed
                });
            }
            // SAFETY: the read initialised the first `n` bytes of `read_buf`'s slice.
            unsafe { self.frames.filled(n) };
        }
    }
}

/// A stream [`FrameReader::next_from`] reads.
pub(crate) trait FrameSource: tokio::io::AsyncRead + Unpin {
    /// The socket whose low-water mark the reader may raise while a large body arrives, and
    /// how many bytes read from it the stream holds (each carrying at most one byte of the
    /// body); `None`: the reader leaves the socket's options alone.
    fn socket(&self) -> Option<(RawFd, usize)> {
        None
    }
}

impl FrameSource for distrpc_secure::Secured {}

/// A TLS connection's records: while a large body arrives, its reader task is woken for
/// pieces of up to [`LOWAT_MAX`] bytes (as a plain connection's reader is, see
/// [`FrameReader::try_next`]) rather than for every segment; on loopback the sender pays for
/// each of those wake-ups.
impl FrameSource for distrpc_secure::records::RecordReader {
    fn socket(&self) -> Option<(RawFd, usize)> {
        Some((std::os::fd::AsRawFd::as_raw_fd(self), self.buffered()))
    }
}

/// The receiving side of a connection: the socket and its [`FrameReader`], which the
/// connection's reader task drives, except while a thread has claimed it: a blocked caller
/// reading its own reply (saving the hand-off from the reader's thread to the caller's: one
/// wake-up per call), or a thread waiting for work reading the peer's next call. A caller takes
/// the side over from a thread that only waits for work (ringing its doorbell), never the
/// other way round.
///
/// The hand-over needs no wake-up either way. While the side is claimed, the socket's bytes do
/// not wake the reader task ([`ReadHalf::pause`]); the claimant, after ending its claim, reads
/// once more until the socket is empty. Bytes that came before that last read are the
/// claimant's; bytes that come after it wake the reader task.
pub(crate) struct ReadSide {
    half: ReadHalf,
    state: Mutex<ReadState>,
    /// Wakes the reader task when the connection ends.
    nudge: Notify,
}

struct ReadState {
    frames: FrameReader,
    holder: Holder,
    /// The token of the next claim.
    claims: u64,
    /// Someone met the end of the stream (or closed the connection): nobody reads any more.
    ended: bool,
}

/// Who reads the side now.
enum Holder {
    /// The reader task.
    Task,
    /// A blocked caller, by its claim's token.
    Caller(u64),
    /// A thread waiting for work, by its claim's token, with its doorbell.
    Waiting(u64, Arc<Doorbell>),
    /// A thread that was waiting for work, by its claim's token, running a call it read here:
    /// it reads on once done, unless someone took the side over meanwhile (anyone may: it is
    /// not reading) — the watch does, once it has seen the claim busy at two ticks in a row
    /// (`seen`: at one).
    Busy(u64, bool),
}

impl Holder {
    fn token(&self) -> Option<u64> {
        match self {
            Holder::Task => None,
            Holder::Caller(t) | Holder::Waiting(t, _) | Holder::Busy(t, _) => Some(*t),
        }
    }
}

/// Who takes a step.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reader {
    /// The reader task: it waits while the side is claimed.
    Task,
    /// The holder of the claim with this token: it stops once the claim was taken over.
    Claimant(u64),
    /// A claimant whose claim just ended, reading what came before (see [`ReadSide`]).
    Leaving,
}

/// One step of reading a connection.
pub(crate) enum Step {
    /// A frame.
    Frame(Frame),
    /// Nothing more to read right now.
    Idle,
    /// Someone else has claimed the side: the reader task waits; a claimant whose claim was
    /// taken over stops.
    Claimed,
    /// The connection ended; `Some` for the one who saw it end, who must report it.
    Ended(Option<ReadEnd>),
}

impl ReadSide {
    pub(crate) fn new(half: ReadHalf, frames: FrameReader) -> Arc<Self> {
        Arc::new(Self {
            half,
            state: Mutex::new(ReadState {
                frames,
                holder: Holder::Task,
                claims: 0,
                ended: false,
            }),
            nudge: Notify::new(),
        })
    }

    /// The next step for `who`.
    pub(crate) fn step(&self, who: Reader) -> Step {
        self.step_from(who, false)
    }

    /// The next step for `who` among the bytes read already ([`Step::Idle`] when they hold no
    /// whole frame): the socket is not read.
    pub(crate) fn step_buffered(&self, who: Reader) -> Step {
        self.step_from(who, true)
    }

    fn step_from(&self, who: Reader, buffered: bool) -> Step {
        let mut st = if who == Reader::Task {
            self.lock_briefly()
        } else {
            lock(&self.state)
        };
        if st.ended {
            return Step::Ended(None);
        }
        let reads = match who {
            Reader::Task => matches!(st.holder, Holder::Task),
            Reader::Claimant(token) => st.holder.token() == Some(token),
            Reader::Leaving => true,
        };
        if !reads {
            return Step::Claimed;
        }
        let next = if buffered {
            st.frames.buffered()
        } else {
            st.frames.try_next(self.half.fd())
        };
        match next {
            Ok(Some(frame)) => Step::Frame(frame),
            Ok(None) => Step::Idle,
            Err(end) => {
                st.ended = true;
                Step::Ended(Some(end))
            }
        }
    }

    /// The lock, for the reader task. Its holder is most often a claimant reading for a
    /// microsecond: spinning a little spares the futex sleep and wake-up (which cost the
    /// busy-poll mode a third of its latency); a holder that takes longer (preempted) is
    /// waited for by sleeping, so that the spin cannot starve it of its CPU.
    fn lock_briefly(&self) -> MutexGuard<'_, ReadState> {
        for _ in 0..SPINS {
            match self.state.try_lock() {
                Ok(st) => return st,
                Err(std::sync::TryLockError::Poisoned(e)) => return e.into_inner(),
                Err(std::sync::TryLockError::WouldBlock) => std::hint::spin_loop(),
            }
        }
        lock(&self.state)
    }

    /// Waits until the socket may have new bytes, or the connection ends.
    pub(crate) async fn wait(&self) -> std::io::Result<()> {
        tokio::select! {
            r = self.half.readable() => r,
            _ = self.nudge.notified() => Ok(()),
        }
    }

    /// Claims the side for the calling thread: a blocked caller (`waiting` is `None`), or a
    /// thread waiting for work, with its doorbell. Returns the claim's token, or `None` if
    /// someone else reads the side (a caller takes it over from a thread that only waits for
    /// work, ringing that thread's doorbell so that it stops at once).
    pub(crate) fn claim(&self, waiting: Option<Arc<Doorbell>>) -> Option<u64> {
        let mut st = lock(&self.state);
        if st.ended {
            return None;
        }
        let token = st.claims;
        let holder = match waiting {
            Some(bell) => Holder::Waiting(token, bell),
            None => Holder::Caller(token),
        };
        match (&st.holder, &holder) {
            (Holder::Task, _) => {
                // The claimant reads the peer's bytes: they no longer wake the reader task.
                self.half.pause();
            }
            (Holder::Waiting(_, bell), Holder::Caller(_)) => bell.ring(),
            (Holder::Busy(..), _) => {}
            _ => return None,
        }
        st.holder = holder;
        st.claims += 1;
        Some(token)
    }

    /// Marks the claim with `token`, a waiting thread's, as busy (see [`Holder::Busy`]): `false`
    /// if it is no longer that thread's.
    pub(crate) fn busy(&self, token: u64) -> bool {
        let mut st = lock(&self.state);
        if !matches!(st.holder, Holder::Waiting(t, _) if t == token) {
            return false;
        }
        st.holder = Holder::Busy(token, false);
        true
    }

    /// Makes the busy claim with `token` a waiting thread's again, with its doorbell: `false` if
    /// it was taken over meanwhile.
    pub(crate) fn unbusy(&self, token: u64, bell: Arc<Doorbell>) -> bool {
        let mut st = lock(&self.state);
        if st.ended || !matches!(st.holder, Holder::Busy(t, _) if t == token) {
            return false;
        }
        st.holder = Holder::Waiting(token, bell);
        true
    }

    /// A tick of the watch (see [`super::watch`]): a busy claim seen at the tick before is
    /// taken back for the reader task, which is woken. `Some(true)`: a busy claim is left to
    /// watch; `Some(false)`: it was taken back; `None`: there was none.
    pub(crate) fn watch_busy(&self) -> Option<bool> {
        let mut st = lock(&self.state);
        match &mut st.holder {
            Holder::Busy(_, seen) if !*seen => {
                *seen = true;
                Some(true)
            }
            Holder::Busy(..) => {
                st.holder = Holder::Task;
                self.half.resume();
                drop(st);
                self.nudge.notify_one();
                Some(false)
            }
            _ => None,
        }
    }

    /// Ends the claim with `token`; `false` if it had been taken over (the new holder reads
    /// on). Otherwise the claimant must then read as [`Reader::Leaving`] until [`Step::Idle`]
    /// (see the type's docs).
    pub(crate) fn release(&self, token: u64) -> bool {
        let mut st = lock(&self.state);
        if st.holder.token() != Some(token) {
            return false;
        }
        st.holder = Holder::Task;
        self.half.resume();
        true
    }

    /// Wakes the reader task to look again (a claimant left bytes it did not read).
    pub(crate) fn wake_reader(&self) {
        self.nudge.notify_one();
    }

    /// Stops reading: the reader task ends at its next step.
    pub(crate) fn end(&self) {
        lock(&self.state).ended = true;
        self.nudge.notify_one();
    }

    /// Blocks the calling thread until the socket is readable, `bell` rings (then returns
    /// `true`) or `timeout` passes.
    pub(crate) fn poll_readable(
        &self,
        timeout: std::time::Duration,
        bell: Option<&Doorbell>,
    ) -> bool {
        let pollfd = |fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        let mut fds = [
            pollfd(self.half.fd()),
            pollfd(bell.map_or(-1, Doorbell::fd)),
        ];
        let n = if bell.is_some() { 2 } else { 1 };
        let ms = libc::c_int::try_from(timeout.as_millis().max(1)).unwrap_or(libc::c_int::MAX);
        // SAFETY: `n` valid pollfds; the descriptors stay open while `self.half` and `bell` live.
        unsafe { libc::poll(fds.as_mut_ptr(), n, ms) };
        fds[1].revents != 0
    }
}

/// One `recv` into memory that may be uninitialised; returns how many bytes it initialised.
fn recv_uninit(fd: RawFd, dst: &mut [std::mem::MaybeUninit<u8>]) -> std::io::Result<usize> {
    // SAFETY: `dst` is valid for writes of its length, which is all `recv` does with it; the
    // descriptor is open while `src` is.
    let n = unsafe { libc::recv(fd, dst.as_mut_ptr().cast(), dst.len(), 0) };
    usize::try_from(n).map_err(|_| std::io::Error::last_os_error())
}

/// The most a reader asks to be woken for at once.
const LOWAT_MAX: usize = 1 << 20;

/// Sets the socket's receive low-water mark: `poll`, epoll and so the reader's wake-ups wait
/// until that many bytes are there (or the stream ends). Best effort: if the kernel refuses it,
/// the reader is only woken more often.
fn set_lowat(fd: RawFd, bytes: usize) {
    let v = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    // SAFETY: a valid descriptor and a c_int option value of the right size.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}
