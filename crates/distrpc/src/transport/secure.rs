//! Connections over TLS: the stream a dial or an accept gives ([`Stream`]), and the reader
//! task of a TLS connection.
//!
//! A plain connection's fast path reads and writes the socket directly, from whichever thread
//! is there (a blocked caller claims the reading, a sender writes when the socket is idle). A
//! TLS connection's bytes are ciphertext: its reader task alone decrypts what arrives (into the
//! frame reader's buffers, so a large tensor is still received without a copy of its own), and
//! its writer task alone encrypts what is queued.
//!
//! ```text
//!  plain: socket ─► reader task or claimant ─► frames        senders ─► socket (or queue)
//!  TLS:   socket ─► rustls ─► reader task ─► frames          senders ─► queue ─► writer ─► rustls ─► socket
//! ```

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use distrpc_wire::Frame;
use tokio::io::ReadHalf;
use tokio::net::TcpStream;

use super::reader::{FrameReader, ReadEnd};
use super::{Connection, Transport};

use distrpc_secure::TlsStream;

/// A connection's stream once dialed or accepted (and secured, as the group asks).
pub(crate) enum Stream {
    Plain(TcpStream),
    /// A TLS stream, and a handle on its socket (to shut it down from outside).
    Tls(Box<TlsStream>, OwnedFd),
}

impl Stream {
    /// The next frame (the hello), read before the stream is split.
    pub(crate) async fn read_frame(&mut self, frames: &mut FrameReader) -> Result<Frame, ReadEnd> {
        match self {
            Stream::Plain(tcp) => frames.next_from(tcp).await,
            Stream::Tls(tls, _) => frames.next_from(&mut **tls).await,
        }
    }
}

/// A second handle on `tcp`'s socket.
pub(crate) fn dup(tcp: &TcpStream) -> std::io::Result<OwnedFd> {
    tcp.as_fd().try_clone_to_owned()
}

/// A TLS connection's read half and frame reader, shared by its reader task and the one that
/// takes over if a handler run inline blocks.
pub(super) type TlsReading = Arc<tokio::sync::Mutex<(ReadHalf<TlsStream>, FrameReader)>>;

impl Transport {
    /// Starts the task that reads a TLS connection.
    pub(super) fn spawn_tls_reader(self: &Arc<Self>, conn: Arc<Connection>, reading: TlsReading) {
        let transport = self.clone();
        self.tasks.spawn(async move {
            let hand_off: crate::runtime::HandOff = {
                let (transport, conn, reading) = (transport.clone(), conn.clone(), reading.clone());
                Arc::new(move || {
                    transport.hand_offs.fetch_add(1, Ordering::Relaxed);
                    transport.spawn_tls_reader(conn.clone(), reading.clone());
                })
            };
            let end = loop {
                if conn.calls_full() {
                    tokio::select! {
                        _ = transport.tasks.cancelled() => break ReadEnd::Closed,
                        () = conn.room_for_calls() => {}
                    }
                }
                let next = {
                    let mut guard = reading.lock().await;
                    let (r, frames) = &mut *guard;
                    tokio::select! {
                        _ = transport.tasks.cancelled() => Err(ReadEnd::Closed),
                        f = frames.next_from(r) => f,
                    }
                };
                match next.and_then(|frame| transport.on_read(&conn, frame, &hand_off)) {
                    Err(end) => break end,
                    Ok(true) => return,
                    Ok(false) => {}
                }
            };
            transport.on_closed(&conn, end);
        });
    }
}
