//! The file store: every `set` appends a record to one file under an exclusive lock, and every
//! read replays the file. Meant for the few keys of a rendezvous, not for heavy traffic.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::time::Instant;

use crate::{StoreError, parse_counter};

/// A store kept in a file that every worker opens (`file:///path`).
#[derive(Debug, Clone)]
pub struct FileStore {
    path: PathBuf,
}

impl FileStore {
    /// Opens (creating if needed) the store at `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        let path = path.as_ref().to_path_buf();
        let store = Self { path };
        store.file()?;
        Ok(store)
    }

    fn io(&self, source: std::io::Error) -> StoreError {
        StoreError::Io {
            addr: self.path.display().to_string(),
            source,
        }
    }

    fn file(&self) -> Result<File, StoreError> {
        OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&self.path)
            .map_err(|e| self.io(e))
    }

    fn replay(&self, file: &mut File) -> Result<HashMap<String, Vec<u8>>, StoreError> {
        let mut bytes = Vec::new();
        file.seek(SeekFrom::Start(0)).map_err(|e| self.io(e))?;
        file.read_to_end(&mut bytes).map_err(|e| self.io(e))?;
        let mut map = HashMap::new();
        let mut rest = &bytes[..];
        while let Some((len, tail)) = rest.split_first_chunk::<4>() {
            let len = u32::from_le_bytes(*len) as usize;
            let record = tail.get(..len).ok_or_else(|| {
                StoreError::Protocol(format!("truncated record in {}", self.path.display()))
            })?;
            let (k, v): (String, serde_bytes::ByteBuf) =
                rmp_serde::from_slice(record).map_err(|e| {
                    StoreError::Protocol(format!("bad record in {}: {e}", self.path.display()))
                })?;
            map.insert(k, v.into_vec());
            rest = &tail[len..];
        }
        Ok(map)
    }

    fn append(&self, file: &mut File, key: &str, value: &[u8]) -> Result<(), StoreError> {
        let record = rmp_serde::to_vec(&(key, serde_bytes::Bytes::new(value)))
            .map_err(|e| StoreError::Protocol(e.to_string()))?;
        let mut out = (record.len() as u32).to_le_bytes().to_vec();
        out.extend_from_slice(&record);
        file.write_all(&out).map_err(|e| self.io(e))
    }

    /// Runs `f` on the file's contents under an exclusive lock.
    fn locked<R>(
        &self,
        f: impl FnOnce(&mut File, HashMap<String, Vec<u8>>) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        let mut file = self.file()?;
        file.lock().map_err(|e| self.io(e))?;
        let map = self.replay(&mut file)?;
        // The lock is released when `file` is closed.
        f(&mut file, map)
    }

    pub(crate) fn set(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.locked(|file, _| self.append(file, key, value))
    }

    pub(crate) fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.locked(|_, mut map| Ok(map.remove(key)))
    }

    pub(crate) fn multi_get(&self, keys: &[String]) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        self.locked(|_, mut map| Ok(keys.iter().map(|k| map.remove(k)).collect()))
    }

    pub(crate) fn add(&self, key: &str, delta: i64) -> Result<i64, StoreError> {
        self.locked(|file, map| {
            let current = map.get(key).map(|v| parse_counter(key, v)).transpose()?;
            let n = current.unwrap_or(0).saturating_add(delta);
            self.append(file, key, n.to_string().as_bytes())?;
            Ok(n)
        })
    }

    pub(crate) async fn wait(&self, keys: &[String], timeout: Duration) -> Result<(), StoreError> {
        let deadline = Instant::now() + timeout;
        let mut backoff = Duration::from_millis(1);
        loop {
            let missing: Vec<String> = self.locked(|_, map| {
                Ok(keys
                    .iter()
                    .filter(|k| !map.contains_key(*k))
                    .cloned()
                    .collect())
            })?;
            if missing.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(StoreError::Timeout { timeout, missing });
            }
            // A plain file gives no change notification: poll with a bounded backoff.
            tokio::time::sleep(backoff.min(deadline - Instant::now())).await;
            backoff = (backoff * 2).min(Duration::from_millis(50));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Store;

    #[tokio::test]
    async fn two_handles_share_one_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store");
        let a = Store::File(FileStore::open(&path).unwrap());
        let b = Store::File(FileStore::open(&path).unwrap());
        a.set("k", b"v").await.unwrap();
        assert_eq!(b.get("k").await.unwrap().as_deref(), Some(&b"v"[..]));
        assert_eq!(a.add("c", 1).await.unwrap(), 1);
        assert_eq!(b.add("c", 1).await.unwrap(), 2);
        b.wait(&["k".into(), "c".into()], Duration::from_secs(1))
            .await
            .unwrap();
        let err = a
            .wait(&["nope".into()], Duration::from_millis(20))
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Timeout { .. }));
    }
}
