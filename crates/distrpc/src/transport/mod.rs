//! The transport: one connection per pair of workers, opened lazily, both directions multiplexed
//! by message id. It dials and accepts peers (every connection first says who it is, with a
//! hello), runs each connection's reader and writer tasks, lets a blocked caller read its own
//! reply and an idle thread its next call ([`Claim`]), and reports lost peers. A plain socket is
//! split into halves whose reading can be paused while a thread claims it (`socket`).
//!
//! ```text
//!  send(rank, frame) ─► connection(rank) ─► Connection queue / direct write ─► socket
//!  socket ─► reader task or claimant ─► Inbound::on_frame (the router, one layer up)
//!  reader/writer ends ─► peer marked gone ─► every LossListener (fail calls, wake gathers)
//! ```
//!
//! Owns: connections, the peer table, reader/writer tasks, the hello. Knows frames and ranks,
//! nothing of calls, references or gather: what a frame means is the [`Inbound`]'s business,
//! which the layer above registers with [`Transport::set_inbound`].

mod claim;
mod connection;
mod crowd;
mod idle;
mod reader;
mod secure;
mod socket;
mod watch;

pub use claim::Origin;
pub(crate) use claim::catch_up;
pub(crate) use claim::{Claim, Reading};
pub(crate) use connection::{Connection, QueueBound, SendError};
pub use idle::IdleReaders;
pub(crate) use reader::{FrameReader, ReadEnd};
use watch::Watch;

use crate::sync::lock;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use distrpc_wire::{Frame, Kind, Limits, OutFrame};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::task::TaskTracker;

use crate::error::Error;
use crate::rendezvous::Group;
use crate::runtime::Tasks;
use crate::worker::{To, WorkerInfo};
use distrpc_secure::{Secured, Security};
use reader::{ReadSide, Reader, Step};
use std::os::fd::{AsFd, OwnedFd};

/// How long an accepted connection may take to say who it is.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// What a connection may send before its hello is read: one small frame (a rank and a name).
const HELLO_LIMITS: Limits = Limits {
    max_body: 4096,
    max_tensors: 0,
};
/// How long connecting to a peer may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Where a frame came from.
#[derive(Clone, Debug)]
pub(crate) enum Source {
    /// A peer, over this connection.
    Peer(Arc<Connection>),
    /// This worker itself (a call to self, which never touches a socket).
    Local,
}

/// What the layer above does with what arrives.
pub(crate) trait Inbound: Send + Sync {
    /// Handles one frame from `from` (a peer's rank, or this worker's own for local frames).
    /// An `Err` is a protocol violation: the connection closes with that reason logged.
    fn on_frame(self: Arc<Self>, source: Source, from: u32, frame: Frame) -> Result<(), String>;
}

/// A connection that ended, as told to each [`LossListener`].
#[derive(Debug)]
pub(crate) struct Loss<'a> {
    /// The connection's id (calls remember which connection they were sent on).
    pub(crate) conn: u64,
    /// The peer's name.
    pub(crate) worker: &'a str,
    /// Why it ended.
    pub(crate) reason: &'a str,
}

/// Called whenever a connection ends.
pub(crate) type LossListener = Box<dyn Fn(&Loss<'_>) + Send + Sync>;

#[derive(Default)]
struct Peer {
    conn: Option<Arc<Connection>>,
    /// Why the last connection to the peer was lost. Calls waiting on it failed at once; the
    /// next call dials the peer again (it may be back: a partition healed), as does the peer
    /// itself, which clears this. While the worker shuts down, calls fail with it.
    gone: Option<String>,
}

/// The connections of one worker.
pub(crate) struct Transport {
    /// This worker.
    pub(crate) me: WorkerInfo,
    /// Every worker of the group (shared with the other workers of this process in it).
    pub(crate) group: Arc<Group>,
    limits: Limits,
    /// How long reader tasks and blocked callers spin before sleeping (the latency options).
    pub(crate) spin: Spin,
    /// The liveness bound (zero: off); see [`SocketOptions`].
    liveness: Duration,
    /// What protects the connections: the group's secret and TLS, if configured.
    security: Security,
    /// What each connection may hold for its peer.
    queue: QueueBound,
    next_conn: AtomicU64,
    /// Reader hand-offs (inline handlers that blocked): a metric of the fast path.
    hand_offs: AtomicU64,
    /// Frames read by threads waiting for work ([`Claim::serve`]): a metric of that path.
    pub(crate) read_waiting: AtomicU64,
    /// Shutting down: lost peers are not dialed again, nor taken back.
    closing: std::sync::atomic::AtomicBool,
    peers: Mutex<Vec<Peer>>,
    conns: Mutex<HashMap<u64, Arc<Connection>>>,
    inbound: OnceLock<Weak<dyn Inbound>>,
    losses: Mutex<Vec<LossListener>>,
    /// Readers, dialers, the accept loop, and every task of the layers above.
    pub(crate) tasks: Tasks,
    /// Connection writers, apart so that shutdown can wait for them to flush.
    writers: TaskTracker,
    /// Bounds what threads reading for their work leave undone on a connection.
    pub(crate) watch: Arc<Watch>,
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transport").field("me", &self.me).finish()
    }
}

impl Transport {
    pub(crate) fn new(
        me: WorkerInfo,
        group: Arc<Group>,
        limits: Limits,
        sockets: SocketOptions,
        tasks: Tasks,
    ) -> Arc<Self> {
        let peers = group.workers.iter().map(|_| Peer::default()).collect();
        let transport = Arc::new(Self {
            me,
            group,
            limits,
            spin: sockets.spin,
            liveness: sockets.liveness,
            security: sockets.security,
            queue: sockets.queue,
            // Connection id 0 is the local "connection" of calls to self.
            next_conn: AtomicU64::new(LOCAL + 1),
            hand_offs: AtomicU64::new(0),
            read_waiting: AtomicU64::new(0),
            closing: std::sync::atomic::AtomicBool::new(false),
            peers: Mutex::new(peers),
            conns: Mutex::new(HashMap::new()),
            inbound: OnceLock::new(),
            losses: Mutex::new(Vec::new()),
            tasks,
            writers: TaskTracker::new(),
            watch: Arc::default(),
        });
        transport.watch.start(&transport);
        transport
    }

    /// Sets who handles arriving frames (once, before serving).
    pub(crate) fn set_inbound(&self, inbound: Weak<dyn Inbound>) {
        let _ = self.inbound.set(inbound);
    }

    /// Adds a listener told of every connection that ends.
    pub(crate) fn on_loss(&self, listener: LossListener) {
        lock(&self.losses).push(listener);
    }

    /// Hands a frame to the inbound side as if it had arrived from `from`.
    pub(crate) fn deliver(&self, source: Source, from: u32, frame: Frame) -> Result<(), String> {
        match self.inbound.get().and_then(Weak::upgrade) {
            Some(inbound) => inbound.on_frame(source, from, frame),
            // The layers above are gone: the worker is being dropped.
            None => Ok(()),
        }
    }

    /// The rank of the worker named `name`.
    pub(crate) fn rank_of(&self, name: &str) -> Option<u32> {
        self.group.by_name.get(name).copied()
    }

    /// The rank of a destination, or an error that names it.
    pub(crate) fn resolve(&self, to: &To) -> Result<u32, Error> {
        match to {
            To::Name(name) => self
                .rank_of(name)
                .ok_or_else(|| Error::UnknownWorker(name.to_string())),
            To::Rank(r) if (*r as usize) < self.group.workers.len() => Ok(*r),
            To::Rank(r) => Err(Error::UnknownWorker(format!(
                "rank {r} (world size is {})",
                self.group.workers.len()
            ))),
        }
    }

    /// The name of the worker of rank `rank`.
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

    /// How many frames threads waiting for work read themselves ([`Claim::serve`]).
    pub(crate) fn read_waiting(&self) -> u64 {
        self.read_waiting.load(Ordering::Relaxed)
    }

    /// How many inline handlers blocked and handed their connection's reading to a new task.
    pub(crate) fn hand_offs(&self) -> u64 {
        self.hand_offs.load(Ordering::Relaxed)
    }

    /// Starts accepting peers on `listener`.
    pub(crate) fn serve(self: &Arc<Self>, listener: TcpListener) {
        let transport = self.clone();
        self.tasks.spawn(async move {
            loop {
                tokio::select! {
                    _ = transport.tasks.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok((stream, addr)) => {
                            let t = transport.clone();
                            transport.tasks.spawn(async move { t.handshake(stream, addr).await });
                        }
                        Err(e) => tracing::warn!(worker = %transport.me.name, error = %e, "accept failed"),
                    },
                }
            }
        });
    }

    /// The connection to `rank` if one is open (none is dialed).
    pub(crate) fn open_connection(&self, rank: u32) -> Option<Arc<Connection>> {
        let peers = lock(&self.peers);
        let peer = peers.get(rank as usize)?;
        peer.gone.is_none().then(|| peer.conn.clone()).flatten()
    }

    /// The connection to `rank`, opening it if there is none.
    pub(crate) fn connection(self: &Arc<Self>, rank: u32) -> Result<Arc<Connection>, Error> {
        let mut peers = lock(&self.peers);
        let peer = peers
            .get_mut(rank as usize)
            .ok_or_else(|| Error::UnknownWorker(format!("rank {rank}")))?;
        if let Some(reason) = &peer.gone {
            if self.closing.load(Ordering::Relaxed) {
                return Err(Error::PeerGone {
                    worker: self.name_of(rank).to_string(),
                    reason: reason.clone(),
                });
            }
            // The peer may be back. Dial again; if that fails, the calls on the new
            // connection fail with why (at once for a peer whose process is gone).
            tracing::debug!(worker = %self.me.name, peer = rank, %reason, "dialing a lost peer again");
            peer.gone = None;
        }
        if let Some(conn) = &peer.conn {
            return Ok(conn.clone());
        }
        let conn = Connection::new(
            self.next_conn.fetch_add(1, Ordering::Relaxed),
            rank,
            self.queue,
        );
        // The hello is queued before the connection is visible to other callers, so that it is
        // always the first frame the peer reads.
        let hello = crate::codec::encode_inline(&(self.me.id, &self.me.name))
            .map_err(|e| Error::InvalidArgument(e.to_string()))
            .and_then(|p| {
                OutFrame::new(Kind::Hello, 0, &p, &[])
                    .map_err(|e| Error::InvalidArgument(e.to_string()))
            })?;
        let _ = conn.send(hello, false, false);
        peer.conn = Some(conn.clone());
        drop(peers);
        lock(&self.conns).insert(conn.id, conn.clone());
        let transport = self.clone();
        let addr = self.group.addrs[rank as usize];
        let c = conn.clone();
        self.tasks.spawn(async move {
            match tokio::time::timeout(CONNECT_TIMEOUT, transport.dial(addr)).await {
                Ok(Ok((stream, socket))) => {
                    let frames = FrameReader::new(transport.limits);
                    transport.start_io(c, stream, socket, frames)
                }
                Ok(Err(e)) => transport.on_closed(&c, ReadEnd::Io(e)),
                Err(_) => transport.on_closed(
                    &c,
                    ReadEnd::Io(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("connecting to {addr} took more than {CONNECT_TIMEOUT:?}"),
                    )),
                ),
            }
        });
        Ok(conn)
    }

    /// A claim on reading `conn` (see [`Claim`]), if it can take it: a blocked caller's
    /// (`waiting` is `None`), or that of a thread waiting for work, with its doorbell.
    pub(crate) fn claim(
        self: &Arc<Self>,
        conn: &Arc<Connection>,
        deadline: Option<std::time::Instant>,
        waiting: Option<Arc<crate::sync::Doorbell>>,
    ) -> Option<Claim> {
        let read = conn.read.get()?;
        let serves = waiting.is_some();
        let token = read.claim(waiting)?;
        Some(Claim::new(
            self.clone(),
            conn.clone(),
            read.clone(),
            (token, serves),
            deadline,
        ))
    }

    /// A connection to `addr`: TLS and authenticated if the group uses them.
    async fn dial(&self, addr: SocketAddr) -> std::io::Result<(Secured, OwnedFd)> {
        let tcp = TcpStream::connect(addr).await?;
        self.prepare(&tcp);
        let socket = dup(&tcp)?;
        let secured = self.security.dial(tcp).await.map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                format!("securing the connection to {addr}: {e}"),
            )
        })?;
        Ok((secured, socket))
    }

    /// Socket options every connection gets.
    fn prepare(&self, tcp: &TcpStream) {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::warn!(error = %e, "cannot set TCP_NODELAY");
        }
        if let Err(e) = watch_liveness(tcp, self.liveness) {
            tracing::warn!(error = %e, "cannot set TCP keepalive and user timeout: a vanished peer is found only by call timeouts");
        }
    }

    /// An accepted connection: it must complete TLS and authenticate, if the group uses them,
    /// then introduce itself with a hello (a small frame) before anything else.
    async fn handshake(self: Arc<Self>, tcp: TcpStream, addr: SocketAddr) {
        self.prepare(&tcp);
        let secured = tokio::select! {
            _ = self.tasks.cancelled() => return,
            s = tokio::time::timeout(HELLO_TIMEOUT, self.secure_accepted(tcp)) => s,
        };
        let (mut stream, socket) = match secured {
            Ok(Ok(secured)) => secured,
            Ok(Err(e)) => {
                tracing::error!(worker = %self.me.name, %addr, error = %e, "connection did not authenticate; closed");
                return;
            }
            Err(_) => {
                tracing::error!(worker = %self.me.name, %addr, "connection did not authenticate within {HELLO_TIMEOUT:?}; closed");
                return;
            }
        };
        let mut reader = FrameReader::new(HELLO_LIMITS);
        let hello = tokio::select! {
            _ = self.tasks.cancelled() => return,
            h = tokio::time::timeout(HELLO_TIMEOUT, reader.next_from(&mut stream)) => h,
        };
        let Some(rank) = self.admit_hello(hello, addr) else {
            return;
        };
        reader.set_limits(self.limits);
        let conn = Connection::new(
            self.next_conn.fetch_add(1, Ordering::Relaxed),
            rank,
            self.queue,
        );
        {
            let mut peers = lock(&self.peers);
            // A peer lost before is back: it dialed us.
            if let Some(peer) = peers.get_mut(rank as usize)
                && peer.conn.is_none()
                && !self.closing.load(Ordering::Relaxed)
            {
                peer.conn = Some(conn.clone());
                peer.gone = None;
            }
        }
        lock(&self.conns).insert(conn.id, conn.clone());
        self.start_io(conn, stream, socket, reader);
    }

    /// TLS and the auth handshake on an accepted connection, as the group uses them.
    async fn secure_accepted(&self, tcp: TcpStream) -> Result<(Secured, OwnedFd), String> {
        let socket = dup(&tcp).map_err(|e| e.to_string())?;
        let mut secured = self
            .security
            .accept_tls(tcp)
            .await
            .map_err(|e| e.to_string())?;
        self.security
            .authenticate(&mut secured)
            .await
            .map_err(|e| e.to_string())?;
        Ok((secured, socket))
    }

    /// The rank a hello names, if it is a worker of the group (else logged; `None`).
    fn admit_hello(
        &self,
        hello: Result<Result<distrpc_wire::Frame, ReadEnd>, tokio::time::error::Elapsed>,
        addr: SocketAddr,
    ) -> Option<u32> {
        match hello {
            Ok(Ok(frame)) if frame.kind == Kind::Hello => {
                match crate::codec::decode_inline::<(u32, String)>(&frame.payload) {
                    Ok((rank, name))
                        if self
                            .group
                            .workers
                            .get(rank as usize)
                            .is_some_and(|w| w.name == name) =>
                    {
                        Some(rank)
                    }
                    Ok((rank, name)) => {
                        tracing::error!(%addr, rank, %name, "connection introduced itself as an unknown worker; closed");
                        None
                    }
                    Err(e) => {
                        tracing::error!(%addr, error = %e, "malformed hello; connection closed");
                        None
                    }
                }
            }
            Ok(Ok(frame)) => {
                tracing::error!(%addr, kind = ?frame.kind, "first frame was not a hello; connection closed");
                None
            }
            Ok(Err(ReadEnd::Closed)) => None,
            Ok(Err(e)) => {
                tracing::error!(%addr, error = %e, "connection closed before its hello");
                None
            }
            Err(_) => {
                tracing::error!(%addr, "no hello within {HELLO_TIMEOUT:?}; connection closed");
                None
            }
        }
    }

    /// Starts the reader and the writer of a connection (`socket`: a handle on its socket,
    /// for [`Connection::abort`]).
    fn start_io(
        self: &Arc<Self>,
        conn: Arc<Connection>,
        stream: Secured,
        socket: OwnedFd,
        frames: FrameReader,
    ) {
        let (transport, c) = (self.clone(), conn.clone());
        conn.set_socket(socket);
        match stream {
            Secured::Plain(tcp) => {
                let (r, w) = match tcp.into_std().map(OwnedFd::from).and_then(socket::split) {
                    Ok(halves) => halves,
                    Err(e) => return self.on_closed(&conn, ReadEnd::Io(e)),
                };
                let read = ReadSide::new(r, frames);
                let _ = conn.read.set(read.clone());
                self.writers.spawn_on(
                    async move {
                        if let Err(e) = c.write_loop(w).await {
                            transport.on_closed(&c, ReadEnd::Io(e));
                        }
                    },
                    self.tasks.handle(),
                );
                self.spawn_reader(conn, read);
            }
            Secured::Tls(tls) => {
                let (r, w) = tls.into_split();
                self.writers.spawn_on(
                    async move {
                        if let Err(e) = c.write_loop_tls(w).await {
                            transport.on_closed(&c, ReadEnd::Io(e));
                        }
                    },
                    self.tasks.handle(),
                );
                self.spawn_tls_reader(conn, Arc::new(tokio::sync::Mutex::new((r, frames))));
            }
        }
    }

    /// What a reader task of `conn` does if a handler it runs inline blocks: a new task takes
    /// over reading, started by `respawn` with the same read state (and the blocked one stops
    /// once the handler is done). Shared by the plain and the TLS reader.
    fn hand_off<S: Clone + Send + Sync + 'static>(
        self: &Arc<Self>,
        conn: &Arc<Connection>,
        state: &S,
        respawn: fn(&Arc<Self>, Arc<Connection>, S),
    ) -> crate::runtime::HandOff {
        let (transport, conn, state) = (self.clone(), conn.clone(), state.clone());
        Arc::new(move || {
            transport.hand_offs.fetch_add(1, Ordering::Relaxed);
            respawn(&transport, conn.clone(), state.clone());
        })
    }

    /// Starts the task that reads `conn` whenever no blocked caller has claimed it.
    fn spawn_reader(self: &Arc<Self>, conn: Arc<Connection>, read: Arc<ReadSide>) {
        let transport = self.clone();
        self.tasks.spawn(async move {
            let hand_off = transport.hand_off(&conn, &read, Self::spawn_reader);
            let spin = transport.spin.readers;
            let mut idle_since: Option<std::time::Instant> = None;
            let end = loop {
                if !transport.room_for_calls(&conn).await {
                    break ReadEnd::Closed;
                }
                match read.step(Reader::Task) {
                    Step::Frame(frame) => {
                        idle_since = None;
                        match transport.on_read(&conn, frame, &hand_off) {
                            Err(end) => break end,
                            Ok(true) => return,
                            Ok(false) => {}
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
                            _ = transport.tasks.cancelled() => break ReadEnd::Closed,
                            r = read.wait() => if let Err(e) = r {
                                break ReadEnd::Io(e);
                            },
                        }
                    }
                }
            };
            transport.on_closed(&conn, end);
        });
    }

    /// One frame from `conn`'s peer.
    fn on_frame(&self, conn: &Arc<Connection>, frame: Frame) -> Result<(), String> {
        self.deliver(Source::Peer(conn.clone()), conn.peer, frame)
    }

    /// Waits while `conn` holds as many of its peer's calls as it takes — the connection is
    /// not read meanwhile, so TCP pushes back on the peer; `false` if the worker stops first.
    async fn room_for_calls(&self, conn: &Connection) -> bool {
        if !conn.calls_full() {
            return true;
        }
        tokio::select! {
            _ = self.tasks.cancelled() => false,
            () = conn.room_for_calls() => true,
        }
    }

    /// A frame a reader task read: handled in the task's frame, handing reading to a new task
    /// if the handler blocks (`Ok(true)`: this task stops). `Err` ends the connection.
    fn on_read(
        &self,
        conn: &Arc<Connection>,
        frame: Frame,
        hand_off: &crate::runtime::HandOff,
    ) -> Result<bool, ReadEnd> {
        let (handled, handed_off) =
            crate::runtime::as_reader(hand_off, || self.on_frame(conn, frame));
        handled.map_err(ReadEnd::Malformed)?;
        Ok(handed_off)
    }

    /// A connection ended: forget it, mark the peer gone, tell the listeners.
    fn on_closed(&self, conn: &Arc<Connection>, end: ReadEnd) {
        let worker = self.name_of(conn.peer).to_string();
        match &end {
            ReadEnd::Malformed(e) => {
                tracing::error!(worker = %self.me.name, peer = %worker, error = %e, "closing connection")
            }
            _ => {
                tracing::debug!(worker = %self.me.name, peer = %worker, reason = %end, "connection closed")
            }
        }
        let reason = conn.aborted().unwrap_or_else(|| end.to_string());
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
        let loss = Loss {
            conn: conn.id,
            worker: &worker,
            reason: &reason,
        };
        for listener in lock(&self.losses).iter() {
            listener(&loss);
        }
    }

    /// Closes every connection: queued frames are still written, new ones refused.
    pub(crate) fn close_all(&self) {
        self.closing.store(true, Ordering::Relaxed);
        let conns: Vec<_> = lock(&self.conns).values().cloned().collect();
        for conn in &conns {
            conn.close("shut down");
        }
    }

    /// Stops every task: writers first drain their queues (bounded by `flush`), then readers
    /// and the rest are cancelled and waited for. On a runtime thread (the last handle dropped
    /// inside async code) it cannot block: it cancels at once.
    pub(crate) fn stop(&self, flush: Duration) {
        self.tasks.close();
        self.writers.close();
        if crate::runtime::on_runtime_thread() {
            self.tasks.cancel();
            return;
        }
        let writers = self.writers.clone();
        let _ =
            crate::runtime::block_on(async { tokio::time::timeout(flush, writers.wait()).await });
        self.tasks.cancel();
        self.tasks.wait(flush);
    }
}

/// How a worker's sockets behave.
#[derive(Clone, Debug)]
pub(crate) struct SocketOptions {
    /// The group's secret and TLS: every connection is secured as they say.
    pub(crate) security: Security,
    /// What each connection may hold for its peer.
    pub(crate) queue: QueueBound,
    /// How long reader tasks and blocked callers spin before sleeping (the latency options).
    pub(crate) spin: Spin,
    /// The liveness bound (zero: off): a peer that stops answering at the TCP level is
    /// dropped within about this long.
    pub(crate) liveness: Duration,
}

/// How long threads poll before they sleep (`RpcOptions::busy_poll` and `spin_wait`).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Spin {
    /// A reader task, after its connection's last frame; and any wait on a call's result.
    pub(crate) readers: Duration,
    /// A thread blocked on its own call, reading its reply itself (its claim), before it
    /// sleeps.
    pub(crate) callers: Duration,
}

/// A second handle on `tcp`'s socket.
fn dup(tcp: &TcpStream) -> std::io::Result<OwnedFd> {
    tcp.as_fd().try_clone_to_owned()
}

/// Makes the kernel watch a connection: once it is idle for half of `bound`, keepalive probes
/// go out every sixth of it, and data or probes unanswered for half of it end the connection
/// (`TCP_USER_TIMEOUT`, which on Linux also bounds the probes). So a peer whose host vanished
/// is found within about `bound` (whole seconds, at least 2), with no cost per call.
fn watch_liveness(stream: &TcpStream, bound: Duration) -> std::io::Result<()> {
    if bound.is_zero() {
        return Ok(());
    }
    let secs = bound.as_secs().max(2);
    let half = Duration::from_secs(secs / 2);
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(half)
        .with_interval(Duration::from_secs((secs / 6).max(1)))
        .with_retries(3);
    let socket = socket2::SockRef::from(stream);
    socket.set_tcp_keepalive(&keepalive)?;
    socket.set_tcp_user_timeout(Some(half))
}

/// Connection id of calls to self, which never touch a socket.
pub(crate) const LOCAL: u64 = 0;
