//! Connections over TLS: the reader task of a TLS connection (a dial or an accept is secured
//! by [`distrpc_secure::Security`]).
//!
//! A plain connection's fast path reads and writes the socket directly, from whichever thread
//! is there (a blocked caller claims the reading, a sender writes when the socket is idle). A
//! TLS connection's bytes are TLS records ([`distrpc_secure::records`], after rustls's
//! handshake): its reader task alone opens what arrives (copying each record's plaintext into
//! the frame reader's buffers, so a large tensor costs one copy), and its writer task alone
//! seals what is queued; the two halves share nothing.
//!
//! ```text
//!  plain: socket ─► reader task or claimant ─► frames        senders ─► socket (or queue)
//!  TLS:   socket ─► records ─► reader task ─► frames         senders ─► queue ─► writer ─► records ─► socket
//! ```

use std::sync::Arc;

use super::reader::{FrameReader, ReadEnd};
use super::{Connection, Transport};

use distrpc_secure::records::RecordReader;

/// A TLS connection's read half and frame reader, shared by its reader task and the one that
/// takes over if a handler run inline blocks.
pub(super) type TlsReading = Arc<tokio::sync::Mutex<(RecordReader, FrameReader)>>;

impl Transport {
    /// Starts the task that reads a TLS connection.
    pub(super) fn spawn_tls_reader(self: &Arc<Self>, conn: Arc<Connection>, reading: TlsReading) {
        let transport = self.clone();
        self.tasks.spawn(async move {
            let hand_off = transport.hand_off(&conn, &reading, Self::spawn_tls_reader);
            let end = loop {
                if !transport.room_for_calls(&conn).await {
                    break ReadEnd::Closed;
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
