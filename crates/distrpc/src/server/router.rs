//! The router: every frame the transport reads comes here. Replies go to the client; plain
//! calls to the call service; every other request to the [`Service`] registered for its kind.

use std::sync::Arc;

use distrpc_wire::{Frame, Kind};

use super::{ReplyTo, Server};
use crate::transport::{Inbound, LOCAL, Source};

/// Frame flag of a call (or remote call) on the value of a remote reference.
pub(crate) const FLAG_METHOD: u16 = 1;
/// Frame flag of a call whose caller waits on its answer soon no more than on a control
/// message's (a distributed autograd context's release): the answer goes with the
/// connection's next frame, or at the watch's next tick (bits 1 and 2 are the codec's).
pub(crate) const FLAG_ANSWER_LATER: u16 = 1 << 3;

/// A request as a service receives it.
#[derive(Debug)]
pub(crate) struct Incoming {
    /// Where its reply goes.
    pub(crate) reply_to: ReplyTo,
    /// The worker that sent it (this worker's own rank for calls to self).
    pub(crate) from: u32,
    pub(crate) frame: Frame,
}

/// Handles the requests of the message kinds it registered for.
pub(crate) trait Service: Send + Sync {
    /// Handles one request. An `Err` is a protocol violation: the connection closes.
    fn on_request(&self, incoming: Incoming) -> Result<(), String>;
}

impl Inbound for Server {
    fn on_frame(self: Arc<Self>, source: Source, from: u32, frame: Frame) -> Result<(), String> {
        match frame.kind {
            Kind::Result
            | Kind::RemoteResult
            | Kind::RRefFetchResult
            | Kind::RRefAck
            | Kind::Exception => {
                let conn = match &source {
                    Source::Peer(conn) => conn.id,
                    Source::Local => LOCAL,
                };
                self.client.on_response(conn, frame);
                Ok(())
            }
            Kind::Heartbeat => Ok(()),
            kind => {
                if let (
                    Source::Peer(conn),
                    Kind::Call
                    | Kind::RemoteCall
                    | Kind::RRefFetch
                    | Kind::RRefUserDelete
                    | Kind::RRefForkRequest
                    | Kind::RRefChildAccept,
                ) = (&source, kind)
                {
                    // Answered on the same connection (see `ReplyTo::Remote`).
                    conn.call_taken();
                }
                let incoming = Incoming {
                    reply_to: ReplyTo::of(source, frame.flags),
                    from,
                    frame,
                };
                let method = incoming.frame.flags & FLAG_METHOD != 0;
                if kind == Kind::Call && !method {
                    return self.on_call(incoming);
                }
                let service = crate::sync::read(&self.services)
                    .iter()
                    .find(|(k, m, _)| *k == kind && *m == method)
                    .and_then(|(_, _, s)| s.upgrade());
                match service {
                    Some(service) => service.on_request(incoming),
                    None => Err(format!("unexpected {kind:?} frame")),
                }
            }
        }
    }
}
