//! The TCP store: a server task hosted by rank 0 and a client per worker.
//!
//! Each request and response is a 4-byte little-endian length followed by a MessagePack value.
//! Lengths are checked against [`MAX_MESSAGE`], and a body's memory grows only as its bytes
//! arrive; keys, values, what the store holds in all, how many clients it serves and how long
//! a wait lasts are bounded too ([`MAX_KEY`], [`MAX_STORED`], [`MAX_CLIENTS`], [`MAX_WAIT`]). A
//! client that sends a malformed message is disconnected with a logged error and the server
//! keeps serving. With the group's [`Security`], connections run over mutual TLS, and both
//! ends prove they know the group's secret before the first message ([`distrpc_secure`]).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::{StoreError, parse_counter};
use distrpc_secure::{AuthError, SecureError, Secured, Security};

/// Largest request or response accepted, in bytes.
pub const MAX_MESSAGE: usize = 64 << 20;
/// Longest key accepted, in bytes.
pub const MAX_KEY: usize = 4096;
/// Most bytes the store holds in all (keys and values); a set beyond is refused.
pub const MAX_STORED: usize = 256 << 20;
/// Most clients served at once; more wait to be accepted.
pub const MAX_CLIENTS: usize = 4096;
/// Longest wait a client may ask for.
pub const MAX_WAIT: Duration = Duration::from_secs(366 * 86400);
/// How long a client has to authenticate.
const AUTH_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest pause of the accept loop after an accept error (too many open files, …).
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

#[derive(Serialize, Deserialize, Debug)]
enum Request {
    Set(String, #[serde(with = "serde_bytes")] Vec<u8>),
    Get(String),
    MultiGet(Vec<String>),
    Add(String, i64),
    Wait(Vec<String>, u64),
}

#[derive(Serialize, Deserialize, Debug)]
enum Response {
    Ok,
    Value(Option<serde_bytes::ByteBuf>),
    Values(Vec<Option<serde_bytes::ByteBuf>>),
    Counter(i64),
    Missing(Vec<String>),
    Error(String),
}

#[derive(Default)]
struct Keys {
    map: HashMap<String, Vec<u8>>,
    /// The bytes of every key and value in `map`.
    stored: usize,
    /// Who waits for a key that does not exist yet. A key is only ever added, so its waiters
    /// are woken once, when it appears: a group of hundreds joining does not wake every waiter
    /// at every write.
    waiters: HashMap<String, Arc<Notify>>,
}

impl Keys {
    /// Inserts `k`, waking whoever waited for it to appear; refused if the store would hold
    /// more than [`MAX_STORED`] bytes.
    fn insert(&mut self, k: String, v: Vec<u8>) -> Result<(), String> {
        let old = self.map.get(&k).map_or(0, |old| k.len() + old.len());
        let stored = self.stored - old + k.len() + v.len();
        if stored > MAX_STORED {
            return Err(format!(
                "the store holds {} bytes; setting {k:?} would make it more than {MAX_STORED}",
                self.stored
            ));
        }
        self.stored = stored;
        if let Some(appeared) = self.waiters.remove(&k) {
            appeared.notify_waiters();
        }
        self.map.insert(k, v);
        Ok(())
    }
}

#[derive(Default)]
struct State {
    keys: Mutex<Keys>,
}

impl State {
    fn lock(&self) -> std::sync::MutexGuard<'_, Keys> {
        // A panic while holding this lock leaves the map consistent (every update is one insert),
        // so a poisoned lock is still safe to use.
        self.keys.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn handle(&self, req: Request) -> Response {
        let keys = match &req {
            Request::Set(k, _) | Request::Get(k) | Request::Add(k, _) => std::slice::from_ref(k),
            Request::MultiGet(keys) | Request::Wait(keys, _) => keys.as_slice(),
        };
        if let Some(k) = keys.iter().find(|k| k.len() > MAX_KEY) {
            return Response::Error(format!(
                "a key of {} bytes is longer than the limit of {MAX_KEY}",
                k.len()
            ));
        }
        match req {
            Request::Set(k, v) => match self.lock().insert(k, v) {
                Ok(()) => Response::Ok,
                Err(e) => Response::Error(e),
            },
            Request::Get(k) => Response::Value(self.lock().map.get(&k).cloned().map(Into::into)),
            Request::MultiGet(keys) => {
                let state = self.lock();
                Response::Values(
                    keys.iter()
                        .map(|k| state.map.get(k).cloned().map(Into::into))
                        .collect(),
                )
            }
            Request::Add(k, delta) => {
                let mut state = self.lock();
                let current = state.map.get(&k).map(|v| parse_counter(&k, v)).transpose();
                match current {
                    Ok(c) => {
                        let n = c.unwrap_or(0).saturating_add(delta);
                        match state.insert(k, n.to_string().into_bytes()) {
                            Ok(()) => Response::Counter(n),
                            Err(e) => Response::Error(e),
                        }
                    }
                    Err(e) => Response::Error(e.to_string()),
                }
            }
            Request::Wait(keys, timeout_ms) => {
                // A client's number: capped, so that the deadline cannot overflow.
                let deadline = Instant::now() + Duration::from_millis(timeout_ms).min(MAX_WAIT);
                loop {
                    // Wait for the first missing key to appear. The wait is registered under the
                    // lock that its insert takes to notify, so the insert cannot slip in between
                    // (a `Notified` hears `notify_waiters` from its creation on).
                    let appeared: Arc<Notify>;
                    let notified = {
                        let mut state = self.lock();
                        let Some(missing) = keys.iter().find(|k| !state.map.contains_key(*k))
                        else {
                            return Response::Ok;
                        };
                        appeared = state.waiters.entry(missing.clone()).or_default().clone();
                        appeared.notified()
                    };
                    if tokio::time::timeout_at(deadline, notified).await.is_err() {
                        let state = self.lock();
                        let missing = keys
                            .iter()
                            .filter(|k| !state.map.contains_key(*k))
                            .cloned()
                            .collect();
                        return Response::Missing(missing);
                    }
                }
            }
        }
    }
}

async fn read_message<T: for<'de> Deserialize<'de>>(
    stream: &mut (impl tokio::io::AsyncRead + Unpin),
) -> std::io::Result<Option<T>> {
    /// What is reserved for a body before its bytes arrive: a declared length alone makes
    /// the reader allocate no more.
    const FIRST_PIECE: usize = 64 << 10;
    let mut len = [0u8; 4];
    match stream.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_MESSAGE {
        return Err(std::io::Error::other(format!(
            "store message of {len} bytes exceeds {MAX_MESSAGE}"
        )));
    }
    let mut buf = Vec::with_capacity(len.min(FIRST_PIECE));
    (&mut *stream)
        .take(len as u64)
        .read_to_end(&mut buf)
        .await?;
    if buf.len() < len {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    rmp_serde::from_slice(&buf)
        .map(Some)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

async fn write_message<T: Serialize>(
    stream: &mut (impl tokio::io::AsyncWrite + Unpin),
    msg: &T,
) -> std::io::Result<()> {
    let body = rmp_serde::to_vec(msg).map_err(std::io::Error::other)?;
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
    stream.write_all(&out).await?;
    // (A TLS stream may hold what was written until flushed.)
    stream.flush().await
}

/// The TCP store server. It runs as a task on the current tokio runtime until dropped.
#[derive(Debug)]
pub struct TcpStoreServer {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl TcpStoreServer {
    /// Serves on `listener` (already bound; use port 0 to let the OS choose). With TLS in
    /// `security`, a client must have a certificate of the group's CA; with a secret, it must
    /// prove it knows it — before its first request is read.
    pub fn serve(listener: TcpListener, security: Security) -> std::io::Result<Self> {
        let addr = listener.local_addr()?;
        let state = Arc::new(State::default());
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            let mut backoff = Duration::ZERO;
            loop {
                tokio::select! {
                    accepted = listener.accept(), if conns.len() < MAX_CLIENTS => match accepted {
                        Ok((stream, peer)) => {
                            backoff = Duration::ZERO;
                            let (state, security) = (state.clone(), security.clone());
                            conns.spawn(async move {
                                if let Err(e) = serve_conn(stream, &state, &security).await {
                                    tracing::warn!(%peer, error = %e, "store connection closed");
                                }
                            });
                        }
                        Err(e) => {
                            // Out of descriptors, say: wait before trying again, not spin.
                            backoff = (backoff * 2).clamp(Duration::from_millis(5), MAX_ACCEPT_BACKOFF);
                            tracing::warn!(error = %e, ?backoff, "store accept failed");
                            tokio::time::sleep(backoff).await;
                        }
                    },
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                }
            }
        });
        Ok(Self { addr, task })
    }

    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for TcpStoreServer {
    fn drop(&mut self) {
        // Aborting the accept task drops its JoinSet, which aborts every connection task.
        self.task.abort();
    }
}

async fn serve_conn(tcp: TcpStream, state: &State, security: &Security) -> std::io::Result<()> {
    tcp.set_nodelay(true)?;
    let secured = async {
        let mut stream = security.accept_tls(tcp).await?;
        if let Err(e) = security.authenticate(&mut stream).await {
            if matches!(e, AuthError::NotAuthenticating) {
                // A client without a token sent a request: tell it why it gets no answer.
                let why = "this store admits only the group's workers: set the group's auth \
                           token (DISTRPC_AUTH_TOKEN, DISTRPC_AUTH_TOKEN_FILE or \
                           RpcOptions::auth_token) on this worker too";
                let _ = write_message(&mut stream, &Response::Error(why.into())).await;
            }
            return Err(SecureError::Auth(e));
        }
        Ok(stream)
    };
    let mut stream = match tokio::time::timeout(AUTH_TIMEOUT, secured).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => return Err(std::io::Error::other(format!("not admitted: {e}"))),
        Err(_) => {
            return Err(std::io::Error::other(format!(
                "not admitted within {AUTH_TIMEOUT:?}"
            )));
        }
    };
    while let Some(req) = read_message::<Request>(&mut stream).await? {
        let resp = state.handle(req).await;
        write_message(&mut stream, &resp).await?;
    }
    Ok(())
}

/// A client of a [`TcpStoreServer`].
#[derive(Debug)]
pub struct TcpStoreClient {
    addr: SocketAddr,
    stream: tokio::sync::Mutex<Secured>,
}

impl TcpStoreClient {
    /// Connects to the store at `addr`, retrying until `timeout` while it is not up yet (rank 0
    /// may start after the others), secured as `security` says (TLS, then the secret's proof).
    pub async fn connect(
        addr: SocketAddr,
        timeout: Duration,
        security: &Security,
    ) -> Result<Self, StoreError> {
        let deadline = Instant::now() + timeout;
        let mut backoff = Duration::from_millis(5);
        loop {
            match TcpStream::connect(addr).await {
                Ok(tcp) => {
                    let _ = tcp.set_nodelay(true);
                    let secured = tokio::time::timeout(AUTH_TIMEOUT, security.dial(tcp));
                    let stream = match secured.await {
                        Ok(Ok(stream)) => stream,
                        Ok(Err(SecureError::Auth(e))) => return Err(StoreError::Auth(e)),
                        Ok(Err(e)) => {
                            return Err(StoreError::Io {
                                addr: addr.to_string(),
                                source: std::io::Error::other(e),
                            });
                        }
                        Err(_) => {
                            return Err(StoreError::Protocol(format!(
                                "the store at {addr} did not authenticate within {AUTH_TIMEOUT:?}"
                            )));
                        }
                    };
                    return Ok(Self {
                        addr,
                        stream: tokio::sync::Mutex::new(stream),
                    });
                }
                Err(e) if Instant::now() + backoff >= deadline => {
                    return Err(StoreError::Io {
                        addr: addr.to_string(),
                        source: e,
                    });
                }
                // Nothing tells us when rank 0 starts listening: retry with a bounded backoff.
                Err(_) => tokio::time::sleep(backoff).await,
            }
            backoff = (backoff * 2).min(Duration::from_millis(200));
        }
    }

    async fn call(&self, req: Request) -> Result<Response, StoreError> {
        let io = |source| StoreError::Io {
            addr: self.addr.to_string(),
            source,
        };
        let mut stream = self.stream.lock().await;
        write_message(&mut *stream, &req).await.map_err(io)?;
        match read_message::<Response>(&mut *stream).await.map_err(io)? {
            Some(Response::Error(e)) => Err(StoreError::Protocol(e)),
            Some(resp) => Ok(resp),
            None => Err(io(std::io::ErrorKind::UnexpectedEof.into())),
        }
    }

    pub(crate) async fn set(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        match self.call(Request::Set(key.into(), value.to_vec())).await? {
            Response::Ok => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    pub(crate) async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        match self.call(Request::Get(key.into())).await? {
            Response::Value(v) => Ok(v.map(|b| b.into_vec())),
            other => Err(unexpected(other)),
        }
    }

    pub(crate) async fn multi_get(
        &self,
        keys: &[String],
    ) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        match self.call(Request::MultiGet(keys.to_vec())).await? {
            Response::Values(v) if v.len() == keys.len() => {
                Ok(v.into_iter().map(|b| b.map(|b| b.into_vec())).collect())
            }
            other => Err(unexpected(other)),
        }
    }

    pub(crate) async fn add(&self, key: &str, delta: i64) -> Result<i64, StoreError> {
        match self.call(Request::Add(key.into(), delta)).await? {
            Response::Counter(n) => Ok(n),
            other => Err(unexpected(other)),
        }
    }

    pub(crate) async fn wait(&self, keys: &[String], timeout: Duration) -> Result<(), StoreError> {
        let ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        match self.call(Request::Wait(keys.to_vec(), ms)).await? {
            Response::Ok => Ok(()),
            Response::Missing(missing) => Err(StoreError::Timeout { timeout, missing }),
            other => Err(unexpected(other)),
        }
    }
}

fn unexpected(resp: Response) -> StoreError {
    StoreError::Protocol(format!("unexpected response {resp:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Store;
    use distrpc_secure::Secret;

    async fn server_and_client() -> (TcpStoreServer, Store) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server = TcpStoreServer::serve(listener, Security::default()).unwrap();
        let client =
            TcpStoreClient::connect(server.addr(), Duration::from_secs(5), &Security::default())
                .await
                .unwrap();
        (server, Store::Tcp(client))
    }

    #[tokio::test]
    async fn set_get_add() {
        let (_server, store) = server_and_client().await;
        assert_eq!(store.get("a").await.unwrap(), None);
        store.set("a", b"1").await.unwrap();
        assert_eq!(store.get("a").await.unwrap().as_deref(), Some(&b"1"[..]));
        assert_eq!(
            store.multi_get(&["a".into(), "zz".into()]).await.unwrap(),
            vec![Some(b"1".to_vec()), None]
        );
        assert_eq!(store.add("n", 2).await.unwrap(), 2);
        assert_eq!(store.add("n", 3).await.unwrap(), 5);
        store.set("x", b"not a number").await.unwrap();
        assert!(store.add("x", 1).await.is_err());
    }

    #[tokio::test]
    async fn wait_wakes_on_set_and_times_out_naming_keys() {
        let (server, store) = server_and_client().await;
        let other =
            TcpStoreClient::connect(server.addr(), Duration::from_secs(5), &Security::default())
                .await
                .unwrap();
        let keys = vec!["k1".to_string(), "k2".to_string()];
        let waiter = tokio::spawn(async move { store.wait(&keys, Duration::from_secs(30)).await });
        other.set("k1", b"").await.unwrap();
        other.set("k2", b"").await.unwrap();
        waiter.await.unwrap().unwrap();
        let err = other
            .wait(&["never".into()], Duration::from_millis(50))
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Timeout { ref missing, .. } if missing == &["never"]));
    }

    /// Waiters are woken per key: each must still wake once all of its keys exist, whichever
    /// order they appear in and whether a set or an add made them.
    #[tokio::test]
    async fn many_waiters_wake_when_their_keys_appear() {
        let (server, _store) = server_and_client().await;
        let mut waiters = Vec::new();
        for i in 0..40 {
            let client = TcpStoreClient::connect(
                server.addr(),
                Duration::from_secs(5),
                &Security::default(),
            )
            .await
            .unwrap();
            let keys = vec![format!("a{}", i % 4), "counter".to_string()];
            waiters.push(tokio::spawn(async move {
                client.wait(&keys, Duration::from_secs(30)).await
            }));
        }
        let writer =
            TcpStoreClient::connect(server.addr(), Duration::from_secs(5), &Security::default())
                .await
                .unwrap();
        writer.set("unrelated", b"").await.unwrap();
        for k in ["a3", "a1", "a0", "a2"] {
            writer.set(k, b"").await.unwrap();
        }
        writer.add("counter", 1).await.unwrap();
        for w in waiters {
            w.await.unwrap().unwrap();
        }
    }

    #[tokio::test]
    async fn garbage_closes_that_connection_only() {
        let (server, store) = server_and_client().await;
        let mut raw = TcpStream::connect(server.addr()).await.unwrap();
        raw.write_all(&u32::MAX.to_le_bytes()).await.unwrap();
        let mut buf = [0u8; 1];
        assert_eq!(
            raw.read(&mut buf).await.unwrap(),
            0,
            "server must close the bad connection"
        );
        store.set("still", b"works").await.unwrap();
        assert!(store.get("still").await.unwrap().is_some());
    }

    /// A client's numbers cannot hurt the server: a wait of u64::MAX milliseconds (an
    /// overflowing deadline once) and an over-long key are answered, and it keeps serving.
    #[tokio::test]
    async fn hostile_numbers_get_answers_not_panics() {
        let (server, store) = server_and_client().await;
        let raw =
            TcpStoreClient::connect(server.addr(), Duration::from_secs(5), &Security::default())
                .await
                .unwrap();
        let waiting =
            tokio::spawn(async move { raw.call(Request::Wait(vec!["k".into()], u64::MAX)).await });
        let long = "k".repeat(MAX_KEY + 1);
        let err = store.set(&long, b"").await.unwrap_err();
        assert!(err.to_string().contains("longer than the limit"), "{err}");
        store.set("k", b"v").await.unwrap();
        let answered = waiting.await.unwrap().unwrap();
        assert!(matches!(answered, Response::Ok), "{answered:?}");
    }

    #[tokio::test]
    async fn the_store_refuses_to_hold_more_than_its_bound() {
        let (_server, store) = server_and_client().await;
        let chunk = vec![0u8; MAX_MESSAGE - 1024];
        let mut stored = 0;
        let err = loop {
            match store.set(&format!("k{stored}"), &chunk).await {
                Ok(()) => stored += 1,
                Err(e) => break e,
            }
        };
        assert_eq!(stored, MAX_STORED / chunk.len(), "{err}");
        assert!(err.to_string().contains("would make it more than"), "{err}");
        // Replacing a value frees its bytes.
        store.set("k0", b"small").await.unwrap();
        store.set("k-after", &chunk).await.unwrap();
    }

    #[tokio::test]
    async fn authenticated_store_admits_only_the_group() {
        let secret = Secret::new("the group's shared token").unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let with = |auth: Option<&Secret>| Security {
            auth: auth.cloned(),
            tls: None,
        };
        let server = TcpStoreServer::serve(listener, with(Some(&secret))).unwrap();
        let timeout = Duration::from_secs(5);
        let member = TcpStoreClient::connect(server.addr(), timeout, &with(Some(&secret)))
            .await
            .unwrap();
        member.set("a", b"1").await.unwrap();

        let stranger = Secret::new("another group's token").unwrap();
        let err = TcpStoreClient::connect(server.addr(), timeout, &with(Some(&stranger)))
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Auth(_)), "{err}");

        // No token at all: its first request is never read; the connection closes.
        let bare = TcpStoreClient::connect(server.addr(), timeout, &with(None))
            .await
            .unwrap();
        let err = bare.get("a").await.unwrap_err();
        assert!(
            err.to_string().contains("set the group's auth token"),
            "{err}"
        );

        assert_eq!(member.get("a").await.unwrap().as_deref(), Some(&b"1"[..]));
    }
}
