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

use std::io::IoSlice;
use std::sync::{Arc, Mutex, MutexGuard};

use distrpc_wire::aligned::BufPool;
use distrpc_wire::frame::HEADER_LEN;
use distrpc_wire::{Frame, Header, Limits, OutFrame};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::Notify;

#[derive(Default)]
struct Queue {
    frames: Vec<OutFrame>,
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
        })
    }

    fn lock(&self) -> MutexGuard<'_, Queue> {
        // Updates are single pushes and swaps: a poisoned queue is still consistent.
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a frame; fails with the close reason if the connection is closed.
    pub(crate) fn send(&self, frame: OutFrame) -> Result<(), String> {
        let mut q = self.lock();
        if let Some(reason) = &q.closed {
            return Err(reason.clone());
        }
        let was_empty = q.frames.is_empty();
        q.frames.push(frame);
        drop(q);
        if was_empty {
            // The writer drains the whole queue per wake-up, so one wake per batch is enough.
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
        self.wake.notify_one();
        true
    }

    /// Writes queued frames until the connection is closed and its queue drained.
    pub(crate) async fn write_loop<W: AsyncWrite + Unpin>(&self, mut w: W) -> std::io::Result<()> {
        let mut batch = Vec::new();
        loop {
            {
                let mut q = self.lock();
                if q.frames.is_empty() {
                    if q.closed.is_some() {
                        break;
                    }
                } else {
                    std::mem::swap(&mut batch, &mut q.frames);
                }
            }
            if batch.is_empty() {
                self.wake.notified().await;
                continue;
            }
            let mut slices: Vec<&[u8]> = batch.iter().flat_map(OutFrame::slices).collect();
            write_all_slices(&mut w, &mut slices).await?;
            batch.clear();
        }
        w.shutdown().await
    }
}

/// Writes every slice, in as few `writev` calls as the kernel allows.
async fn write_all_slices<W: AsyncWrite + Unpin>(
    w: &mut W,
    slices: &mut [&[u8]],
) -> std::io::Result<()> {
    // Linux's IOV_MAX is 1024.
    const MAX_IOV: usize = 1024;
    let mut start = 0;
    while start < slices.len() {
        if slices[start].is_empty() {
            start += 1;
            continue;
        }
        let end = (start + MAX_IOV).min(slices.len());
        let iov: Vec<IoSlice<'_>> = slices[start..end].iter().map(|s| IoSlice::new(s)).collect();
        let mut n = w.write_vectored(&iov).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        while n > 0 && start < slices.len() {
            let len = slices[start].len();
            if n >= len {
                n -= len;
                start += 1;
            } else {
                slices[start] = &slices[start][n..];
                n = 0;
            }
        }
    }
    w.flush().await
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
pub(crate) struct FrameReader<R> {
    r: BufReader<R>,
    limits: Limits,
    buffers: BufPool,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub(crate) fn new(r: R, limits: Limits) -> Self {
        Self {
            r: BufReader::with_capacity(64 * 1024, r),
            limits,
            buffers: BufPool::default(),
        }
    }

    /// The next frame.
    pub(crate) async fn next(&mut self) -> Result<Frame, ReadEnd> {
        let mut head = [0u8; HEADER_LEN];
        let mut got = 0;
        while got < HEADER_LEN {
            match self.r.read(&mut head[got..]).await {
                Ok(0) if got == 0 => return Err(ReadEnd::Closed),
                Ok(0) => {
                    return Err(ReadEnd::Malformed(
                        "connection closed inside a frame header".into(),
                    ));
                }
                Ok(n) => got += n,
                Err(e) => return Err(ReadEnd::Io(e)),
            }
        }
        let header =
            Header::parse(&head, &self.limits).map_err(|e| ReadEnd::Malformed(e.to_string()))?;
        // `parse` bounded body_len by `limits.max_body`, which the caller chose to fit memory.
        let len = usize::try_from(header.body_len)
            .map_err(|_| ReadEnd::Malformed("frame body larger than memory".into()))?;
        let mut body = self.buffers.take(len);
        self.r.read_exact(body.as_mut_slice()).await.map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                ReadEnd::Malformed("connection closed inside a frame body".into())
            } else {
                ReadEnd::Io(e)
            }
        })?;
        Frame::decode(&header, body.freeze()).map_err(|e| ReadEnd::Malformed(e.to_string()))
    }
}
