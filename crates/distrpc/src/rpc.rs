//! [`Rpc`]: one worker of a group, and everything a user does with it.

use std::borrow::Borrow;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::call::{Delivery, RawCall, RawReply, RpcFuture, TypedCall};
use crate::error::Error;
use crate::function::Function;
pub use crate::metrics::Metrics;
use crate::node::{Node, NodeConfig};
use crate::options::RpcOptions;
use crate::rendezvous::{self, Bound};
use crate::rref::RRef;
use crate::server::registry::Registry;
use crate::worker::{To, WorkerInfo, check_name};

/// State shared by every clone of an [`Rpc`]; dropping the last clone stops the worker.
pub(crate) struct Shared {
    node: Node,
    store_server: Mutex<Option<distrpc_store::TcpStoreServer>>,
    listen_addr: SocketAddr,
    check_rref_leaks: bool,
}

impl Shared {
    /// Stops this worker locally and, on rank 0, the store.
    fn stop(&self) {
        self.node.shutdown_local();
        // Dropping the server aborts its tasks; it needs no runtime context.
        crate::sync::lock(&self.store_server).take();
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One worker of a distrpc group: makes calls to the others, serves theirs, and shuts down with
/// them. Cheap to clone; every clone is the same worker. Dropping the last clone stops the
/// worker locally (call [`Rpc::shutdown`] first to stop with the group).
///
/// ```
/// use distrpc::{Function, Rpc, RpcOptions};
///
/// // A group of one: rank 0 hosts the rendezvous store on a free loopback port.
/// let options = RpcOptions::default()
///     .init_method("tcp://127.0.0.1:0")
///     .register("double", |(x,): (i64,)| x * 2);
/// let rpc = Rpc::init("worker0", 0, 1, options)?;
/// let double: Function<(i64,), i64> = Function::named("double");
/// assert_eq!(rpc.rpc_sync("worker0", &double, (21,))?, 42);
/// rpc.shutdown()?;
/// # Ok::<(), distrpc::Error>(())
/// ```
#[derive(Clone)]
pub struct Rpc {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Rpc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rpc")
            .field("worker", &self.shared.node.transport.me)
            .finish()
    }
}

/// A worker that has bound its sockets (and, as rank 0, started the store) but not yet met the
/// group; see [`Rpc::bind`].
#[derive(Debug)]
pub struct PendingRpc {
    name: String,
    rank: u32,
    world: u32,
    options: RpcOptions,
    bound: Bound,
}

impl PendingRpc {
    /// The rendezvous store's address, when it is a TCP store. For rank 0 given port 0 this is
    /// the port the OS chose: pass it to the other workers.
    pub fn store_addr(&self) -> Option<SocketAddr> {
        match &self.bound.target {
            rendezvous::StoreTarget::Tcp(addr) => Some(*addr),
            rendezvous::StoreTarget::File(_) => None,
        }
    }

    /// Meets the rest of the group and starts serving. Fails if the group does not fill within
    /// the RPC timeout, if another worker has the same name or rank, or on any I/O error.
    pub fn join(self) -> Result<Rpc, Error> {
        if crate::runtime::on_runtime_thread() {
            return Err(Error::WouldBlock);
        }
        let rt = crate::runtime::start()?;
        let PendingRpc {
            name,
            rank,
            world,
            options,
            bound,
        } = self;
        // Before meeting the group: a worker that cannot serve must not join it.
        let mut registry = Registry::with_registered()?;
        for (fname, handler) in options.functions.iter().cloned() {
            let origin = format!("RpcOptions::register({fname:?})");
            registry.insert(&fname, origin, handler)?;
        }
        let group = crate::runtime::block_on(rendezvous::join(
            &bound.target,
            &bound.security,
            &name,
            rank,
            world,
            bound.advertise,
            options.rpc_timeout,
        ))?;
        let check_rref_leaks = options.check_rref_leaks;
        let node = Node::new(
            NodeConfig {
                rank,
                group,
                registry,
                num_worker_threads: options.num_worker_threads,
                rpc_timeout: options.rpc_timeout,
                limits: distrpc_wire::Limits {
                    max_body: options.max_frame_bytes,
                    ..Default::default()
                },
                faults: options.faults,
                spin: crate::transport::Spin {
                    readers: options.busy_poll,
                    callers: options.busy_poll.max(options.spin_wait),
                },
                liveness: options.liveness,
                foreign: options.foreign.iter().cloned().collect(),
                security: bound.security.clone(),
                queue: crate::transport::QueueBound {
                    bytes: options.max_queued_bytes,
                    stall: options.send_stall,
                    calls: options.max_calls_in,
                },
            },
            rt.clone(),
        );
        let listen_addr = bound.listener.local_addr()?;
        {
            let _guard = rt.enter();
            node.transport.serve(bound.listener);
        }
        let shared = Arc::new(Shared {
            node,
            store_server: Mutex::new(bound.server),
            listen_addr,
            check_rref_leaks,
        });
        let weak = Arc::downgrade(&shared);
        let api: std::sync::Weak<dyn std::any::Any + Send + Sync> = weak;
        shared.node.server.set_current(api);
        tracing::debug!(worker = %name, rank, world, %listen_addr, "rpc initialized");
        Ok(Rpc { shared })
    }
}

impl Rpc {
    /// Joins a group as worker `name` of rank `rank` among `world_size` (torch's `init_rpc`).
    /// `rank` and `world_size` may be `None` to read `RANK` and `WORLD_SIZE`. Blocks until every
    /// worker has joined, or fails after the RPC timeout naming the ranks that never came.
    pub fn init(
        name: &str,
        rank: impl Into<Option<usize>>,
        world_size: impl Into<Option<usize>>,
        options: RpcOptions,
    ) -> Result<Rpc, Error> {
        Self::bind(name, rank, world_size, options)?.join()
    }

    /// The first half of [`Rpc::init`]: checks the arguments, binds the worker's listener and,
    /// on rank 0, starts the store; [`PendingRpc::join`] does the rest. Rank 0 started with
    /// `tcp://127.0.0.1:0` learns its store's port from [`PendingRpc::store_addr`] here.
    pub fn bind(
        name: &str,
        rank: impl Into<Option<usize>>,
        world_size: impl Into<Option<usize>>,
        options: RpcOptions,
    ) -> Result<PendingRpc, Error> {
        check_name(name)?;
        if crate::runtime::on_runtime_thread() {
            return Err(Error::WouldBlock);
        }
        if options.num_worker_threads == 0 {
            return Err(Error::InvalidArgument(
                "num_worker_threads must be at least 1".into(),
            ));
        }
        let (rank, world) = rendezvous::rank_and_world(rank.into(), world_size.into())?;
        let method = rendezvous::parse_init_method(&options.init_method)?;
        crate::runtime::start()?;
        let security = options.security()?;
        distrpc_wire::ops::set_max_elements(options.max_builtin_elements);
        let bound =
            crate::runtime::block_on(rendezvous::bind(&method, rank, options.listen_ip, security))?;
        Ok(PendingRpc {
            name: name.to_string(),
            rank,
            world,
            options,
            bound,
        })
    }

    /// The worker whose function is running on this thread or task, inside a handler; `None`
    /// elsewhere. Handlers use it to make nested calls.
    pub fn current() -> Option<Rpc> {
        let current = crate::server::current::current()?;
        let shared = current.api.upgrade()?.downcast::<Shared>().ok()?;
        Some(Rpc { shared })
    }

    fn node(&self) -> &Node {
        &self.shared.node
    }

    /// This worker (torch's `get_worker_info()`).
    pub fn worker_info(&self) -> &WorkerInfo {
        &self.node().transport.me
    }

    /// Another worker, by name or rank (torch's `get_worker_info(name)`).
    pub fn worker_info_of(&self, to: impl Into<To>) -> Result<WorkerInfo, Error> {
        let transport = &self.node().transport;
        let rank = transport.resolve(&to.into())?;
        Ok(transport.group.workers[rank as usize].clone())
    }

    /// The open connection to `to`, for a thread waiting for the replies of calls to it to
    /// read them itself ([`Origin::serve`](crate::server::foreign::Origin::serve)); `None` if
    /// none is open (nothing is dialed), `to` is this worker or unknown.
    pub fn connection_to(&self, to: impl Into<To>) -> Option<crate::server::foreign::Origin> {
        let transport = &self.node().transport;
        let rank = transport.resolve(&to.into()).ok()?;
        let conn = transport.open_connection(rank)?;
        Some(crate::server::foreign::Origin::new(transport, &conn))
    }

    /// Every worker of the group, by rank.
    pub fn worker_infos(&self) -> &[WorkerInfo] {
        &self.node().transport.group.workers
    }

    /// This worker's name.
    pub fn name(&self) -> &str {
        &self.node().transport.me.name
    }

    /// This worker's rank.
    pub fn rank(&self) -> u32 {
        self.node().transport.me.id
    }

    /// Number of workers in the group.
    pub fn world_size(&self) -> usize {
        self.node().transport.group.workers.len()
    }

    /// The address this worker accepts peers on.
    pub fn listen_addr(&self) -> SocketAddr {
        self.shared.listen_addr
    }

    /// The default timeout of calls (torch's `get_rpc_timeout`).
    pub fn rpc_timeout(&self) -> Duration {
        self.node().client.default_timeout()
    }

    /// Sets the default timeout of calls; zero means none (torch's `_set_rpc_timeout`).
    pub fn set_rpc_timeout(&self, timeout: Duration) {
        self.node().client.set_default_timeout(timeout);
    }

    /// Calls `f` on `to` and waits for its result, within the default timeout.
    ///
    /// Fails with the callee's error ([`Error::Remote`]), [`Error::Timeout`],
    /// [`Error::PeerGone`] if `to` dies first, or [`Error::UnknownFunction`] /
    /// [`Error::Decode`] if `to` has no such function or other argument types.
    pub fn rpc_sync<A, R, L>(
        &self,
        to: impl Into<To>,
        f: impl Borrow<Function<A, R, L>>,
        args: A,
    ) -> Result<R, Error>
    where
        A: Serialize,
        R: DeserializeOwned + Send + 'static,
    {
        self.call(
            to.into(),
            f.borrow().name(),
            &args,
            None,
            Delivery::Blocking,
        )
        .wait()
    }

    /// [`Rpc::rpc_sync`] with its own timeout (zero: none).
    pub fn rpc_sync_timeout<A, R, L>(
        &self,
        to: impl Into<To>,
        f: impl Borrow<Function<A, R, L>>,
        args: A,
        timeout: Duration,
    ) -> Result<R, Error>
    where
        A: Serialize,
        R: DeserializeOwned + Send + 'static,
    {
        self.call(
            to.into(),
            f.borrow().name(),
            &args,
            Some(timeout),
            Delivery::Blocking,
        )
        .wait()
    }

    /// Calls `f` on `to` without waiting; the future completes with the result or the error.
    /// The arguments are encoded before this returns.
    pub fn rpc_async<A, R, L>(
        &self,
        to: impl Into<To>,
        f: impl Borrow<Function<A, R, L>>,
        args: A,
    ) -> RpcFuture<R>
    where
        A: Serialize,
        R: DeserializeOwned + Send + 'static,
    {
        self.call(to.into(), f.borrow().name(), &args, None, Delivery::Queued)
    }

    /// [`Rpc::rpc_async`] with its own timeout (zero: none).
    pub fn rpc_async_timeout<A, R, L>(
        &self,
        to: impl Into<To>,
        f: impl Borrow<Function<A, R, L>>,
        args: A,
        timeout: Duration,
    ) -> RpcFuture<R>
    where
        A: Serialize,
        R: DeserializeOwned + Send + 'static,
    {
        self.call(
            to.into(),
            f.borrow().name(),
            &args,
            Some(timeout),
            Delivery::Queued,
        )
    }

    fn call<A: Serialize, R: DeserializeOwned + Send + 'static>(
        &self,
        to: To,
        function: &str,
        args: &A,
        timeout: Option<Duration>,
        delivery: Delivery,
    ) -> RpcFuture<R> {
        match self.node().transport.resolve(&to) {
            Ok(dest) => {
                let call = TypedCall {
                    dest,
                    prefix: &[],
                    flags: 0,
                    function,
                    timeout,
                    internal: false,
                    delivery,
                };
                self.node().client.call_typed(call, args)
            }
            Err(e) => RpcFuture::ready(Err(e)),
        }
    }

    /// A call whose arguments the caller encoded itself ([`RawCall`]): how a front calls — a
    /// pickled Python function, run by the callee's foreign handler for pickles
    /// ([`RpcOptions::foreign`]), or MessagePack arguments for a Rust function by name. Waits
    /// for the encoded reply (`None`: the default timeout). A callee with no handler for the
    /// codec answers [`Error::UnsupportedCodec`].
    ///
    /// ```
    /// use distrpc::{Codec, RawCall, Rpc, RpcOptions};
    ///
    /// #[distrpc::function]
    /// fn add(a: i64, b: i64) -> i64 { a + b }
    ///
    /// let rpc = Rpc::init("w0", 0, 1, RpcOptions::default().init_method("tcp://127.0.0.1:0"))?;
    /// let call = RawCall {
    ///     codec: Codec::MessagePack,
    ///     function: add.name().to_string(),
    ///     payload: rmp_serde::to_vec(&(2i64, 3i64)).unwrap(),
    ///     tensors: vec![],
    /// };
    /// let reply = rpc.rpc_sync_raw("w0", call, None)?;
    /// assert_eq!(rmp_serde::from_slice::<i64>(&reply.payload).unwrap(), 5);
    /// rpc.shutdown()?;
    /// # Ok::<(), distrpc::Error>(())
    /// ```
    pub fn rpc_sync_raw(
        &self,
        to: impl Into<To>,
        call: RawCall,
        timeout: Option<Duration>,
    ) -> Result<RawReply, Error> {
        self.raw(to.into(), 0, call, timeout, Delivery::Blocking)
            .wait()
    }

    /// [`Rpc::rpc_sync_raw`] as a future that the calling thread is about to wait on (with
    /// [`RpcFuture::wait`] or, to look up between waits, [`RpcFuture::wait_timeout`]): the
    /// waiting thread reads its own reply, as `rpc_sync` does.
    pub fn rpc_sync_raw_future(
        &self,
        to: impl Into<To>,
        call: RawCall,
        timeout: Option<Duration>,
    ) -> RpcFuture<RawReply> {
        self.raw(to.into(), 0, call, timeout, Delivery::Blocking)
    }

    /// `remote()` of a [`RawCall`]: the callee's front keeps the result (a Python object) behind
    /// the returned reference; `T` only types the handle. See [`RRef::to_here_raw`] and
    /// [`RRef::rpc_sync_raw`].
    pub fn remote_raw<T>(
        &self,
        to: impl Into<To>,
        call: RawCall,
        timeout: Option<Duration>,
    ) -> RRef<T> {
        let rrefs = &self.node().rrefs;
        match self.node().transport.resolve(&to.into()) {
            Ok(dest) => crate::rref::raw_remote::<(), T>(rrefs, dest, call, None, timeout),
            Err(e) => RRef::invalid(rrefs, e),
        }
    }

    /// A reference owned by this worker to a value a front holds (a Python object, torch's
    /// `RRef(value)`); the front's `Value::encode` encodes it when it is fetched.
    pub fn rref_value<T>(&self, value: Arc<dyn crate::server::value::Value>) -> RRef<T> {
        crate::rref::local_raw(&self.node().rrefs, value)
    }

    /// The reference a front received in a message it decodes itself: `fork` (made by
    /// [`RRef::fork_raw`]) from worker `from`. Before running a function that received it,
    /// wait for [`RRef::wait_confirmed`].
    pub fn rref_from_fork<T>(&self, fork: &[u8], from: u32) -> Result<RRef<T>, Error> {
        crate::rref::from_fork(&self.node().rrefs, fork, from)
    }

    /// [`Rpc::rpc_sync_raw`] without waiting.
    pub fn rpc_async_raw(
        &self,
        to: impl Into<To>,
        call: RawCall,
        timeout: Option<Duration>,
    ) -> RpcFuture<RawReply> {
        self.raw(to.into(), 0, call, timeout, Delivery::Queued)
    }

    /// [`Rpc::rpc_async_raw`], written from the calling thread when the connection is idle
    /// (sparing the wake-up of its writer task), for a caller with no other call in flight that
    /// will soon wait for this one; callers that pipeline batch better through
    /// [`Rpc::rpc_async_raw`], whose writer task gathers what accumulates into one `writev`.
    pub fn rpc_async_raw_direct(
        &self,
        to: impl Into<To>,
        call: RawCall,
        timeout: Option<Duration>,
    ) -> RpcFuture<RawReply> {
        self.raw(to.into(), 0, call, timeout, Delivery::Direct)
    }

    /// [`Rpc::rpc_async_raw_direct`] of a call nobody waits on soon (a distributed autograd
    /// context's release): the callee sends its answer with its next frame to this worker, or
    /// within its watch's tick (about 10 ms), as a control message's acknowledgement — not in
    /// a write of its own that wakes a thread here for it.
    pub fn rpc_async_raw_answered_later(
        &self,
        to: impl Into<To>,
        call: RawCall,
        timeout: Option<Duration>,
    ) -> RpcFuture<RawReply> {
        let flags = crate::server::FLAG_ANSWER_LATER;
        self.raw(to.into(), flags, call, timeout, Delivery::Direct)
    }

    /// Sends `call` to `to` in a frame with `flags`, as `delivery` says.
    fn raw(
        &self,
        to: To,
        flags: u16,
        call: RawCall,
        timeout: Option<Duration>,
        delivery: Delivery,
    ) -> RpcFuture<RawReply> {
        match self.node().transport.resolve(&to) {
            Ok(dest) => {
                let client = &self.node().client;
                client.call_raw_on(dest, &[], flags, call, timeout, delivery)
            }
            Err(e) => RpcFuture::ready(Err(e)),
        }
    }

    /// Runs `f` on `to` and keeps its result there, behind the returned remote reference
    /// (torch's `remote`). Returns at once; creation errors surface when the reference is used.
    /// To self, the result is an owner reference.
    pub fn remote<A, R, L>(
        &self,
        to: impl Into<To>,
        f: impl Borrow<Function<A, R, L>>,
        args: A,
    ) -> RRef<R>
    where
        A: Serialize,
        R: Send + Sync + 'static,
    {
        self.remote_timeout(to, f, args, self.rpc_timeout())
    }

    /// [`Rpc::remote`] with its own creation timeout (zero: none). A creation that is not
    /// confirmed in time makes every use of the reference fail with [`Error::RRefCreation`].
    pub fn remote_timeout<A, R, L>(
        &self,
        to: impl Into<To>,
        f: impl Borrow<Function<A, R, L>>,
        args: A,
        timeout: Duration,
    ) -> RRef<R>
    where
        A: Serialize,
        R: Send + Sync + 'static,
    {
        let rrefs = &self.node().rrefs;
        let dest = match self.node().transport.resolve(&to.into()) {
            Ok(d) => d,
            // An unknown worker cannot own anything: every use of the reference says so.
            Err(e) => return RRef::invalid(rrefs, e),
        };
        let name = f.borrow().name();
        RRef::create(rrefs, dest, name, &args, None, Some(timeout))
    }

    /// A reference to `value`, owned by this worker (torch's `RRef(value)`).
    pub fn rref<T: Serialize + Send + Sync + 'static>(&self, value: T) -> RRef<T> {
        RRef::from_inner(crate::rref::remote::local(&self.node().rrefs, value))
    }

    /// Gathers `value` from every worker; each gets the same map from name to value (torch's
    /// `_all_gather`). Blocks until all have called it, within the default timeout.
    pub fn all_gather<T: Serialize + DeserializeOwned>(
        &self,
        value: &T,
    ) -> Result<BTreeMap<String, T>, Error> {
        crate::collective::all_gather(&self.node().gather, value, None, None)
    }

    /// [`Rpc::all_gather`] among the workers named in `names` only, with a timeout (zero: none).
    pub fn all_gather_among<T: Serialize + DeserializeOwned>(
        &self,
        value: &T,
        names: &[&str],
        timeout: Duration,
    ) -> Result<BTreeMap<String, T>, Error> {
        crate::collective::all_gather(&self.node().gather, value, Some(names), Some(timeout))
    }

    /// Blocks until every worker named in `names` has reached this barrier (torch's `_barrier`).
    pub fn barrier(&self, names: &[&str]) -> Result<(), Error> {
        crate::collective::barrier(&self.node().gather, Some(names), Some(self.rpc_timeout()))
    }

    /// Graceful shutdown with no time limit (torch's `shutdown()`): see [`Rpc::shutdown_timeout`].
    pub fn shutdown(&self) -> Result<(), Error> {
        self.shutdown_timeout(Duration::ZERO)
    }

    /// Graceful shutdown: waits until every worker has called shutdown, then until no call is
    /// in flight anywhere in the group, then stops. This worker keeps serving until then, so
    /// no call accepted before the barrier is lost. With a non-zero `timeout`, fails (and stops
    /// locally) when that runs out. Afterwards every call fails with [`Error::ShutDown`].
    pub fn shutdown_timeout(&self, timeout: Duration) -> Result<(), Error> {
        let node = self.node();
        if !node.client.is_running() {
            return Err(node.client.shut_down_error());
        }
        if crate::runtime::on_runtime_thread() {
            return Err(Error::WouldBlock);
        }
        let result = node.shutdown_graceful(timeout);
        self.shutdown_local();
        let held = result?;
        if self.shared.check_rref_leaks && !held.is_empty() {
            return Err(Error::RRefLeak {
                worker: node.transport.me.name.clone(),
                references: held
                    .iter()
                    .map(|(r, f)| format!("UserRRef(rref_id={}, fork_id={})", r.0, f.0))
                    .collect(),
            });
        }
        Ok(())
    }

    /// Stops this worker at once, without waiting for the others (torch's
    /// `shutdown(graceful=False)`). Calls in flight fail with [`Error::ShutDown`].
    pub fn shutdown_local(&self) {
        self.shared.stop();
    }

    /// Whether this worker still makes and serves calls.
    pub fn is_running(&self) -> bool {
        self.node().client.is_running()
    }

    /// torch's agent metrics: `agent.thread_pool_size`, `agent.num_idle_threads`,
    /// `agent.client_active_calls`, `agent.server_active_calls`,
    /// `agent.server_active_async_calls`; torch's reference counts `num_owner_rrefs`,
    /// `num_pending_users`, `num_forks`, `num_pending_futures`; and distrpc's own:
    /// `num_user_rrefs`, `num_owner_values`, `agent.inline_handler_runs` (sync functions that,
    /// being quick so far, ran on the connection's reader instead of the pool) and
    /// `agent.reader_hand_offs` (such runs that blocked, so that another task took over
    /// reading) and `agent.frames_read_waiting` (frames that an idle pool thread, or a front's
    /// thread waiting for work, read from a connection itself) and `agent.claims_taken_back`
    /// (connections such a thread kept while it ran a call it read there, taken back because
    /// the call ran longer than a tick). See [`Metrics`] for reading them.
    pub fn metrics(&self) -> Metrics {
        Metrics(
            self.node()
                .metrics()
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
        )
    }
}
