//! [`SledStore`], the real backend, on sled 0.34: its [`SledOptions`],
//! opening a data directory (one process per directory, clean-up after a crash
//! during sled's snapshot, waiting out sled's own file lock), durable syncs
//! (sled's flush, then fsync of the database file and of the blob files sled
//! never syncs), and the topic, floor, group-offset and metadata trees.
//! Partitions, with large batches stored in chunks, are in `partition`.

mod partition;

pub use partition::{CHUNK, CHUNKED_OVER};

use std::collections::HashSet;
use std::ffi::OsString;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::keys::{
    be, floor_key, group_key, group_of_key, group_value, key_offset, meta_key, parse_floor_key,
    parse_group_key, partition_tree_prefix, split_meta_key, topic_of_group_key, topic_of_tree,
};
use super::{GroupPosition, MetaVisitor, PartitionStore, Store};
use crate::error::{Error, Result};
use crate::topic::TopicConfig;
use crate::util::lock;
use partition::SledPartition;

/// Settings for the sled backend.
#[derive(Debug, Clone)]
pub struct SledOptions {
    /// sled's page cache size in bytes (sled's default of 1 GiB makes RSS huge).
    pub cache_capacity: u64,
    /// sled's log segment size (power of two). Values or leaf nodes larger than a
    /// quarter of it become separate blob files, which this store fsyncs itself.
    pub segment_size: usize,
}

impl Default for SledOptions {
    fn default() -> Self {
        SledOptions {
            cache_capacity: 32 * 1024 * 1024,
            segment_size: 1024 * 1024,
        }
    }
}

/// The sled 0.34 backend: one tree per partition, plus `topics`, `floors` and
/// `groups` trees.
pub struct SledStore {
    db: sled::Db,
    topics: sled::Tree,
    floors: sled::Tree,
    groups: sled::Tree,
    meta: sled::Tree,
    db_file: File,
    blobs_dir: PathBuf,
    synced_blobs: Mutex<HashSet<OsString>>,
    /// The data directory (for free-space checks).
    dir: std::path::PathBuf,
    /// Held for the store's life: one process per data directory.
    _dir_lock: File,
}

impl SledStore {
    /// Opens or creates the store in `dir`, cleaning up after a crash first.
    pub fn open(dir: &Path, options: &SledOptions) -> Result<Self> {
        if !options.segment_size.is_power_of_two() || options.segment_size < 64 * 1024 {
            return Err(Error::Config(format!(
                "segment_size must be a power of two ≥ 65536, got {}",
                options.segment_size
            )));
        }
        std::fs::create_dir_all(dir)?;
        // Our own lock first: the snapshot clean-up below must never touch the
        // files of another live process (sled takes its lock only inside open).
        let dir_lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join("tributary.lock"))?;
        if let Err(e) = dir_lock.try_lock() {
            return Err(Error::Io(std::io::Error::other(format!(
                "{} is in use by another process ({e})",
                dir.display()
            ))));
        }
        remove_interrupted_snapshots(dir)?;
        let config = sled::Config::new()
            .path(dir)
            .cache_capacity(options.cache_capacity)
            .segment_size(options.segment_size)
            .flush_every_ms(None);
        let db = open_waiting_for_lock(&config)?;
        let topics = db.open_tree("__topics")?;
        let floors = db.open_tree("__floors")?;
        let groups = db.open_tree("__groups")?;
        let meta = db.open_tree("__meta")?;
        db.flush()?;
        let db_file = File::open(dir.join("db"))?;
        db_file.sync_all()?;
        File::open(dir)?.sync_all()?;
        Ok(SledStore {
            db,
            topics,
            floors,
            groups,
            meta,
            db_file,
            blobs_dir: dir.join("blobs"),
            dir: dir.to_owned(),
            synced_blobs: Mutex::new(HashSet::new()),
            _dir_lock: dir_lock,
        })
    }

    /// sled never fsyncs blob files (values over segment_size/4): do it here,
    /// for every blob not synced before, then the directory that names them.
    fn sync_blobs(&self) -> Result<()> {
        let entries = match std::fs::read_dir(&self.blobs_dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        let mut synced = lock(&self.synced_blobs);
        let mut present = HashSet::new();
        let mut any_new = false;
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name();
            if !synced.contains(&name) {
                match File::open(entry.path()) {
                    Ok(f) => f.sync_data()?,
                    // sled removed it meanwhile (garbage collection): nothing to keep.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(e.into()),
                }
                any_new = true;
            }
            present.insert(name);
        }
        *synced = present;
        if any_new {
            File::open(&self.blobs_dir)?.sync_all()?;
        }
        Ok(())
    }
}

/// How long [`SledStore::open`] waits for sled's file lock.
const LOCK_WAIT: Duration = Duration::from_secs(5);

/// sled's I/O thread pool keeps the database file, and with it the file lock,
/// open for a moment after the last handle is dropped: reopening right after a
/// close can find the lock still taken. Wait a little for it; a lock another
/// process really holds still fails, after the wait.
fn open_waiting_for_lock(config: &sled::Config) -> Result<sled::Db> {
    let deadline = Instant::now() + LOCK_WAIT;
    loop {
        match config.open() {
            Err(sled::Error::Io(e))
                if e.to_string().contains("could not acquire lock")
                    && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            opened => return Ok(opened?),
        }
    }
}

/// sled issues #1527/#1533: a crash while sled writes its start-up snapshot
/// leaves `snap.*.generating`, which bricks the next open. Remove them.
fn remove_interrupted_snapshots(dir: &Path) -> Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("snap.") && name.ends_with(".generating") {
            tracing::warn!(file = %name, "removing an interrupted sled snapshot left by a crash");
            std::fs::remove_file(entry.path())?;
        }
    }
    Ok(())
}

impl Store for SledStore {
    fn load_topics(&self) -> Result<Vec<TopicConfig>> {
        let mut out = Vec::new();
        for item in self.topics.iter() {
            let (k, v) = item?;
            let config: TopicConfig =
                crate::topic::decode_stored(&v).map_err(|e| Error::Corruption {
                    topic: String::from_utf8_lossy(&k).into_owned(),
                    partition: 0,
                    offset: 0,
                    detail: format!("topic config does not decode: {e}"),
                })?;
            out.push(config);
        }
        Ok(out)
    }

    fn put_topic(&self, config: &TopicConfig) -> Result<()> {
        let bytes = postcard::to_stdvec(config).map_err(|e| Error::Config(e.to_string()))?;
        self.topics.insert(config.name.as_bytes(), bytes)?;
        Ok(())
    }

    fn remove_topic(&self, topic: &str) -> Result<()> {
        self.topics.remove(topic.as_bytes())?;
        for item in self.groups.iter() {
            let (k, _) = item?;
            if topic_of_group_key(&k) == Some(topic.as_bytes()) {
                self.groups.remove(k)?;
            }
        }
        Ok(())
    }

    fn drop_partitions(&self, topic: &str) -> Result<()> {
        let prefix = partition_tree_prefix(topic);
        for name in self.db.tree_names() {
            if name.starts_with(prefix.as_bytes()) {
                self.db.drop_tree(name)?;
            }
        }
        Ok(())
    }

    fn partition_topics(&self) -> Result<Vec<String>> {
        let mut out: Vec<String> = self
            .db
            .tree_names()
            .iter()
            .filter_map(|n| topic_of_tree(n).map(str::to_owned))
            .collect();
        out.sort();
        out.dedup();
        Ok(out)
    }

    fn partition(&self, topic: &str, partition: u32) -> Result<Arc<dyn PartitionStore>> {
        let tree = self.db.open_tree(format!("p/{topic}/{partition}"))?;
        let chunks = self.db.open_tree(format!("p/{topic}/{partition}/chunks"))?;
        Ok(Arc::new(SledPartition { tree, chunks }))
    }

    fn put_floor(&self, topic: &str, partition: u32, start: u64) -> Result<()> {
        self.floors
            .insert(floor_key(topic, partition), &be(start))?;
        Ok(())
    }

    fn floor(&self, topic: &str, partition: u32) -> Result<Option<u64>> {
        self.floors
            .get(floor_key(topic, partition))?
            .map(|v| key_offset(&v))
            .transpose()
    }

    fn put_group_offset(
        &self,
        group: &str,
        topic: &str,
        partition: u32,
        offset: u64,
        metadata: &[u8],
    ) -> Result<()> {
        self.groups.insert(
            group_key(group, topic, partition),
            group_value(offset, metadata),
        )?;
        Ok(())
    }

    fn group_offsets(&self, group: &str) -> Result<Vec<GroupPosition>> {
        let mut prefix = group.as_bytes().to_vec();
        prefix.push(0);
        let mut out = Vec::new();
        for item in self.groups.scan_prefix(prefix) {
            let (k, v) = item?;
            if let Some(entry) = parse_group_key(group, &k, &v) {
                out.push(entry);
            }
        }
        Ok(out)
    }

    fn forget_group(&self, group: &str) -> Result<()> {
        let mut prefix = group.as_bytes().to_vec();
        prefix.push(0);
        for item in self.groups.scan_prefix(prefix) {
            let (k, _) = item?;
            self.groups.remove(k)?;
        }
        Ok(())
    }

    fn forget_group_offset(&self, group: &str, topic: &str, partition: u32) -> Result<()> {
        self.groups.remove(group_key(group, topic, partition))?;
        Ok(())
    }

    fn group_names(&self) -> Result<Vec<String>> {
        let mut out: Vec<String> = Vec::new();
        let mut next: Option<Vec<u8>> = None;
        // One key per group: after each, skip past every key of that group.
        loop {
            let item = match &next {
                None => self.groups.iter().next(),
                Some(from) => self.groups.range(from.clone()..).next(),
            };
            let Some(item) = item else { break };
            let (k, _) = item?;
            let Some(name) = group_of_key(&k) else { break };
            out.push(name.to_owned());
            let mut after = name.as_bytes().to_vec();
            after.push(1);
            next = Some(after);
        }
        Ok(out)
    }

    fn put_meta(&self, space: &str, key: &[u8], value: Option<&[u8]>) -> Result<()> {
        let k = meta_key(space, key);
        match value {
            Some(v) => self.meta.insert(k, v)?,
            None => self.meta.remove(k)?,
        };
        Ok(())
    }

    fn meta(&self, space: &str) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let prefix = meta_key(space, b"");
        let mut out = Vec::new();
        for item in self.meta.scan_prefix(&prefix) {
            let (k, v) = item?;
            out.push((k[prefix.len()..].to_vec(), v.to_vec()));
        }
        Ok(out)
    }

    fn get_meta(&self, space: &str, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.meta.get(meta_key(space, key))?.map(|v| v.to_vec()))
    }

    fn meta_range(
        &self,
        space: &str,
        from: &[u8],
        to: &[u8],
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let skip = meta_key(space, b"").len();
        let (from, to) = (meta_key(space, from), meta_key(space, to));
        let mut out = Vec::new();
        if from >= to {
            return Ok(out);
        }
        for item in self.meta.range(from..to).take(limit) {
            let (k, v) = item?;
            out.push((k[skip..].to_vec(), v.to_vec()));
        }
        Ok(out)
    }

    fn meta_keys(&self, space: &str) -> Result<Vec<Vec<u8>>> {
        let prefix = meta_key(space, b"");
        let mut out = Vec::new();
        for item in self.meta.scan_prefix(&prefix) {
            let (k, _) = item?;
            out.push(k[prefix.len()..].to_vec());
        }
        Ok(out)
    }

    fn floors(&self) -> Result<Vec<(String, u32, u64)>> {
        let mut out = Vec::new();
        for item in self.floors.iter() {
            let (k, v) = item?;
            let bad = || Error::Io(std::io::Error::other("a floor entry does not decode"));
            let (topic, partition) = parse_floor_key(&k).ok_or_else(bad)?;
            out.push((topic, partition, key_offset(&v)?));
        }
        Ok(out)
    }

    fn for_each_meta(&self, f: &mut MetaVisitor<'_>) -> Result<()> {
        for item in self.meta.iter() {
            let (k, v) = item?;
            let (space, key) = split_meta_key(&k)
                .ok_or_else(|| Error::Io(std::io::Error::other("a metadata key has no space")))?;
            f(space, key, &v)?;
        }
        Ok(())
    }

    fn clear(&self) -> Result<()> {
        for tree in [&self.topics, &self.floors, &self.groups, &self.meta] {
            tree.clear()?;
        }
        for name in self.db.tree_names() {
            if topic_of_tree(&name).is_some() {
                self.db.drop_tree(name)?;
            }
        }
        Ok(())
    }

    fn sync(&self) -> Result<()> {
        // sled's flush writes its buffers and calls sync_file_range, which is not
        // durable on its own; blobs are never synced by sled; sync_data makes both so.
        self.db.flush()?;
        self.sync_blobs()?;
        self.db_file.sync_data()?;
        Ok(())
    }

    fn disk_bytes(&self) -> u64 {
        self.db.size_on_disk().unwrap_or(0)
    }

    fn free_bytes(&self) -> Option<u64> {
        // What an unprivileged writer may use (f_bavail), as sled would.
        let st = rustix::fs::statvfs(&self.dir).ok()?;
        Some(st.f_bavail.saturating_mul(st.f_frsize))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interrupted_snapshot_files_are_removed_before_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        drop(SledStore::open(dir.path(), &SledOptions::default()).expect("open"));
        let junk = dir.path().join("snap.00000000000001A0.generating");
        std::fs::write(&junk, b"half a snapshot").expect("write");
        drop(SledStore::open(dir.path(), &SledOptions::default()).expect("reopen"));
        assert!(!junk.exists());
    }

    #[test]
    fn large_values_become_synced_blobs_and_read_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = SledStore::open(dir.path(), &SledOptions::default()).expect("open");
        // Partitions chunk large batches, but a leaf of an older log (or any
        // other tree) can still be a blob: write one straight into sled.
        let raw = s.db.open_tree("raw").expect("tree");
        let big = vec![7u8; 600 * 1024];
        raw.insert(b"k", big.clone()).expect("insert");
        s.sync().expect("sync");
        let blobs = std::fs::read_dir(dir.path().join("blobs"))
            .expect("blobs dir")
            .count();
        assert!(
            blobs >= 1,
            "a 600 KiB value should be a blob with 1 MiB segments"
        );
        assert_eq!(lock(&s.synced_blobs).len(), blobs);
        assert_eq!(raw.get(b"k").expect("get").as_deref(), Some(&big[..]));
    }
}
