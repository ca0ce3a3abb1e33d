//! The Raft log on disk: a sled database of its own in the node's data
//! directory (`raft/`), entries keyed by index, the vote and the committed
//! and purged log ids beside them. An append is acknowledged to Raft after
//! a [`SledDisk::sync`] (sled's flush, an fsync of any blob file it wrote,
//! an fdatasync of its file): the node counts towards a majority only for
//! what is on its disk. A vote, a truncation and a purge are synced the
//! same way before they are answered.
//!
//! Segments are 1 MiB, so entries up to about 256 KiB (every merged entry of
//! small writes, [`crate::merge`]) stay in sled's log file; a larger one
//! (an edge's big batch) is a blob file of its own, synced too.

use std::collections::VecDeque;
use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::{Arc, Mutex};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{Entry, LogId, RaftLogReader, StorageIOError, Vote};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tributary_storage::store::SledDisk;
use tributary_storage::util::lock;

use crate::types::{NodeId, StorageError, TypeConfig};

/// The Raft log (cheap to clone: sled handles).
#[derive(Clone)]
pub struct LogStore {
    disk: Arc<SledDisk>,
    /// The last entries written, as they were (see [`Recent`]).
    recent: Arc<Mutex<Recent>>,
    entries: sled::Tree,
    meta: sled::Tree,
}

const VOTE: &[u8] = b"vote";
const COMMITTED: &[u8] = b"committed";
const PURGED: &[u8] = b"purged";
const CATCH_UP: &[u8] = b"catch_up";

/// sled's page cache for the Raft log (recent entries are read back to be
/// sent and applied).
const CACHE: u64 = 8 << 20;
/// sled's segment size: values over a quarter of it become blob files.
const SEGMENT: usize = 1 << 20;
/// What [`Recent`] keeps, in encoded bytes.
const RECENT_BYTES: usize = 4 << 20;

/// The entries last written, in index order with no gap, up to
/// [`RECENT_BYTES`] of them encoded. Each entry is read back right after
/// it is written: once per follower to be sent, once to be applied. Served
/// from here, those reads copy it instead of reading sled's pages and
/// decoding it again (a twelfth of the leader's time under many small
/// writes). A truncation or a purge drops what it removes from the log;
/// an entry that does not follow the last one kept (after a truncation)
/// starts the run again.
#[derive(Default)]
struct Recent {
    entries: VecDeque<(Entry<TypeConfig>, usize)>,
    bytes: usize,
}

impl Recent {
    fn first(&self) -> Option<u64> {
        self.entries.front().map(|(e, _)| e.log_id.index)
    }

    fn extend(&mut self, written: Vec<(Entry<TypeConfig>, usize)>) {
        for (e, len) in written {
            let follows = match self.entries.back() {
                Some((last, _)) => last.log_id.index + 1 == e.log_id.index,
                None => true,
            };
            if !follows {
                self.clear();
            }
            self.bytes += len;
            self.entries.push_back((e, len));
        }
        while self.bytes > RECENT_BYTES {
            match self.entries.pop_front() {
                Some((_, len)) => self.bytes -= len,
                None => break,
            }
        }
    }

    /// Drops the entries from `index` on.
    fn truncate(&mut self, index: u64) {
        while self
            .entries
            .back()
            .is_some_and(|(e, _)| e.log_id.index >= index)
        {
            if let Some((_, len)) = self.entries.pop_back() {
                self.bytes -= len;
            }
        }
    }

    /// Drops the entries up to `index`.
    fn purge(&mut self, index: u64) {
        while self.first().is_some_and(|first| first <= index) {
            if let Some((_, len)) = self.entries.pop_front() {
                self.bytes -= len;
            }
        }
    }

    fn clear(&mut self) {
        self.entries.clear();
        self.bytes = 0;
    }

    /// Copies of the entries in `range`, if every one of them is here.
    fn get<RB: RangeBounds<u64>>(&self, range: &RB) -> Option<Vec<Entry<TypeConfig>>> {
        let first = self.first()?;
        let last = self.entries.back()?.0.log_id.index;
        let start = match range.start_bound() {
            Bound::Included(&i) => i,
            Bound::Excluded(&i) => i.checked_add(1)?,
            Bound::Unbounded => return None,
        };
        let end = match range.end_bound() {
            Bound::Included(&i) => i,
            Bound::Excluded(&i) => i.checked_sub(1)?,
            Bound::Unbounded => return None,
        };
        if start < first || end > last || start > end {
            return None;
        }
        let from = usize::try_from(start - first).ok()?;
        let to = usize::try_from(end - first).ok()?;
        Some(
            self.entries
                .range(from..=to)
                .map(|(e, _)| e.clone())
                .collect(),
        )
    }
}

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
    pub fn open(dir: &Path) -> Result<LogStore, tributary_storage::error::Error> {
        // A Raft log made by an earlier version keeps its segment size
        // (sled opens a database only with the one it was created with).
        let segment = SledDisk::segment_size_of(dir).unwrap_or(SEGMENT);
        let disk = SledDisk::open(dir, CACHE, segment)?;
        let entries = disk.db().open_tree("entries")?;
        let meta = disk.db().open_tree("meta")?;
        disk.sync()?;
        Ok(LogStore {
            disk: Arc::new(disk),
            recent: Arc::new(Mutex::new(Recent::default())),
            entries,
            meta,
        })
    }

    /// Durable syncs of the Raft log since it was opened.
    pub fn syncs(&self) -> u64 {
        self.disk.syncs()
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

    /// Makes everything written so far durable ([`SledDisk::sync`], on a
    /// blocking thread).
    async fn flush(&self) -> Result<(), StorageError> {
        let disk = self.disk.clone();
        tokio::task::spawn_blocking(move || disk.sync())
            .await
            .map_err(|e| write_err(&std::io::Error::other(e)))?
            .map_err(|e| write_err(&e))
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

    /// Stores `entries` and makes them durable.
    async fn write(
        &self,
        entries: impl IntoIterator<Item = Entry<TypeConfig>>,
    ) -> Result<(), StorageError> {
        let mut written = Vec::new();
        for e in entries {
            let bytes = encode(&e)?;
            let len = bytes.len();
            if let Err(err) = self.entries.insert(e.log_id.index.to_be_bytes(), bytes) {
                lock(&self.recent).clear();
                return Err(write_err(&err));
            }
            written.push((e, len));
        }
        lock(&self.recent).extend(written);
        let started = std::time::Instant::now();
        let synced = self.flush().await;
        tracing::debug!(took = ?started.elapsed(), "cluster: Raft log synced");
        synced
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
        if let Some(cached) = lock(&self.recent).get(&range) {
            return Ok(cached);
        }
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
        // Acknowledged once on disk. Awaited here, not in a task of its
        // own: an acknowledgement then never crosses a later truncation.
        let written = self.write(entries).await.map_err(std::io::Error::other);
        callback.log_io_completed(written);
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError> {
        lock(&self.recent).truncate(log_id.index);
        self.remove(log_id.index.to_be_bytes()..)?;
        self.flush().await
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError> {
        self.put(PURGED, &log_id)?;
        lock(&self.recent).purge(log_id.index);
        self.remove(..=log_id.index.to_be_bytes())?;
        self.flush().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::big_entry;

    fn stored(store: &LogStore) -> Vec<(u64, usize)> {
        store
            .entries
            .iter()
            .map(|kv| {
                let (k, v) = kv.expect("read");
                (index_of(&k).expect("key"), v.len())
            })
            .collect()
    }

    /// An append is answered only after a sync of the kind that reaches the
    /// disk ([`SledDisk::sync`]), and an entry too large for sled's log file
    /// is a blob file that is synced too. Before, the Raft log relied on
    /// sled's flush (a `sync_file_range`, no fsync of the blobs), so an
    /// acknowledged entry could be lost with the machine's power.
    #[tokio::test]
    async fn an_append_is_synced_and_a_large_entry_is_a_synced_blob() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = LogStore::open(dir.path()).expect("open");
        let before = store.syncs();
        store
            .write([big_entry(1, 100), big_entry(2, 400 << 10)])
            .await
            .expect("write");
        assert_eq!(store.syncs(), before + 1);
        assert!(
            store.disk.synced_blobs() >= 1,
            "a 400 KiB entry is a synced blob"
        );
        drop(store);
        let mut store = LogStore::open(dir.path()).expect("reopen");
        let back = store.try_get_log_entries(1..=2).await.expect("read");
        assert_eq!(back.len(), 2);
        assert_eq!(back[1].log_id.index, 2);
        assert_eq!(stored(&store).len(), 2);
    }

    /// A merged entry of small writes (up to [`crate::merge`]'s 192 KiB of
    /// records) stays in sled's log file: a blob file per entry cost the
    /// leader a file created, synced and later deleted for each.
    #[tokio::test]
    async fn a_merged_entry_is_not_a_blob() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = LogStore::open(dir.path()).expect("open");
        store
            .write([big_entry(1, crate::merge::MERGE_BYTES + 4096)])
            .await
            .expect("write");
        let blobs = std::fs::read_dir(dir.path().join("blobs"))
            .map(|d| d.count())
            .unwrap_or(0);
        assert_eq!(blobs, 0);
    }

    fn in_term(term: u64, index: u64) -> Entry<TypeConfig> {
        let mut e = big_entry(index, 10 + index as usize);
        e.log_id = LogId::new(openraft::CommittedLeaderId::new(term, 1), index);
        e
    }

    /// What [`Recent`] serves is what sled holds, through a truncation (a
    /// new leader's entries replace the old ones) and a purge, and it
    /// serves nothing it does not hold whole.
    #[tokio::test]
    async fn recent_entries_read_back_as_stored() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = LogStore::open(dir.path()).expect("open");
        store
            .write((1..=5).map(|i| in_term(1, i)))
            .await
            .expect("write");
        store
            .truncate(LogId::new(openraft::CommittedLeaderId::new(1, 1), 4))
            .await
            .expect("truncate");
        store
            .write([in_term(2, 4), in_term(2, 5)])
            .await
            .expect("write");
        store
            .purge(LogId::new(openraft::CommittedLeaderId::new(1, 1), 2))
            .await
            .expect("purge");
        assert!(
            lock(&store.recent).get(&(1..=5)).is_none(),
            "1 and 2 are purged"
        );
        assert!(
            lock(&store.recent).get(&(3..7)).is_none(),
            "6 was never written"
        );
        let cached = lock(&store.recent).get(&(3..=5)).expect("3 to 5 are kept");
        lock(&store.recent).clear();
        let stored = store.try_get_log_entries(3..=5).await.expect("read");
        let terms: Vec<u64> = stored.iter().map(|e| e.log_id.leader_id.term).collect();
        assert_eq!(terms, [1, 2, 2]);
        let bytes = |es: &[Entry<TypeConfig>]| -> Vec<Vec<u8>> {
            es.iter().map(|e| encode(e).expect("encode")).collect()
        };
        assert_eq!(bytes(&cached), bytes(&stored));
    }

    /// It keeps at most [`RECENT_BYTES`], the last entries written.
    #[tokio::test]
    async fn recent_entries_are_bounded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = LogStore::open(dir.path()).expect("open");
        let each = 100 << 10;
        let n = (RECENT_BYTES / each) as u64 * 2;
        store
            .write((1..=n).map(|i| big_entry(i, each)))
            .await
            .expect("write");
        let recent = lock(&store.recent);
        assert!(recent.bytes <= RECENT_BYTES, "{}", recent.bytes);
        assert!(recent.first() > Some(n / 3), "{:?}", recent.first());
        assert_eq!(recent.entries.back().map(|(e, _)| e.log_id.index), Some(n));
    }

    /// A Raft log made with sled's default segments (before this version)
    /// opens with them and keeps its entries.
    #[tokio::test]
    async fn a_raft_log_of_an_earlier_version_opens() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let disk = SledDisk::open(dir.path(), CACHE, 512 << 10).expect("old layout");
            let entries = disk.db().open_tree("entries").expect("tree");
            let e = big_entry(7, 10);
            entries
                .insert(7u64.to_be_bytes(), encode(&e).expect("encode"))
                .expect("insert");
            disk.sync().expect("sync");
        }
        let mut store = LogStore::open(dir.path()).expect("open");
        let back = store.try_get_log_entries(7..8).await.expect("read");
        assert_eq!(back.len(), 1);
        assert_eq!(back[0].log_id.index, 7);
    }
}
