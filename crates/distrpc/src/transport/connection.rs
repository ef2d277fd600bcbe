//! One TCP connection to a peer, its sending side: a queue that any thread can push frames
//! into, and a writer task that drains the whole queue into vectored writes. The receiving side
//! is [`ReadSide`](super::reader::ReadSide).
//!
//! ```text
//!  callers ──send()──► queue ──(wake)──► writer task ──write_vectored──► socket
//!  callers ──send(direct)──────────────────────────────write_vectored──► socket (when idle)
//! ```
//!
//! A connection closes when either side fails, when the peer closes it, or when the transport
//! closes it; the transport then tells whoever listens for lost peers.

use crate::sync::lock;
use std::io::IoSlice;
use std::sync::{Arc, Mutex, MutexGuard};

use distrpc_wire::OutFrame;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::Notify;

use super::reader::ReadSide;

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
    /// The receiving side, once connected.
    pub(crate) read: std::sync::OnceLock<Arc<ReadSide>>,
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
            read: std::sync::OnceLock::new(),
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
