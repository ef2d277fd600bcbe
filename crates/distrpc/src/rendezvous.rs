//! Rendezvous: how the workers of a group find each other at init.
//!
//! ```text
//!  rank 0: host the store ─┐
//!  every rank: bind a listener on port 0
//!              add  distrpc/rank/{r}/claims   (a second claimant of a rank fails)
//!              set  distrpc/worker/{r} = (name, address)
//!              add  distrpc/joined; the last to join reads every record, checks them (a name
//!                   used twice, a bad address) and sets distrpc/table = the group, or the error
//!              wait distrpc/table   (bounded by rpc_timeout; a timeout names the ranks missing)
//!              get  distrpc/table   (one value: each worker reads O(world), and the workers of
//!                                    one process share one decoded copy)
//!              add  distrpc/read; rank 0, host of the store, waits until all have read
//! ```
//!
//! The store wakes a waiter only when a key it waits for appears, so the group's joining costs
//! O(world) wake-ups, not one per waiter per write.
//!
//! `init_method` is torch's: `env://` reads `MASTER_ADDR` and `MASTER_PORT`; `tcp://host:port`;
//! `file:///path` (the file must not hold an earlier group's keys). When the launcher
//! (`distrpc launch`) started this process as rank 0, it hands over the store's listening socket
//! in `DISTRPC_STORE_FD`, so that no port is ever guessed.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use distrpc_secure::Security;
use distrpc_store::{FileStore, Store, StoreError, TcpStoreClient, TcpStoreServer};
use tokio::net::TcpListener;

use crate::error::Error;
use crate::worker::WorkerInfo;

/// Environment variable through which the launcher passes rank 0 the store's listening socket.
pub const STORE_FD_ENV: &str = "DISTRPC_STORE_FD";

/// Where the group's store is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum InitMethod {
    Tcp { host: String, port: u16 },
    File(PathBuf),
}

fn env_var(name: &str, why: &str) -> Result<String, Error> {
    std::env::var(name).map_err(|_| {
        Error::InvalidArgument(format!("environment variable {name} expected ({why})"))
    })
}

pub(crate) fn parse_init_method(s: &str) -> Result<InitMethod, Error> {
    if let Some(rest) = s.strip_prefix("env://") {
        if !rest.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "init_method {s:?}: env:// takes nothing after it"
            )));
        }
        let host = env_var("MASTER_ADDR", "init_method env://")?;
        let port = env_var("MASTER_PORT", "init_method env://")?;
        let port = port.parse().map_err(|_| {
            Error::InvalidArgument(format!("MASTER_PORT {port:?} is not a port number"))
        })?;
        return Ok(InitMethod::Tcp { host, port });
    }
    if let Some(rest) = s.strip_prefix("tcp://") {
        let bad = || Error::InvalidArgument(format!("init_method {s:?} is not tcp://host:port"));
        let (host, port) = rest.rsplit_once(':').ok_or_else(bad)?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(bad());
        }
        let port = port.trim_end_matches('/').parse().map_err(|_| bad())?;
        return Ok(InitMethod::Tcp {
            host: host.to_string(),
            port,
        });
    }
    if let Some(path) = s.strip_prefix("file://") {
        if path.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "init_method {s:?} names no file"
            )));
        }
        return Ok(InitMethod::File(PathBuf::from(path)));
    }
    Err(Error::InvalidArgument(format!(
        "init_method {s:?}: expected env://, tcp://host:port or file:///path"
    )))
}

/// The rank and world size, from the arguments or else from `RANK` and `WORLD_SIZE`.
pub(crate) fn rank_and_world(
    rank: Option<usize>,
    world: Option<usize>,
) -> Result<(u32, u32), Error> {
    let from_env = |name: &str| -> Result<usize, Error> {
        let v = env_var(name, &format!("{} parameter missing", name.to_lowercase()))?;
        v.parse()
            .map_err(|_| Error::InvalidArgument(format!("{name}={v:?} is not a number")))
    };
    let rank = match rank {
        Some(r) => r,
        None => from_env("RANK")?,
    };
    let world = match world {
        Some(w) => w,
        None => from_env("WORLD_SIZE")?,
    };
    if world == 0 {
        return Err(Error::InvalidArgument(
            "world_size must be at least 1".into(),
        ));
    }
    if rank >= world {
        return Err(Error::InvalidArgument(format!(
            "rank {rank} is out of range for world_size {world} (ranks are 0..{world})"
        )));
    }
    let to_u32 = |n: usize| {
        u32::try_from(n).map_err(|_| Error::InvalidArgument(format!("{n} is too large")))
    };
    Ok((to_u32(rank)?, to_u32(world)?))
}

/// Where to reach the store once it is up.
#[derive(Debug, Clone)]
pub(crate) enum StoreTarget {
    Tcp(SocketAddr),
    File(PathBuf),
}

/// Phase one of init: sockets bound, the store hosted (rank 0), nothing published yet.
#[derive(Debug)]
pub(crate) struct Bound {
    pub(crate) server: Option<TcpStoreServer>,
    pub(crate) target: StoreTarget,
    pub(crate) listener: TcpListener,
    pub(crate) advertise: SocketAddr,
    /// What protects the group's connections (store and peers).
    pub(crate) security: Security,
}

static STORE_FD_TAKEN: AtomicBool = AtomicBool::new(false);

/// The store listener handed over by the launcher, if this process is its rank 0. Taken once:
/// the variable is removed and the descriptor made close-on-exec, so that rank 0's own
/// children inherit neither.
fn inherited_store_listener() -> Result<Option<std::net::TcpListener>, Error> {
    let Ok(fd) = std::env::var(STORE_FD_ENV) else {
        return Ok(None);
    };
    // The socket belongs to the first init of this process only; a later init binds its own.
    if STORE_FD_TAKEN.swap(true, Ordering::AcqRel) {
        return Ok(None);
    }
    // SAFETY: the environment is written from one thread at a time: this runs once per process
    // (STORE_FD_TAKEN), and distrpc's own threads never read or write the environment.
    unsafe { std::env::remove_var(STORE_FD_ENV) };
    let listener = take_listener(&fd)?;
    socket2::SockRef::from(&listener).set_cloexec(true)?;
    // The launcher listened with std's short queue: deepen it (listen again is allowed).
    socket2::SockRef::from(&listener).listen(crate::net::BACKLOG)?;
    Ok(Some(listener))
}

/// The listening socket `fd` names (a descriptor number, as the launcher wrote it).
fn take_listener(fd: &str) -> Result<std::net::TcpListener, Error> {
    use std::os::fd::{BorrowedFd, FromRawFd};
    let bad = |what: &str| Error::InvalidArgument(format!("{STORE_FD_ENV}={fd:?} {what}"));
    let fd: i32 = fd
        .trim()
        .parse()
        .ok()
        .filter(|&fd| fd >= 0)
        .ok_or_else(|| bad("is not a descriptor number"))?;
    // SAFETY: `fd` is not negative (so not -1, which `borrow_raw` forbids); it is only borrowed
    // for the checks below, which fail cleanly on a descriptor that is not open.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    let socket = socket2::SockRef::from(&borrowed);
    let is_stream = socket.r#type().is_ok_and(|t| t == socket2::Type::STREAM);
    let is_ip = socket.local_addr().is_ok_and(|a| a.as_socket().is_some());
    if !(is_stream && is_ip) {
        return Err(bad("is not an open TCP socket"));
    }
    if !socket.is_listener().unwrap_or(false) {
        return Err(bad("is not a listening socket"));
    }
    // SAFETY: an open, listening TCP socket, taken at most once per process (STORE_FD_TAKEN)
    // and opened by the launcher for this process alone: from here the listener owns it.
    Ok(unsafe { std::net::TcpListener::from_raw_fd(fd) })
}

/// The local address used to reach `remote` (no packet is sent).
fn local_ip_towards(remote: SocketAddr) -> Option<IpAddr> {
    let probe = std::net::UdpSocket::bind(SocketAddr::new(
        if remote.is_ipv4() {
            Ipv4Addr::UNSPECIFIED.into()
        } else {
            IpAddr::from([0u16; 8])
        },
        0,
    ))
    .ok()?;
    probe.connect(remote).ok()?;
    probe.local_addr().ok().map(|a| a.ip())
}

pub(crate) async fn bind(
    method: &InitMethod,
    rank: u32,
    listen_ip: Option<IpAddr>,
    security: Security,
) -> Result<Bound, Error> {
    let (server, target, store_ip) = match method {
        InitMethod::Tcp { host, port } => {
            let addr = tokio::net::lookup_host((host.as_str(), *port))
                .await
                .map_err(|e| Error::Rendezvous(format!("cannot resolve {host}:{port}: {e}")))?
                .next()
                .ok_or_else(|| {
                    Error::Rendezvous(format!("{host}:{port} resolves to no address"))
                })?;
            if rank == 0 {
                let listener = match inherited_store_listener()? {
                    Some(l) => {
                        l.set_nonblocking(true)?;
                        TcpListener::from_std(l)?
                    }
                    None => crate::net::listen_async(addr).map_err(|e| {
                        Error::Rendezvous(format!("rank 0 cannot host the store on {addr}: {e}"))
                    })?,
                };
                let server = TcpStoreServer::serve(listener, security.clone())?;
                let target = StoreTarget::Tcp(server.addr());
                (Some(server), target, Some(addr))
            } else {
                (None, StoreTarget::Tcp(addr), Some(addr))
            }
        }
        InitMethod::File(path) => (None, StoreTarget::File(path.clone()), None),
    };
    // By default a worker listens only on the interface toward the store (loopback for a
    // store on this host), and advertises that address.
    let (bind_ip, advertise_ip) = match (listen_ip, store_ip) {
        (Some(ip), _) => (ip, ip),
        (None, None) => (Ipv4Addr::LOCALHOST.into(), Ipv4Addr::LOCALHOST.into()),
        (None, Some(s)) if s.ip().is_loopback() => (s.ip(), s.ip()),
        (None, Some(s)) => match local_ip_towards(s) {
            Some(ip) => (ip, ip),
            None => (Ipv4Addr::UNSPECIFIED.into(), Ipv4Addr::LOCALHOST.into()),
        },
    };
    let listener = crate::net::listen_async(SocketAddr::new(bind_ip, 0))?;
    let advertise = SocketAddr::new(advertise_ip, listener.local_addr()?.port());
    if security.auth.is_none() {
        let exposed = [
            Some(listener.local_addr()?),
            server.as_ref().map(TcpStoreServer::addr),
        ];
        for addr in exposed
            .into_iter()
            .flatten()
            .filter(|a| !a.ip().is_loopback())
        {
            tracing::warn!(
                %addr,
                "distrpc listens beyond loopback without authentication: anyone who can reach \
                 this address can join the group and run code in it (pickled calls). Set an \
                 auth token (RpcOptions::auth_token, DISTRPC_AUTH_TOKEN or \
                 DISTRPC_AUTH_TOKEN_FILE) on every worker"
            );
        }
    }
    Ok(Bound {
        server,
        target,
        listener,
        advertise,
        security,
    })
}

/// How the verdict on a group whose workers disagree on its size begins.
const DISAGREEMENT: &str = "the workers disagree on the world size";

/// Set by a worker that read the verdict of a disagreement.
const VERDICT_READ_KEY: &str = "distrpc/world/verdict_read";
/// How long rank 0 keeps its store for the verdict to be read.
const VERDICT_WAIT: Duration = Duration::from_secs(5);

/// Where the first worker to join records the world size it was given.
const WORLD_KEY: &str = "distrpc/world";

/// Checks that this worker was given the world size the first one to join was given. On a
/// disagreement every worker waiting for the group learns it through the table key, and this
/// one fails at once, naming both sides.
async fn agree_on_world(
    store: &Store,
    me: &str,
    rank: u32,
    world: u32,
    timeout: Duration,
) -> Result<(), Error> {
    let store_err = |e: StoreError| Error::Rendezvous(e.to_string());
    let codec_err = |e: crate::codec::CodecError| Error::Rendezvous(e.to_string());
    // Most workers find it set already: one round trip.
    let mut record = store.get(WORLD_KEY).await.map_err(store_err)?;
    if record.is_none() {
        if store
            .add("distrpc/world/claims", 1)
            .await
            .map_err(store_err)?
            == 1
        {
            let record = crate::codec::encode_inline(&(world, me, rank)).map_err(codec_err)?;
            store.set(WORLD_KEY, &record).await.map_err(store_err)?;
            return Ok(());
        }
        // The first claimant sets it right after its claim.
        store
            .wait(&[WORLD_KEY.to_string()], timeout)
            .await
            .map_err(store_err)?;
        record = store.get(WORLD_KEY).await.map_err(store_err)?;
    }
    let (first_world, first, first_rank): (u32, String, u32) =
        crate::codec::decode_inline(record.as_deref().unwrap_or_default()).map_err(codec_err)?;
    if first_world == world {
        return Ok(());
    }
    let message = format!(
        "{DISAGREEMENT}: {me:?} (rank {rank}) was given {world}, \
         {first:?} (rank {first_rank}) was given {first_world}"
    );
    let table: Table = Err(message.clone());
    let blob = crate::codec::encode_inline(&table).map_err(codec_err)?;
    store.set(TABLE_KEY, &blob).await.map_err(store_err)?;
    if rank == 0 {
        // This process hosts the store: the worker that set the world size reads the verdict
        // from it first (bounded: it may be gone).
        let bound = timeout.min(VERDICT_WAIT);
        let _ = store.wait(&[VERDICT_READ_KEY.to_string()], bound).await;
    }
    Err(Error::Rendezvous(message))
}

fn key_worker(rank: u32) -> String {
    format!("distrpc/worker/{rank}")
}

/// Phase two: publish this worker, wait for the others, check the group.
pub(crate) async fn join(
    target: &StoreTarget,
    security: &Security,
    me: &str,
    rank: u32,
    world: u32,
    advertise: SocketAddr,
    timeout: Duration,
) -> Result<Arc<Group>, Error> {
    let timeout = if timeout.is_zero() {
        Duration::from_secs(365 * 86400)
    } else {
        timeout
    };
    let store_err = |e: StoreError| Error::Rendezvous(e.to_string());
    let store = match target {
        StoreTarget::Tcp(addr) => Store::Tcp(
            TcpStoreClient::connect(*addr, timeout, security)
                .await
                .map_err(store_err)?,
        ),
        StoreTarget::File(path) => Store::File(FileStore::open(path).map_err(store_err)?),
    };
    agree_on_world(&store, me, rank, world, timeout).await?;
    let claims = store
        .add(&format!("distrpc/rank/{rank}/claims"), 1)
        .await
        .map_err(store_err)?;
    if claims > 1 {
        return Err(Error::Rendezvous(format!(
            "rank {rank} was claimed by more than one worker ({me:?} came after another)"
        )));
    }
    let record = crate::codec::encode_inline(&(me, advertise.to_string()))
        .map_err(|e| Error::Rendezvous(e.to_string()))?;
    store
        .set(&key_worker(rank), &record)
        .await
        .map_err(store_err)?;
    // Only the last to join, or one that waited in vain, reads every record.
    let keys = || (0..world).map(key_worker).collect::<Vec<String>>();
    // The last to join checks the group and publishes it as one table (or what is wrong with
    // it); everyone waits on that one key and reads it with one get. Each worker then reads
    // O(world) bytes, and the records are checked once, not once per worker.
    let joined = store.add("distrpc/joined", 1).await.map_err(store_err)?;
    if joined == i64::from(world) {
        let records = store.multi_get(&keys()).await.map_err(store_err)?;
        let table: Table = check_group(records);
        let blob =
            crate::codec::encode_inline(&table).map_err(|e| Error::Rendezvous(e.to_string()))?;
        store.set(TABLE_KEY, &blob).await.map_err(store_err)?;
    }
    if let Err(e) = store.wait(&[TABLE_KEY.to_string()], timeout).await {
        return Err(match e {
            StoreError::Timeout { .. } => {
                let present = store.multi_get(&keys()).await.map_err(store_err)?;
                let ranks: Vec<String> = present
                    .iter()
                    .enumerate()
                    .filter(|(_, v)| v.is_none())
                    .map(|(r, _)| r.to_string())
                    .collect();
                Error::Rendezvous(format!(
                    "{me:?} waited {timeout:?} for ranks {ranks:?} of world size {world} to join; they never did"
                ))
            }
            other => store_err(other),
        });
    }
    let blob = store
        .get(TABLE_KEY)
        .await
        .map_err(store_err)?
        .ok_or_else(|| Error::Rendezvous("the group's table vanished from the store".into()))?;
    // A group that cannot form (workers disagreeing on its size) fails here; its size is not
    // known, so rank 0 cannot wait for everyone to have read the verdict.
    let verdict = crate::codec::decode_inline::<Result<serde::de::IgnoredAny, String>>(&blob);
    if let Ok(Err(message)) = verdict
        && message.starts_with(DISAGREEMENT)
    {
        // Rank 0, if it found the disagreement, waits for this before its store goes.
        let _ = store.set(VERDICT_READ_KEY, b"").await;
        return Err(Error::Rendezvous(message));
    }
    // Rank 0 hosts the store: it must not return (and maybe exit) before every worker has read
    // it, whether the group turns out valid or not.
    let read = store.add("distrpc/read", 1).await.map_err(store_err)?;
    if read == i64::from(world) {
        store
            .set("distrpc/all_read", b"")
            .await
            .map_err(store_err)?;
    }
    if rank == 0 {
        store
            .wait(&["distrpc/all_read".to_string()], timeout)
            .await
            .map_err(store_err)?;
    }
    let group = shared_group(blob)?;
    if group.workers.len() != world as usize {
        return Err(Error::Rendezvous(format!(
            "the group's table has {} workers, not {world}",
            group.workers.len()
        )));
    }
    Ok(group)
}

/// The group as rendezvous found it: every worker's name and address. Immutable, so the
/// workers of one process that joined the same group share one copy (hundreds of in-process
/// workers then decode and hold one table, not one each).
#[derive(Debug)]
pub(crate) struct Group {
    pub(crate) workers: Vec<WorkerInfo>,
    pub(crate) addrs: Vec<SocketAddr>,
    pub(crate) by_name: HashMap<String, u32>,
    /// The table as published, which identifies the group.
    blob: Vec<u8>,
}

/// The groups this process has joined and still uses.
static GROUPS: Mutex<Vec<Weak<Group>>> = Mutex::new(Vec::new());

/// The group published as `blob`: decoded once per process.
fn shared_group(blob: Vec<u8>) -> Result<Arc<Group>, Error> {
    let mut groups = crate::sync::lock(&GROUPS);
    groups.retain(|g| g.strong_count() > 0);
    if let Some(group) = groups
        .iter()
        .filter_map(Weak::upgrade)
        .find(|g| g.blob == blob)
    {
        return Ok(group);
    }
    let table: Table = crate::codec::decode_inline(&blob)
        .map_err(|e| Error::Rendezvous(format!("bad group table: {e}")))?;
    let entries = table.map_err(Error::Rendezvous)?;
    let mut workers = Vec::with_capacity(entries.len());
    let mut addrs = Vec::with_capacity(entries.len());
    let mut by_name = HashMap::with_capacity(entries.len());
    for (r, (name, addr)) in (0u32..).zip(entries) {
        by_name.insert(name.clone(), r);
        workers.push(WorkerInfo { id: r, name });
        addrs.push(addr);
    }
    let group = Arc::new(Group {
        workers,
        addrs,
        by_name,
        blob,
    });
    groups.push(Arc::downgrade(&group));
    Ok(group)
}

/// The store key of the group's table.
const TABLE_KEY: &str = "distrpc/table";

/// The group as the last worker to join found it: each rank's name and address, or why the
/// group is not valid.
type Table = Result<Vec<(String, SocketAddr)>, String>;

/// Checks the records of every rank (present, well-formed, names unique) and makes the table.
fn check_group(records: Vec<Option<Vec<u8>>>) -> Table {
    let mut entries = Vec::with_capacity(records.len());
    // Name → rank, to find a duplicate in one look-up (not a scan of all before it).
    let mut ranks_by_name = HashMap::with_capacity(records.len());
    for (r, raw) in records.into_iter().enumerate() {
        let raw = raw.ok_or_else(|| format!("rank {r} vanished from the store"))?;
        let (name, addr): (String, String) = crate::codec::decode_inline(&raw)
            .map_err(|e| format!("bad record for rank {r}: {e}"))?;
        let addr: SocketAddr = addr
            .parse()
            .map_err(|_| format!("rank {r} published a bad address {addr:?}"))?;
        if let Some(first) = ranks_by_name.insert(name.clone(), r) {
            return Err(format!(
                "worker name {name:?} is not unique: ranks {first} and {r} both use it"
            ));
        }
        entries.push((name, addr));
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The launcher's descriptor is checked before it is taken: a number, not negative, an open
    /// listening TCP socket. Regression: -1 was handed to `BorrowedFd::borrow_raw`, and any
    /// open socket was taken.
    #[test]
    fn the_store_descriptor_is_checked_before_it_is_taken() {
        use std::os::fd::{AsRawFd, IntoRawFd};
        for bad in ["", "x", "-1", "-7", "99999"] {
            let e = take_listener(bad).err().map(|e| e.to_string());
            assert!(
                e.as_deref().is_some_and(|e| e.contains(STORE_FD_ENV)),
                "{bad}: {e:?}"
            );
        }
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let e = take_listener(&udp.as_raw_fd().to_string())
            .err()
            .map(|e| e.to_string());
        assert!(e.is_some_and(|e| e.contains("not an open TCP socket")));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let connected = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let e = take_listener(&connected.as_raw_fd().to_string())
            .err()
            .map(|e| e.to_string());
        assert!(e.is_some_and(|e| e.contains("not a listening socket")));
        let addr = listener.local_addr().unwrap();
        let fd = listener.into_raw_fd();
        let taken = take_listener(&fd.to_string()).unwrap();
        assert_eq!(taken.local_addr().unwrap(), addr);
    }

    #[test]
    fn init_methods_parse() {
        assert_eq!(
            parse_init_method("tcp://127.0.0.1:29500").unwrap(),
            InitMethod::Tcp {
                host: "127.0.0.1".into(),
                port: 29500
            }
        );
        assert_eq!(
            parse_init_method("tcp://[::1]:0").unwrap(),
            InitMethod::Tcp {
                host: "::1".into(),
                port: 0
            }
        );
        assert_eq!(
            parse_init_method("file:///tmp/x").unwrap(),
            InitMethod::File("/tmp/x".into())
        );
        for bad in [
            "tcp://nohost",
            "tcp://:1",
            "file://",
            "http://x:1",
            "tcp://h:99999",
        ] {
            assert!(parse_init_method(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn rank_must_be_in_range() {
        assert_eq!(rank_and_world(Some(1), Some(2)).unwrap(), (1, 2));
        let e = rank_and_world(Some(2), Some(2)).unwrap_err().to_string();
        assert!(e.contains("rank 2 is out of range"), "{e}");
        assert!(rank_and_world(Some(0), Some(0)).is_err());
    }
}
