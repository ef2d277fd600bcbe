//! The agent: connections to peers, the table of calls waiting for a reply, timeouts, and
//! dispatch of incoming calls to handlers.
//!
//! ```text
//!  caller thread ── call() ─► pending[id] ──► Connection queue ──► writer ──► peer
//!  peer ──► reader ── Result/Exception ─► take pending[id] ─► complete the RpcFuture
//!                  └─ Call ─► registry ─► pool (sync) / task (async) / inline ─► reply
//!  timer task ── deadline passed ─► take pending[id] ─► Timeout
//!  reader/writer ends ─► fail every pending call on that connection ─► PeerGone
//! ```
//!
//! Every pending call leaves the table exactly once, through `take_pending`: by its reply, its
//! timeout, the loss of its connection, a failed send, or shutdown. So every future completes.

use crate::sync::{lock, wait_until};
use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, Weak};
use std::time::Duration;

use bytes::Bytes;
use distrpc_wire::{Frame, Kind, Limits, OutFrame, Tensor};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Handle;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::connection::{Connection, FrameReader, ReadEnd, ReadSide, Step};
use crate::error::{Error, Failure};
use crate::function::{Handler, HandlerKind, Outcome, Produced, Registry, Reply, Request};
use crate::future::RpcFuture;
use crate::options::FaultInjection;
use crate::pool::Pool;
use crate::rref::context::Context as RRefs;
use crate::rref::{Control, Effect, ForkId, RRefId, get_id};
use crate::worker::{To, WorkerInfo};

/// Connection id of calls to self, which never touch a socket.
const LOCAL: u64 = 0;
/// How long an accepted connection may take to say who it is.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long connecting to a peer may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long shutdown waits for writers to flush.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// Frame flag of a call (or remote call) on the value of a remote reference.
pub(crate) const FLAG_METHOD: u16 = 1;
/// How long one attempt of a reference control message may take before it is retried.
const CONTROL_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);

const RUNNING: u8 = 0;
const SHUT_DOWN: u8 = 2;

type Done = Box<dyn FnOnce(Result<Frame, Error>) + Send>;

struct Pending {
    conn: u64,
    peer: u32,
    function: String,
    started: std::time::Instant,
    deadline: Option<(Instant, Duration)>,
    internal: bool,
    done: Done,
}

#[derive(Default)]
struct Peer {
    conn: Option<Arc<Connection>>,
    gone: Option<String>,
}

#[derive(Default, Debug, Clone, Copy)]
pub(crate) struct Counts {
    /// Calls this worker's user code is waiting on (torch's `client_active_calls`).
    pub(crate) client: usize,
    /// distrpc's own calls (gather, barrier) in flight.
    pub(crate) client_internal: usize,
    /// Sync and inline handlers queued or running.
    pub(crate) server: usize,
    /// Async handlers running.
    pub(crate) server_async: usize,
    /// Reference control messages not yet acknowledged (torch's `num_pending_futures`).
    pub(crate) control: usize,
}

/// Everything the agent needs that rendezvous produced.
pub(crate) struct AgentConfig {
    pub(crate) me: WorkerInfo,
    pub(crate) group: Arc<crate::rendezvous::Group>,
    pub(crate) registry: Registry,
    pub(crate) num_worker_threads: usize,
    pub(crate) rpc_timeout: Duration,
    pub(crate) limits: Limits,
    pub(crate) faults: FaultInjection,
    pub(crate) busy_poll: Duration,
    pub(crate) gather: Arc<crate::gather::Gather>,
}

pub(crate) struct Agent {
    pub(crate) me: WorkerInfo,
    /// Remote references owned or used here.
    pub(crate) rrefs: RRefs,
    /// Every worker of the group (shared with the other workers of this process in it).
    pub(crate) group: Arc<crate::rendezvous::Group>,
    registry: Registry,
    pool: Pool,
    limits: Limits,
    faults: FaultInjection,
    /// How long blocking waits on this worker's calls spin before parking.
    pub(crate) busy_poll: Duration,
    default_timeout_us: AtomicU64,
    next_id: AtomicU64,
    next_conn: AtomicU64,
    /// Sync handlers run inline on a reader task, and reader hand-offs (inline handlers that
    /// blocked): metrics that show the fast path at work.
    inline_runs: AtomicU64,
    hand_offs: AtomicU64,
    peers: Mutex<Vec<Peer>>,
    conns: Mutex<HashMap<u64, Arc<Connection>>>,
    pending: Mutex<HashMap<u64, Pending>>,
    deadlines: Mutex<Deadlines>,
    deadline_changed: Notify,
    counts: Mutex<Counts>,
    counts_changed: Condvar,
    state: AtomicU8,
    cancel: CancellationToken,
    tasks: TaskTracker,
    /// Connection writers, apart so that shutdown can wait for them to flush.
    writers: TaskTracker,
    rt: Handle,
    /// The user-facing handle, for `Rpc::current()` inside handlers.
    pub(crate) rpc: OnceLock<Weak<crate::rpc::Shared>>,
    /// Woken whenever a peer is lost, so that gathers waiting on it fail at once.
    gather: Arc<crate::gather::Gather>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent").field("me", &self.me).finish()
    }
}

impl Agent {
    pub(crate) fn new(config: AgentConfig, rt: Handle) -> Arc<Self> {
        let peers = config
            .group
            .workers
            .iter()
            .map(|_| Peer::default())
            .collect();
        let agent = Arc::new(Self {
            rrefs: RRefs::new(config.me.id),
            pool: Pool::new(
                config.num_worker_threads,
                format!("distrpc-{}", config.me.name),
            ),
            me: config.me,
            group: config.group,
            registry: config.registry,
            limits: config.limits,
            faults: config.faults,
            busy_poll: config.busy_poll,
            default_timeout_us: AtomicU64::new(duration_us(config.rpc_timeout)),
            next_id: AtomicU64::new(1),
            next_conn: AtomicU64::new(LOCAL + 1),
            inline_runs: AtomicU64::new(0),
            hand_offs: AtomicU64::new(0),
            peers: Mutex::new(peers),
            conns: Mutex::new(HashMap::new()),
            pending: Mutex::new(HashMap::new()),
            deadlines: Mutex::new(Deadlines::default()),
            deadline_changed: Notify::new(),
            counts: Mutex::new(Counts::default()),
            counts_changed: Condvar::new(),
            state: AtomicU8::new(RUNNING),
            cancel: CancellationToken::new(),
            tasks: TaskTracker::new(),
            writers: TaskTracker::new(),
            rt,
            rpc: OnceLock::new(),
            gather: config.gather,
        });
        let timer = agent.clone();
        agent
            .tasks
            .spawn_on(async move { timer.run_timer().await }, &agent.rt);
        agent
    }

    /// Starts accepting peers on `listener`.
    pub(crate) fn serve(self: &Arc<Self>, listener: TcpListener) {
        let agent = self.clone();
        self.tasks.spawn_on(
            async move {
                loop {
                    tokio::select! {
                        _ = agent.cancel.cancelled() => return,
                        accepted = listener.accept() => match accepted {
                            Ok((stream, addr)) => {
                                let a = agent.clone();
                                agent.tasks.spawn_on(async move { a.handshake(stream, addr).await }, &agent.rt);
                            }
                            Err(e) => tracing::warn!(worker = %agent.me.name, error = %e, "accept failed"),
                        },
                    }
                }
            },
            &self.rt,
        );
    }

    pub(crate) fn is_running(&self) -> bool {
        self.state.load(Ordering::Acquire) == RUNNING
    }

    pub(crate) fn shut_down_error(&self) -> Error {
        Error::ShutDown {
            worker: self.me.name.clone(),
        }
    }

    pub(crate) fn default_timeout(&self) -> Duration {
        Duration::from_micros(self.default_timeout_us.load(Ordering::Relaxed))
    }

    pub(crate) fn set_default_timeout(&self, timeout: Duration) {
        self.default_timeout_us
            .store(duration_us(timeout), Ordering::Relaxed);
    }

    /// The rank of a destination.
    /// The rank of the worker named `name`.
    pub(crate) fn rank_of(&self, name: &str) -> Option<u32> {
        self.group.by_name.get(name).copied()
    }

    pub(crate) fn resolve(&self, to: &To) -> Result<u32, Error> {
        match to {
            To::Name(name) => self
                .rank_of(name)
                .ok_or_else(|| Error::UnknownWorker(format!("{name:?}"))),
            To::Rank(r) if (*r as usize) < self.group.workers.len() => Ok(*r),
            To::Rank(r) => Err(Error::UnknownWorker(format!(
                "rank {r} (world size is {})",
                self.group.workers.len()
            ))),
        }
    }

    pub(crate) fn name_of(&self, rank: u32) -> &str {
        self.group
            .workers
            .get(rank as usize)
            .map_or("<unknown>", |w| w.name.as_str())
    }

    /// Whether `rank` is known to be gone, and why.
    pub(crate) fn gone(&self, rank: u32) -> Option<String> {
        lock(&self.peers).get(rank as usize)?.gone.clone()
    }

    pub(crate) fn counts(&self) -> Counts {
        *lock(&self.counts)
    }

    /// Waits until no user call of this worker is in flight, or `deadline` passes.
    pub(crate) fn wait_no_client_calls(&self, deadline: Option<std::time::Instant>) -> bool {
        let mut counts = lock(&self.counts);
        while counts.client + counts.control > 0 {
            match wait_until(&self.counts_changed, counts, deadline) {
                Ok(c) => counts = c,
                Err(_) => return false,
            }
        }
        true
    }

    /// Sends `out`; `done` receives the reply frame or the error. For a `blocking` call made
    /// from a plain thread, returns the caller's [`Claim`] on the connection when it could
    /// take it: waiting through it reads the reply on the caller's own thread.
    pub(crate) fn call(self: &Arc<Self>, out: Outgoing<'_>, done: Done) -> Option<Claim> {
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
        let state = self.state.load(Ordering::Acquire);
        if state != RUNNING && !(internal && state != SHUT_DOWN) {
            done(Err(self.shut_down_error()));
            return None;
        }
        let timeout = timeout.unwrap_or_else(|| self.default_timeout());
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let conn = if dest == self.me.id {
            None
        } else {
            match self.connection(dest) {
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
                        worker: self.name_of(dest).to_string(),
                        reason: e.to_string(),
                    }));
                    return None;
                }
            },
            None => None,
        };
        let deadline = (!timeout.is_zero()).then(|| (Instant::now() + timeout, timeout));
        self.register(
            id,
            Pending {
                conn: conn.as_ref().map_or(LOCAL, |c| c.id),
                peer: dest,
                function: function.to_string(),
                started: std::time::Instant::now(),
                deadline,
                internal,
                done,
            },
        );
        if self.faults.should_fail(kind) {
            self.fail(id, |p| Error::Injected {
                worker: self.name_of(p.peer).into(),
                kind,
            });
            return None;
        }
        // Claimed before the request leaves, so that the reply cannot reach the reader task.
        let claim = match &conn {
            Some(c) if delivery == Delivery::Blocking && !crate::runtime::on_runtime_thread() => {
                c.read.get().filter(|r| r.claim()).map(|read| Claim {
                    agent: self.clone(),
                    conn: c.clone(),
                    read: read.clone(),
                    deadline: deadline.map(|(at, _)| at.into_std()),
                })
            }
            _ => None,
        };
        let send = {
            let agent = self.clone();
            move || match (conn, frame) {
                (Some(conn), Some(frame)) => {
                    if let Err(reason) = conn.send(frame, delivery != Delivery::Queued) {
                        agent.fail(id, |p| Error::PeerGone {
                            worker: agent.name_of(p.peer).into(),
                            reason,
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
                    let me = agent.me.id;
                    let _ = agent.on_request(ReplyTo::Local, frame, me);
                }
            }
        };
        match self.faults.delay_of(kind) {
            Some(delay) => {
                self.tasks.spawn_on(
                    async move {
                        tokio::time::sleep(delay).await;
                        send();
                    },
                    &self.rt,
                );
            }
            None => send(),
        }
        claim
    }

    fn register(&self, id: u64, pending: Pending) {
        {
            let mut counts = lock(&self.counts);
            if pending.internal {
                counts.client_internal += 1;
            } else {
                counts.client += 1;
            }
        }
        if let Some((at, _)) = pending.deadline {
            let mut deadlines = lock(&self.deadlines);
            deadlines.set.insert((at, id));
            // Wake the timer only if it would sleep past this deadline: not for the common
            // call whose deadline comes after that of the call before it.
            let sooner = deadlines.armed.is_none_or(|armed| at < armed);
            if sooner {
                deadlines.armed = Some(at);
            }
            drop(deadlines);
            if sooner {
                self.deadline_changed.notify_one();
            }
        }
        lock(&self.pending).insert(id, pending);
    }

    /// Removes a pending call, if it is still pending, keeping the counts and deadlines in step.
    fn take_pending(&self, id: u64, conn: Option<u64>) -> Option<Pending> {
        let p = {
            let mut pending = lock(&self.pending);
            match pending.get(&id) {
                Some(p) if conn.is_none_or(|c| c == p.conn) => pending.remove(&id),
                _ => None,
            }
        }?;
        if let Some((at, _)) = p.deadline {
            lock(&self.deadlines).set.remove(&(at, id));
        }
        let mut counts = lock(&self.counts);
        if p.internal {
            counts.client_internal -= 1;
        } else {
            counts.client -= 1;
        }
        if counts.client + counts.control == 0 {
            self.counts_changed.notify_all();
        }
        Some(p)
    }

    fn fail(&self, id: u64, error: impl FnOnce(&Pending) -> Error) {
        if let Some(p) = self.take_pending(id, None) {
            let e = error(&p);
            (p.done)(Err(e));
        }
    }

    async fn run_timer(self: Arc<Self>) {
        loop {
            let next = {
                let mut deadlines = lock(&self.deadlines);
                deadlines.armed = deadlines.set.first().map(|(t, _)| *t);
                deadlines.armed
            };
            let changed = self.deadline_changed.notified();
            tokio::select! {
                _ = self.cancel.cancelled() => return,
                _ = changed => {}
                _ = async {
                    match next {
                        Some(t) => tokio::time::sleep_until(t).await,
                        None => std::future::pending().await,
                    }
                } => {}
            }
            let now = Instant::now();
            let expired: Vec<u64> = {
                let mut deadlines = lock(&self.deadlines);
                let mut ids = Vec::new();
                while let Some(&(t, id)) = deadlines.set.first() {
                    if t > now {
                        break;
                    }
                    deadlines.set.pop_first();
                    ids.push(id);
                }
                ids
            };
            for id in expired {
                self.fail(id, |p| Error::Timeout {
                    worker: self.name_of(p.peer).to_string(),
                    function: p.function.clone(),
                    timeout: p.deadline.map_or(Duration::ZERO, |(_, d)| d),
                    elapsed: p.started.elapsed(),
                });
            }
        }
    }

    /// The connection to `rank`, opening it if there is none.
    fn connection(self: &Arc<Self>, rank: u32) -> Result<Arc<Connection>, Error> {
        let mut peers = lock(&self.peers);
        let peer = peers
            .get_mut(rank as usize)
            .ok_or_else(|| Error::UnknownWorker(format!("rank {rank}")))?;
        if let Some(reason) = &peer.gone {
            return Err(Error::PeerGone {
                worker: self.name_of(rank).to_string(),
                reason: reason.clone(),
            });
        }
        if let Some(conn) = &peer.conn {
            return Ok(conn.clone());
        }
        let conn = Connection::new(self.next_conn.fetch_add(1, Ordering::Relaxed), rank);
        // The hello is queued before the connection is visible to other callers, so that it is
        // always the first frame the peer reads.
        let hello = crate::codec::encode_inline(&(self.me.id, &self.me.name))
            .map_err(|e| Error::InvalidArgument(e.to_string()))
            .and_then(|p| {
                OutFrame::new(Kind::Hello, 0, &p, &[])
                    .map_err(|e| Error::InvalidArgument(e.to_string()))
            })?;
        let _ = conn.send(hello, false);
        peer.conn = Some(conn.clone());
        drop(peers);
        lock(&self.conns).insert(conn.id, conn.clone());
        let agent = self.clone();
        let addr = self.group.addrs[rank as usize];
        let c = conn.clone();
        self.tasks.spawn_on(
            async move {
                match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
                    Ok(Ok(stream)) => agent.start_io(c, stream),
                    Ok(Err(e)) => agent.on_closed(&c, ReadEnd::Io(e)),
                    Err(_) => agent.on_closed(
                        &c,
                        ReadEnd::Io(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            format!("connecting to {addr} took more than {CONNECT_TIMEOUT:?}"),
                        )),
                    ),
                }
            },
            &self.rt,
        );
        Ok(conn)
    }

    /// An accepted connection: it must introduce itself with a Hello before anything else.
    async fn handshake(self: Arc<Self>, stream: TcpStream, addr: SocketAddr) {
        let (r, w) = stream.into_split();
        let mut reader = FrameReader::new(self.limits);
        let hello = tokio::select! {
            _ = self.cancel.cancelled() => return,
            h = tokio::time::timeout(HELLO_TIMEOUT, reader.next(&r)) => h,
        };
        let rank = match hello {
            Ok(Ok(frame)) if frame.kind == Kind::Hello => {
                match crate::codec::decode_inline::<(u32, String)>(&frame.payload) {
                    Ok((rank, name))
                        if self
                            .group
                            .workers
                            .get(rank as usize)
                            .is_some_and(|w| w.name == name) =>
                    {
                        rank
                    }
                    Ok((rank, name)) => {
                        tracing::error!(%addr, rank, %name, "connection introduced itself as an unknown worker; closed");
                        return;
                    }
                    Err(e) => {
                        tracing::error!(%addr, error = %e, "malformed hello; connection closed");
                        return;
                    }
                }
            }
            Ok(Ok(frame)) => {
                tracing::error!(%addr, kind = ?frame.kind, "first frame was not a hello; connection closed");
                return;
            }
            Ok(Err(ReadEnd::Closed)) => return,
            Ok(Err(e)) => {
                tracing::error!(%addr, error = %e, "connection closed before its hello");
                return;
            }
            Err(_) => {
                tracing::error!(%addr, "no hello within {HELLO_TIMEOUT:?}; connection closed");
                return;
            }
        };
        let conn = Connection::new(self.next_conn.fetch_add(1, Ordering::Relaxed), rank);
        {
            let mut peers = lock(&self.peers);
            if let Some(peer) = peers.get_mut(rank as usize)
                && peer.conn.is_none()
                && peer.gone.is_none()
            {
                peer.conn = Some(conn.clone());
            }
        }
        lock(&self.conns).insert(conn.id, conn.clone());
        self.spawn_halves(conn, r, reader, w);
    }

    fn start_io(self: &Arc<Self>, conn: Arc<Connection>, stream: TcpStream) {
        let (r, w) = stream.into_split();
        self.spawn_halves(conn, r, FrameReader::new(self.limits), w);
    }

    fn spawn_halves(
        self: &Arc<Self>,
        conn: Arc<Connection>,
        r: tokio::net::tcp::OwnedReadHalf,
        frames: FrameReader,
        w: tokio::net::tcp::OwnedWriteHalf,
    ) {
        if let Err(e) = w.as_ref().set_nodelay(true) {
            tracing::warn!(error = %e, "cannot set TCP_NODELAY");
        }
        let read = ReadSide::new(r, frames);
        let _ = conn.read.set(read.clone());
        let (agent, c) = (self.clone(), conn.clone());
        self.writers.spawn_on(
            async move {
                if let Err(e) = c.write_loop(w).await {
                    agent.on_closed(&c, ReadEnd::Io(e));
                }
            },
            &self.rt,
        );
        self.spawn_reader(conn, read);
    }

    /// Starts the task that reads `conn` whenever no blocked caller has claimed it.
    fn spawn_reader(self: &Arc<Self>, conn: Arc<Connection>, read: Arc<ReadSide>) {
        let agent = self.clone();
        self.tasks.spawn_on(
            async move {
                // If a handler run inline blocks, a new task takes over reading (and this one
                // stops once the handler is done).
                let hand_off: crate::runtime::HandOff = {
                    let (agent, conn, read) = (agent.clone(), conn.clone(), read.clone());
                    Arc::new(move || {
                        agent.hand_offs.fetch_add(1, Ordering::Relaxed);
                        agent.spawn_reader(conn.clone(), read.clone());
                    })
                };
                let spin = agent.busy_poll;
                let mut idle_since: Option<std::time::Instant> = None;
                let end = loop {
                    match read.step(false) {
                        Step::Frame(frame) => {
                            idle_since = None;
                            let (handled, handed_off) =
                                crate::runtime::as_reader(&hand_off, || {
                                    agent.on_frame(&conn, frame)
                                });
                            if let Err(e) = handled {
                                break ReadEnd::Malformed(e);
                            }
                            if handed_off {
                                return;
                            }
                        }
                        Step::Ended(Some(end)) => break end,
                        Step::Ended(None) => return,
                        Step::Idle
                            if !spin.is_zero()
                                && idle_since
                                    .get_or_insert_with(std::time::Instant::now)
                                    .elapsed()
                                    < spin =>
                        {
                            // The latency option: look again instead of sleeping until woken
                            // (letting this thread's other tasks run in between).
                            tokio::task::yield_now().await;
                        }
                        Step::Idle | Step::Claimed => {
                            idle_since = None;
                            tokio::select! {
                                _ = agent.cancel.cancelled() => break ReadEnd::Closed,
                                r = read.wait() => if let Err(e) = r {
                                    break ReadEnd::Io(e);
                                },
                            }
                        }
                    }
                };
                agent.on_closed(&conn, end);
            },
            &self.rt,
        );
    }

    /// A connection ended: forget it, mark the peer gone, fail what waited on it.
    fn on_closed(&self, conn: &Arc<Connection>, end: ReadEnd) {
        let worker = self.name_of(conn.peer).to_string();
        let running = self.is_running();
        match &end {
            ReadEnd::Malformed(e) => {
                tracing::error!(worker = %self.me.name, peer = %worker, error = %e, "closing connection")
            }
            _ if running => {
                tracing::debug!(worker = %self.me.name, peer = %worker, reason = %end, "connection closed")
            }
            _ => {}
        }
        let reason = end.to_string();
        conn.close(&reason);
        // Whoever reads next (the reader task, a claimant) stops.
        if let Some(read) = conn.read.get() {
            read.end();
        }
        lock(&self.conns).remove(&conn.id);
        {
            let mut peers = lock(&self.peers);
            if let Some(peer) = peers.get_mut(conn.peer as usize)
                && peer.conn.as_ref().is_some_and(|c| Arc::ptr_eq(c, conn))
            {
                peer.conn = None;
                peer.gone.get_or_insert(reason.clone());
            }
        }
        let ids: Vec<u64> = lock(&self.pending)
            .iter()
            .filter(|(_, p)| p.conn == conn.id)
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            self.fail(id, |_| Error::PeerGone {
                worker: worker.clone(),
                reason: reason.clone(),
            });
        }
        self.gather.wake();
    }

    /// Handles one frame from a peer. An `Err` is a protocol violation: the connection closes.
    fn on_frame(self: &Arc<Self>, conn: &Arc<Connection>, frame: Frame) -> Result<(), String> {
        match frame.kind {
            Kind::Result
            | Kind::RemoteResult
            | Kind::RRefFetchResult
            | Kind::RRefAck
            | Kind::Exception => {
                self.on_response(conn.id, frame);
                Ok(())
            }
            Kind::Heartbeat => Ok(()),
            _ => self.on_request(ReplyTo::Remote(conn.clone()), frame, conn.peer),
        }
    }

    fn on_response(&self, conn: u64, frame: Frame) {
        let Some(p) = self.take_pending(frame.id, Some(conn)) else {
            // A reply after its call timed out or failed: dropped, as torch does.
            tracing::debug!(id = frame.id, "reply to a call that is no longer pending");
            return;
        };
        let result = if frame.kind == Kind::Exception {
            let worker = self.name_of(p.peer);
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
        (p.done)(result);
    }

    /// Handles a request from `from` (this worker itself for local calls). An `Err` is a
    /// protocol violation: the connection closes.
    fn on_request(
        self: &Arc<Self>,
        reply_to: ReplyTo,
        frame: Frame,
        from: u32,
    ) -> Result<(), String> {
        let id = frame.id;
        let method = frame.flags & FLAG_METHOD != 0;
        match frame.kind {
            Kind::Call | Kind::RemoteCall => {
                let remote = frame.kind == Kind::RemoteCall;
                let call = parse_call(&frame.payload, if remote { 2 } else { 0 }, method)
                    .ok_or("malformed call")?;
                let completion = if remote {
                    let (rref, fork) = (RRefId(call.ids[0]), ForkId(call.ids[1]));
                    if rref.0.created_on != from || fork.0.created_on != from {
                        return Err("remote call with ids its sender did not create".into());
                    }
                    let effects = self.rrefs.ledger(|l| l.owner_created(rref, Some(fork)));
                    self.rrefs.expect_value(rref);
                    self.run_effects(effects);
                    Completion::Store(rref)
                } else {
                    Completion::Reply(Kind::Result)
                };
                self.dispatch(
                    reply_to,
                    id,
                    from,
                    call.function,
                    call.args,
                    frame.tensors,
                    call.this,
                    completion,
                );
            }
            Kind::RRefFetch => {
                let mut rest = &frame.payload[..];
                let rref = RRefId(get_id(&mut rest).ok_or("malformed fetch")?);
                let agent = self.clone();
                // Waits on the owner for a value still being created.
                self.rrefs.with_value(
                    rref,
                    Box::new(move |value| {
                        agent.deliver(
                            &reply_to,
                            id,
                            "to_here",
                            value,
                            Completion::Reply(Kind::RRefFetchResult),
                        );
                    }),
                );
            }
            Kind::RRefForkRequest | Kind::RRefChildAccept | Kind::RRefUserDelete => {
                let msg: Control = crate::codec::decode_inline(&frame.payload)
                    .map_err(|e| format!("malformed reference control message: {e}"))?;
                let effects = self.rrefs.ledger(|l| match msg {
                    Control::ForkRequest { rref, fork } => {
                        l.fork_request(rref, fork);
                        Vec::new()
                    }
                    Control::ChildAccept { fork } => l.child_accepted(fork),
                    Control::UserDelete { rref, fork } => l.user_delete(rref, fork),
                });
                self.run_effects(effects);
                self.send_reply(&reply_to, id, Kind::RRefAck, Ok(Reply::default()));
            }
            other => return Err(format!("unexpected {other:?} frame")),
        }
        Ok(())
    }

    /// Runs `function`; for a method, once the value of `this` exists (waiting on the owner,
    /// not on the caller).
    #[allow(clippy::too_many_arguments)]
    fn dispatch(
        self: &Arc<Self>,
        reply_to: ReplyTo,
        id: u64,
        from: u32,
        name: Bytes,
        args: Bytes,
        tensors: Vec<Tensor>,
        this: Option<RRefId>,
        completion: Completion,
    ) {
        let name = name_str(&name);
        if self.state.load(Ordering::Acquire) == SHUT_DOWN {
            return self.deliver(&reply_to, id, name, Err(Failure::ShutDown), completion);
        }
        let Some((function, handler)) = self.registry.get(name) else {
            let failure = Failure::UnknownFunction(name.to_string());
            return self.deliver(&reply_to, id, name, Err(failure), completion);
        };
        let (function, handler) = (function.clone(), handler.clone());
        let request = Request {
            payload: args,
            tensors,
            this: None,
            ctx: Some((self.clone(), from)),
        };
        let Some(rref) = this else {
            return self.run_handler(handler, request, reply_to, id, function, completion);
        };
        let agent = self.clone();
        self.rrefs.with_value(
            rref,
            Box::new(move |value| match value {
                Ok(v) => {
                    let request = Request {
                        this: Some(v),
                        ..request
                    };
                    agent.run_handler(handler, request, reply_to, id, function, completion);
                }
                Err(f) => agent.deliver(&reply_to, id, &function, Err(f), completion),
            }),
        );
    }

    fn run_handler(
        self: &Arc<Self>,
        handler: Handler,
        request: Request,
        reply_to: ReplyTo,
        id: u64,
        function: Arc<str>,
        completion: Completion,
    ) {
        let rpc = self.rpc.get().cloned().unwrap_or_default();
        match handler.0 {
            HandlerKind::Inline(h) => {
                self.count_server(false, 1);
                let out = crate::rpc::with_current(&rpc, || h(request));
                self.finish(&reply_to, id, &function, out, completion, false);
            }
            HandlerKind::Sync(h, speed) => {
                self.count_server(false, 1);
                if crate::runtime::reading_inline() && speed.trusted() {
                    // Quick until now: run it here, sparing the hand-off to the pool.
                    self.inline_runs.fetch_add(1, Ordering::Relaxed);
                    let started = std::time::Instant::now();
                    let out = crate::rpc::with_current(&rpc, || h(request));
                    speed.record(started.elapsed(), crate::runtime::handed_off());
                    return self.finish(&reply_to, id, &function, out, completion, false);
                }
                let agent = self.clone();
                let (reply_copy, function_copy) = (reply_to.clone(), function.clone());
                let job = Box::new(move || {
                    let started = std::time::Instant::now();
                    let out = crate::rpc::with_current(&rpc, || h(request));
                    speed.record(started.elapsed(), false);
                    agent.finish(&reply_to, id, &function, out, completion, false);
                });
                if self.pool.execute(job).is_err() {
                    // The pool closes only at shutdown, and the refused job held the reply.
                    self.finish(
                        &reply_copy,
                        id,
                        &function_copy,
                        Err(Failure::ShutDown),
                        completion,
                        false,
                    );
                }
            }
            HandlerKind::Async(h) => {
                self.count_server(true, 1);
                let agent = self.clone();
                let fut = crate::rpc::scope_current(rpc, h(request));
                self.tasks.spawn_on(
                    async move {
                        let out = fut.await;
                        agent.finish(&reply_to, id, &function, out, completion, true);
                    },
                    &self.rt,
                );
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
        self.count_server(is_async, -1);
    }

    /// Delivers a value: encoded as the reply, or kept as a reference's value with an
    /// acknowledgement as the reply.
    fn deliver(
        self: &Arc<Self>,
        reply_to: &ReplyTo,
        id: u64,
        function: &str,
        out: Produced,
        completion: Completion,
    ) {
        match completion {
            Completion::Reply(kind) => {
                let outcome = out.and_then(|value| {
                    crate::rref::encoding(self, || value.encode()).map_err(|m| {
                        crate::function::remote_error(
                            function,
                            "distrpc::EncodeError",
                            format!("cannot encode the result: {m}"),
                        )
                    })
                });
                self.send_reply(reply_to, id, kind, outcome);
            }
            Completion::Store(rref) => {
                // Acknowledge first: whoever then fetches the value finds its reference
                // confirmed (a fetch that comes in between waits for the value below).
                let ack = match &out {
                    Ok(_) => Ok(Reply::default()),
                    Err(f) => Err(f.clone()),
                };
                self.send_reply(reply_to, id, Kind::RemoteResult, ack);
                self.rrefs.set_value(rref, out);
            }
        }
    }

    /// Makes the value of `rref` here, for `remote()` to self.
    pub(crate) fn create_locally(
        self: &Arc<Self>,
        rref: RRefId,
        function: &str,
        payload: Vec<u8>,
        tensors: Vec<Tensor>,
        this: Option<RRefId>,
    ) {
        let payload = Bytes::from(payload);
        match parse_call_head(&payload) {
            Some((function, args)) => {
                let me = self.me.id;
                self.dispatch(
                    ReplyTo::Nobody,
                    0,
                    me,
                    function,
                    args,
                    tensors,
                    this,
                    Completion::Store(rref),
                );
            }
            None => self
                .rrefs
                .set_value(rref, Err(Failure::Other(format!("bad call of {function}")))),
        }
    }

    /// Carries out the ledger's effects: sends its control messages (retried until
    /// acknowledged, never blocking the caller).
    pub(crate) fn run_effects(self: &Arc<Self>, effects: Vec<Effect>) {
        for (to, msg) in self.rrefs.apply(effects) {
            self.send_control(to, msg);
        }
    }

    fn send_control(self: &Arc<Self>, to: u32, msg: Control) {
        if !self.is_running() {
            return;
        }
        let kind = match msg {
            Control::ForkRequest { .. } => Kind::RRefForkRequest,
            Control::ChildAccept { .. } => Kind::RRefChildAccept,
            Control::UserDelete { .. } => Kind::RRefUserDelete,
        };
        let payload = match crate::codec::encode_inline(&msg) {
            Ok(p) => p,
            Err(e) => {
                return tracing::error!(error = %e, "cannot encode a reference control message");
            }
        };
        self.count_control(1);
        let agent = self.clone();
        self.tasks.spawn_on(
            async move {
                // Control messages are idempotent, so a lost or late one is simply sent again.
                let mut backoff = Duration::from_millis(10);
                loop {
                    let (fut, done) = RpcFuture::<Frame>::pending();
                    let out = Outgoing {
                        timeout: Some(CONTROL_ATTEMPT_TIMEOUT),
                        internal: true,
                        ..Outgoing::new(to, kind, "rref control", payload.clone())
                    };
                    agent.call(out, Box::new(move |r| done.complete(r)));
                    match fut.await {
                        Ok(_) => {
                            if let Control::ForkRequest { fork, .. } = msg {
                                let effects = agent.rrefs.ledger(|l| l.fork_acked(fork));
                                agent.run_effects(effects);
                            }
                            break;
                        }
                        Err(Error::PeerGone { .. } | Error::ShutDown { .. } | Error::UnknownWorker(_)) => break,
                        Err(e) => {
                            tracing::debug!(worker = %agent.me.name, ?msg, error = %e, "retrying a reference control message");
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(Duration::from_secs(1));
                        }
                    }
                }
                agent.count_control(-1);
            },
            &self.rt,
        );
    }

    fn count_control(&self, delta: isize) {
        let mut counts = lock(&self.counts);
        counts.control = counts.control.saturating_add_signed(delta);
        if counts.client + counts.control == 0 {
            self.counts_changed.notify_all();
        }
    }

    fn count_server(&self, is_async: bool, delta: isize) {
        let mut counts = lock(&self.counts);
        let n = if is_async {
            &mut counts.server_async
        } else {
            &mut counts.server
        };
        *n = n.saturating_add_signed(delta);
        if counts.server + counts.server_async == 0 {
            self.counts_changed.notify_all();
        }
    }

    fn send_reply(&self, reply_to: &ReplyTo, id: u64, ok_kind: Kind, outcome: Outcome) {
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
            ReplyTo::Local => self.on_response(
                LOCAL,
                Frame {
                    kind,
                    flags: 0,
                    id,
                    payload: Bytes::from(payload),
                    tensors,
                },
            ),
            ReplyTo::Remote(conn) => {
                let frame = OutFrame::new(kind, id, &payload, &tensors).or_else(|e| {
                    let failure = Failure::Other(format!("result cannot be sent: {e}"));
                    let p = crate::codec::encode_inline(&failure).unwrap_or_default();
                    OutFrame::new(Kind::Exception, id, &p, &[])
                });
                match frame {
                    Ok(frame) => {
                        if conn.send(frame, true).is_err() {
                            tracing::debug!(id, "reply dropped: connection closed");
                        }
                    }
                    Err(e) => tracing::error!(error = %e, "cannot build a reply frame"),
                }
            }
        }
    }

    /// Stops this worker at once: no more calls in or out, every pending call fails, queued
    /// frames are flushed (bounded), then every task ends.
    pub(crate) fn shutdown_local(&self) {
        if self.state.swap(SHUT_DOWN, Ordering::AcqRel) == SHUT_DOWN {
            return;
        }
        if !crate::runtime::on_runtime_thread() {
            // Handlers that already started (say, the last barrier's broadcast) still reply: wait
            // for them, bounded, before the connections close under their replies.
            let deadline = Some(std::time::Instant::now() + FLUSH_TIMEOUT);
            let mut counts = lock(&self.counts);
            while counts.server + counts.server_async > 0 {
                match wait_until(&self.counts_changed, counts, deadline) {
                    Ok(c) => counts = c,
                    Err(c) => {
                        tracing::warn!(worker = %self.me.name, handlers = c.server + c.server_async, "shutting down with handlers still running");
                        break;
                    }
                }
            }
        }
        let conns: Vec<_> = lock(&self.conns).values().cloned().collect();
        for conn in &conns {
            conn.close("shut down");
        }
        let ids: Vec<u64> = lock(&self.pending).keys().copied().collect();
        for id in ids {
            self.fail(id, |_| self.shut_down_error());
        }
        self.pool.close();
        self.tasks.close();
        self.writers.close();
        if crate::runtime::on_runtime_thread() {
            // Cannot block here (the last handle was dropped inside async code): stop now.
            self.cancel.cancel();
        } else {
            // Writers drain their queues (the last barrier's replies) before readers stop.
            let writers = self.writers.clone();
            let _ = crate::runtime::block_on(async {
                tokio::time::timeout(FLUSH_TIMEOUT, writers.wait()).await
            });
            self.cancel.cancel();
            let tasks = self.tasks.clone();
            let _ = crate::runtime::block_on(async {
                tokio::time::timeout(FLUSH_TIMEOUT, tasks.wait()).await
            });
        }
        self.gather.wake();
    }

    /// torch's agent metrics.
    pub(crate) fn metrics(&self) -> Vec<(&'static str, i64)> {
        let c = self.counts();
        let info = self.rrefs.info();
        vec![
            ("agent.thread_pool_size", self.pool.size() as i64),
            ("agent.num_idle_threads", self.pool.idle() as i64),
            ("agent.client_active_calls", c.client as i64),
            ("agent.server_active_calls", c.server as i64),
            ("agent.server_active_async_calls", c.server_async as i64),
            ("agent.num_functions", self.registry.len() as i64),
            ("num_owner_rrefs", info.num_owner_rrefs as i64),
            ("num_pending_users", info.num_pending_users as i64),
            ("num_forks", info.num_forks as i64),
            ("num_pending_futures", c.control as i64),
            ("num_user_rrefs", info.num_users as i64),
            ("num_owner_values", self.rrefs.num_values() as i64),
            (
                "agent.inline_handler_runs",
                self.inline_runs.load(Ordering::Relaxed) as i64,
            ),
            (
                "agent.reader_hand_offs",
                self.hand_offs.load(Ordering::Relaxed) as i64,
            ),
        ]
    }
}

/// How long a claimant sleeps in `poll` before it looks whether its call ended some other way
/// (a shutdown, a failure seen by the writer): the bound on noticing those late.
const CLAIM_SLICE: Duration = Duration::from_millis(10);

/// A blocked caller's hold on reading one connection (see [`ReadSide`]): while it waits for its
/// reply, its own thread reads the connection and handles whatever arrives, so the reply needs
/// no hand-off from the reader task's thread. Dropping it hands reading back.
pub(crate) struct Claim {
    agent: Arc<Agent>,
    conn: Arc<Connection>,
    read: Arc<ReadSide>,
    deadline: Option<std::time::Instant>,
}

impl std::fmt::Debug for Claim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Claim")
            .field("conn", &self.conn.id)
            .finish()
    }
}

impl Claim {
    /// Reads the connection until `done` is set, the call's deadline passes or the connection
    /// ends; spins for up to `spin` before sleeping in `poll`.
    pub(crate) fn drive(&self, done: &std::sync::atomic::AtomicBool, spin: Duration) {
        let is_done = || done.load(Ordering::Acquire);
        let spin_until = (!spin.is_zero()).then(|| std::time::Instant::now() + spin);
        loop {
            match self.step() {
                None => return,
                Some(false) => {
                    if is_done() {
                        return;
                    }
                    let now = std::time::Instant::now();
                    if spin_until.is_some_and(|t| now < t) {
                        std::hint::spin_loop();
                        continue;
                    }
                    let left = match self.deadline {
                        Some(at) if at <= now => return,
                        Some(at) => at - now,
                        None => CLAIM_SLICE,
                    };
                    self.read.poll_readable(left.min(CLAIM_SLICE));
                }
                Some(true) => {}
            }
            if is_done() {
                return;
            }
        }
    }

    /// Reads and handles one frame: `Some(true)` if there was one, `Some(false)` if the socket
    /// is empty, `None` once the connection has ended.
    fn step(&self) -> Option<bool> {
        match self.read.step(true) {
            Step::Frame(frame) => {
                if let Err(e) = self.agent.on_frame(&self.conn, frame) {
                    self.agent.on_closed(&self.conn, ReadEnd::Malformed(e));
                    return None;
                }
                Some(true)
            }
            Step::Idle => Some(false),
            Step::Ended(Some(end)) => {
                self.agent.on_closed(&self.conn, end);
                None
            }
            Step::Ended(None) | Step::Claimed => None,
        }
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.read.release();
        // What came after our last read: the reader task let its wake-up go while we held
        // the claim.
        while self.step() == Some(true) {}
    }
}

/// The deadlines of pending calls, and when the timer task will next wake up.
#[derive(Debug, Default)]
struct Deadlines {
    set: BTreeSet<(Instant, u64)>,
    /// The deadline the timer sleeps until (`None`: it sleeps until woken).
    armed: Option<Instant>,
}

/// A request to send: to whom, what, and how.
pub(crate) struct Outgoing<'a> {
    pub(crate) dest: u32,
    pub(crate) kind: Kind,
    /// Frame flags ([`FLAG_METHOD`]).
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
    /// ([`Claim`]).
    Blocking,
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

/// Where the reply to a call goes.
#[derive(Clone)]
enum ReplyTo {
    /// A call to self: complete the pending call directly.
    Local,
    Remote(Arc<Connection>),
    /// No one waits (the value of a `remote()` to self).
    Nobody,
}

/// What becomes of a handler's value.
#[derive(Clone, Copy, Debug)]
enum Completion {
    /// Encoded and sent back in a frame of this kind.
    Reply(Kind),
    /// Kept as the value of a remote reference; the caller gets an acknowledgement.
    Store(RRefId),
}

fn duration_us(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// Appends the call head (the function name, length-prefixed) to `out`.
fn put_call_head(out: &mut Vec<u8>, function: &str) -> Result<(), Error> {
    let len = u16::try_from(function.len()).map_err(|_| {
        Error::InvalidArgument(format!(
            "function name of {} bytes is too long",
            function.len()
        ))
    })?;
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(function.as_bytes());
    Ok(())
}

/// Encodes a call payload in one pass: `ids` (a remote call's new reference and fork), the
/// value a method is called on, the call head, then the arguments (their tensors go to the
/// table). Returns the payload, the tensors and the frame flags. The inverse of [`parse_call`].
pub(crate) fn encode_call<A: serde::Serialize + ?Sized>(
    agent: &Arc<Agent>,
    ids: &[crate::rref::GlobalId],
    this: Option<RRefId>,
    function: &str,
    args: &A,
) -> Result<(Vec<u8>, Vec<Tensor>, u16), Error> {
    let mut payload = Vec::with_capacity(64 + 12 * ids.len() + function.len());
    for id in ids.iter().chain(this.as_ref().map(|t| &t.0)) {
        crate::rref::put_id(&mut payload, *id);
    }
    put_call_head(&mut payload, function)?;
    let tensors = crate::rref::encoding(agent, || crate::codec::encode(args, &mut payload))
        .map_err(|e| Error::Encode {
            function: function.to_string(),
            what: "arguments",
            message: e.to_string(),
        })?;
    let flags = if this.is_some() { FLAG_METHOD } else { 0 };
    Ok((payload, tensors, flags))
}

/// A call payload taken apart: leading ids (a remote call's new reference and fork), the value
/// a method is called on, the function, and the encoded arguments.
struct CallParts {
    ids: Vec<crate::rref::GlobalId>,
    this: Option<RRefId>,
    /// The function's name (checked to be UTF-8).
    function: Bytes,
    args: Bytes,
}

fn parse_call(payload: &Bytes, ids: usize, method: bool) -> Option<CallParts> {
    let mut rest = &payload[..];
    let ids = (0..ids)
        .map(|_| get_id(&mut rest))
        .collect::<Option<Vec<_>>>()?;
    let this = if method {
        Some(RRefId(get_id(&mut rest)?))
    } else {
        None
    };
    let head = payload.slice(payload.len() - rest.len()..);
    let (function, args) = parse_call_head(&head)?;
    Some(CallParts {
        ids,
        this,
        function,
        args,
    })
}

fn parse_call_head(payload: &Bytes) -> Option<(Bytes, Bytes)> {
    let (len, rest) = payload.split_first_chunk::<2>()?;
    let len = u16::from_le_bytes(*len) as usize;
    std::str::from_utf8(rest.get(..len)?).ok()?;
    Some((payload.slice(2..2 + len), payload.slice(2 + len..)))
}

/// A name `parse_call_head` checked.
fn name_str(name: &[u8]) -> &str {
    std::str::from_utf8(name).unwrap_or("<invalid>")
}
