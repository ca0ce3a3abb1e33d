//! The Raft log on disk, in the node's data directory (`raft/`): the
//! entries in segment files of their own ([`crate::wal`], `raft/wal/`), the
//! vote and the committed and purged log ids in a small sled database
//! beside them. An append is acknowledged to Raft after the segment files
//! it wrote are fdatasynced: the node counts towards a majority only for
//! what is on its disk. A vote is synced ([`SledDisk::sync`]: sled's
//! flush, an fdatasync of its file) before it is answered; a truncation
//! and a purge too.
//!
//! A Raft log of an earlier version kept its entries in the sled database
//! (tree `entries`); they are moved into segment files when it opens.

use std::collections::VecDeque;
use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{Entry, LogId, RaftLogReader, StorageIOError, Vote};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tributary_storage::store::SledDisk;
use tributary_storage::util::lock;

use crate::types::{NodeId, StorageError, TypeConfig};
use crate::wal::{Pending, Wal};

/// The Raft log (cheap to clone: shared handles).
#[derive(Clone)]
pub struct LogStore {
    disk: Arc<SledDisk>,
    /// The last entries written, as they were (see [`Recent`]).
    recent: Arc<Mutex<Recent>>,
    wal: Arc<Mutex<Wal>>,
    /// Syncs of the entries' files.
    wal_syncs: Arc<AtomicU64>,
    meta: sled::Tree,
}

const VOTE: &[u8] = b"vote";
const COMMITTED: &[u8] = b"committed";
const PURGED: &[u8] = b"purged";
const CATCH_UP: &[u8] = b"catch_up";
/// Set once the entries of an earlier version's sled tree are in segment
/// files.
const ENTRIES_MOVED: &[u8] = b"entries_moved";
/// Entries moved out of sled at a time.
const MOVE_CHUNK: usize = 16 << 20;

/// sled's page cache for the Raft log's metadata.
const CACHE: u64 = 1 << 20;
/// sled's segment size.
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

impl LogStore {
    /// Opens (or creates) the Raft log in `dir`.
    pub fn open(dir: &Path) -> Result<LogStore, tributary_storage::error::Error> {
        // A Raft log made by an earlier version keeps its segment size
        // (sled opens a database only with the one it was created with).
        let segment = SledDisk::segment_size_of(dir).unwrap_or(SEGMENT);
        let disk = SledDisk::open(dir, CACHE, segment)?;
        let meta = disk.db().open_tree("meta")?;
        let storage_err = |e: StorageError| {
            tributary_storage::error::Error::Io(std::io::Error::other(e.to_string()))
        };
        let purged: Option<LogId<NodeId>> = match meta.get(PURGED)? {
            Some(v) => Some(decode(&v).map_err(storage_err)?),
            None => None,
        };
        let wal = Wal::open(&dir.join("wal"), purged.map(|p| p.index))?;
        let mut store = LogStore {
            disk: Arc::new(disk),
            recent: Arc::new(Mutex::new(Recent::default())),
            wal: Arc::new(Mutex::new(wal)),
            wal_syncs: Arc::default(),
            meta,
        };
        store.move_sled_entries(purged).map_err(storage_err)?;
        store.disk.sync()?;
        Ok(store)
    }

    /// Moves the entries a Raft log of an earlier version kept in sled
    /// into segment files. The tree is left as it is until the files are
    /// synced and `entries_moved` is recorded (synced too), so a move cut
    /// short is made again from the start; only then is the tree dropped.
    fn move_sled_entries(&mut self, purged: Option<LogId<NodeId>>) -> Result<(), StorageError> {
        let db = self.disk.db();
        if !db.tree_names().iter().any(|n| n.as_ref() == b"entries") {
            return Ok(());
        }
        if !self.get::<bool>(ENTRIES_MOVED)?.unwrap_or(false) {
            let tree = db.open_tree("entries").map_err(|e| read_err(&e))?;
            let mut wal = lock(&self.wal);
            let mut pending = wal.clear().map_err(|e| write_err(&e))?;
            let (mut chunk, mut bytes, mut moved) = (Vec::new(), 0, 0);
            let mut items = tree.iter();
            loop {
                let item = items.next();
                if let Some(item) = &item {
                    let (_, v) = item.as_ref().map_err(read_err)?;
                    let e: Entry<TypeConfig> = decode(v)?;
                    if purged.is_none_or(|p| e.log_id.index > p.index) {
                        bytes += v.len();
                        chunk.push((e.log_id, v.to_vec()));
                    }
                }
                if bytes >= MOVE_CHUNK || (item.is_none() && !chunk.is_empty()) {
                    pending.merge(wal.append(&chunk).map_err(|e| write_err(&e))?);
                    moved += chunk.len();
                    chunk.clear();
                    bytes = 0;
                }
                if item.is_none() {
                    break;
                }
            }
            pending.sync().map_err(|e| write_err(&e))?;
            drop(wal);
            self.put(ENTRIES_MOVED, &true)?;
            self.disk.sync().map_err(|e| write_err(&e))?;
            tracing::info!(
                entries = moved,
                "cluster: the Raft log's entries moved out of sled into segment files"
            );
        }
        db.drop_tree("entries").map_err(|e| write_err(&e))?;
        self.disk.sync().map_err(|e| write_err(&e))
    }

    /// Durable syncs of the Raft log since it was opened.
    pub fn syncs(&self) -> u64 {
        self.disk.syncs() + self.wal_syncs.load(Ordering::Relaxed)
    }

    /// Nothing stored, not even a vote: a new node, or one whose data was
    /// wiped.
    pub fn is_blank(&self) -> Result<bool, StorageError> {
        Ok(lock(&self.wal).is_empty() && self.get::<Vote<NodeId>>(VOTE)?.is_none())
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

    /// Changes the entries' files with `change` and syncs what it needs,
    /// on a blocking thread (writes and syncs wait on the disk).
    async fn change_wal(
        &self,
        change: impl FnOnce(&mut Wal) -> std::io::Result<Pending> + Send + 'static,
    ) -> Result<(), StorageError> {
        let wal = self.wal.clone();
        let changed = tokio::task::spawn_blocking(move || {
            let pending = change(&mut lock(&wal))?;
            pending.sync()
        })
        .await
        .map_err(|e| write_err(&std::io::Error::other(e)))?
        .map_err(|e| write_err(&e));
        self.wal_syncs.fetch_add(1, Ordering::Relaxed);
        changed
    }

    /// Stores `entries` and makes them durable.
    async fn write(
        &self,
        entries: impl IntoIterator<Item = Entry<TypeConfig>>,
    ) -> Result<(), StorageError> {
        let mut encoded = Vec::new();
        let mut written = Vec::new();
        for e in entries {
            let bytes = encode(&e)?;
            let len = bytes.len();
            encoded.push((e.log_id, bytes));
            written.push((e, len));
        }
        let started = std::time::Instant::now();
        let synced = self.change_wal(move |wal| wal.append(&encoded)).await;
        tracing::debug!(took = ?started.elapsed(), "cluster: Raft log written and synced");
        match synced {
            Ok(()) => lock(&self.recent).extend(written),
            Err(_) => lock(&self.recent).clear(),
        }
        synced
    }

    /// Entries stored (for status).
    pub fn len(&self) -> usize {
        lock(&self.wal).len()
    }

    /// No entries stored.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
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
        let end = match range.end_bound() {
            Bound::Included(&i) => i,
            Bound::Excluded(&0) => return Ok(Vec::new()),
            Bound::Excluded(&i) => i - 1,
            Bound::Unbounded => u64::MAX,
        };
        if let Some(cached) = lock(&self.recent).get(&range) {
            return Ok(cached);
        }
        Wal::read(&self.wal, start, end)
            .map_err(|e| read_err(&e))?
            .iter()
            .map(|v| decode(v))
            .collect()
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let purged: Option<LogId<NodeId>> = self.get(PURGED)?;
        let last = lock(&self.wal).last().or(purged);
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
        self.change_wal(move |wal| wal.truncate(log_id.index)).await
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError> {
        // The purged id is durable before any segment file goes: entries
        // at or below it are skipped at open, wherever they are.
        self.put(PURGED, &log_id)?;
        self.flush().await?;
        lock(&self.recent).purge(log_id.index);
        self.change_wal(move |wal| wal.purge(log_id.index).map(|()| Pending::default()))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::big_entry;

    /// An append is answered after one sync of the entries' files, and
    /// the entries read back after a reopen, large ones too.
    #[tokio::test]
    async fn an_append_is_synced_and_reads_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = LogStore::open(dir.path()).expect("open");
        let before = store.syncs();
        store
            .write([big_entry(1, 100), big_entry(2, 400 << 10)])
            .await
            .expect("write");
        assert_eq!(store.syncs(), before + 1);
        drop(store);
        let mut store = LogStore::open(dir.path()).expect("reopen");
        let back = store.try_get_log_entries(1..=2).await.expect("read");
        assert_eq!(back.len(), 2);
        assert_eq!(back[1].log_id.index, 2);
        assert_eq!(store.len(), 2);
        let state = store.get_log_state().await.expect("state");
        assert_eq!(state.last_log_id.map(|l| l.index), Some(2));
    }

    /// Each entry is written once: a thousand entries of 100 KiB (an edge's
    /// drain) take about 100 MiB of files, where sled's tree wrote them
    /// about six times over.
    #[tokio::test]
    async fn each_entry_is_written_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = LogStore::open(dir.path()).expect("open");
        for i in 0..100u64 {
            store
                .write((1..=10).map(|j| big_entry(i * 10 + j, 100 << 10)))
                .await
                .expect("write");
        }
        let files: u64 = std::fs::read_dir(dir.path().join("wal"))
            .expect("wal dir")
            .map(|f| f.expect("entry").metadata().expect("metadata").len())
            .sum();
        let entries = 1000 * (100 << 10);
        assert!(
            files >= entries && files < entries + entries / 50,
            "{files}"
        );
    }

    /// An earlier version's Raft log: entries `range` in sled's tree (512
    /// KiB segments), entry 6 purged.
    fn old_layout(dir: &Path, range: std::ops::RangeInclusive<u64>) {
        let disk = SledDisk::open(dir, CACHE, 512 << 10).expect("old layout");
        let entries = disk.db().open_tree("entries").expect("tree");
        for i in range {
            entries
                .insert(i.to_be_bytes(), encode(&big_entry(i, 10)).expect("encode"))
                .expect("insert");
        }
        let meta = disk.db().open_tree("meta").expect("tree");
        let purged = LogId::new(openraft::CommittedLeaderId::new(1, 1), 6);
        meta.insert(PURGED, encode(&purged).expect("encode"))
            .expect("insert");
        disk.sync().expect("sync");
    }

    async fn indexes(dir: &Path) -> Vec<u64> {
        let mut store = LogStore::open(dir).expect("open");
        assert!(
            !store
                .disk
                .db()
                .tree_names()
                .iter()
                .any(|n| n.as_ref() == b"entries"),
            "the old tree is dropped"
        );
        let back = store.try_get_log_entries(0..100).await.expect("read");
        back.iter().map(|e| e.log_id.index).collect()
    }

    /// A Raft log of an earlier version opens, its entries moved into
    /// segment files, the purged ones left behind; it opens again the same.
    #[tokio::test]
    async fn a_raft_log_of_an_earlier_version_opens() {
        let dir = tempfile::tempdir().expect("tempdir");
        old_layout(dir.path(), 6..=8);
        assert_eq!(indexes(dir.path()).await, [7, 8]);
        assert_eq!(indexes(dir.path()).await, [7, 8]);
    }

    /// A move cut short (segment files with part of the entries, nothing
    /// recorded) is made again from the tree; once recorded as done, what
    /// is left of the tree (a drop cut short) is not moved again.
    #[tokio::test]
    async fn a_move_out_of_sled_cut_short_is_made_again_and_a_finished_one_is_not() {
        let dir = tempfile::tempdir().expect("tempdir");
        old_layout(dir.path(), 6..=9);
        {
            let mut wal = Wal::open(&dir.path().join("wal"), Some(6)).expect("wal");
            let e = big_entry(7, 10);
            wal.append(&[(e.log_id, encode(&e).expect("encode"))])
                .expect("append")
                .sync()
                .expect("sync");
        }
        assert_eq!(indexes(dir.path()).await, [7, 8, 9]);
        // The move done; a tree of entry 9 alone, as a drop cut short
        // could leave it.
        {
            let disk = SledDisk::open(dir.path(), CACHE, 512 << 10).expect("open");
            let entries = disk.db().open_tree("entries").expect("tree");
            entries
                .insert(
                    9u64.to_be_bytes(),
                    encode(&big_entry(9, 10)).expect("encode"),
                )
                .expect("insert");
            disk.sync().expect("sync");
        }
        assert_eq!(indexes(dir.path()).await, [7, 8, 9]);
    }

    fn in_term(term: u64, index: u64) -> Entry<TypeConfig> {
        let mut e = big_entry(index, 10 + index as usize);
        e.log_id = LogId::new(openraft::CommittedLeaderId::new(term, 1), index);
        e
    }

    /// What [`Recent`] serves is what the files hold, through a truncation (a
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
}
