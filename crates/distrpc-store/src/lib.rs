//! The rendezvous store of distrpc: a small key-value store through which workers find each
//! other at init (torch's `c10d::Store`).
//!
//! - [`TcpStoreServer`] is hosted inside rank 0's process; every worker talks to it with a
//!   [`Store::Tcp`] client. Nothing needs to be installed or started by hand.
//! - [`Store::File`] keeps the same data in one file that every worker can open
//!   (`file:///path`), for single-machine groups and tests.
//!
//! The operations are the ones rendezvous needs: [`Store::set`], [`Store::get`], [`Store::add`]
//! (an atomic counter) and [`Store::wait`] (block until keys exist, with a timeout).

mod file;
mod tcp;

use std::time::Duration;

pub use file::FileStore;
pub use tcp::{
    MAX_CLIENTS, MAX_KEY, MAX_MESSAGE, MAX_STORED, MAX_WAIT, TcpStoreClient, TcpStoreServer,
};

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// Talking to the store failed.
    #[error("store i/o with {addr}: {source}")]
    Io {
        /// The store's address or path.
        addr: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Keys did not appear within the timeout.
    #[error("timed out after {timeout:?} waiting for store keys {missing:?}")]
    Timeout {
        /// The timeout that ran out.
        timeout: Duration,
        /// Keys still missing.
        missing: Vec<String>,
    },
    /// The store sent or holds something that is not a valid store message.
    #[error("store protocol error: {0}")]
    Protocol(String),
    /// The store and this client do not share the group's auth token.
    #[error("store authentication: {0}")]
    Auth(#[from] distrpc_secure::AuthError),
    /// A counter key holds a value that is not a counter.
    #[error("store key {0:?} does not hold a counter")]
    NotACounter(String),
}

/// A connection to a rendezvous store.
#[derive(Debug)]
#[non_exhaustive]
pub enum Store {
    /// A client of a [`TcpStoreServer`].
    Tcp(TcpStoreClient),
    /// A store kept in a file.
    File(FileStore),
}

impl Store {
    /// Sets `key` to `value`, waking every waiter on it.
    pub async fn set(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        match self {
            Store::Tcp(c) => c.set(key, value).await,
            Store::File(f) => f.set(key, value),
        }
    }

    /// The value of `key`, if it is set.
    pub async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        match self {
            Store::Tcp(c) => c.get(key).await,
            Store::File(f) => f.get(key),
        }
    }

    /// The values of `keys`, in order, in one round trip (`None` for a key that is not set).
    pub async fn multi_get(&self, keys: &[String]) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        match self {
            Store::Tcp(c) => c.multi_get(keys).await,
            Store::File(f) => f.multi_get(keys),
        }
    }

    /// Adds `delta` to the counter at `key` (missing counts as 0) and returns the new value.
    pub async fn add(&self, key: &str, delta: i64) -> Result<i64, StoreError> {
        match self {
            Store::Tcp(c) => c.add(key, delta).await,
            Store::File(f) => f.add(key, delta),
        }
    }

    /// Waits until every key in `keys` is set, or fails with the missing ones after `timeout`.
    pub async fn wait(&self, keys: &[String], timeout: Duration) -> Result<(), StoreError> {
        match self {
            Store::Tcp(c) => c.wait(keys, timeout).await,
            Store::File(f) => f.wait(keys, timeout).await,
        }
    }
}

/// Reads a counter value as stored by [`Store::add`] (decimal ASCII, as torch's stores do).
fn parse_counter(key: &str, value: &[u8]) -> Result<i64, StoreError> {
    std::str::from_utf8(value)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| StoreError::NotACounter(key.to_string()))
}
