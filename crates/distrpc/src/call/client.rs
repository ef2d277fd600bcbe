//! [`Client`]: the send path of calls and their replies.
//!
//! ```text
//!  caller ── call(Outgoing) ─► PendingTable[id] ─► fault injection ─► transport (or self)
//!  reply frame ── on_response ─► take PendingTable[id] ─► Done (completes the RpcFuture)
//!  timer ── deadline passed ─► Timeout      lost connection ─► PeerGone      shutdown ─► ShutDown
//! ```

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use bytes::Bytes;
use distrpc_wire::{Codec, Frame, Kind, OutFrame, Tensor};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::time::Instant;

use super::activity::Activity;
use super::fault::FaultInjection;
use super::future::RpcFuture;
use super::payload::encode_call;
use super::pending::{Done, Pending, PendingTable};
use super::scope::{self, ValueScope};
use crate::error::{Error, Failure};
use crate::transport::{LOCAL, Reading, SendError, Source, Transport};

/// A request to send: to whom, what, and how.
pub(crate) struct Outgoing<'a> {
    pub(crate) dest: u32,
    pub(crate) kind: Kind,
    /// Frame flags (the router's `FLAG_METHOD`).
    pub(crate) flags: u16,
    /// The function called, for errors and timeouts.
    pub(crate) function: &'a str,
    /// For calls, made by [`encode_call`].
    pub(crate) payload: Vec<u8>,
    pub(crate) tensors: Vec<Tensor>,
    /// `None`: the default timeout; zero: none.
    pub(crate) timeout: Option<Duration>,
    /// distrpc's own gather and barrier calls, which shutdown does not wait for.
    pub(crate) internal: bool,
    pub(crate) delivery: Delivery,
}

/// How a request leaves, and how its reply comes back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Delivery {
    /// Queued for the connection's writer task, which batches whatever accumulates into one
    /// `writev` (callers that pipeline: `rpc_async`).
    Queued,
    /// Written from the caller's thread when the socket is idle, sparing the writer's wake-up,
    /// though the caller does not wait (`remote()`, whose use usually follows at once).
    Direct,
    /// Written from the caller's thread, which blocks on the reply at once and reads it itself
    /// ([`Claim`](crate::transport::Claim)).
    Blocking,
    /// Written as [`Delivery::Direct`]; the caller reads the reply itself when it waits for
    /// it, after other work ([`Reading::Later`]).
    Started,
    /// Written from the sender's thread when the socket is idle, as [`Delivery::Direct`], but
    /// never waiting for room: a reference's control message, sent from wherever a reference
    /// is dropped (a thread holding Python's lock, a reader task).
    Control,
    /// A control message no thread waits on (a reference's delete): it goes with the
    /// connection's next write — the next call to that worker, often — or at the watch's
    /// second tick, never waiting for room (see `transport::watch`).
    Lazy,
}

impl<'a> Outgoing<'a> {
    /// A request of `kind` to `dest` with no tensors, no flags and the default timeout.
    pub(crate) fn new(dest: u32, kind: Kind, function: &'a str, payload: Vec<u8>) -> Self {
        Self {
            dest,
            kind,
            flags: 0,
            function,
            payload,
            tensors: Vec::new(),
            timeout: None,
            internal: false,
            delivery: Delivery::Queued,
        }
    }
}

/// A typed call: what [`Client::call_typed`] sends.
#[derive(Debug)]
pub(crate) struct TypedCall<'a> {
    pub(crate) dest: u32,
    /// Bytes before the call head (a reference's id, for a method), and the frame flags.
    pub(crate) prefix: &'a [u8],
    pub(crate) flags: u16,
    pub(crate) function: &'a str,
    pub(crate) timeout: Option<Duration>,
    pub(crate) internal: bool,
    pub(crate) delivery: Delivery,
}

/// A call whose arguments the caller encoded itself: how a front calls — a pickled Python
/// function (torch's `PythonUDF`), or MessagePack arguments for a Rust function by name.
#[derive(Debug, Clone)]
pub struct RawCall {
    /// How `payload` is encoded; the callee's handler for it decodes it.
    pub codec: Codec,
    /// The function's registered name (for a pickled call, a name for errors and profiles).
    pub function: String,
    /// The encoded arguments.
    pub payload: Vec<u8>,
    /// Tensors beside them, sent from their own memory.
    pub tensors: Vec<Tensor>,
}

/// The reply to a [`RawCall`]: the result, encoded as the call was, and its tensors.
#[derive(Debug, Clone)]
pub struct RawReply {
    /// The encoded result.
    pub payload: Bytes,
    /// The tensors beside it (slices of the receive buffer, 64-byte aligned).
    pub tensors: Vec<Tensor>,
}

impl From<Frame> for RawReply {
    fn from(frame: Frame) -> Self {
        RawReply {
            payload: frame.payload,
            tensors: frame.tensors,
        }
    }
}

/// The calling side of one worker.
pub(crate) struct Client {
    pub(crate) transport: Arc<Transport>,
    pending: Arc<PendingTable>,
    pub(crate) activity: Arc<Activity>,
    faults: FaultInjection,
    default_timeout_us: AtomicU64,
    next_id: AtomicU64,
    running: AtomicBool,
    scope: OnceLock<Weak<dyn ValueScope>>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("me", &self.transport.me)
            .finish()
    }
}

impl Client {
    pub(crate) fn new(
        transport: Arc<Transport>,
        default_timeout: Duration,
        faults: FaultInjection,
    ) -> Arc<Self> {
        let activity = Arc::new(Activity::default());
        let pending = PendingTable::new(activity.clone());
        let t = transport.clone();
        pending.start_timer(&transport.tasks, move |p| Error::Timeout {
            worker: t.name_of(p.peer).to_string(),
            function: p.function.clone(),
            timeout: p.deadline.map_or(Duration::ZERO, |(_, d)| d),
            elapsed: p.started.elapsed(),
        });
        let table = pending.clone();
        transport.on_loss(Box::new(move |loss| {
            table.fail_where(
                |p| p.conn == loss.conn,
                |_| Error::PeerGone {
                    worker: loss.worker.to_string(),
                    reason: loss.reason.to_string(),
                },
            );
        }));
        Arc::new(Self {
            transport,
            pending,
            activity,
            faults,
            default_timeout_us: AtomicU64::new(duration_us(default_timeout)),
            next_id: AtomicU64::new(1),
            running: AtomicBool::new(true),
            scope: OnceLock::new(),
        })
    }

    /// Sets the scope values are encoded and decoded in (once, at init).
    pub(crate) fn set_scope(&self, scope: Weak<dyn ValueScope>) {
        let _ = self.scope.set(scope);
    }

    /// The scope values are encoded and decoded in, if it still exists.
    pub(crate) fn scope(&self) -> Option<Arc<dyn ValueScope>> {
        self.scope.get().and_then(Weak::upgrade)
    }

    /// Whether this worker still makes calls.
    pub(crate) fn is_running(&self) -> bool {
        self.running.load(Ordering::Acquire)
    }

    /// Refuses new calls from now on; returns whether this call stopped it.
    pub(crate) fn stop(&self) -> bool {
        self.running.swap(false, Ordering::AcqRel)
    }

    /// Fails every pending call with [`Error::ShutDown`].
    pub(crate) fn fail_all(&self) {
        self.pending
            .fail_where(|_| true, |_| self.shut_down_error());
    }

    /// The error of a call made after shutdown.
    pub(crate) fn shut_down_error(&self) -> Error {
        Error::ShutDown {
            worker: self.transport.me.name.clone(),
        }
    }

    /// The default timeout of calls.
    pub(crate) fn default_timeout(&self) -> Duration {
        Duration::from_micros(self.default_timeout_us.load(Ordering::Relaxed))
    }

    /// Sets the default timeout of calls (zero: none).
    pub(crate) fn set_default_timeout(&self, timeout: Duration) {
        self.default_timeout_us
            .store(duration_us(timeout), Ordering::Relaxed);
    }

    /// Sends `out`; `done` receives the reply frame or the error. For a blocking call made
    /// from a plain thread, returns the caller's [`Claim`](crate::transport::Claim) on the connection when it could
    /// take it, for a started one the means to take it later ([`Reading`]): waiting through
    /// it reads the reply on the caller's own thread.
    pub(crate) fn call(self: &Arc<Self>, out: Outgoing<'_>, done: Done) -> Option<Reading> {
        let Outgoing {
            dest,
            kind,
            flags,
            function,
            payload,
            tensors,
            timeout,
            internal,
            delivery,
        } = out;
        if !self.is_running() {
            done(Err(self.shut_down_error()));
            return None;
        }
        if !internal {
            // A thread that kept a connection while running a call, and now calls out, may
            // wait for the answer however it likes (a Python future's `wait`): what comes on
            // the connection must not wait for it.
            crate::transport::Origin::let_go();
        }
        let timeout = timeout.unwrap_or_else(|| self.default_timeout());
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let transport = &self.transport;
        let conn = if dest == transport.me.id {
            None
        } else {
            match transport.connection(dest) {
                Ok(c) => Some(c),
                Err(e) => {
                    done(Err(e));
                    return None;
                }
            }
        };
        let frame = match &conn {
            Some(_) => match OutFrame::with_flags(kind, flags, id, &payload, &tensors) {
                Ok(f) => Some(f),
                Err(e) => {
                    done(Err(Error::SendFailed {
                        worker: transport.name_of(dest).to_string(),
                        reason: e.to_string(),
                    }));
                    return None;
                }
            },
            None => None,
        };
        let deadline = (!timeout.is_zero()).then(|| (Instant::now() + timeout, timeout));
        self.pending.register(
            id,
            Pending {
                conn: conn.as_ref().map_or(LOCAL, |c| c.id),
                peer: dest,
                function: function.to_string(),
                started: std::time::Instant::now(),
                deadline,
                internal,
                done,
                counted: None,
            },
        );
        if self.faults.should_fail(kind) {
            self.pending.fail(id, |p| Error::Injected {
                worker: transport.name_of(p.peer).into(),
                kind,
            });
            return None;
        }
        // Claimed before the request leaves, so that the reply cannot reach the reader task;
        // for a call started now and waited for later, when the caller waits.
        let claim = match &conn {
            Some(c) if !crate::runtime::on_runtime_thread() => {
                let deadline = deadline.map(|(at, _)| at.into_std());
                match delivery {
                    Delivery::Blocking => transport.claim(c, deadline, None).map(Reading::Now),
                    Delivery::Started => Some(Reading::Later {
                        transport: transport.clone(),
                        conn: c.clone(),
                        deadline,
                    }),
                    _ => None,
                }
            }
            _ => None,
        };
        let send = {
            let client = self.clone();
            move || match (conn, frame) {
                (Some(conn), Some(frame)) => {
                    let sent = match delivery {
                        Delivery::Lazy => client.transport.watch.defer(&conn, frame),
                        _ => conn.send(
                            frame,
                            delivery != Delivery::Queued,
                            delivery != Delivery::Control,
                        ),
                    };
                    if let Err(e) = sent {
                        let t = &client.transport;
                        client.pending.fail(id, |p| {
                            let worker = t.name_of(p.peer).into();
                            match e {
                                SendError::Closed(reason) => Error::PeerGone { worker, reason },
                                SendError::Stalled(reason) => Error::SendFailed { worker, reason },
                            }
                        });
                    }
                }
                _ => {
                    let frame = Frame {
                        kind,
                        flags,
                        id,
                        payload: Bytes::from(payload),
                        tensors,
                    };
                    // A call to self cannot be malformed: we built it.
                    let me = client.transport.me.id;
                    let _ = client.transport.deliver(Source::Local, me, frame);
                }
            }
        };
        match self.faults.delay_of(kind) {
            Some(delay) => {
                transport.tasks.spawn(async move {
                    tokio::time::sleep(delay).await;
                    send();
                });
            }
            None => send(),
        }
        claim
    }

    /// A reply arrived on connection `conn` ([`LOCAL`] for calls to self).
    pub(crate) fn on_response(&self, conn: u64, frame: Frame) {
        let Some(p) = self.pending.take(frame.id, Some(conn)) else {
            // A reply after its call timed out or failed: dropped, as torch does.
            tracing::debug!(id = frame.id, "reply to a call that is no longer pending");
            return;
        };
        let result = if frame.kind == Kind::Exception {
            let worker = self.transport.name_of(p.peer);
            Err(
                match crate::codec::decode_inline::<Failure>(&frame.payload) {
                    Ok(failure) => failure.into_error(worker),
                    Err(e) => Error::SendFailed {
                        worker: worker.to_string(),
                        reason: format!("undecodable exception reply: {e}"),
                    },
                },
            )
        } else {
            Ok(frame)
        };
        p.complete(result);
    }

    /// Encodes `args` (inside the value scope: references in them fork), sends the call, and
    /// returns a future of its decoded result.
    pub(crate) fn call_typed<A, R>(self: &Arc<Self>, call: TypedCall<'_>, args: &A) -> RpcFuture<R>
    where
        A: Serialize + ?Sized,
        R: DeserializeOwned + Send + 'static,
    {
        let TypedCall {
            dest,
            prefix,
            flags,
            function,
            timeout,
            internal,
            delivery,
        } = call;
        let (fut, done) = RpcFuture::pending_spinning(self.transport.spin.readers);
        let scope = self.scope();
        let encoded = scope::encoding(scope.as_deref(), dest, || {
            encode_call(prefix, function, |out| crate::codec::encode(args, out))
        });
        let (payload, tensors) = match encoded {
            Ok(encoded) => encoded,
            Err(e) => {
                done.complete(Err(e));
                return fut;
            }
        };
        let fname = function.to_string();
        let transport = self.transport.clone();
        let out = Outgoing {
            flags,
            tensors,
            timeout,
            internal,
            delivery,
            ..Outgoing::new(dest, Kind::Call, function, payload)
        };
        let claim = self.call(
            out,
            Box::new(move |result| {
                done.complete(result.and_then(|frame| {
                    scope::decoding(scope.as_deref(), dest, || {
                        crate::codec::decode::<R>(&frame.payload, frame.tensors)
                    })
                    .map_err(|e| Error::Decode {
                        worker: transport.name_of(dest).to_string(),
                        function: fname,
                        what: "result",
                        message: e.to_string(),
                    })
                }))
            }),
        );
        fut.with_claim(claim)
    }
}

impl Client {
    /// Sends a call encoded by the caller, after a payload prefix and with frame flags (a
    /// method call on a reference's value: its id and `FLAG_METHOD`; a call answered later:
    /// `FLAG_ANSWER_LATER`), and returns a future of its encoded reply.
    pub(crate) fn call_raw_on(
        self: &Arc<Self>,
        dest: u32,
        prefix: &[u8],
        flags: u16,
        call: RawCall,
        timeout: Option<Duration>,
        delivery: Delivery,
    ) -> RpcFuture<RawReply> {
        let (fut, done) = RpcFuture::pending_spinning(self.transport.spin.readers);
        let RawCall {
            codec,
            function,
            payload,
            tensors,
        } = call;
        let encoded = encode_call(prefix, &function, |out| {
            out.extend_from_slice(&payload);
            Ok::<_, std::convert::Infallible>(Vec::new())
        });
        let head_and_args = match encoded {
            Ok((bytes, _)) => bytes,
            Err(e) => {
                done.complete(Err(e));
                return fut;
            }
        };
        let out = Outgoing {
            flags: flags | codec.flags(),
            tensors,
            timeout,
            delivery,
            ..Outgoing::new(dest, Kind::Call, &function, head_and_args)
        };
        let claim = self.call(
            out,
            Box::new(move |result| done.complete(result.map(RawReply::from))),
        );
        fut.with_claim(claim)
    }
}

fn duration_us(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}
