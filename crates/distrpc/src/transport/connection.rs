//! One TCP connection to a peer, its sending side: a queue that any thread can push frames
//! into, and a writer task that drains the whole queue into vectored writes. The receiving side
//! is [`ReadSide`](super::reader::ReadSide).
//!
//! ```text
//!  callers ──send()──► queue ──(wake)──► writer task ──write_vectored──► socket
//!  callers ──send(direct)──────────────────────────────write_vectored──► socket (when idle)
//! ```
//!
//! What is queued is bounded ([`QueueBound`]): past the bound, a caller on its own thread waits
//! for the peer to read (and fails if it reads nothing for a while); a reply or a message sent
//! from the runtime never waits, and past four times the bound the connection is closed — a
//! peer that stops reading cannot make this worker hold its results without bound.
//!
//! A connection closes when either side fails, when the peer closes it, or when the transport
//! closes it; the transport then tells whoever listens for lost peers.

use crate::sync::lock;
use std::io::IoSlice;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::socket::WriteHalf;
use distrpc_wire::OutFrame;
use tokio::sync::Notify;

use super::reader::ReadSide;

thread_local! {
    /// Replies this thread holds for one connection (its id) inside [`Connection::gathering`].
    static HELD: std::cell::RefCell<Option<(u64, Vec<OutFrame>)>> =
        const { std::cell::RefCell::new(None) };
    /// The connection (its id) a thread waiting for work reads now ([`Connection::serving`]).
    static SERVING: std::cell::Cell<Option<u64>> = const { std::cell::Cell::new(None) };
}

/// After this many waits in a row that outlasted the spin, threads waiting on a connection for
/// the same kind of frame stop spinning ([`SpinHint`]).
const SLOW_IN_A_ROW: u32 = 4;

/// Whether a thread waiting for a connection's next frame of one kind (a reply; the peer's
/// next call) should spin before it sleeps: not once [`SLOW_IN_A_ROW`] waits in a row
/// outlasted the spin (a peer whose calls take long, one that calls seldom), until one ends
/// within it again.
#[derive(Default)]
pub(crate) struct SpinHint(std::sync::atomic::AtomicU32);

impl SpinHint {
    /// Whether to spin.
    pub(crate) fn spins(&self) -> bool {
        self.0.load(Ordering::Relaxed) < SLOW_IN_A_ROW
    }

    /// Notes how a wait ended, if it waited at all: within the spin, or later. One whose frame
    /// was there before it began (a call started earlier, waited for after other work) tells
    /// nothing of the peer's pace, and is not noted.
    pub(crate) fn note_wait(&self, waited: bool, within_spin: bool) {
        if waited {
            self.note(within_spin);
        }
    }

    /// Notes how a wait ended: within the spin, or later.
    pub(crate) fn note(&self, within_spin: bool) {
        if within_spin {
            self.0.store(0, Ordering::Relaxed);
        } else {
            let n = self.0.load(Ordering::Relaxed);
            self.0.store(n.saturating_add(1), Ordering::Relaxed);
        }
    }
}

#[derive(Default)]
struct Queue {
    frames: Vec<OutFrame>,
    /// Bytes of `frames[0]` already written (by a direct write that could not finish).
    skip: usize,
    /// Someone (a direct sender or the writer task) is writing: only one may.
    writing: bool,
    closed: Option<String>,
    /// Why [`Connection::abort`] dropped the connection, if it did.
    aborted: Option<String>,
    /// Bytes accepted and not yet written (queued, or in the writer's batch).
    pending: usize,
    /// Bytes written so far: a waiting sender sees the peer make progress.
    written: u64,
    /// Senders waiting for room.
    waiting: usize,
    /// Frames admitted that go with the next write ([`Connection::defer`]).
    lazy: Vec<OutFrame>,
    /// Whether the watch saw `lazy` as it is at a tick already.
    lazy_seen: bool,
    /// Whether `lazy` has a frame a serving thread writes before it sleeps (not only
    /// answers sent later: [`Connection::defer_later`]).
    lazy_urgent: bool,
}

/// How much a connection may hold for its peer (see the module docs), and how many of its
/// peer's calls it takes at once.
#[derive(Clone, Copy, Debug)]
pub(crate) struct QueueBound {
    /// Past this many bytes, callers wait for room.
    pub(crate) bytes: usize,
    /// A waiting caller fails once the peer has read nothing for this long.
    pub(crate) stall: Duration,
    /// With this many of the peer's calls unanswered, the connection is not read (TCP pushes
    /// back on the peer) until one is answered.
    pub(crate) calls: usize,
}

/// Why a frame was not sent.
#[derive(Debug)]
pub(crate) enum SendError {
    /// The connection is closed, for this reason.
    Closed(String),
    /// The peer has not read what is queued for it: the frame was not accepted.
    Stalled(String),
}

/// The sending side of a connection, shared by everyone who sends on it.
pub(crate) struct Connection {
    /// Unique among this agent's connections.
    pub(crate) id: u64,
    /// The peer's rank, once known.
    pub(crate) peer: u32,
    queue: Mutex<Queue>,
    wake: Notify,
    /// Where senders wait for room.
    room: Condvar,
    bound: QueueBound,
    /// The peer's calls taken and not yet answered.
    calls_in: std::sync::atomic::AtomicUsize,
    /// Wakes the reader once a call is answered while the connection was full.
    room_for_calls: Notify,
    /// The socket, once connected: senders write to it directly when it is idle (plain TCP).
    sink: Mutex<Option<Arc<WriteHalf>>>,
    /// The socket under the connection, for [`Connection::abort`] to shut down.
    socket: Mutex<Option<std::os::fd::OwnedFd>>,
    /// The receiving side, once connected.
    pub(crate) read: std::sync::OnceLock<Arc<ReadSide>>,
    /// Whether callers blocked on a reply over this connection spin.
    pub(crate) replies: SpinHint,
    /// Whether a thread waiting for the peer's next call, reading this connection, spins.
    pub(crate) calls: SpinHint,
    /// Whether a thread that read a call here keeps reading the connection while it runs the
    /// call (its runs were quick: see `Origin::serve`).
    pub(crate) runs: SpinHint,
    /// Whether the transport's watch looks at this connection (see `transport::watch`).
    pub(crate) watched: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("id", &self.id)
            .field("peer", &self.peer)
            .finish()
    }
}

impl Connection {
    pub(crate) fn new(id: u64, peer: u32, bound: QueueBound) -> Arc<Self> {
        Arc::new(Self {
            id,
            peer,
            queue: Mutex::new(Queue::default()),
            wake: Notify::new(),
            room: Condvar::new(),
            bound,
            calls_in: std::sync::atomic::AtomicUsize::new(0),
            replies: SpinHint::default(),
            calls: SpinHint::default(),
            runs: SpinHint::default(),
            watched: std::sync::atomic::AtomicBool::new(false),
            room_for_calls: Notify::new(),
            sink: Mutex::new(None),
            socket: Mutex::new(None),
            read: std::sync::OnceLock::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Queue> {
        lock(&self.queue)
    }

    fn sink(&self) -> Option<Arc<WriteHalf>> {
        lock(&self.sink).clone()
    }

    /// Sends a frame. With `direct`, it is written at once from this thread when the socket is
    /// idle (no thread hand-off, no wake-up: for a caller about to block on the reply, or a
    /// handler's reply); otherwise it is queued for the writer task, which batches whatever
    /// accumulates into one `writev` (for callers that pipeline). Past the queue's bound, a
    /// sender that `may_wait` (a caller on its own thread) waits for room; others never wait,
    /// and past four times the bound close the connection (see the module docs). Fails with
    /// the close reason if the connection is closed.
    pub(crate) fn send(
        &self,
        frame: OutFrame,
        direct: bool,
        may_wait: bool,
    ) -> Result<(), SendError> {
        let q = self.admit(
            frame.len(),
            may_wait && !crate::runtime::on_runtime_thread(),
        )?;
        // A reply (nobody waits on it here) inside `gathering` on this connection waits for
        // the others.
        let frame = if direct && !may_wait {
            self.hold(frame)
        } else {
            Some(frame)
        };
        let Some(frame) = frame else {
            return Ok(());
        };
        self.write_or_queue(q, vec![frame], direct);
        Ok(())
    }

    /// Keeps `frame` with the others this thread holds for this connection, if it gathers for
    /// it ([`Connection::gathering`]); gives it back otherwise.
    fn hold(&self, frame: OutFrame) -> Option<OutFrame> {
        HELD.with(|held| match &mut *held.borrow_mut() {
            Some((id, frames)) if *id == self.id => {
                frames.push(frame);
                None
            }
            _ => Some(frame),
        })
    }

    /// Runs `f`, holding the replies (and control messages) this thread sends on this
    /// connection meanwhile, then writes them together: one `writev`, and one wake-up of the
    /// peer instead of one each — a `remote()`'s acknowledgement and the reply to a fetch
    /// that waited for its value. Requests are never held (their senders may wait on them).
    pub(crate) fn gathering<R>(&self, f: impl FnOnce() -> R) -> R {
        if HELD.with(|held| held.borrow().is_some()) {
            return f();
        }
        HELD.with(|held| *held.borrow_mut() = Some((self.id, Vec::new())));
        /// Sends what was held, even if `f` panics.
        struct Release<'a>(&'a Connection);
        impl Drop for Release<'_> {
            fn drop(&mut self) {
                let held = HELD.with(|held| held.borrow_mut().take());
                if let Some((_, frames)) = held {
                    self.0.send_held(frames);
                }
            }
        }
        let _release = Release(self);
        f()
    }

    /// Whether the calling thread reads this connection while it waits for work
    /// ([`Connection::serving`]): it writes soon (the answer to the peer's next call), or
    /// flushes what waits for company before it sleeps or stops reading.
    pub(crate) fn served_here(&self) -> bool {
        SERVING.get() == Some(self.id)
    }

    /// Keeps `frame` (admitted, never waiting for room) to go with the connection's next write,
    /// or when [`Connection::flush_lazy`] or the watch's second tick writes it: for a frame no
    /// thread waits on. Use [`Watch::defer`](super::watch::Watch::defer), which watches it.
    pub(super) fn defer(&self, frame: OutFrame) -> Result<(), SendError> {
        self.defer_as(frame, true)
    }

    /// [`Connection::defer`], except that a serving thread about to sleep does not write it
    /// ([`Connection::flush_lazy`]): only the next write or the watch's second tick does. For
    /// the answer to a call its caller waits on no sooner than that (a context's release).
    pub(super) fn defer_later(&self, frame: OutFrame) -> Result<(), SendError> {
        self.defer_as(frame, false)
    }

    fn defer_as(&self, frame: OutFrame, urgent: bool) -> Result<(), SendError> {
        let mut q = self.admit(frame.len(), false)?;
        if q.lazy.is_empty() {
            q.lazy_seen = false;
        }
        q.lazy.push(frame);
        q.lazy_urgent |= urgent;
        Ok(())
    }

    /// A tick of the watch: frames that waited since the tick before are written. Returns
    /// whether frames are left waiting.
    pub(crate) fn watch_lazy(&self) -> bool {
        let mut q = self.lock();
        if q.lazy.is_empty() || q.closed.is_some() {
            return false;
        }
        if !q.lazy_seen {
            q.lazy_seen = true;
            return true;
        }
        self.write_or_queue(q, Vec::new(), true);
        false
    }

    /// Writes the frames [`Connection::defer`] keeps, if any (with them, those
    /// [`Connection::defer_later`] keeps; not those alone).
    pub(crate) fn flush_lazy(&self) {
        let q = self.lock();
        if q.lazy_urgent && q.closed.is_none() {
            self.write_or_queue(q, Vec::new(), true);
        }
    }

    /// Runs `f` as the thread reading this connection while it waits for work: see
    /// [`Connection::served_here`].
    pub(crate) fn serving<R>(&self, f: impl FnOnce() -> R) -> R {
        let before = SERVING.replace(Some(self.id));
        let out = f();
        SERVING.set(before);
        out
    }

    /// Writes `frames` (admitted already) now if the socket is idle, else queues them for the
    /// writer task.
    fn send_held(&self, frames: Vec<OutFrame>) {
        let q = self.lock();
        if !frames.is_empty() && q.closed.is_none() {
            self.write_or_queue(q, frames, true);
        }
    }

    /// Writes `frames` (admitted already, `q` locked) from this thread if `direct` and the
    /// socket is idle, else queues them for the writer task.
    fn write_or_queue(&self, mut q: MutexGuard<'_, Queue>, frames: Vec<OutFrame>, direct: bool) {
        let frames = if q.lazy.is_empty() {
            frames
        } else {
            q.lazy_urgent = false;
            let mut all = std::mem::take(&mut q.lazy);
            all.extend(frames);
            all
        };
        let sink = if !direct || q.writing || !q.frames.is_empty() {
            None
        } else {
            self.sink()
        };
        let Some(sink) = sink else {
            let wake = q.frames.is_empty() && !q.writing;
            q.frames.extend(frames);
            drop(q);
            if wake {
                // The writer drains the whole queue per wake-up, so one wake per batch is enough.
                self.wake.notify_one();
            }
            return;
        };
        q.writing = true;
        drop(q);
        let written = match frames.as_slice() {
            [frame] => write_now(&sink, frame),
            _ => {
                let mut slices: Vec<&[u8]> = frames.iter().flat_map(OutFrame::slices).collect();
                write_slices_now(&sink, &mut slices)
            }
        };
        let mut q = self.lock();
        q.writing = false;
        Self::wrote(&mut q, &self.room, written);
        // What the socket did not take (it is full, or failed) goes first in the queue: the
        // writer task finishes it, or meets the error and closes the connection.
        let (mut left, mut skip, mut rest) = (written, 0, Vec::new());
        for frame in frames {
            if rest.is_empty() && left >= frame.len() {
                left -= frame.len();
            } else {
                if rest.is_empty() {
                    skip = left;
                }
                rest.push(frame);
            }
        }
        if !rest.is_empty() {
            q.frames.splice(0..0, rest);
            q.skip = skip;
        }
        let wake = !q.frames.is_empty() || q.closed.is_some();
        drop(q);
        if wake {
            self.wake.notify_one();
        }
    }

    /// Takes `len` more bytes into the queue, waiting for room if `wait` (see [`Self::send`]);
    /// returns the queue, locked.
    fn admit(&self, len: usize, wait: bool) -> Result<MutexGuard<'_, Queue>, SendError> {
        let mut q = self.lock();
        let mut progress = (q.written, Instant::now());
        loop {
            if let Some(reason) = &q.closed {
                return Err(SendError::Closed(reason.clone()));
            }
            // A frame larger than the bound still goes, alone.
            if q.pending == 0 || q.pending + len <= self.bound.bytes {
                break;
            }
            if !wait {
                if q.pending + len <= 4 * self.bound.bytes {
                    break;
                }
                let reason = format!(
                    "the peer stopped reading: {} bytes were queued for it",
                    q.pending
                );
                drop(q);
                self.abort(&reason);
                return Err(SendError::Closed(reason));
            }
            if q.written != progress.0 {
                progress = (q.written, Instant::now());
            }
            let Some(left) = self.bound.stall.checked_sub(progress.1.elapsed()) else {
                return Err(SendError::Stalled(format!(
                    "{} bytes are queued for the peer, which has read none of them for {:?}",
                    q.pending, self.bound.stall
                )));
            };
            // The wait runs inside the front's hook (the Python binding lets its interpreter
            // lock go there), with the queue's lock let go first: a thread holding the
            // interpreter lock may be about to take the queue's.
            q.waiting += 1;
            let seen = q.written;
            drop(q);
            crate::sync::around_wait(&mut || {
                let q = self.lock();
                if q.written == seen && q.closed.is_none() {
                    let _ = self.room.wait_timeout(q, left);
                }
            });
            q = self.lock();
            q.waiting -= 1;
        }
        q.pending += len;
        Ok(q)
    }

    /// A call from the peer was taken (its answer will go back on this connection).
    pub(crate) fn call_taken(&self) {
        self.calls_in
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// A call from the peer was answered: if the connection was full, its reader goes on.
    pub(crate) fn call_answered(&self) {
        use std::sync::atomic::Ordering;
        let before = self
            .calls_in
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                Some(n.saturating_sub(1))
            })
            .unwrap_or(0);
        if before >= self.bound.calls {
            self.room_for_calls.notify_one();
        }
    }

    /// Whether the peer has as many calls unanswered as the connection takes: it must not be
    /// read until one is answered.
    pub(crate) fn calls_full(&self) -> bool {
        self.calls_in.load(std::sync::atomic::Ordering::Relaxed) >= self.bound.calls
    }

    /// Waits until the connection takes calls again.
    pub(crate) async fn room_for_calls(&self) {
        while self.calls_full() {
            let notified = self.room_for_calls.notified();
            if !self.calls_full() {
                return;
            }
            notified.await;
        }
    }

    /// Accounts for `n` bytes written, waking senders waiting for room.
    fn wrote(q: &mut Queue, room: &Condvar, n: usize) {
        q.pending = q.pending.saturating_sub(n);
        q.written += n as u64;
        if q.waiting > 0 && n > 0 {
            room.notify_all();
        }
    }

    /// Closes the connection: queued frames are still written, new ones are refused. Returns
    /// whether this call closed it.
    pub(crate) fn close(&self, reason: &str) -> bool {
        let mut q = self.lock();
        if q.closed.is_some() {
            return false;
        }
        q.closed = Some(reason.to_string());
        if q.waiting > 0 {
            self.room.notify_all();
        }
        drop(q);
        // Without our handles, the writer task holds the last one: the socket's write side
        // shuts down when it ends (and closes once its reader's half goes too).
        lock(&self.sink).take();
        lock(&self.socket).take();
        self.wake.notify_one();
        true
    }

    /// Closes the connection at once, dropping what is queued (a peer that stopped reading
    /// would never take it): the socket is shut down both ways, so its reader and writer end
    /// and the transport learns of the loss.
    pub(crate) fn abort(&self, reason: &str) {
        tracing::warn!(peer = self.peer, %reason, "dropping the connection");
        {
            let mut q = self.lock();
            q.frames.clear();
            q.skip = 0;
            q.pending = 0;
            q.aborted.get_or_insert_with(|| reason.to_string());
        }
        if let Some(socket) = lock(&self.socket).as_ref() {
            let _ = socket2::SockRef::from(socket).shutdown(std::net::Shutdown::Both);
        }
        self.close(reason);
    }

    /// Why [`Connection::abort`] dropped the connection (what its reader and writer then meet
    /// is only the consequence).
    pub(crate) fn aborted(&self) -> Option<String> {
        self.lock().aborted.clone()
    }

    /// Writes queued frames until the connection is closed and its queue drained.
    pub(crate) async fn write_loop(&self, w: WriteHalf) -> std::io::Result<()> {
        let w = Arc::new(w);
        {
            let q = self.lock();
            if q.closed.is_none() {
                *lock(&self.sink) = Some(w.clone());
            }
        }
        self.drain(&mut PlainWriter(w)).await
    }

    /// Writes queued frames through `w` (a TLS stream: no direct writes from senders) until
    /// the connection is closed and its queue drained.
    pub(crate) async fn write_loop_tls<W>(&self, w: W) -> std::io::Result<()>
    where
        W: tokio::io::AsyncWrite + Unpin,
    {
        self.drain(&mut StreamWriter(w)).await
    }

    /// Remembers the socket under the connection, so that [`Connection::abort`] can shut it
    /// down whoever holds its halves (a TLS stream's tasks).
    pub(crate) fn set_socket(&self, socket: std::os::fd::OwnedFd) {
        *lock(&self.socket) = Some(socket);
    }

    async fn drain(&self, w: &mut impl BatchWriter) -> std::io::Result<()> {
        loop {
            let work = {
                let mut q = self.lock();
                if q.writing {
                    None
                } else if q.frames.is_empty() {
                    if q.closed.is_some() {
                        break;
                    }
                    None
                } else {
                    q.writing = true;
                    Some((std::mem::take(&mut q.frames), std::mem::take(&mut q.skip)))
                }
            };
            let Some((batch, skip)) = work else {
                self.wake.notified().await;
                continue;
            };
            let mut slices: Vec<&[u8]> = batch.iter().flat_map(OutFrame::slices).collect();
            advance(&mut slices, skip);
            let result = w
                .write_batch(&mut slices, &mut |n| {
                    Self::wrote(&mut self.lock(), &self.room, n);
                })
                .await;
            self.lock().writing = false;
            result?;
        }
        w.finish().await
    }
}

/// Where a connection's writer task writes a batch of frames.
trait BatchWriter {
    /// Writes every slice, telling `wrote` each amount written.
    async fn write_batch(
        &mut self,
        slices: &mut Vec<&[u8]>,
        wrote: &mut (dyn FnMut(usize) + Send),
    ) -> std::io::Result<()>;
    /// Ends the stream once everything is written.
    async fn finish(&mut self) -> std::io::Result<()>;
}

/// A plain socket's write half: vectored writes straight from the frames.
struct PlainWriter(Arc<WriteHalf>);

impl BatchWriter for PlainWriter {
    async fn write_batch(
        &mut self,
        slices: &mut Vec<&[u8]>,
        wrote: &mut (dyn FnMut(usize) + Send),
    ) -> std::io::Result<()> {
        write_all_slices(&self.0, slices, wrote).await
    }

    async fn finish(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Any stream (TLS): vectored writes of the batch (a TLS writer gathers the slices into
/// records), then a flush.
struct StreamWriter<W>(W);

impl<W: tokio::io::AsyncWrite + Unpin> BatchWriter for StreamWriter<W> {
    async fn write_batch(
        &mut self,
        slices: &mut Vec<&[u8]>,
        wrote: &mut (dyn FnMut(usize) + Send),
    ) -> std::io::Result<()> {
        use tokio::io::AsyncWriteExt;
        while !slices.is_empty() {
            let n = self.0.write_vectored(&iov(slices)).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            advance(slices, n);
            wrote(n);
        }
        self.0.flush().await
    }

    async fn finish(&mut self) -> std::io::Result<()> {
        use tokio::io::AsyncWriteExt;
        self.0.shutdown().await
    }
}

/// Drops the first `n` bytes of `slices`.
fn advance(slices: &mut Vec<&[u8]>, mut n: usize) {
    let mut first = 0;
    while n > 0 && first < slices.len() {
        let len = slices[first].len();
        if n >= len {
            n -= len;
            first += 1;
        } else {
            slices[first] = &slices[first][n..];
            n = 0;
        }
    }
    slices.drain(..first);
    slices.retain(|s| !s.is_empty());
}

/// Linux's IOV_MAX.
const MAX_IOV: usize = 1024;

/// The first `MAX_IOV` slices, as one `writev`'s worth.
fn iov<'a>(slices: &[&'a [u8]]) -> Vec<IoSlice<'a>> {
    slices
        .iter()
        .take(MAX_IOV)
        .map(|s| IoSlice::new(s))
        .collect()
}

/// Writes as much of `frame` as the socket takes right now, without waiting; returns the bytes
/// written.
fn write_now(w: &WriteHalf, frame: &OutFrame) -> usize {
    if let Some(bytes) = frame.as_contiguous() {
        // The common small frame: one buffer, no slice list to build.
        let mut written = 0;
        while written < bytes.len() {
            match w.try_write_vectored(&[IoSlice::new(&bytes[written..])]) {
                Ok(n) if n > 0 => written += n,
                _ => break,
            }
        }
        return written;
    }
    let mut slices: Vec<&[u8]> = frame.slices().collect();
    write_slices_now(w, &mut slices)
}

/// Writes as much of `slices` as the socket takes right now, without waiting; returns the
/// bytes written.
fn write_slices_now(w: &WriteHalf, slices: &mut Vec<&[u8]>) -> usize {
    slices.retain(|s| !s.is_empty());
    let mut written = 0;
    while !slices.is_empty() {
        match w.try_write_vectored(&iov(slices)) {
            Ok(n) if n > 0 => {
                written += n;
                advance(slices, n);
            }
            _ => break,
        }
    }
    written
}

/// Writes every slice, in as few `writev` calls as the kernel allows, telling `wrote` each
/// amount written.
async fn write_all_slices(
    w: &WriteHalf,
    slices: &mut Vec<&[u8]>,
    wrote: &mut (dyn FnMut(usize) + Send),
) -> std::io::Result<()> {
    while !slices.is_empty() {
        match w.write_vectored(&iov(slices)).await {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                advance(slices, n);
                wrote(n);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use distrpc_wire::Kind;
    use std::io::Read;

    fn bytes_of(frame: &OutFrame) -> Vec<u8> {
        frame.slices().flatten().copied().collect()
    }

    /// Reads exactly `frames` from `peer`, and nothing more is there.
    fn read_frames(peer: &mut std::net::TcpStream, frames: &[&OutFrame]) {
        let want: Vec<u8> = frames.iter().flat_map(|f| bytes_of(f)).collect();
        let mut got = vec![0u8; want.len()];
        peer.read_exact(&mut got).unwrap();
        assert_eq!(got, want);
        assert!(!readable(peer));
    }

    /// Whether the peer has bytes to read now.
    fn readable(peer: &std::net::TcpStream) -> bool {
        peer.set_nonblocking(true).unwrap();
        let mut byte = [0u8; 1];
        let got = peer.peek(&mut byte);
        peer.set_nonblocking(false).unwrap();
        matches!(got, Ok(n) if n > 0)
    }

    /// A connection writing to a socket whose other end is `peer` (a plain blocking stream),
    /// and the runtime its write half is registered with (enter it while writing).
    fn writing_pair() -> (
        tokio::runtime::Runtime,
        std::net::TcpStream,
        Arc<Connection>,
    ) {
        let (runtime, peer, ours) = super::super::socket::test_pair();
        let write = {
            let _inside = runtime.enter();
            super::super::socket::split(ours).unwrap().1
        };
        let bound = QueueBound {
            bytes: 1 << 20,
            stall: Duration::from_secs(5),
            calls: 16,
        };
        let conn = Connection::new(1, 1, bound);
        *lock(&conn.sink) = Some(Arc::new(write));
        (runtime, peer, conn)
    }

    #[test]
    fn gathered_replies_go_together_when_the_gathering_ends_and_requests_go_at_once() {
        let (runtime, mut peer, conn) = writing_pair();
        let _inside = runtime.enter();

        let ack = OutFrame::new(Kind::RemoteResult, 1, b"", &[]).unwrap();
        let reply = OutFrame::new(Kind::RRefFetchResult, 2, b"value", &[]).unwrap();
        let request = OutFrame::new(Kind::Call, 3, b"call", &[]).unwrap();
        let (ack_bytes, reply_bytes, request_bytes) =
            (bytes_of(&ack), bytes_of(&reply), bytes_of(&request));
        conn.gathering(|| {
            conn.send(ack, true, false).unwrap();
            conn.send(reply, true, false).unwrap();
            assert!(!readable(&peer), "a gathered reply went before the end");
            // A request is never held: its sender may wait for the answer inside.
            conn.send(request, true, true).unwrap();
            let mut got = vec![0u8; request_bytes.len()];
            peer.read_exact(&mut got).unwrap();
            assert_eq!(got, request_bytes);
            assert!(!readable(&peer));
        });
        let mut got = vec![0u8; ack_bytes.len() + reply_bytes.len()];
        peer.read_exact(&mut got).unwrap();
        assert_eq!(
            got,
            [ack_bytes, reply_bytes].concat(),
            "in order, at the end"
        );
    }

    #[test]
    fn lazy_frames_go_with_the_next_write_or_at_the_second_tick_and_only_from_a_serving_thread() {
        let (runtime, mut peer, conn) = writing_pair();
        let _inside = runtime.enter();
        let watch = super::super::watch::Watch::default();
        let waits = |conn: &Connection| conn.watched.load(Ordering::Relaxed);
        let frame = |id| OutFrame::new(Kind::RRefAck, id, b"", &[]).unwrap();

        // Not serving: written at once.
        let (a, a_bytes) = (frame(1), frame(1));
        watch.send_lazy(&conn, a).unwrap();
        assert!(!waits(&conn));
        read_frames(&mut peer, &[&a_bytes]);

        // Serving: it waits, and goes before the next frame written.
        let (b, b_bytes) = (frame(2), frame(2));
        let reply = OutFrame::new(Kind::RemoteResult, 3, b"", &[]).unwrap();
        let reply_bytes = OutFrame::new(Kind::RemoteResult, 3, b"", &[]).unwrap();
        conn.serving(|| watch.send_lazy(&conn, b)).unwrap();
        assert!(waits(&conn));
        assert!(!readable(&peer), "a lazy frame went alone");
        conn.send(reply, true, false).unwrap();
        read_frames(&mut peer, &[&b_bytes, &reply_bytes]);

        // Nothing else written: the watch's first tick sees it, the second writes it.
        let (c, c_bytes) = (frame(4), frame(4));
        conn.serving(|| watch.send_lazy(&conn, c)).unwrap();
        assert!(conn.watch_lazy(), "left for the next tick");
        assert!(!readable(&peer));
        assert!(!conn.watch_lazy(), "written at the second");
        read_frames(&mut peer, &[&c_bytes]);

        // A serving thread about to sleep writes it itself.
        let (d, d_bytes) = (frame(5), frame(5));
        conn.serving(|| watch.send_lazy(&conn, d)).unwrap();
        conn.flush_lazy();
        read_frames(&mut peer, &[&d_bytes]);
        assert!(!conn.watch_lazy(), "nothing left to watch");
    }

    #[test]
    fn an_answer_sent_later_waits_for_the_next_write_or_the_second_tick_not_a_sleep() {
        let (runtime, mut peer, conn) = writing_pair();
        let _inside = runtime.enter();
        let watch = super::super::watch::Watch::default();
        let frame = |id| OutFrame::new(Kind::Result, id, b"none", &[]).unwrap();

        // From any thread, serving or not; a sleeping thread's flush leaves it.
        let (a, a_bytes) = (frame(1), frame(1));
        watch.defer_later(&conn, a).unwrap();
        conn.flush_lazy();
        assert!(!readable(&peer), "an answer sent later went at a flush");
        let (b, b_bytes) = (frame(2), frame(2));
        conn.send(b, true, false).unwrap();
        read_frames(&mut peer, &[&a_bytes, &b_bytes]);

        // With a lazy acknowledgement: the flush writes both.
        let (c, c_bytes) = (frame(3), frame(3));
        let ack = OutFrame::new(Kind::RRefAck, 4, b"", &[]).unwrap();
        let ack_bytes = OutFrame::new(Kind::RRefAck, 4, b"", &[]).unwrap();
        watch.defer_later(&conn, c).unwrap();
        conn.serving(|| watch.send_lazy(&conn, ack)).unwrap();
        conn.flush_lazy();
        read_frames(&mut peer, &[&c_bytes, &ack_bytes]);

        // Alone: the watch's second tick writes it.
        let (d, d_bytes) = (frame(5), frame(5));
        watch.defer_later(&conn, d).unwrap();
        assert!(conn.watch_lazy(), "left for the next tick");
        conn.flush_lazy();
        assert!(!readable(&peer));
        assert!(!conn.watch_lazy(), "written at the second");
        read_frames(&mut peer, &[&d_bytes]);
    }

    #[test]
    fn waiters_stop_spinning_after_slow_waits_until_one_is_quick_again() {
        let hint = SpinHint::default();
        for _ in 1..SLOW_IN_A_ROW {
            hint.note(false);
            assert!(
                hint.spins(),
                "fewer than SLOW_IN_A_ROW slow waits still spin"
            );
        }
        hint.note(false);
        assert!(!hint.spins());
        hint.note(false);
        assert!(!hint.spins());
        hint.note(true);
        assert!(hint.spins(), "a quick wait makes waiters spin again");
    }

    #[test]
    fn a_frame_there_before_the_wait_does_not_make_waiters_spin_again() {
        let hint = SpinHint::default();
        for _ in 0..SLOW_IN_A_ROW {
            hint.note_wait(true, false);
        }
        assert!(!hint.spins());
        hint.note_wait(false, true);
        assert!(
            !hint.spins(),
            "a reply that was there already says nothing of the peer"
        );
        hint.note_wait(true, true);
        assert!(hint.spins(), "a wait that ended within the spin does");
    }
}
