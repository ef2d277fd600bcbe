//! Replies: where a handler's value goes ([`ReplyTo`], [`Completion`]) and how it is sent.

use std::sync::Arc;

use bytes::Bytes;
use distrpc_wire::{Frame, Kind, OutFrame};

use super::Server;
use super::handler::Produced;
use super::value::{Outcome, Reply};
use crate::call::scope;
use crate::error::Failure;
use crate::transport::{Connection, LOCAL, Origin, Source, Transport};

/// Where the reply to a call goes.
#[derive(Clone, Debug)]
pub(crate) enum ReplyTo {
    /// A call to self: complete the pending call directly.
    Local,
    /// Back on the connection the call came in on, now or with its next frame.
    Remote(Arc<Connection>, Answer),
    /// No one waits (the value of a `remote()` to self).
    Nobody,
}

/// When a reply to a peer goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Answer {
    /// At once.
    Now,
    /// With the connection's next frame, or at the watch's next tick: the caller marked the
    /// call as one nobody waits on soon ([`FLAG_ANSWER_LATER`](super::router::FLAG_ANSWER_LATER)),
    /// and its answer wakes no thread of the caller's on its own.
    Later,
}

impl ReplyTo {
    /// The connection the call came in on, for a thread waiting for the peer's next call
    /// ([`Origin::serve`]); `None` for a call to this worker itself.
    pub(crate) fn origin(&self, transport: &Arc<Transport>) -> Option<Origin> {
        match self {
            ReplyTo::Remote(conn, _) => Some(Origin::new(transport, conn)),
            ReplyTo::Local | ReplyTo::Nobody => None,
        }
    }

    /// Where the reply to a request from `source` goes, and when (its frame's `flags`).
    pub(crate) fn of(source: Source, flags: u16) -> Self {
        match source {
            Source::Peer(conn) if flags & super::router::FLAG_ANSWER_LATER != 0 => {
                ReplyTo::Remote(conn, Answer::Later)
            }
            Source::Peer(conn) => ReplyTo::Remote(conn, Answer::Now),
            Source::Local => ReplyTo::Local,
        }
    }
}

/// Keeps a handler's value (a remote reference's, on its owner).
pub(crate) type Keep = Arc<dyn Fn(Produced) + Send + Sync>;

/// What becomes of a handler's value.
#[derive(Clone)]
pub(crate) enum Completion {
    /// Encoded and sent back in a frame of this kind.
    Reply(Kind),
    /// Kept by the given function; the caller gets an acknowledgement (`RemoteResult`).
    Keep(Keep),
}

impl std::fmt::Debug for Completion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Completion::Reply(kind) => write!(f, "Reply({kind:?})"),
            Completion::Keep(_) => f.write_str("Keep"),
        }
    }
}

impl Server {
    /// Delivers a value: encoded as the reply, or kept with an acknowledgement as the reply.
    pub(crate) fn deliver(
        &self,
        reply_to: &ReplyTo,
        id: u64,
        function: &str,
        out: Produced,
        completion: Completion,
    ) {
        match completion {
            Completion::Reply(kind) => {
                let scope = self.client.scope();
                let to = match reply_to {
                    ReplyTo::Remote(conn, _) => conn.peer,
                    ReplyTo::Local | ReplyTo::Nobody => self.client.transport.me.id,
                };
                let outcome = out.and_then(|value| {
                    scope::encoding(scope.as_deref(), to, || value.encode()).map_err(|m| {
                        super::handler::remote_error(
                            function,
                            "distrpc::EncodeError",
                            format!("cannot encode the result: {m}"),
                        )
                    })
                });
                self.send_reply(reply_to, id, kind, outcome);
            }
            Completion::Keep(keep) => {
                // Acknowledge first: whoever then fetches the value finds its reference
                // confirmed (a fetch that comes in between waits for the value).
                let ack = match &out {
                    Ok(_) => Ok(Reply::default()),
                    Err(f) => Err(f.clone()),
                };
                let acknowledge = || {
                    self.send_reply(reply_to, id, Kind::RemoteResult, ack);
                    keep(out);
                };
                // A fetch of the value that came first is answered in the same write (also one
                // still unread, if this thread kept the connection while the call ran).
                match reply_to {
                    ReplyTo::Remote(conn, _) => {
                        crate::transport::catch_up(conn);
                        conn.gathering(acknowledge)
                    }
                    _ => acknowledge(),
                }
            }
        }
    }

    /// Sends an encoded reply (or the failure) of kind `ok_kind` to call `id`.
    pub(crate) fn send_reply(&self, reply_to: &ReplyTo, id: u64, ok_kind: Kind, outcome: Outcome) {
        let (kind, payload, tensors) = match outcome {
            Ok(reply) => (ok_kind, reply.payload, reply.tensors),
            Err(failure) => match crate::codec::encode_inline(&failure) {
                Ok(p) => (Kind::Exception, p, Vec::new()),
                Err(e) => {
                    tracing::error!(error = %e, "cannot encode a failure reply");
                    return;
                }
            },
        };
        match reply_to {
            ReplyTo::Nobody => {}
            ReplyTo::Local => self.client.on_response(
                LOCAL,
                Frame {
                    kind,
                    flags: 0,
                    id,
                    payload: Bytes::from(payload),
                    tensors,
                },
            ),
            ReplyTo::Remote(conn, answer) => {
                let frame = OutFrame::new(kind, id, &payload, &tensors).or_else(|e| {
                    let failure = Failure::Other(format!("result cannot be sent: {e}"));
                    let p = crate::codec::encode_inline(&failure).unwrap_or_default();
                    OutFrame::new(Kind::Exception, id, &p, &[])
                });
                match frame {
                    Ok(frame) => {
                        // Nobody waits on a control message's acknowledgement, nor soon on
                        // the answer to a call marked so.
                        let watch = &self.client.transport.watch;
                        let sent = if *answer == Answer::Later {
                            watch.defer_later(conn, frame)
                        } else if kind == Kind::RRefAck {
                            watch.send_lazy(conn, frame)
                        } else {
                            conn.send(frame, true, false)
                        };
                        if sent.is_err() {
                            tracing::debug!(id, "reply dropped: connection closed");
                        }
                    }
                    Err(e) => tracing::error!(error = %e, "cannot build a reply frame"),
                }
                conn.call_answered();
            }
        }
    }
}
