//! One TCP connection to a peer: a queue that any thread can push frames into, a writer task
//! that drains the whole queue into vectored writes, and a reader task that checks and decodes
//! frames before handing them to the agent.
//!
//! ```text
//!  callers ──send()──► queue ──(wake)──► writer task ──write_vectored──► socket
//!  socket ──► reader task: header → Limits check → aligned body → Frame::decode ──► agent
//! ```
//!
//! A connection closes when either task fails, when the peer closes it, or when the agent closes
//! it; the agent then fails every call waiting on it.

use crate::sync::lock;
use std::io::IoSlice;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::{Buf, BytesMut};
use distrpc_wire::aligned::{ALIGN, AlignedBuf, BufPool};
use distrpc_wire::frame::HEADER_LEN;
use distrpc_wire::{Frame, Header, Limits, OutFrame};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::Notify;

#[derive(Default)]
struct Queue {
    frames: Vec<OutFrame>,
    /// Bytes of `frames[0]` already written (by a direct write that could not finish).
    skip: usize,
    /// Someone (a direct sender or the writer task) is writing: only one may.
    writing: bool,
    closed: Option<String>,
}

/// The sending side of a connection, shared by everyone who sends on it.
pub(crate) struct Connection {
    /// Unique among this agent's connections.
    pub(crate) id: u64,
    /// The peer's rank, once known.
    pub(crate) peer: u32,
    queue: Mutex<Queue>,
    wake: Notify,
    /// The socket, once connected: senders write to it directly when it is idle.
    sink: Mutex<Option<Arc<OwnedWriteHalf>>>,
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
    pub(crate) fn new(id: u64, peer: u32) -> Arc<Self> {
        Arc::new(Self {
            id,
            peer,
            queue: Mutex::new(Queue::default()),
            wake: Notify::new(),
            sink: Mutex::new(None),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Queue> {
        lock(&self.queue)
    }

    fn sink(&self) -> Option<Arc<OwnedWriteHalf>> {
        lock(&self.sink).clone()
    }

    /// Sends a frame. With `direct`, it is written at once from this thread when the socket is
    /// idle (no thread hand-off, no wake-up: for a caller about to block on the reply, or a
    /// handler's reply); otherwise it is queued for the writer task, which batches whatever
    /// accumulates into one `writev` (for callers that pipeline). Fails with the close reason if
    /// the connection is closed.
    pub(crate) fn send(&self, frame: OutFrame, direct: bool) -> Result<(), String> {
        let mut q = self.lock();
        if let Some(reason) = &q.closed {
            return Err(reason.clone());
        }
        let sink = if !direct || q.writing || !q.frames.is_empty() {
            None
        } else {
            self.sink()
        };
        let Some(sink) = sink else {
            let wake = q.frames.is_empty() && !q.writing;
            q.frames.push(frame);
            drop(q);
            if wake {
                // The writer drains the whole queue per wake-up, so one wake per batch is enough.
                self.wake.notify_one();
            }
            return Ok(());
        };
        q.writing = true;
        drop(q);
        let written = write_now(&sink, &frame);
        let mut q = self.lock();
        q.writing = false;
        if written < frame.len() {
            // The socket is full (or failed): the writer task finishes the frame, or meets the
            // error and closes the connection.
            q.frames.insert(0, frame);
            q.skip = written;
        }
        let wake = !q.frames.is_empty() || q.closed.is_some();
        drop(q);
        if wake {
            self.wake.notify_one();
        }
        Ok(())
    }

    /// Closes the connection: queued frames are still written, new ones are refused. Returns
    /// whether this call closed it.
    pub(crate) fn close(&self, reason: &str) -> bool {
        let mut q = self.lock();
        if q.closed.is_some() {
            return false;
        }
        q.closed = Some(reason.to_string());
        drop(q);
        // Without our handle, the writer task holds the last one: the socket's write side shuts
        // down when it ends.
        lock(&self.sink).take();
        self.wake.notify_one();
        true
    }

    /// Writes queued frames until the connection is closed and its queue drained.
    pub(crate) async fn write_loop(&self, w: OwnedWriteHalf) -> std::io::Result<()> {
        let w = Arc::new(w);
        {
            let q = self.lock();
            if q.closed.is_none() {
                *lock(&self.sink) = Some(w.clone());
            }
        }
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
            let result = write_all_slices(&w, &mut slices).await;
            self.lock().writing = false;
            result?;
        }
        Ok(())
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
fn write_now(w: &OwnedWriteHalf, frame: &OutFrame) -> usize {
    if let Some(bytes) = frame.as_contiguous() {
        // The common small frame: one buffer, no slice list to build.
        let mut written = 0;
        while written < bytes.len() {
            match w.try_write(&bytes[written..]) {
                Ok(n) if n > 0 => written += n,
                _ => break,
            }
        }
        return written;
    }
    let mut slices: Vec<&[u8]> = frame.slices().filter(|s| !s.is_empty()).collect();
    let mut written = 0;
    while !slices.is_empty() {
        match w.try_write_vectored(&iov(&slices)) {
            Ok(n) if n > 0 => {
                written += n;
                advance(&mut slices, n);
            }
            _ => break,
        }
    }
    written
}

/// Writes every slice, in as few `writev` calls as the kernel allows.
async fn write_all_slices(w: &OwnedWriteHalf, slices: &mut Vec<&[u8]>) -> std::io::Result<()> {
    while !slices.is_empty() {
        w.writable().await?;
        match w.try_write_vectored(&iov(slices)) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => advance(slices, n),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

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

/// Reads frames from a socket, checking each against the limits before allocating for it.
///
/// Small frames are read in bulk into one growing buffer and handed out as slices of it (one
/// `read` serves many frames, no allocation per frame); a body of [`BufPool::MIN_POOLED`] bytes
/// or more is read straight into a reused 64-byte aligned buffer. Either way the tensors of a
/// frame start on a 64-byte boundary: a small body that lands unaligned and carries tensors is
/// copied once into an aligned buffer.
pub(crate) struct FrameReader<R> {
    r: R,
    buf: BytesMut,
    limits: Limits,
    buffers: BufPool,
}

/// How much the bulk buffer grows by per read.
const READ_CHUNK: usize = 64 * 1024;

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub(crate) fn new(r: R, limits: Limits) -> Self {
        Self {
            r,
            buf: BytesMut::with_capacity(READ_CHUNK),
            limits,
            buffers: BufPool::default(),
        }
    }

    /// Reads more bytes into the bulk buffer; `Ok(0)` at the end of the stream.
    async fn fill(&mut self) -> Result<usize, ReadEnd> {
        self.buf.reserve(READ_CHUNK);
        self.r.read_buf(&mut self.buf).await.map_err(ReadEnd::Io)
    }

    /// The next frame.
    pub(crate) async fn next(&mut self) -> Result<Frame, ReadEnd> {
        while self.buf.len() < HEADER_LEN {
            if self.fill().await? == 0 {
                return Err(if self.buf.is_empty() {
                    ReadEnd::Closed
                } else {
                    ReadEnd::Malformed("connection closed inside a frame header".into())
                });
            }
        }
        let head: [u8; HEADER_LEN] = self.buf[..HEADER_LEN]
            .try_into()
            .map_err(|_| ReadEnd::Malformed("short header".into()))?;
        let header =
            Header::parse(&head, &self.limits).map_err(|e| ReadEnd::Malformed(e.to_string()))?;
        self.buf.advance(HEADER_LEN);
        // `parse` bounded body_len by `limits.max_body`, which the caller chose to fit memory.
        let len = usize::try_from(header.body_len)
            .map_err(|_| ReadEnd::Malformed("frame body larger than memory".into()))?;
        let truncated = || ReadEnd::Malformed("connection closed inside a frame body".into());
        let body = if len >= BufPool::MIN_POOLED {
            let mut body = self.buffers.take(len);
            let have = self.buf.len().min(len);
            body.as_mut_slice()[..have].copy_from_slice(&self.buf[..have]);
            self.buf.advance(have);
            self.r
                .read_exact(&mut body.as_mut_slice()[have..])
                .await
                .map_err(|e| {
                    if e.kind() == std::io::ErrorKind::UnexpectedEof {
                        truncated()
                    } else {
                        ReadEnd::Io(e)
                    }
                })?;
            body.freeze()
        } else {
            while self.buf.len() < len {
                if self.fill().await? == 0 {
                    return Err(truncated());
                }
            }
            let body = self.buf.split_to(len).freeze();
            if header.tensor_count > 0 && !(body.as_ptr() as usize).is_multiple_of(ALIGN) {
                let mut aligned = AlignedBuf::zeroed(len);
                aligned.as_mut_slice().copy_from_slice(&body);
                aligned.freeze()
            } else {
                body
            }
        };
        Frame::decode(&header, body).map_err(|e| ReadEnd::Malformed(e.to_string()))
    }
}
