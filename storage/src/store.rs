//! The storage backend behind the log: a trait with two implementations,
//! [`SledStore`] (the real one) and [`MemStore`] (an in-memory twin for tests,
//! which can also hold a commit or simulate a crash).
//!
//! Backends only store bytes: batch values under base offsets per partition,
//! topic configs, group offsets, and each partition's "floor" (the first offset
//! retention kept). Offsets, batching, checksums and durability ordering are the
//! log's business. Writes become durable only at [`Store::sync`].

use std::collections::{BTreeMap, HashSet};
use std::ffi::OsString;
use std::fs::File;
use std::ops::Bound::{Excluded, Unbounded};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::topic::TopicConfig;
use crate::util::lock;

/// One stored batch: base offset and value.
pub type StoredBatch = (u64, Vec<u8>);

/// A partition's batches, keyed by base offset.
pub trait PartitionStore: Send + Sync {
    /// Stores a batch (durable at the next [`Store::sync`]).
    fn insert(&self, base: u64, value: Vec<u8>) -> Result<()>;
    /// Removes a batch.
    fn remove(&self, base: u64) -> Result<()>;
    /// The batch with the smallest base offset.
    fn first(&self) -> Result<Option<StoredBatch>>;
    /// The batch with the largest base offset.
    fn last(&self) -> Result<Option<StoredBatch>>;
    /// The batch whose base is the greatest ≤ `from` (if any), then following
    /// batches in order, until at least `max_bytes` of values are collected.
    fn read(&self, from: u64, max_bytes: usize) -> Result<Vec<StoredBatch>>;
}

/// A whole log's storage.
pub trait Store: Send + Sync {
    /// Topic configs that were stored.
    fn load_topics(&self) -> Result<Vec<TopicConfig>>;
    /// Stores a topic config.
    fn put_topic(&self, config: &TopicConfig) -> Result<()>;
    /// Opens (creating if needed) a partition's batch store.
    fn partition(&self, topic: &str, partition: u32) -> Result<Arc<dyn PartitionStore>>;
    /// Records the first offset a partition keeps after retention.
    fn put_floor(&self, topic: &str, partition: u32, start: u64) -> Result<()>;
    /// The recorded floor, if any.
    fn floor(&self, topic: &str, partition: u32) -> Result<Option<u64>>;
    /// Stores a consumer group's position.
    fn put_group_offset(&self, group: &str, topic: &str, partition: u32, offset: u64)
        -> Result<()>;
    /// A group's positions as (topic, partition, offset).
    fn group_offsets(&self, group: &str) -> Result<Vec<(String, u32, u64)>>;
    /// Writes (`Some`) or removes (`None`) a small metadata value: front ends
    /// keep sessions and retained messages here, durable with the next sync.
    fn put_meta(&self, space: &str, key: &[u8], value: Option<&[u8]>) -> Result<()>;
    /// Every metadata entry of `space`, sorted by key.
    fn meta(&self, space: &str) -> Result<Vec<(Vec<u8>, Vec<u8>)>>;
    /// One metadata value.
    fn get_meta(&self, space: &str, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self
            .meta(space)?
            .into_iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v))
    }
    /// The keys of a metadata space, sorted (values are not copied).
    fn meta_keys(&self, space: &str) -> Result<Vec<Vec<u8>>> {
        Ok(self.meta(space)?.into_iter().map(|(k, _)| k).collect())
    }
    /// Makes every earlier write durable.
    fn sync(&self) -> Result<()>;
    /// Bytes the store occupies on disk (0 in memory).
    fn disk_bytes(&self) -> u64;
    /// Bytes free for this store on its file system (`None`: not on a disk).
    fn free_bytes(&self) -> Option<u64> {
        None
    }
}

fn be(offset: u64) -> [u8; 8] {
    offset.to_be_bytes()
}

fn key_offset(key: &[u8]) -> Result<u64> {
    let arr: [u8; 8] = key.try_into().map_err(|_| {
        Error::Io(std::io::Error::other(format!(
            "batch key of {} bytes",
            key.len()
        )))
    })?;
    Ok(u64::from_be_bytes(arr))
}

fn group_key(group: &str, topic: &str, partition: u32) -> Vec<u8> {
    let mut k = Vec::with_capacity(group.len() + topic.len() + 6);
    k.extend_from_slice(group.as_bytes());
    k.push(0);
    k.extend_from_slice(topic.as_bytes());
    k.push(0);
    k.extend_from_slice(&partition.to_be_bytes());
    k
}

fn meta_key(space: &str, key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(space.len() + 1 + key.len());
    k.extend_from_slice(space.as_bytes());
    k.push(0);
    k.extend_from_slice(key);
    k
}

fn parse_group_key(group: &str, key: &[u8], value: &[u8]) -> Option<(String, u32, u64)> {
    let rest = key.strip_prefix(group.as_bytes())?.strip_prefix(&[0])?;
    let (topic, part) = rest.split_at(rest.len().checked_sub(5)?);
    let part = part.strip_prefix(&[0])?;
    let partition = u32::from_be_bytes(part.try_into().ok()?);
    let offset = u64::from_be_bytes(value.try_into().ok()?);
    Some((String::from_utf8(topic.to_vec()).ok()?, partition, offset))
}

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

/// One partition: its batches, and the chunks of its large batches.
///
/// ## Large batches are stored in chunks
/// sled keeps a leaf page of up to 16 values in memory and writes a page
/// larger than a quarter of a segment to a blob file; its cache then counts
/// such a page by the size of its pointer, so pages of large values are never
/// evicted and the process grows with every large event written (measured: 1.9
/// GiB RSS after 1.5 GB of 900 KB events with a 32 MiB cache). So a batch value
/// over [`CHUNKED_OVER`] bytes (only a single event larger than a batch makes
/// one) is stored as [`CHUNK`]-byte values in a second tree, keyed by base
/// offset and chunk number, and the partition tree holds a 14-byte stub:
///
/// ```text
/// 0  1  magic 0x55 ('U': chunked; a whole batch starts with 0x54)
/// 1  1  version (1)
/// 2  8  total length (LE u64)
/// 10 4  chunk count (LE u32)
/// ```
///
/// Chunks are written before the stub and removed after it, in the same commit
/// cycle as any other write, so a stub never outlives its chunks (a crash can
/// only leave orphan chunks of a batch whose stub was not yet durable, which
/// nothing reads; the offset is then written again and overwrites them).
struct SledPartition {
    tree: sled::Tree,
    chunks: sled::Tree,
}

/// Batch values over this many bytes are stored in chunks.
pub const CHUNKED_OVER: usize = 12 * 1024;
/// Size of one chunk of a large batch.
pub const CHUNK: usize = 8 * 1024;
const STUB_MAGIC: u8 = 0x55;
const STUB_LEN: usize = 14;

fn chunk_key(base: u64, i: u32) -> [u8; 12] {
    let mut k = [0u8; 12];
    k[..8].copy_from_slice(&base.to_be_bytes());
    k[8..].copy_from_slice(&i.to_be_bytes());
    k
}

/// (total length, chunk count) when `v` is a stub.
fn stub(v: &[u8]) -> Option<(u64, u32)> {
    if v.len() != STUB_LEN || v[0] != STUB_MAGIC || v[1] != 1 {
        return None;
    }
    let total = u64::from_le_bytes(v[2..10].try_into().ok()?);
    let count = u32::from_le_bytes(v[10..14].try_into().ok()?);
    Some((total, count))
}

impl SledPartition {
    /// The stored batch under `k`, put back together when it was chunked.
    fn batch(&self, (k, v): (sled::IVec, sled::IVec)) -> Result<StoredBatch> {
        let base = key_offset(&k)?;
        let Some((total, count)) = stub(&v) else {
            return Ok((base, v.to_vec()));
        };
        let broken = |detail: String| Error::Corruption {
            topic: String::from_utf8_lossy(&self.tree.name()).into_owned(),
            partition: 0,
            offset: base,
            detail,
        };
        let total = usize::try_from(total).map_err(|_| broken("chunked batch too large".into()))?;
        let mut out = Vec::with_capacity(total.min(64 * 1024 * 1024));
        let mut seen = 0u32;
        for item in self
            .chunks
            .range(chunk_key(base, 0)..chunk_key(base, count))
        {
            let (_, chunk) = item?;
            out.extend_from_slice(&chunk);
            seen += 1;
        }
        if seen != count || out.len() != total {
            return Err(broken(format!(
                "chunked batch: {seen} of {count} chunks, {} of {total} bytes",
                out.len()
            )));
        }
        Ok((base, out))
    }
}

impl PartitionStore for SledPartition {
    fn insert(&self, base: u64, value: Vec<u8>) -> Result<()> {
        if value.len() <= CHUNKED_OVER {
            self.tree.insert(be(base), value)?;
            return Ok(());
        }
        let mut count = 0u32;
        for (i, chunk) in value.chunks(CHUNK).enumerate() {
            let i = u32::try_from(i).map_err(|_| Error::Config("batch too large".into()))?;
            self.chunks.insert(chunk_key(base, i), chunk)?;
            count = i + 1;
        }
        let mut s = [0u8; STUB_LEN];
        s[0] = STUB_MAGIC;
        s[1] = 1;
        s[2..10].copy_from_slice(&(value.len() as u64).to_le_bytes());
        s[10..14].copy_from_slice(&count.to_le_bytes());
        self.tree.insert(be(base), &s[..])?;
        Ok(())
    }

    fn remove(&self, base: u64) -> Result<()> {
        if let Some(old) = self.tree.remove(be(base))? {
            if let Some((_, count)) = stub(&old) {
                for i in 0..count {
                    self.chunks.remove(chunk_key(base, i))?;
                }
            }
        }
        Ok(())
    }

    fn first(&self) -> Result<Option<StoredBatch>> {
        self.tree.first()?.map(|kv| self.batch(kv)).transpose()
    }

    fn last(&self) -> Result<Option<StoredBatch>> {
        self.tree.last()?.map(|kv| self.batch(kv)).transpose()
    }

    fn read(&self, from: u64, max_bytes: usize) -> Result<Vec<StoredBatch>> {
        let mut out = Vec::new();
        let mut bytes = 0;
        if let Some(item) = self.tree.range(..=be(from)).next_back() {
            let b = self.batch(item?)?;
            bytes += b.1.len();
            out.push(b);
        }
        for item in self.tree.range((Excluded(be(from)), Unbounded)) {
            if bytes >= max_bytes && !out.is_empty() {
                break;
            }
            let b = self.batch(item?)?;
            bytes += b.1.len();
            out.push(b);
        }
        Ok(out)
    }
}

fn floor_key(topic: &str, partition: u32) -> Vec<u8> {
    let mut k = topic.as_bytes().to_vec();
    k.push(0);
    k.extend_from_slice(&partition.to_be_bytes());
    k
}

impl Store for SledStore {
    fn load_topics(&self) -> Result<Vec<TopicConfig>> {
        let mut out = Vec::new();
        for item in self.topics.iter() {
            let (k, v) = item?;
            let config: TopicConfig = postcard::from_bytes(&v).map_err(|e| Error::Corruption {
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
    ) -> Result<()> {
        self.groups
            .insert(group_key(group, topic, partition), &be(offset))?;
        Ok(())
    }

    fn group_offsets(&self, group: &str) -> Result<Vec<(String, u32, u64)>> {
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

    fn meta_keys(&self, space: &str) -> Result<Vec<Vec<u8>>> {
        let prefix = meta_key(space, b"");
        let mut out = Vec::new();
        for item in self.meta.scan_prefix(&prefix) {
            let (k, _) = item?;
            out.push(k[prefix.len()..].to_vec());
        }
        Ok(out)
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

// ---------------------------------------------------------------------------
// In-memory twin
// ---------------------------------------------------------------------------

#[derive(Clone, Default)]
struct MemState {
    topics: BTreeMap<String, TopicConfig>,
    partitions: BTreeMap<(String, u32), BTreeMap<u64, Vec<u8>>>,
    floors: BTreeMap<(String, u32), u64>,
    groups: BTreeMap<Vec<u8>, u64>,
    meta: BTreeMap<Vec<u8>, Vec<u8>>,
}

enum MemOp {
    Topic(TopicConfig),
    Insert(String, u32, u64, Vec<u8>),
    Remove(String, u32, u64),
    Floor(String, u32, u64),
    Group(Vec<u8>, u64),
    Meta(Vec<u8>, Option<Vec<u8>>),
}

impl MemState {
    fn apply(&mut self, op: MemOp) {
        match op {
            MemOp::Topic(c) => {
                self.topics.insert(c.name.clone(), c);
            }
            MemOp::Insert(t, p, base, v) => {
                self.partitions.entry((t, p)).or_default().insert(base, v);
            }
            MemOp::Remove(t, p, base) => {
                if let Some(tree) = self.partitions.get_mut(&(t, p)) {
                    tree.remove(&base);
                }
            }
            MemOp::Floor(t, p, s) => {
                self.floors.insert((t, p), s);
            }
            MemOp::Group(k, o) => {
                self.groups.insert(k, o);
            }
            MemOp::Meta(k, Some(v)) => {
                self.meta.insert(k, v);
            }
            MemOp::Meta(k, None) => {
                self.meta.remove(&k);
            }
        }
    }
}

#[derive(Default)]
struct MemInner {
    live: MemState,
    durable: MemState,
    journal: Vec<MemOp>,
    syncs: u64,
    held: bool,
    fail_sync: Option<String>,
    free_bytes: Option<u64>,
}

/// An in-memory [`Store`]: what is synced survives [`MemStore::crashed`], what is
/// not is lost, as on a real disk after a power cut. Tests can hold syncs to prove
/// that nothing is acknowledged before durability.
#[derive(Clone, Default)]
pub struct MemStore {
    inner: Arc<(Mutex<MemInner>, Condvar)>,
}

impl MemStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes every following [`Store::sync`] wait until [`MemStore::release_sync`].
    pub fn hold_sync(&self) {
        lock(&self.inner.0).held = true;
    }

    /// Lets held and future syncs complete.
    pub fn release_sync(&self) {
        lock(&self.inner.0).held = false;
        self.inner.1.notify_all();
    }

    /// Makes syncs fail with this message (None: succeed again).
    pub fn fail_sync(&self, message: Option<&str>) {
        lock(&self.inner.0).fail_sync = message.map(str::to_owned);
    }

    /// What [`Store::free_bytes`] answers from now on (a disk filling up).
    pub fn set_free_bytes(&self, free: Option<u64>) {
        lock(&self.inner.0).free_bytes = free;
    }

    /// How many syncs completed.
    pub fn syncs(&self) -> u64 {
        lock(&self.inner.0).syncs
    }

    /// A new store holding only what was synced: the state after a crash.
    pub fn crashed(&self) -> MemStore {
        let durable = lock(&self.inner.0).durable.clone();
        let inner = MemInner {
            live: durable.clone(),
            durable,
            ..MemInner::default()
        };
        MemStore {
            inner: Arc::new((Mutex::new(inner), Condvar::new())),
        }
    }

    /// Applies `op` now; it becomes durable at the next sync.
    fn write(&self, op: MemOp) {
        let mirror = clone_op(&op);
        let mut g = lock(&self.inner.0);
        g.live.apply(op);
        g.journal.push(mirror);
    }
}

fn clone_op(op: &MemOp) -> MemOp {
    match op {
        MemOp::Topic(c) => MemOp::Topic(c.clone()),
        MemOp::Insert(t, p, b, v) => MemOp::Insert(t.clone(), *p, *b, v.clone()),
        MemOp::Remove(t, p, b) => MemOp::Remove(t.clone(), *p, *b),
        MemOp::Floor(t, p, s) => MemOp::Floor(t.clone(), *p, *s),
        MemOp::Group(k, o) => MemOp::Group(k.clone(), *o),
        MemOp::Meta(k, v) => MemOp::Meta(k.clone(), v.clone()),
    }
}

struct MemPartition {
    store: MemStore,
    topic: String,
    partition: u32,
}

impl MemPartition {
    fn with_tree<R>(&self, f: impl FnOnce(Option<&BTreeMap<u64, Vec<u8>>>) -> R) -> R {
        let g = lock(&self.store.inner.0);
        f(g.live.partitions.get(&(self.topic.clone(), self.partition)))
    }

    fn op(&self, op: MemOp) {
        self.store.write(op);
    }
}

impl PartitionStore for MemPartition {
    fn insert(&self, base: u64, value: Vec<u8>) -> Result<()> {
        self.op(MemOp::Insert(
            self.topic.clone(),
            self.partition,
            base,
            value,
        ));
        Ok(())
    }

    fn remove(&self, base: u64) -> Result<()> {
        self.op(MemOp::Remove(self.topic.clone(), self.partition, base));
        Ok(())
    }

    fn first(&self) -> Result<Option<StoredBatch>> {
        Ok(self.with_tree(|t| t.and_then(|t| t.iter().next().map(|(k, v)| (*k, v.clone())))))
    }

    fn last(&self) -> Result<Option<StoredBatch>> {
        Ok(self.with_tree(|t| t.and_then(|t| t.iter().next_back().map(|(k, v)| (*k, v.clone())))))
    }

    fn read(&self, from: u64, max_bytes: usize) -> Result<Vec<StoredBatch>> {
        Ok(self.with_tree(|t| {
            let mut out = Vec::new();
            let Some(t) = t else { return out };
            let mut bytes = 0;
            if let Some((k, v)) = t.range(..=from).next_back() {
                bytes += v.len();
                out.push((*k, v.clone()));
            }
            for (k, v) in t.range((Excluded(from), Unbounded)) {
                if bytes >= max_bytes && !out.is_empty() {
                    break;
                }
                bytes += v.len();
                out.push((*k, v.clone()));
            }
            out
        }))
    }
}

impl Store for MemStore {
    fn load_topics(&self) -> Result<Vec<TopicConfig>> {
        Ok(lock(&self.inner.0).live.topics.values().cloned().collect())
    }

    fn put_topic(&self, config: &TopicConfig) -> Result<()> {
        self.write(MemOp::Topic(config.clone()));
        Ok(())
    }

    fn partition(&self, topic: &str, partition: u32) -> Result<Arc<dyn PartitionStore>> {
        Ok(Arc::new(MemPartition {
            store: self.clone(),
            topic: topic.to_owned(),
            partition,
        }))
    }

    fn put_floor(&self, topic: &str, partition: u32, start: u64) -> Result<()> {
        self.write(MemOp::Floor(topic.to_owned(), partition, start));
        Ok(())
    }

    fn floor(&self, topic: &str, partition: u32) -> Result<Option<u64>> {
        Ok(lock(&self.inner.0)
            .live
            .floors
            .get(&(topic.to_owned(), partition))
            .copied())
    }

    fn put_group_offset(
        &self,
        group: &str,
        topic: &str,
        partition: u32,
        offset: u64,
    ) -> Result<()> {
        let key = group_key(group, topic, partition);
        self.write(MemOp::Group(key, offset));
        Ok(())
    }

    fn group_offsets(&self, group: &str) -> Result<Vec<(String, u32, u64)>> {
        let g = lock(&self.inner.0);
        Ok(g.live
            .groups
            .iter()
            .filter_map(|(k, v)| parse_group_key(group, k, &v.to_be_bytes()))
            .collect())
    }

    fn put_meta(&self, space: &str, key: &[u8], value: Option<&[u8]>) -> Result<()> {
        self.write(MemOp::Meta(meta_key(space, key), value.map(<[u8]>::to_vec)));
        Ok(())
    }

    fn meta(&self, space: &str) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let prefix = meta_key(space, b"");
        let g = lock(&self.inner.0);
        Ok(g.live
            .meta
            .range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .map(|(k, v)| (k[prefix.len()..].to_vec(), v.clone()))
            .collect())
    }

    fn sync(&self) -> Result<()> {
        let (m, cv) = &*self.inner;
        let mut g = lock(m);
        while g.held {
            g = cv.wait(g).unwrap_or_else(|p| p.into_inner());
        }
        if let Some(msg) = &g.fail_sync {
            return Err(Error::Io(std::io::Error::other(msg.clone())));
        }
        let journal = std::mem::take(&mut g.journal);
        for op in journal {
            g.durable.apply(op);
        }
        g.syncs += 1;
        Ok(())
    }

    fn disk_bytes(&self) -> u64 {
        0
    }

    fn free_bytes(&self) -> Option<u64> {
        lock(&self.inner.0).free_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_keys_round_trip_and_do_not_leak_across_groups() {
        let s = MemStore::new();
        s.put_group_offset("g", "t.a", 3, 42).expect("put");
        s.put_group_offset("g2", "t", 0, 7).expect("put");
        s.put_group_offset("g", "t", 0, 1).expect("put");
        let mut got = s.group_offsets("g").expect("get");
        got.sort();
        assert_eq!(got, vec![("t".to_owned(), 0, 1), ("t.a".to_owned(), 3, 42)]);
    }

    #[test]
    fn mem_crash_keeps_only_synced_writes() {
        let s = MemStore::new();
        let p = s.partition("t", 0).expect("partition");
        p.insert(0, vec![1]).expect("insert");
        s.sync().expect("sync");
        p.insert(1, vec![2]).expect("insert");
        let after = s.crashed();
        let p2 = after.partition("t", 0).expect("partition");
        assert_eq!(p2.last().expect("last"), Some((0, vec![1])));
    }

    #[test]
    fn sled_read_starts_at_containing_batch() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = SledStore::open(dir.path(), &SledOptions::default()).expect("open");
        let p = s.partition("t", 0).expect("partition");
        for base in [0u64, 10, 20, 30] {
            p.insert(base, vec![base as u8; 100]).expect("insert");
        }
        let got: Vec<u64> = p
            .read(15, 150)
            .expect("read")
            .into_iter()
            .map(|b| b.0)
            .collect();
        assert_eq!(got, vec![10, 20]);
        let got: Vec<u64> = p
            .read(20, 1)
            .expect("read")
            .into_iter()
            .map(|b| b.0)
            .collect();
        assert_eq!(got, vec![20]);
        assert_eq!(p.first().expect("first").map(|b| b.0), Some(0));
        assert_eq!(p.last().expect("last").map(|b| b.0), Some(30));
        s.sync().expect("sync");
    }

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

    #[test]
    fn large_batches_are_chunked_not_blobs_and_read_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = SledStore::open(dir.path(), &SledOptions::default()).expect("open");
        let p = s.partition("t", 0).expect("partition");
        let big: Vec<u8> = (0..600 * 1024u32).map(|i| (i % 251) as u8).collect();
        p.insert(5, big.clone()).expect("insert");
        p.insert(6, vec![1, 2, 3]).expect("insert small");
        s.sync().expect("sync");
        let blobs = std::fs::read_dir(dir.path().join("blobs")).map_or(0, |d| d.count());
        assert_eq!(blobs, 0, "a chunked batch makes no blob");
        assert_eq!(p.first().expect("first"), Some((5, big.clone())));
        assert_eq!(p.read(5, 1).expect("read")[0], (5, big));
        p.remove(5).expect("remove");
        assert_eq!(p.first().expect("first"), Some((6, vec![1, 2, 3])));
        let chunks = s.db.open_tree("p/t/0/chunks").expect("chunks");
        assert!(
            chunks.is_empty(),
            "removing a chunked batch removes its chunks"
        );
        // A stub whose chunks are missing is corruption, not a panic.
        p.insert(7, vec![9u8; 100 * 1024]).expect("insert");
        chunks.remove(chunk_key(7, 3)).expect("damage");
        assert!(matches!(p.last(), Err(Error::Corruption { offset: 7, .. })));
    }
}
