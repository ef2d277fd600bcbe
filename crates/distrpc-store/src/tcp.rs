//! The TCP store: a server task hosted by rank 0 and a client per worker.
//!
//! Each request and response is a 4-byte little-endian length followed by a MessagePack value.
//! Lengths are checked against [`MAX_MESSAGE`] before anything is allocated; a client that sends
//! a malformed message is disconnected with a logged error and the server keeps serving.

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

/// Largest request or response accepted, in bytes.
pub const MAX_MESSAGE: usize = 64 << 20;

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
    /// Who waits for a key that does not exist yet. A key is only ever added, so its waiters
    /// are woken once, when it appears: a group of hundreds joining does not wake every waiter
    /// at every write.
    waiters: HashMap<String, Arc<Notify>>,
}

impl Keys {
    /// Inserts `k`, waking whoever waited for it to appear.
    fn insert(&mut self, k: String, v: Vec<u8>) {
        if let Some(appeared) = self.waiters.remove(&k) {
            appeared.notify_waiters();
        }
        self.map.insert(k, v);
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
        match req {
            Request::Set(k, v) => {
                self.lock().insert(k, v);
                Response::Ok
            }
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
                        state.insert(k, n.to_string().into_bytes());
                        Response::Counter(n)
                    }
                    Err(e) => Response::Error(e.to_string()),
                }
            }
            Request::Wait(keys, timeout_ms) => {
                let deadline = Instant::now() + Duration::from_millis(timeout_ms);
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
    stream: &mut TcpStream,
) -> std::io::Result<Option<T>> {
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
    let mut buf = vec![0u8; len];
    stream.read_exact(&mut buf).await?;
    rmp_serde::from_slice(&buf)
        .map(Some)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

async fn write_message<T: Serialize>(stream: &mut TcpStream, msg: &T) -> std::io::Result<()> {
    let body = rmp_serde::to_vec(msg).map_err(std::io::Error::other)?;
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
    stream.write_all(&out).await
}

/// The TCP store server. It runs as a task on the current tokio runtime until dropped.
#[derive(Debug)]
pub struct TcpStoreServer {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl TcpStoreServer {
    /// Serves on `listener` (already bound; use port 0 to let the OS choose).
    pub fn serve(listener: TcpListener) -> std::io::Result<Self> {
        let addr = listener.local_addr()?;
        let state = Arc::new(State::default());
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok((stream, peer)) => {
                            let state = state.clone();
                            conns.spawn(async move {
                                if let Err(e) = serve_conn(stream, &state).await {
                                    tracing::warn!(%peer, error = %e, "store connection closed");
                                }
                            });
                        }
                        Err(e) => tracing::warn!(error = %e, "store accept failed"),
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

async fn serve_conn(mut stream: TcpStream, state: &State) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
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
    stream: tokio::sync::Mutex<TcpStream>,
}

impl TcpStoreClient {
    /// Connects to the store at `addr`, retrying until `timeout` while it is not up yet (rank 0
    /// may start after the others).
    pub async fn connect(addr: SocketAddr, timeout: Duration) -> Result<Self, StoreError> {
        let deadline = Instant::now() + timeout;
        let mut backoff = Duration::from_millis(5);
        loop {
            match TcpStream::connect(addr).await {
                Ok(stream) => {
                    let _ = stream.set_nodelay(true);
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
        write_message(&mut stream, &req).await.map_err(io)?;
        match read_message::<Response>(&mut stream).await.map_err(io)? {
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

    async fn server_and_client() -> (TcpStoreServer, Store) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server = TcpStoreServer::serve(listener).unwrap();
        let client = TcpStoreClient::connect(server.addr(), Duration::from_secs(5))
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
        let other = TcpStoreClient::connect(server.addr(), Duration::from_secs(5))
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
            let client = TcpStoreClient::connect(server.addr(), Duration::from_secs(5))
                .await
                .unwrap();
            let keys = vec![format!("a{}", i % 4), "counter".to_string()];
            waiters.push(tokio::spawn(async move {
                client.wait(&keys, Duration::from_secs(30)).await
            }));
        }
        let writer = TcpStoreClient::connect(server.addr(), Duration::from_secs(5))
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
}
