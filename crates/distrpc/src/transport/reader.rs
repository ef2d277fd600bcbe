//! The receiving side of a connection: frames checked against the limits before any
//! allocation, read by the connection's reader task or by a blocked caller that claimed it.
//!
//! ```text
//!  socket ──► reader task ─┐
//!                          ├─ header → Limits check → aligned body → Frame::decode ──► inbound
//!  socket ──► claimant ────┘   (a blocked caller reading its own reply; the task then waits)
//! ```

use crate::sync::lock;
use std::sync::{Arc, Mutex, MutexGuard};

use distrpc_wire::deframe::Deframer;
use distrpc_wire::{Frame, Limits};
use tokio::net::tcp::OwnedReadHalf;
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

    /// The next frame, reading from `src` without waiting. `Ok(None)` means `src` has nothing
    /// more right now, and said so (the socket's readiness is cleared: its next wake-up means
    /// new bytes).
    ///
    /// With `direct`, reads with plain `recv` calls instead of through tokio, which skips the
    /// read while its reactor has not yet seen the socket become readable: a thread woken by
    /// its own `poll` must not wait for the reactor's thread to wake up too.
    pub(crate) fn try_next(
        &mut self,
        src: &OwnedReadHalf,
        direct: bool,
    ) -> Result<Option<Frame>, ReadEnd> {
        let malformed = |e: distrpc_wire::FrameError| ReadEnd::Malformed(e.to_string());
        loop {
            if let Some(frame) = self.frames.next_frame().map_err(malformed)? {
                if self.lowat != 1 && self.frames.large_remaining().is_none() {
                    set_lowat(src, 1);
                    self.lowat = 1;
                }
                return Ok(Some(frame));
            }
            let dst = self.frames.read_buf();
            let read = if direct {
                recv_uninit(src, dst)
            } else {
                // Through tokio, so that a WouldBlock clears its readiness.
                src.as_ref()
                    .try_io(tokio::io::Interest::READABLE, || recv_uninit(src, dst))
            };
            match read {
                Ok(0) if self.frames.holds_bytes() => {
                    return Err(ReadEnd::Malformed(
                        "connection closed inside a frame".into(),
                    ));
                }
                Ok(0) => return Err(ReadEnd::Closed),
                // SAFETY: `recv` initialised the first `n` bytes of `read_buf`'s slice.
                Ok(n) => unsafe { self.frames.filled(n) },
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    // While a large body arrives, wake up for big pieces of it, not for every
                    // segment; back to one byte once it is in.
                    let want = self
                        .frames
                        .large_remaining()
                        .map_or(1, |r| r.min(LOWAT_MAX));
                    if want != self.lowat {
                        set_lowat(src, want);
                        self.lowat = want;
                    }
                    return Ok(None);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(ReadEnd::Io(e)),
            }
        }
    }

    /// The next frame from any stream (a TLS stream; a socket before it is split), waiting
    /// for its bytes.
    pub(crate) async fn next_from<R>(&mut self, src: &mut R) -> Result<Frame, ReadEnd>
    where
        R: tokio::io::AsyncRead + Unpin,
    {
        let malformed = |e: distrpc_wire::FrameError| ReadEnd::Malformed(e.to_string());
        loop {
            if let Some(frame) = self.frames.next_frame().map_err(malformed)? {
                return Ok(frame);
            }
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

/// The receiving side of a connection: the socket and its [`FrameReader`], which the
/// connection's reader task drives, except while a blocked caller has claimed it to read its
/// own reply (saving the hand-off from the reader's thread to the caller's: one wake-up per
/// call).
///
/// The hand-over needs no wake-up either way. While the side is claimed, the reader task clears
/// the socket's readiness each time it is woken (under the lock, so never after the claim
/// ended) and waits for the next wake-up; the claimant, after ending its claim, reads once more
/// until the socket is empty. Bytes that came before that last read are the claimant's; bytes
/// that come after it wake the reader task.
pub(crate) struct ReadSide {
    half: OwnedReadHalf,
    state: Mutex<ReadState>,
    /// Wakes the reader task when the connection ends.
    nudge: Notify,
}

struct ReadState {
    frames: FrameReader,
    claimed: bool,
    /// Someone met the end of the stream (or closed the connection): nobody reads any more.
    ended: bool,
}

/// One step of reading a connection.
pub(crate) enum Step {
    /// A frame.
    Frame(Frame),
    /// Nothing more to read right now.
    Idle,
    /// A caller has claimed the side: the reader task waits.
    Claimed,
    /// The connection ended; `Some` for the one who saw it end, who must report it.
    Ended(Option<ReadEnd>),
}

impl ReadSide {
    pub(crate) fn new(half: OwnedReadHalf, frames: FrameReader) -> Arc<Self> {
        Arc::new(Self {
            half,
            state: Mutex::new(ReadState {
                frames,
                claimed: false,
                ended: false,
            }),
            nudge: Notify::new(),
        })
    }

    /// The next step for the reader task (`claimant == false`), or for the claim's holder
    /// (during its claim, and for the last read after it).
    pub(crate) fn step(&self, claimant: bool) -> Step {
        let mut st = if claimant {
            lock(&self.state)
        } else {
            self.lock_briefly()
        };
        if st.ended {
            return Step::Ended(None);
        }
        if st.claimed && !claimant {
            // Forget this wake-up: the claimant reads what caused it.
            let _ = self
                .half
                .as_ref()
                .try_io(tokio::io::Interest::READABLE, || {
                    Err::<(), _>(std::io::ErrorKind::WouldBlock.into())
                });
            return Step::Claimed;
        }
        match st.frames.try_next(&self.half, claimant) {
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

    /// Claims the side for the calling thread, unless someone already has.
    pub(crate) fn claim(&self) -> bool {
        let mut st = lock(&self.state);
        if st.claimed || st.ended {
            return false;
        }
        st.claimed = true;
        true
    }

    /// Ends a claim. The claimant must then read until [`Step::Idle`] (see the type's docs).
    pub(crate) fn release(&self) {
        lock(&self.state).claimed = false;
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

    /// Blocks the calling thread until the socket is readable or `timeout` passes.
    pub(crate) fn poll_readable(&self, timeout: std::time::Duration) {
        use std::os::fd::AsRawFd;
        let mut fd = libc::pollfd {
            fd: self.half.as_ref().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = libc::c_int::try_from(timeout.as_millis().max(1)).unwrap_or(libc::c_int::MAX);
        // SAFETY: one valid pollfd; the descriptor stays open while `self.half` lives.
        unsafe { libc::poll(&mut fd, 1, ms) };
    }
}

/// One `recv` into memory that may be uninitialised; returns how many bytes it initialised.
fn recv_uninit(
    src: &OwnedReadHalf,
    dst: &mut [std::mem::MaybeUninit<u8>],
) -> std::io::Result<usize> {
    use std::os::fd::AsRawFd;
    let fd = src.as_ref().as_raw_fd();
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
fn set_lowat(src: &OwnedReadHalf, bytes: usize) {
    use std::os::fd::AsRawFd;
    let v = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    // SAFETY: a valid descriptor and a c_int option value of the right size.
    unsafe {
        libc::setsockopt(
            src.as_ref().as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}
