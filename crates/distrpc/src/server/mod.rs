//! The server: the callee's side of calls. The router takes every frame the transport reads
//! and hands replies to the client and requests to a service; the call service (here) looks
//! the function up in the registry and runs its handler — inline on the reader, on the pool,
//! or as a task — and sends its reply.
//!
//! ```text
//!  transport ─► router ─┬─ Result / Exception / Ack ──────────► client.on_response
//!                       ├─ Call ─► registry ─► inline / pool / task ─► reply ─► connection
//!                       └─ other kinds ─► the service registered for them (references, ...)
//! ```
//!
//! Owns: the registry, handler execution, the handler pool, replies, and the router's table of
//! services. Uses the call layer (replies to self complete pending calls; values are decoded in
//! its value scope) and the transport. May not touch: references or gather, which register as
//! services or registry entries from above.

pub(crate) mod current;
pub mod foreign;
pub mod handler;
pub mod registry;
mod reply;
mod router;
pub mod value;

pub(crate) use reply::{Completion, ReplyTo};
pub(crate) use router::{FLAG_ANSWER_LATER, FLAG_METHOD, Incoming, Service};

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock, Weak};

use std::collections::HashMap;

use bytes::Bytes;
use distrpc_wire::{Codec, Kind, Tensor};

use crate::call::Client;
use crate::call::activity::Counter;
use crate::error::Failure;
use crate::pool::Pool;
use current::Current;
use foreign::{ForeignCall, ForeignHandler};
use handler::{Handler, HandlerKind, Produced, Request};
use registry::Registry;

/// The serving side of one worker.
pub(crate) struct Server {
    pub(crate) client: Arc<Client>,
    registry: Registry,
    pool: Pool,
    /// Sync handlers run inline on a reader task: a metric of the fast path.
    inline_runs: AtomicU64,
    /// The worker handlers run for (see [`current`]).
    current: OnceLock<Arc<Current>>,
    /// Services for the message kinds the call service does not handle: (kind, whether the
    /// frame has [`FLAG_METHOD`], service).
    services: RwLock<Vec<Route>>,
    /// The fronts' handlers of calls in other codecs (pickle).
    foreign: Foreign,
}

/// The foreign handlers, by codec.
pub(crate) type Foreign = HashMap<Codec, Arc<dyn ForeignHandler>>;

/// A kind of request, whether it has [`FLAG_METHOD`], and the service it goes to.
type Route = (Kind, bool, Weak<dyn Service>);

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("me", &self.client.transport.me)
            .field("functions", &self.registry.len())
            .finish()
    }
}

impl Server {
    /// A server for `client`'s worker, with `num_worker_threads` pool threads. It receives
    /// frames once registered with the transport (done here).
    pub(crate) fn new(
        client: Arc<Client>,
        registry: Registry,
        foreign: Foreign,
        num_worker_threads: usize,
    ) -> Arc<Self> {
        let name = format!("distrpc-{}", client.transport.me.name);
        let server = Arc::new(Self {
            client,
            registry,
            pool: Pool::new(num_worker_threads, name),
            inline_runs: AtomicU64::new(0),
            current: OnceLock::new(),
            services: RwLock::new(Vec::new()),
            foreign,
        });
        let weak = Arc::downgrade(&server);
        server.client.transport.set_inbound(weak);
        server
    }

    /// Sets the user's handle that handlers see as the current worker (once, at init).
    pub(crate) fn set_current(&self, api: Weak<dyn std::any::Any + Send + Sync>) {
        let _ = self.current.set(Arc::new(Current {
            api,
            name: self.client.transport.me.name.clone(),
        }));
    }

    fn current(&self) -> Arc<Current> {
        self.current
            .get_or_init(|| {
                Arc::new(Current {
                    api: Weak::<()>::new(),
                    name: self.client.transport.me.name.clone(),
                })
            })
            .clone()
    }

    /// Routes frames of `kind` (with [`FLAG_METHOD`] set or not, as `method` says) to `service`.
    pub(crate) fn add_service(&self, kind: Kind, method: bool, service: Weak<dyn Service>) {
        crate::sync::write(&self.services).push((kind, method, service));
    }

    /// How many functions are registered.
    pub(crate) fn num_functions(&self) -> usize {
        self.registry.len()
    }

    /// The handler pool's size and idle threads.
    pub(crate) fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Sync handlers that ran inline on a reader.
    pub(crate) fn inline_runs(&self) -> u64 {
        self.inline_runs.load(Ordering::Relaxed)
    }

    /// The function registered under `name`, or why it cannot run.
    pub(crate) fn lookup(&self, name: &str) -> Result<(Arc<str>, Handler), Failure> {
        if !self.client.is_running() {
            return Err(Failure::ShutDown);
        }
        match self.registry.get(name) {
            Some((function, handler)) => Ok((function.clone(), handler.clone())),
            None => Err(Failure::UnknownFunction(name.to_string())),
        }
    }

    /// A handler's request: arguments from `from`, decoded in the client's value scope.
    pub(crate) fn request(&self, payload: Bytes, tensors: Vec<Tensor>, from: u32) -> Request {
        Request {
            payload,
            tensors,
            this: None,
            scope: self.client.scope().map(|s| (s, from)),
        }
    }

    /// Runs the function named `name` with `request`, sending its value where `completion`
    /// says.
    pub(crate) fn dispatch(
        self: &Arc<Self>,
        reply_to: ReplyTo,
        id: u64,
        name: &str,
        request: Request,
        completion: Completion,
    ) {
        match self.lookup(name) {
            Ok((function, handler)) => {
                self.run(handler, request, reply_to, id, function, completion)
            }
            Err(failure) => self.deliver(&reply_to, id, name, Err(failure), completion),
        }
    }

    /// Runs a handler: inline if it must or has shown itself quick, on the pool if it may
    /// block, as a task if it is async.
    pub(crate) fn run(
        self: &Arc<Self>,
        handler: Handler,
        request: Request,
        reply_to: ReplyTo,
        id: u64,
        function: Arc<str>,
        completion: Completion,
    ) {
        let current = self.current();
        let activity = &self.client.activity;
        match handler.0 {
            HandlerKind::Inline(h) => {
                activity.add(Counter::Server, 1);
                let out = current::with_current(&current, || h(request));
                self.finish(&reply_to, id, &function, out, completion, false);
            }
            HandlerKind::Sync(h, speed) => {
                activity.add(Counter::Server, 1);
                if crate::runtime::reading_inline() && speed.trusted() {
                    // Quick until now: run it here, sparing the hand-off to the pool.
                    self.inline_runs.fetch_add(1, Ordering::Relaxed);
                    let started = std::time::Instant::now();
                    let out = current::with_current(&current, || h(request));
                    speed.record(started.elapsed(), crate::runtime::handed_off());
                    return self.finish(&reply_to, id, &function, out, completion, false);
                }
                let server = self.clone();
                let refused = (reply_to.clone(), function.clone(), completion.clone());
                let origin = reply_to.origin(&self.client.transport);
                let job = Box::new(move || {
                    let started = std::time::Instant::now();
                    let out = current::with_current(&current, || h(request));
                    speed.record(started.elapsed(), false);
                    server.finish(&reply_to, id, &function, out, completion, false);
                });
                if self.pool.execute(job, origin).is_err() {
                    // The pool closes only at shutdown, and the refused job held the reply.
                    let (reply_to, function, completion) = refused;
                    let out = Err(Failure::ShutDown);
                    self.finish(&reply_to, id, &function, out, completion, false);
                }
            }
            HandlerKind::Async(h) => {
                activity.add(Counter::ServerAsync, 1);
                let server = self.clone();
                let fut = current::scope_current(current, h(request));
                self.client.transport.tasks.spawn(async move {
                    let out = fut.await;
                    server.finish(&reply_to, id, &function, out, completion, true);
                });
            }
        }
    }

    /// A started handler ended: deliver its value, then count it out (only then, so that
    /// shutdown cannot close the connection between the handler's end and its reply).
    fn finish(
        self: &Arc<Self>,
        reply_to: &ReplyTo,
        id: u64,
        function: &str,
        out: Produced,
        completion: Completion,
        is_async: bool,
    ) {
        self.deliver(reply_to, id, function, out, completion);
        let counter = if is_async {
            Counter::ServerAsync
        } else {
            Counter::Server
        };
        self.client.activity.add(counter, -1);
    }

    /// Waits (bounded by `deadline`) until no handler is queued or running: those that started
    /// (say, the last barrier's broadcast) still reply before the connections close.
    pub(crate) fn drain(&self, deadline: std::time::Instant) {
        let drained = self
            .client
            .activity
            .wait(|c| c.incoming() == 0, Some(deadline));
        if let Err(c) = drained {
            tracing::warn!(worker = %self.client.transport.me.name, handlers = c.incoming(), "shutting down with handlers still running");
        }
    }

    /// Refuses new handlers on the pool (at shutdown).
    pub(crate) fn close(&self) {
        self.pool.close();
    }
}

impl Server {
    /// Handles a plain call (not on a reference's value).
    fn on_call(self: &Arc<Self>, incoming: Incoming) -> Result<(), String> {
        let Incoming {
            reply_to,
            from,
            frame,
        } = incoming;
        let (name, args) =
            crate::call::payload::parse_call_head(&frame.payload).ok_or("malformed call")?;
        let name = crate::call::payload::name_str(&name);
        let codec = Codec::of(frame.flags);
        if self.for_front(codec, name) {
            let call = ForeignCall::arrived(name, args, frame.tensors, from, false);
            let completion = Completion::Reply(Kind::Result);
            self.on_foreign_call(reply_to, frame.id, codec, call, completion);
            return Ok(());
        }
        let request = self.request(args, frame.tensors, from);
        let completion = Completion::Reply(Kind::Result);
        self.dispatch(reply_to, frame.id, name, request, completion);
        Ok(())
    }
}
