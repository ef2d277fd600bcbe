//! [`RRefService`]: the live side of remote references on one worker. It serves the reference
//! message kinds (remote calls, method calls, fetches, control messages) as a service of the
//! router, carries out the ledger's effects by sending control messages through the client,
//! and is the value scope in which references fork (encode) and are received (decode).
//!
//! ```text
//!  RemoteCall ──► ledger.owner_created ─► run the function ─► Keep: value in the slot, ack
//!  Call + FLAG_METHOD ──► wait for the slot's value (on the owner) ─► run the method ─► reply
//!  RRefFetch ──► wait for the slot's value ─► reply with a copy
//!  ForkRequest / ChildAccept / UserDelete ──► ledger ─► effects ─► control messages, ack
//! ```

use std::cell::RefCell;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use distrpc_wire::{Codec, Frame, Kind, Tensor};

use super::context::Context;
use super::ledger::{Control, Effect, ForkId, RRefId};
use super::{get_id, put_id};
use crate::call::activity::Counter;
use crate::call::payload::{encode_call, name_str, parse_call_head};
use crate::call::scope::{Settled, ValueScope};
use crate::call::{Client, Delivery, Outgoing};
use crate::error::{Error, Failure};
use crate::server::foreign::ForeignCall;
use crate::server::{Completion, FLAG_METHOD, Incoming, ReplyTo, Server, Service};

/// How long one attempt of a reference control message may take before it is retried.
const CONTROL_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a failed control message waits before it is sent again; doubled per failure.
const CONTROL_FIRST_BACKOFF: Duration = Duration::from_millis(10);
/// The most a control message waits between attempts.
const CONTROL_MAX_BACKOFF: Duration = Duration::from_secs(1);

thread_local! {
    /// The service encoding a message on this thread (RRefs fork only inside one).
    static ENCODING: RefCell<Option<(Arc<RRefService>, u32)>> = const { RefCell::new(None) };
    /// The service decoding a message on this thread, and the worker that sent it.
    static DECODING: RefCell<Option<(Arc<RRefService>, u32)>> = const { RefCell::new(None) };
    /// User references created by the decode that just ran on this thread, not yet confirmed.
    static RECEIVED: RefCell<Vec<ForkId>> = const { RefCell::new(Vec::new()) };
}

/// The remote references of one worker, and the service that keeps them.
pub(crate) struct RRefService {
    /// Values owned here and the ledger.
    pub(crate) ctx: Context,
    pub(crate) client: Arc<Client>,
    server: Arc<Server>,
    /// Itself, for the handlers and waiters that keep it while they run.
    this: std::sync::Weak<RRefService>,
}

impl std::fmt::Debug for RRefService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RRefService")
            .field("ctx", &self.ctx)
            .finish()
    }
}

impl RRefService {
    /// The service of `server`'s worker, registered with the router for the reference kinds
    /// and with the client as its value scope.
    pub(crate) fn new(server: Arc<Server>) -> Arc<Self> {
        let client = server.client.clone();
        let service = Arc::new_cyclic(|this| Self {
            ctx: Context::new(client.transport.me.id),
            client,
            server,
            this: this.clone(),
        });
        let weak = Arc::downgrade(&service);
        service.client.set_scope(weak.clone());
        for (kind, method) in [
            (Kind::Call, true),
            (Kind::RemoteCall, false),
            (Kind::RemoteCall, true),
            (Kind::RRefFetch, false),
            (Kind::RRefForkRequest, false),
            (Kind::RRefChildAccept, false),
            (Kind::RRefUserDelete, false),
        ] {
            service.server.add_service(kind, method, weak.clone());
        }
        service
    }

    /// This service as an `Arc`.
    fn arc(&self) -> Arc<Self> {
        match self.this.upgrade() {
            Some(this) => this,
            // A service is only ever made inside an `Arc` (`new`), and `&self` proves that
            // `Arc` still lives.
            None => unreachable!("an RRefService outside its Arc"),
        }
    }

    /// This worker's rank.
    pub(crate) fn me(&self) -> u32 {
        self.client.transport.me.id
    }

    /// The name of the worker of rank `rank`.
    pub(crate) fn name_of(&self, rank: u32) -> &str {
        self.client.transport.name_of(rank)
    }

    /// Runs `f` (an encode of a message to worker `to`) with this service as the one
    /// references fork in: the forks made are `to`'s.
    pub(crate) fn encoding<R>(self: &Arc<Self>, to: u32, f: impl FnOnce() -> R) -> R {
        scoped(&ENCODING, (self.clone(), to), f)
    }

    /// Runs `f` (a decode of a message from `from`) with this service receiving references.
    pub(crate) fn decoding<R>(self: &Arc<Self>, from: u32, f: impl FnOnce() -> R) -> R {
        scoped(&DECODING, (self.clone(), from), f)
    }

    /// Carries out the ledger's effects: sends its control messages (retried until
    /// acknowledged, never blocking the caller).
    pub(crate) fn run_effects(self: &Arc<Self>, effects: Vec<Effect>) {
        for (to, msg) in self.ctx.apply(effects) {
            self.send_control(to, msg);
        }
    }

    fn send_control(self: &Arc<Self>, to: u32, msg: Control) {
        if !self.client.is_running() {
            return;
        }
        self.client.activity.add(Counter::Control, 1);
        self.attempt_control(to, msg, CONTROL_FIRST_BACKOFF);
    }

    /// Sends one attempt of a control message from this thread (no wake-up of a task or of the
    /// connection's writer when the socket is idle). Control messages are idempotent, so a
    /// lost or late one is simply sent again (encoded again: a few bytes), after `backoff`.
    fn attempt_control(self: &Arc<Self>, to: u32, msg: Control, backoff: Duration) {
        let activity = &self.client.activity;
        let kind = match msg {
            Control::ForkRequest { .. } => Kind::RRefForkRequest,
            Control::ChildAccept { .. } => Kind::RRefChildAccept,
            Control::UserDelete { .. } => Kind::RRefUserDelete,
        };
        let payload = match crate::codec::encode_inline(&msg) {
            Ok(p) => p,
            Err(e) => {
                activity.add(Counter::Control, -1);
                return tracing::error!(error = %e, "cannot encode a reference control message");
            }
        };
        // Nothing waits on a delete or on a child's acceptance (it only lets the parent drop
        // its hold on the value): they go with the next frame to that worker, within the
        // watch's bound — an acceptance for a fork that came in a call, with the call's reply,
        // rather than waking the caller once more before its reply. Fork requests are waited
        // on by the calls that carry them.
        let delivery = match msg {
            Control::UserDelete { .. } | Control::ChildAccept { .. } => Delivery::Lazy,
            Control::ForkRequest { .. } => Delivery::Control,
        };
        let out = Outgoing {
            timeout: Some(CONTROL_ATTEMPT_TIMEOUT),
            internal: true,
            delivery,
            ..Outgoing::new(to, kind, "rref control", payload)
        };
        let service = self.clone();
        let done = move |result: Result<Frame, Error>| match result {
            Ok(_) => {
                if let Control::ForkRequest { fork, .. } = msg {
                    let effects = service.ctx.ledger(|l| l.fork_acked(fork));
                    service.run_effects(effects);
                }
                service.client.activity.add(Counter::Control, -1);
            }
            Err(Error::PeerGone { .. } | Error::ShutDown { .. } | Error::UnknownWorker(_)) => {
                service.client.activity.add(Counter::Control, -1);
            }
            Err(e) => {
                tracing::debug!(worker = %service.client.transport.me.name, ?msg, error = %e, "retrying a reference control message");
                let again = service.clone();
                service.client.transport.tasks.spawn(async move {
                    tokio::time::sleep(backoff).await;
                    again.attempt_control(to, msg, (backoff * 2).min(CONTROL_MAX_BACKOFF));
                });
            }
        };
        self.client.call(out, Box::new(done));
    }

    /// How a handler's value becomes the value of `rref` here.
    fn keep(self: &Arc<Self>, rref: RRefId) -> Completion {
        let service = self.clone();
        Completion::Keep(Arc::new(move |out| service.ctx.set_value(rref, out)))
    }

    /// Makes the value of `rref` here, for `remote()` to self: `function` (a method of `this`,
    /// if given) with the encoded `args`.
    pub(crate) fn create_locally<E: std::fmt::Display>(
        self: &Arc<Self>,
        rref: RRefId,
        codec: Codec,
        function: &str,
        this: Option<RRefId>,
        encode_args: impl FnOnce(&mut Vec<u8>) -> Result<Vec<Tensor>, E>,
    ) {
        let me = self.me();
        let encoded = self.encoding(me, || encode_call(&[], function, encode_args));
        let (payload, tensors) = match encoded {
            Ok(encoded) => encoded,
            Err(e) => return self.ctx.set_value(rref, Err(Failure::Other(e.to_string()))),
        };
        let payload = Bytes::from(payload);
        match parse_call_head(&payload) {
            Some((name, args)) if codec == Codec::MessagePack => {
                let request = self.server.request(args, tensors, self.me());
                let completion = self.keep(rref);
                self.dispatch(
                    ReplyTo::Nobody,
                    0,
                    name_str(&name),
                    request,
                    this,
                    completion,
                );
            }
            Some((name, args)) => {
                let call = ForeignCall {
                    function: name_str(&name).to_string(),
                    payload: args,
                    tensors,
                    from: self.me(),
                    this: None,
                    keep: true,
                };
                let completion = self.keep(rref);
                self.dispatch_foreign(ReplyTo::Nobody, 0, Some(codec), call, this, completion);
            }
            None => self
                .ctx
                .set_value(rref, Err(Failure::Other(format!("bad call of {function}")))),
        }
    }

    /// Runs `name`; for a method, once the value of `this` exists (waiting on the owner, not
    /// on the caller).
    fn dispatch(
        self: &Arc<Self>,
        reply_to: ReplyTo,
        id: u64,
        name: &str,
        request: crate::server::handler::Request,
        this: Option<RRefId>,
        completion: Completion,
    ) {
        let Some(rref) = this else {
            return self
                .server
                .dispatch(reply_to, id, name, request, completion);
        };
        let (function, handler) = match self.server.lookup(name) {
            Ok(found) => found,
            Err(failure) => {
                return self
                    .server
                    .deliver(&reply_to, id, name, Err(failure), completion);
            }
        };
        let server = self.server.clone();
        self.ctx.with_value(
            rref,
            Box::new(move |value| match value {
                Ok(v) => {
                    let request = crate::server::handler::Request {
                        this: Some(v),
                        ..request
                    };
                    server.run(handler, request, reply_to, id, function, completion);
                }
                Err(f) => server.deliver(&reply_to, id, &function, Err(f), completion),
            }),
        );
    }

    /// A call (plain or `remote()`) on the value of a reference, or a `remote()`.
    fn on_call(self: &Arc<Self>, incoming: Incoming) -> Result<(), String> {
        let Incoming {
            reply_to,
            from,
            frame,
        } = incoming;
        let remote = frame.kind == Kind::RemoteCall;
        let method = frame.flags & FLAG_METHOD != 0;
        let mut rest = &frame.payload[..];
        let mut created = None;
        if remote {
            let ids = get_id(&mut rest).zip(get_id(&mut rest));
            let (rref, fork) = ids.ok_or("malformed remote call")?;
            let (rref, fork) = (RRefId(rref), ForkId(fork));
            if rref.0.created_on != from || fork.0.created_on != from {
                return Err("remote call with ids its sender did not create".into());
            }
            created = Some((rref, fork));
        }
        let this = match method {
            true => Some(RRefId(get_id(&mut rest).ok_or("malformed method call")?)),
            false => None,
        };
        let head = frame.payload.slice(frame.payload.len() - rest.len()..);
        let (name, args) = parse_call_head(&head).ok_or("malformed call")?;
        let completion = match created {
            Some((rref, fork)) => {
                let effects = self.ctx.ledger(|l| l.owner_created(rref, Some(fork)));
                self.ctx.expect_value(rref);
                self.run_effects(effects);
                self.keep(rref)
            }
            None => Completion::Reply(Kind::Result),
        };
        let name = name_str(&name);
        let codec = Codec::of(frame.flags);
        if self.server.for_front(codec, name) {
            let call = ForeignCall::arrived(name, args, frame.tensors, from, created.is_some());
            self.dispatch_foreign(reply_to, frame.id, codec, call, this, completion);
        } else {
            let request = self.server.request(args, frame.tensors, from);
            self.dispatch(reply_to, frame.id, name, request, this, completion);
        }
        Ok(())
    }

    /// A foreign call (a pickled Python function) on a reference's value, or whose value a
    /// reference keeps: to the front's handler, with the value once it exists.
    fn dispatch_foreign(
        self: &Arc<Self>,
        reply_to: ReplyTo,
        id: u64,
        codec: Option<Codec>,
        call: ForeignCall,
        this: Option<RRefId>,
        completion: Completion,
    ) {
        let Some(rref) = this else {
            return self
                .server
                .on_foreign_call(reply_to, id, codec, call, completion);
        };
        let server = self.server.clone();
        self.ctx.with_value(
            rref,
            Box::new(move |value| match value {
                Ok(v) => {
                    let call = ForeignCall {
                        this: Some(v),
                        ..call
                    };
                    server.on_foreign_call(reply_to, id, codec, call, completion);
                }
                Err(f) => server.deliver(&reply_to, id, &call.function, Err(f), completion),
            }),
        );
    }

    /// `to_here()` from another worker: a copy of the value, once it exists.
    fn on_fetch(self: &Arc<Self>, incoming: Incoming) -> Result<(), String> {
        let Incoming {
            reply_to, frame, ..
        } = incoming;
        let mut rest = &frame.payload[..];
        let rref = RRefId(get_id(&mut rest).ok_or("malformed fetch")?);
        let (server, id) = (self.server.clone(), frame.id);
        // Waits on the owner for a value still being created.
        self.ctx.with_value(
            rref,
            Box::new(move |value| {
                let completion = Completion::Reply(Kind::RRefFetchResult);
                server.deliver(&reply_to, id, "to_here", value, completion);
            }),
        );
        Ok(())
    }

    /// A control message: the ledger takes it, its effects are carried out, it is acknowledged.
    fn on_control(self: &Arc<Self>, incoming: Incoming) -> Result<(), String> {
        let msg: Control = crate::codec::decode_inline(&incoming.frame.payload)
            .map_err(|e| format!("malformed reference control message: {e}"))?;
        let from = incoming.from;
        let admitted = self.ctx.ledger(|l| l.admit(&msg, from));
        if let Err(e) = admitted {
            // Acknowledged all the same: a confused peer must not retry it forever.
            tracing::warn!(from, error = %e, "reference control message refused");
            let (reply_to, id) = (&incoming.reply_to, incoming.frame.id);
            self.server
                .send_reply(reply_to, id, Kind::RRefAck, Ok(Default::default()));
            return Ok(());
        }
        let effects = self.ctx.ledger(|l| match msg {
            Control::ForkRequest { rref, fork } => {
                l.fork_request(rref, fork);
                Vec::new()
            }
            Control::ChildAccept { fork } => l.child_accepted(fork),
            Control::UserDelete { rref, fork } => l.user_delete(rref, fork),
        });
        self.run_effects(effects);
        let ack = Ok(Default::default());
        let (reply_to, id) = (&incoming.reply_to, incoming.frame.id);
        self.server.send_reply(reply_to, id, Kind::RRefAck, ack);
        Ok(())
    }

    /// The call payload prefix of a method call on `this`.
    pub(crate) fn method_prefix(this: RRefId) -> [u8; 12] {
        let mut prefix = Vec::with_capacity(12);
        put_id(&mut prefix, this.0);
        let mut out = [0; 12];
        out.copy_from_slice(&prefix);
        out
    }
}

impl Service for RRefService {
    fn on_request(&self, incoming: Incoming) -> Result<(), String> {
        let this = self.arc();
        match incoming.frame.kind {
            Kind::Call | Kind::RemoteCall => this.on_call(incoming),
            Kind::RRefFetch => this.on_fetch(incoming),
            _ => this.on_control(incoming),
        }
    }
}

impl ValueScope for RRefService {
    fn encoding(&self, to: u32, f: &mut dyn FnMut()) {
        RRefService::encoding(&self.arc(), to, f)
    }

    fn decoding(&self, from: u32, f: &mut dyn FnMut()) {
        RRefService::decoding(&self.arc(), from, f)
    }

    fn settle(&self, function: &str) -> Result<(), Failure> {
        let forks = take_received();
        if forks.is_empty() {
            return Ok(());
        }
        let timeout = self.client.default_timeout();
        let wait = || {
            let _blocked = crate::pool::enter_blocking();
            self.ctx.wait_confirmed(&forks, timeout)
        };
        // Elsewhere on the runtime (distrpc's own inline functions) the wait is short: it runs
        // here.
        let missing = crate::runtime::blocking(wait).unwrap_or_else(wait);
        all_confirmed(function, &missing)
    }

    fn settle_async(&self, function: &str) -> Settled {
        let forks = take_received();
        let this = self.arc();
        let function = function.to_string();
        Box::pin(async move {
            if forks.is_empty() {
                return Ok(());
            }
            let timeout = this.client.default_timeout();
            let missing = this.ctx.wait_confirmed_async(&forks, timeout).await;
            all_confirmed(&function, &missing)
        })
    }
}

fn scoped<T: Clone + 'static, R>(
    key: &'static std::thread::LocalKey<RefCell<Option<T>>>,
    value: T,
    f: impl FnOnce() -> R,
) -> R {
    struct Restore<T: 'static>(
        &'static std::thread::LocalKey<RefCell<Option<T>>>,
        Option<T>,
    );
    impl<T: 'static> Drop for Restore<T> {
        fn drop(&mut self) {
            let previous = self.1.take();
            self.0.with(|c| *c.borrow_mut() = previous);
        }
    }
    let previous = key.with(|c| c.borrow_mut().replace(value));
    let _restore = Restore(key, previous);
    f()
}

/// The service encoding a message on this thread, and the worker the message goes to, if
/// any (references fork only inside one).
pub(crate) fn encoding_service() -> Option<(Arc<RRefService>, u32)> {
    ENCODING.with(|c| c.borrow().clone())
}

/// The service decoding a message on this thread, and the worker that sent it.
pub(crate) fn decoding_context() -> Option<(Arc<RRefService>, u32)> {
    DECODING.with(|c| c.borrow().clone())
}

/// A user reference the running decode received, to be confirmed before its handler runs.
pub(crate) fn note_received(fork: ForkId) {
    RECEIVED.with(|r| r.borrow_mut().push(fork));
}

/// Forgets the references the last decode on this thread received (a front confirms its own).
pub(crate) fn take_received_forks() {
    take_received();
}

fn take_received() -> Vec<ForkId> {
    RECEIVED.with(|r| std::mem::take(&mut *r.borrow_mut()))
}

fn all_confirmed(function: &str, missing: &[ForkId]) -> Result<(), Failure> {
    if missing.is_empty() {
        return Ok(());
    }
    Err(Failure::Other(format!(
        "{} reference(s) in the arguments of {function} were not confirmed by their owners in time",
        missing.len()
    )))
}
