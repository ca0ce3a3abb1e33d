//! The Raft log on disk: a sled database of its own in the node's data
//! directory (`raft/`), entries keyed by index, the vote and the committed
//! and purged log ids beside them. An append is acknowledged to Raft after
//! sled's flush (an fsync): the node counts towards a majority only for
//! what is on its disk.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::path::Path;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{Entry, LogId, RaftLogReader, StorageIOError, Vote};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::types::{NodeId, StorageError, TypeConfig};

/// The Raft log (cheap to clone: sled handles).
#[derive(Clone)]
pub struct LogStore {
    db: sled::Db,
    entries: sled::Tree,
    meta: sled::Tree,
}

const VOTE: &[u8] = b"vote";
const COMMITTED: &[u8] = b"committed";
const PURGED: &[u8] = b"purged";
const CATCH_UP: &[u8] = b"catch_up";

fn read_err(e: &(impl std::error::Error + 'static)) -> StorageError {
    StorageIOError::read_logs(e).into()
}

fn write_err(e: &(impl std::error::Error + 'static)) -> StorageError {
    StorageIOError::write_logs(e).into()
}

fn decode<T: DeserializeOwned>(v: &[u8]) -> Result<T, StorageError> {
    postcard::from_bytes(v).map_err(|e| read_err(&e))
}

fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, StorageError> {
    postcard::to_allocvec(v).map_err(|e| write_err(&e))
}

fn index_of(key: &[u8]) -> Result<u64, StorageError> {
    key.try_into()
        .map(u64::from_be_bytes)
        .map_err(|_| read_err(&std::io::Error::other("a Raft log key is not 8 bytes")))
}

impl LogStore {
    /// Opens (or creates) the Raft log in `dir`.
    pub fn open(dir: &Path) -> Result<LogStore, sled::Error> {
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(8 << 20)
            .flush_every_ms(None)
            .open()?;
        Ok(LogStore {
            entries: db.open_tree("entries")?,
            meta: db.open_tree("meta")?,
            db,
        })
    }

    /// Nothing stored, not even a vote: a new node, or one whose data was
    /// wiped.
    pub fn is_blank(&self) -> Result<bool, StorageError> {
        Ok(self.entries.is_empty() && self.get::<Vote<NodeId>>(VOTE)?.is_none())
    }

    /// The index this node must hold before it votes again ([`crate::gate`]).
    pub fn catch_up(&self) -> Result<Option<u64>, StorageError> {
        self.get(CATCH_UP)
    }

    /// Sets (or, with `None`, clears) it, durably.
    pub async fn set_catch_up(&self, to: Option<u64>) -> Result<(), StorageError> {
        match to {
            Some(i) => self.put(CATCH_UP, &i)?,
            None => {
                self.meta.remove(CATCH_UP).map_err(|e| write_err(&e))?;
            }
        }
        self.flush().await
    }

    fn get<T: DeserializeOwned>(&self, key: &[u8]) -> Result<Option<T>, StorageError> {
        match self.meta.get(key).map_err(|e| read_err(&e))? {
            Some(v) => decode(&v).map(Some),
            None => Ok(None),
        }
    }

    fn put<T: Serialize>(&self, key: &[u8], value: &T) -> Result<(), StorageError> {
        self.meta
            .insert(key, encode(value)?)
            .map_err(|e| write_err(&e))?;
        Ok(())
    }

    async fn flush(&self) -> Result<(), StorageError> {
        self.db.flush_async().await.map_err(|e| write_err(&e))?;
        Ok(())
    }

    /// Removes the entries whose keys are in `range`.
    fn remove<R: RangeBounds<[u8; 8]>>(&self, range: R) -> Result<(), StorageError> {
        let keys: Vec<sled::IVec> = self
            .entries
            .range(range)
            .keys()
            .collect::<Result<_, _>>()
            .map_err(|e| read_err(&e))?;
        for k in keys {
            self.entries.remove(k).map_err(|e| write_err(&e))?;
        }
        Ok(())
    }

    /// Entries stored (for status).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// No entries stored.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError> {
        let start = match range.start_bound() {
            Bound::Included(&i) => i,
            Bound::Excluded(&i) => i.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let mut out = Vec::new();
        for item in self.entries.range(start.to_be_bytes()..) {
            let (k, v) = item.map_err(|e| read_err(&e))?;
            if !range.contains(&index_of(&k)?) {
                break;
            }
            out.push(decode(&v)?);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let purged: Option<LogId<NodeId>> = self.get(PURGED)?;
        let last = match self.entries.last().map_err(|e| read_err(&e))? {
            Some((_, v)) => Some(decode::<Entry<TypeConfig>>(&v)?.log_id),
            None => purged,
        };
        Ok(LogState {
            last_purged_log_id: purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError> {
        self.put(VOTE, vote)?;
        self.flush().await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError> {
        self.get(VOTE)
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogId<NodeId>>,
    ) -> Result<(), StorageError> {
        self.put(COMMITTED, &committed)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, StorageError> {
        Ok(self.get::<Option<LogId<NodeId>>>(COMMITTED)?.flatten())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        for e in entries {
            self.entries
                .insert(e.log_id.index.to_be_bytes(), encode(&e)?)
                .map_err(|e| write_err(&e))?;
        }
        // Acknowledged once on disk. Awaited here, not in a task of its
        // own: an acknowledgement then never crosses a later truncation.
        let started = std::time::Instant::now();
        let flushed = self
            .db
            .flush_async()
            .await
            .map(drop)
            .map_err(std::io::Error::other);
        tracing::debug!(took = ?started.elapsed(), "cluster: Raft log synced");
        callback.log_io_completed(flushed);
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError> {
        self.remove(log_id.index.to_be_bytes()..)?;
        self.flush().await
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError> {
        self.put(PURGED, &log_id)?;
        self.remove(..=log_id.index.to_be_bytes())?;
        self.flush().await
    }
}
