//! The log: topics, appends with group commit, reads, tails, retention and
//! consumer-group offsets, over any [`Store`].
//!
//! ## The write path
//! [`Log::append`] validates and partitions the events, takes permits from a byte
//! budget (`max_pending_bytes`: memory is bounded however fast producers are),
//! and queues one command for the committer thread. The committer drains every
//! queued command (up to `max_cycle_bytes`), assigns dense offsets, packs the
//! events of each partition into ~8 KiB batches, inserts them, and then makes the
//! whole cycle durable with one [`Store::sync`]. Only then does it publish the new
//! end offsets (readers never see undurable data) and answer every waiting
//! producer. One fsync covers every producer that was waiting: a cycle's cost
//! does not grow with the number of producers.
//!
//! If the store ever fails to write or sync, the log stops accepting writes
//! (`Error::Unwritable`, `/health` 503) until restarted: the outcome of the failed
//! cycle is unknown, and offsets must never be handed out twice.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::{mpsc, oneshot, watch, OwnedSemaphorePermit, Semaphore};

use crate::batch::{
    decode_header, decode_records, encoded_len, BatchBuilder, BatchHeader, HEADER_LEN,
};
use crate::error::{Error, Result};
use crate::event::{AppendRecord, Position, Record};
use crate::partitioner::partition_for_key;
use crate::stats::{Stats, StatsSnapshot};
use crate::store::{PartitionStore, SledOptions, SledStore, Store};
use crate::topic::{OnFull, TopicConfig};

/// When an append is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// After the commit cycle's fsync (the default): an ack means on disk.
    Fsync,
    /// Right after the events are in the engine; a flusher fsyncs every interval.
    /// A crash loses up to one interval of acknowledged events.
    Interval(Duration),
}

/// Settings for topics created implicitly (auto-create) or without explicit values.
#[derive(Debug, Clone)]
pub struct TopicDefaults {
    /// Partition count.
    pub partitions: u32,
    /// Age retention (ms); `None` keeps events forever.
    pub retention_ms: Option<u64>,
    /// Size retention per partition; `None` means no limit.
    pub retention_bytes: Option<u64>,
    /// Largest single event.
    pub max_event_bytes: usize,
    /// Policy at the disk quota.
    pub on_full: OnFull,
}

impl Default for TopicDefaults {
    fn default() -> Self {
        TopicDefaults {
            partitions: 1,
            retention_ms: None,
            retention_bytes: None,
            max_event_bytes: 1024 * 1024,
            on_full: OnFull::Reject,
        }
    }
}

impl TopicDefaults {
    /// A topic config for `name` with these defaults.
    pub fn config(&self, name: &str) -> TopicConfig {
        TopicConfig {
            name: name.to_owned(),
            partitions: self.partitions,
            retention_ms: self.retention_ms,
            retention_bytes: self.retention_bytes,
            max_event_bytes: self.max_event_bytes,
            on_full: self.on_full,
        }
    }
}

/// The log's settings.
#[derive(Debug, Clone)]
pub struct LogConfig {
    /// When appends are acknowledged.
    pub durability: Durability,
    /// Bytes of appends that may wait for the committer; producers beyond it wait.
    pub max_pending_bytes: usize,
    /// Bytes one commit cycle takes at most.
    pub max_cycle_bytes: usize,
    /// Target size of one stored batch value.
    pub batch_bytes: usize,
    /// How often retention runs.
    pub retention_interval: Duration,
    /// Create unknown topics on first append.
    pub auto_create_topics: bool,
    /// Defaults for new topics.
    pub topic_defaults: TopicDefaults,
    /// The disk quota: event bytes (as stored in batches) the log holds at
    /// most, across all topics. At the quota, appends to `reject` topics fail
    /// and appends to `drop_oldest` topics evict the oldest batches of such
    /// topics first. `None`: no quota.
    pub max_disk_bytes: Option<u64>,
    /// Free space the log leaves on its file system: a cycle of appends that
    /// would eat into it is refused ([`Error::DiskFull`]) instead of written,
    /// so the engine never meets a full disk (sled cannot recover from a failed
    /// write without a restart, and then fails reads too). Appends resume by
    /// themselves when space is back. 0 turns the check off.
    pub min_free_bytes: u64,
    /// Topics forwarded upstream (an edge with `[upstream]`): their events are
    /// kept by retention until [`Log::mark_forwarded`] says the core has them,
    /// and the disk quota evicts their forwarded events first.
    pub forwarded: Forwarded,
}

/// Which topics an edge forwards upstream.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Forwarded {
    /// None (a core, or an edge without `[upstream]`).
    #[default]
    None,
    /// Every topic, also those created later.
    All,
    /// These topics.
    Topics(std::collections::BTreeSet<String>),
}

impl Forwarded {
    /// Is `topic` forwarded?
    pub fn includes(&self, topic: &str) -> bool {
        match self {
            Forwarded::None => false,
            Forwarded::All => true,
            Forwarded::Topics(t) => t.contains(topic),
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            durability: Durability::Fsync,
            max_pending_bytes: 32 * 1024 * 1024,
            max_cycle_bytes: 4 * 1024 * 1024,
            batch_bytes: 8 * 1024,
            retention_interval: Duration::from_secs(5),
            auto_create_topics: true,
            topic_defaults: TopicDefaults::default(),
            max_disk_bytes: None,
            min_free_bytes: 16 * 1024 * 1024,
            forwarded: Forwarded::None,
        }
    }
}

/// One partition's offsets and size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionInfo {
    /// Partition number.
    pub partition: u32,
    /// First offset still stored.
    pub start_offset: u64,
    /// Next offset to be written (durable end).
    pub end_offset: u64,
    /// Bytes of batches stored.
    pub bytes: u64,
}

/// A topic's config and live state.
#[derive(Debug, Clone)]
pub struct TopicInfo {
    /// Its config.
    pub config: TopicConfig,
    /// Per-partition offsets.
    pub partitions: Vec<PartitionInfo>,
    /// Events appended since the process started.
    pub events_appended: u64,
    /// Encoded bytes appended since the process started.
    pub bytes_appended: u64,
}

/// The answer to a read.
#[derive(Debug, Clone)]
pub struct ReadResult {
    /// Records in offset order.
    pub records: Vec<Record>,
    /// Where the next read should start.
    pub next_offset: u64,
    /// First offset stored when read.
    pub start_offset: u64,
    /// End offset when read.
    pub end_offset: u64,
}

/// A consumer group's position in one partition.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct GroupOffset {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: u32,
    /// Next offset the group will read.
    pub offset: u64,
}

struct PartitionState {
    id: u32,
    store: Arc<dyn PartitionStore>,
    /// Next offset to hand out (the committer's).
    next: AtomicU64,
    /// Cumulative bytes after the last batch (the committer's).
    next_pos: AtomicU64,
    /// Durable end: readers see offsets below it.
    end: watch::Sender<u64>,
    start: AtomicU64,
    start_pos: AtomicU64,
    /// Offsets below this are forwarded upstream (or need not be: `u64::MAX`
    /// for topics that are not forwarded). Retention keeps what is above it.
    forwarded: AtomicU64,
}

impl PartitionState {
    /// Event bytes stored now (what retention and the disk quota count).
    fn stored_bytes(&self) -> u64 {
        self.next_pos
            .load(Relaxed)
            .saturating_sub(self.start_pos.load(Relaxed))
    }
}

struct TopicState {
    config: TopicConfig,
    partitions: Vec<PartitionState>,
    round_robin: AtomicU32,
    events: AtomicU64,
    bytes: AtomicU64,
}

impl TopicState {
    fn partition(&self, partition: u32) -> Result<&PartitionState> {
        self.partitions
            .get(partition as usize)
            .ok_or_else(|| Error::UnknownPartition {
                topic: self.config.name.clone(),
                partition,
                partitions: self.config.partitions,
            })
    }

    fn info(&self) -> TopicInfo {
        TopicInfo {
            config: self.config.clone(),
            partitions: self
                .partitions
                .iter()
                .map(|p| PartitionInfo {
                    partition: p.id,
                    start_offset: p.start.load(SeqCst),
                    end_offset: *p.end.borrow(),
                    bytes: p.stored_bytes(),
                })
                .collect(),
            events_appended: self.events.load(Relaxed),
            bytes_appended: self.bytes.load(Relaxed),
        }
    }
}

/// One partition's share of an append, already encoded by the producer's task
/// into batch-sized chunks, so the committer only copies bytes.
struct Part {
    partition: u32,
    count: u32,
    chunks: Vec<BatchBuilder>,
}

enum Command {
    Append {
        topic: Arc<TopicState>,
        parts: Vec<Part>,
        bytes: usize,
        reply: oneshot::Sender<Result<Vec<u64>>>,
        _permit: OwnedSemaphorePermit,
        /// Its bytes under the disk quota, released with the command (after
        /// its batch is sealed and counted), also if the producer gave up.
        _reservation: Option<Reservation>,
    },
    Commit {
        group: String,
        offsets: Vec<GroupOffset>,
        reply: oneshot::Sender<Result<()>>,
    },
    Meta {
        space: String,
        entries: Vec<MetaEntry>,
        reply: oneshot::Sender<Result<()>>,
    },
    Barrier {
        reply: oneshot::Sender<Result<()>>,
    },
}

/// A metadata write: `None` removes the key.
pub type MetaEntry = (Vec<u8>, Option<Vec<u8>>);

struct Shared {
    store: Arc<dyn Store>,
    config: LogConfig,
    topics: RwLock<BTreeMap<String, Arc<TopicState>>>,
    stats: Stats,
    failure: Mutex<Option<String>>,
    failed: AtomicBool,
    /// Set when a cycle found the disk under the free-space reserve; cleared
    /// by the first check that finds room again.
    disk_low: AtomicBool,
    closed: AtomicBool,
    dirty: AtomicBool,
    /// Held for a whole retention pass: two passes at once could write a stale floor.
    retention: Mutex<()>,
    /// True while the syncer makes a cycle durable.
    syncing: AtomicBool,
    /// The committer, woken by the syncer when a sync ends.
    committer_thread: std::sync::OnceLock<std::thread::Thread>,
    /// Number of topics, for [`Log::watch_topics`].
    topic_count: watch::Sender<usize>,
    /// Bytes admitted under the disk quota whose appends have not ended.
    reserved: AtomicU64,
    /// One quota evictor at a time (waiting appends do not hold threads).
    evicting: tokio::sync::Mutex<()>,
}

/// Bytes admitted under the disk quota. It travels with the append's
/// command and is released when the committer is done with it, after the
/// batch is sealed and counted in [`Shared::stored_bytes`] (in between it
/// counts twice, which only errs on the safe side), whether or not the
/// producer still waits for the answer.
struct Reservation {
    shared: Arc<Shared>,
    bytes: u64,
}

impl Reservation {
    /// Adds first, then checks (and takes back on failure): two producers
    /// racing for the last room can both be refused, never both admitted.
    fn try_new(shared: &Arc<Shared>, bytes: u64, max: u64) -> Option<Reservation> {
        let reserved = shared.reserved.fetch_add(bytes, SeqCst) + bytes;
        if shared.stored_bytes() + reserved > max {
            shared.reserved.fetch_sub(bytes, SeqCst);
            return None;
        }
        Some(Reservation {
            shared: shared.clone(),
            bytes,
        })
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.shared.reserved.fetch_sub(self.bytes, SeqCst);
    }
}

impl Shared {
    fn fail(&self, message: String) {
        tracing::error!(error = %message, "the log can no longer write; restart to recover");
        let mut f = self.failure.lock().unwrap_or_else(|p| p.into_inner());
        f.get_or_insert(message);
        self.failed.store(true, SeqCst);
    }

    fn check_writable(&self) -> Result<()> {
        // Failure first: the committer lets a closed log drain its queue, but a
        // failed one must never write or sync again, closed or not.
        if self.failed.load(SeqCst) {
            let f = self.failure.lock().unwrap_or_else(|p| p.into_inner());
            return Err(Error::Unwritable(f.clone().unwrap_or_default()));
        }
        if self.closed.load(SeqCst) {
            return Err(Error::Closed);
        }
        Ok(())
    }

    /// `Err(DiskFull)` when writing `incoming` bytes now would leave less than
    /// the reserve free; sets or clears [`Shared::disk_low`] as it finds.
    fn check_room(&self, incoming: u64) -> Result<()> {
        let reserve = self.config.min_free_bytes;
        if reserve == 0 {
            return Ok(());
        }
        let Some(free) = self.store.free_bytes() else {
            return Ok(());
        };
        // The engine writes more than the events (page images, segments):
        // twice the incoming bytes is what a cycle is allowed to need.
        if free < reserve.saturating_add(incoming.saturating_mul(2)) {
            if !self.disk_low.swap(true, SeqCst) {
                tracing::warn!(
                    free,
                    reserve,
                    "the disk is nearly full: new events are refused until space is freed"
                );
            }
            return Err(Error::DiskFull { free, reserve });
        }
        if self.disk_low.swap(false, SeqCst) {
            tracing::info!(
                free,
                reserve,
                "space on the disk again: new events are accepted"
            );
        }
        Ok(())
    }

    /// Fails fast while the disk is known to be low, re-checking the disk so
    /// that appends resume as soon as space is back: room for a whole commit
    /// cycle above the reserve (hysteresis, so the node does not flap between
    /// taking one small append and refusing the next).
    fn check_disk(&self) -> Result<()> {
        if self.disk_low.load(SeqCst) {
            self.check_room(self.config.max_cycle_bytes as u64)?;
        }
        Ok(())
    }

    fn topic(&self, name: &str) -> Option<Arc<TopicState>> {
        self.topics
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
    }
}

/// Stops background threads: a flag and a condvar to sleep on.
#[derive(Default)]
struct Stopper {
    stopped: Mutex<bool>,
    cv: Condvar,
}

impl Stopper {
    /// Sleeps up to `d`; true when stopping.
    fn sleep(&self, d: Duration) -> bool {
        let g = self.stopped.lock().unwrap_or_else(|p| p.into_inner());
        let (g, _) = self
            .cv
            .wait_timeout_while(g, d, |s| !*s)
            .unwrap_or_else(|p| p.into_inner());
        *g
    }

    fn stop(&self) {
        *self.stopped.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.cv.notify_all();
    }
}

struct Inner {
    shared: Arc<Shared>,
    tx: mpsc::Sender<Command>,
    pending: Arc<Semaphore>,
    stopper: Arc<Stopper>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.stopper.stop();
        // The committer drains what is queued, syncs and exits once the last
        // sender is gone: drop ours before joining, so the store is released
        // (sled's file lock too) when the last handle is dropped.
        let (closed, _) = mpsc::channel(1);
        drop(std::mem::replace(&mut self.tx, closed));
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|p| p.into_inner()));
        for t in threads {
            let _ = t.join();
        }
    }
}

/// A handle to the log; cheap to clone.
#[derive(Clone)]
pub struct Log {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Log {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Log").finish_non_exhaustive()
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn corruption(topic: &str, partition: u32, offset: u64, detail: String) -> Error {
    Error::Corruption {
        topic: topic.to_owned(),
        partition,
        offset,
        detail,
    }
}

fn recover_partition(
    store: &dyn Store,
    topic: &str,
    id: u32,
    forwarded: bool,
) -> Result<PartitionState> {
    let handle = store.partition(topic, id)?;
    let floor = store.floor(topic, id)?.unwrap_or(0);
    let (next, next_pos) = match handle.last()? {
        Some((base, value)) => {
            let h = decode_header(&value).map_err(|d| corruption(topic, id, base, d))?;
            (base + u64::from(h.count), h.end_position)
        }
        None => (0, 0),
    };
    let next = next.max(floor);
    let (start, start_pos) = match handle.first()? {
        Some((base, value)) => {
            let h = decode_header(&value).map_err(|d| corruption(topic, id, base, d))?;
            (
                base.max(floor).min(next),
                h.end_position.saturating_sub(value.len() as u64),
            )
        }
        None => (next, next_pos),
    };
    Ok(PartitionState {
        id,
        store: handle,
        next: AtomicU64::new(next),
        next_pos: AtomicU64::new(next_pos),
        end: watch::Sender::new(next),
        start: AtomicU64::new(start),
        start_pos: AtomicU64::new(start_pos),
        // Forwarded topics start protected: the uploader raises the mark from
        // its durable cursors before anything is sent.
        forwarded: AtomicU64::new(if forwarded { 0 } else { u64::MAX }),
    })
}

fn build_topic(store: &dyn Store, config: TopicConfig, fwd: &Forwarded) -> Result<TopicState> {
    let forwarded = fwd.includes(&config.name);
    let partitions = (0..config.partitions)
        .map(|p| recover_partition(store, &config.name, p, forwarded))
        .collect::<Result<_>>()?;
    Ok(TopicState {
        config,
        partitions,
        round_robin: AtomicU32::new(0),
        events: AtomicU64::new(0),
        bytes: AtomicU64::new(0),
    })
}

impl Log {
    /// Opens (or creates) a sled-backed log in `dir`.
    pub fn open(dir: &Path, sled: &SledOptions, config: LogConfig) -> Result<Log> {
        let store = SledStore::open(dir, sled)?;
        Log::with_store(Arc::new(store), config)
    }

    /// A log over any store (tests use [`crate::MemStore`]).
    pub fn with_store(store: Arc<dyn Store>, config: LogConfig) -> Result<Log> {
        if config.durability == Durability::Interval(Duration::ZERO) {
            return Err(Error::Config("the flush interval must be positive".into()));
        }
        if config.max_pending_bytes == 0 || config.max_pending_bytes > u32::MAX as usize {
            return Err(Error::Config(
                "max_pending_bytes must be 1..=4294967295".into(),
            ));
        }
        config.topic_defaults.config("defaults").validate()?;
        let mut topics = BTreeMap::new();
        for tc in store.load_topics()? {
            let name = tc.name.clone();
            let state = build_topic(store.as_ref(), tc, &config.forwarded)?;
            topics.insert(name, Arc::new(state));
        }
        let topic_total = topics.len();
        let shared = Arc::new(Shared {
            store,
            config,
            topics: RwLock::new(topics),
            stats: Stats::default(),
            failure: Mutex::new(None),
            failed: AtomicBool::new(false),
            disk_low: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            dirty: AtomicBool::new(false),
            retention: Mutex::new(()),
            syncing: AtomicBool::new(false),
            committer_thread: std::sync::OnceLock::new(),
            topic_count: watch::Sender::new(topic_total),
            reserved: AtomicU64::new(0),
            evicting: tokio::sync::Mutex::new(()),
        });
        let (tx, rx) = mpsc::channel(4096);
        let stopper = Arc::new(Stopper::default());
        let mut threads = Vec::new();
        {
            let shared = shared.clone();
            let (jobs_tx, jobs_rx) = std::sync::mpsc::sync_channel(1);
            let committer_shared = shared.clone();
            threads.push(
                std::thread::Builder::new()
                    .name("log-committer".into())
                    .spawn(move || committer(&committer_shared, rx, jobs_tx))?,
            );
            threads.push(
                std::thread::Builder::new()
                    .name("log-syncer".into())
                    .spawn(move || syncer(&shared, jobs_rx))?,
            );
        }
        if let Durability::Interval(every) = shared.config.durability {
            let (shared, stopper) = (shared.clone(), stopper.clone());
            threads.push(
                std::thread::Builder::new()
                    .name("log-flusher".into())
                    .spawn(move || {
                        let mut stopping = false;
                        while !stopping {
                            stopping = stopper.sleep(every);
                            if shared.dirty.swap(false, SeqCst) && !shared.failed.load(SeqCst) {
                                if let Err(e) = shared.store.sync() {
                                    shared.fail(format!("interval flush failed: {e}"));
                                }
                            }
                        }
                    })?,
            );
        }
        {
            let (shared, stopper) = (shared.clone(), stopper.clone());
            threads.push(
                std::thread::Builder::new()
                    .name("log-retention".into())
                    .spawn(move || {
                        while !stopper.sleep(shared.config.retention_interval) {
                            enforce_retention(&shared, &stopper);
                        }
                    })?,
            );
        }
        let pending = Arc::new(Semaphore::new(shared.config.max_pending_bytes));
        Ok(Log {
            inner: Arc::new(Inner {
                shared,
                tx,
                pending,
                stopper,
                threads: Mutex::new(threads),
            }),
        })
    }

    fn shared(&self) -> &Shared {
        &self.inner.shared
    }

    /// The settings this log runs with.
    pub fn config(&self) -> &LogConfig {
        &self.shared().config
    }

    /// Ok when the log accepts writes.
    pub fn health(&self) -> Result<()> {
        self.shared().check_writable()?;
        self.shared().check_disk()
    }

    /// Counters for metrics.
    pub fn stats(&self) -> StatsSnapshot {
        self.shared().stats.snapshot()
    }

    /// Bytes free on the log's file system (`None`: not on a disk).
    pub fn free_disk_bytes(&self) -> Option<u64> {
        self.shared().store.free_bytes()
    }

    /// Bytes the store occupies on disk.
    pub fn disk_bytes(&self) -> u64 {
        self.shared().store.disk_bytes()
    }

    /// Creates a topic; durable when this returns.
    pub async fn create_topic(&self, config: TopicConfig) -> Result<TopicInfo> {
        config.validate()?;
        self.shared().check_writable()?;
        let state = {
            let shared = self.shared();
            let mut topics = shared.topics.write().unwrap_or_else(|p| p.into_inner());
            if topics.contains_key(&config.name) {
                return Err(Error::TopicExists(config.name));
            }
            // Stored before any append can name it: the committer's sync that makes
            // the first events durable makes the topic durable with or before them.
            shared.store.put_topic(&config)?;
            let state = Arc::new(build_topic(
                shared.store.as_ref(),
                config,
                &shared.config.forwarded,
            )?);
            topics.insert(state.config.name.clone(), state.clone());
            shared.topic_count.send_replace(topics.len());
            state
        };
        tracing::info!(topic = %state.config.name, partitions = state.config.partitions, "topic created");
        self.barrier().await?;
        Ok(state.info())
    }

    async fn topic_or_create(&self, name: &str) -> Result<Arc<TopicState>> {
        if let Some(t) = self.shared().topic(name) {
            return Ok(t);
        }
        if !self.shared().config.auto_create_topics {
            return Err(Error::UnknownTopic(name.to_owned()));
        }
        let config = self.shared().config.topic_defaults.config(name);
        match self.create_topic(config).await {
            Ok(_) | Err(Error::TopicExists(_)) => self
                .shared()
                .topic(name)
                .ok_or_else(|| Error::UnknownTopic(name.to_owned())),
            Err(e) => Err(e),
        }
    }

    fn existing(&self, name: &str) -> Result<Arc<TopicState>> {
        self.shared()
            .topic(name)
            .ok_or_else(|| Error::UnknownTopic(name.to_owned()))
    }

    /// Every topic, by name.
    pub fn topics(&self) -> Vec<TopicInfo> {
        let topics = self
            .shared()
            .topics
            .read()
            .unwrap_or_else(|p| p.into_inner());
        topics.values().map(|t| t.info()).collect()
    }

    /// One topic.
    pub fn topic(&self, name: &str) -> Result<TopicInfo> {
        Ok(self.existing(name)?.info())
    }

    /// Appends events to `topic`; resolves with each event's position, in input
    /// order, once they are durable (per [`Durability`]). Events with a key go to
    /// `murmur2(key) % partitions`; keyless events of one call go to one partition,
    /// rotating per call; an explicit partition wins over both.
    pub async fn append(&self, topic: &str, records: Vec<AppendRecord>) -> Result<Vec<Position>> {
        let result = self.append_inner(topic, records).await;
        let stats = &self.shared().stats;
        match &result {
            Ok(p) => {
                stats.append_requests.fetch_add(1, Relaxed);
                stats.append_events.fetch_add(p.len() as u64, Relaxed);
            }
            Err(_) => {
                stats.append_errors.fetch_add(1, Relaxed);
            }
        }
        result
    }

    async fn append_inner(&self, topic: &str, records: Vec<AppendRecord>) -> Result<Vec<Position>> {
        self.shared().check_writable()?;
        self.shared().check_disk().inspect_err(|_| {
            self.shared()
                .stats
                .disk_full_rejected_appends
                .fetch_add(1, Relaxed);
        })?;
        let t = self.topic_or_create(topic).await?;
        if records.is_empty() {
            return Ok(Vec::new());
        }
        let n = t.config.partitions;
        let now = now_ms();
        let keyless = t.round_robin.fetch_add(1, Relaxed) % n;
        let batch_bytes = self.shared().config.batch_bytes;
        let mut slot_of_partition = vec![u32::MAX; n as usize];
        let mut parts: Vec<Part> = Vec::new();
        let mut placement = Vec::with_capacity(records.len());
        // A chunk's first allocation fits the whole call (up to a batch): calls of
        // one small event do not hold a batch-sized buffer while they queue.
        let lens: Vec<usize> = records.iter().map(|r| encoded_len(&r.event)).collect();
        let first_capacity = batch_bytes.min(lens.iter().sum::<usize>() + HEADER_LEN);
        // Encode here, on the producer's task: the committer thread, which every
        // producer waits on, then only moves or concatenates finished chunks.
        for (AppendRecord { partition, event }, len) in records.into_iter().zip(lens) {
            let size = event.size();
            if size > t.config.max_event_bytes {
                return Err(Error::EventTooLarge {
                    size,
                    max: t.config.max_event_bytes,
                });
            }
            let p = match (partition, &event.key) {
                (Some(p), _) => t.partition(p)?.id,
                (None, Some(k)) => partition_for_key(k, n),
                (None, None) => keyless,
            };
            let slot = &mut slot_of_partition[p as usize];
            if *slot == u32::MAX {
                *slot = parts.len() as u32;
                parts.push(Part {
                    partition: p,
                    count: 0,
                    chunks: Vec::new(),
                });
            }
            let part = &mut parts[*slot as usize];
            let chunk = match part.chunks.last_mut() {
                Some(c) if c.is_empty() || c.len() + len <= batch_bytes => c,
                _ => {
                    part.chunks.push(BatchBuilder::with_capacity(
                        first_capacity.max(len + HEADER_LEN),
                    ));
                    part.chunks.last_mut().ok_or(Error::Closed)?
                }
            };
            chunk.push(&event, event.timestamp.unwrap_or(now));
            placement.push((*slot, u64::from(part.count)));
            part.count += 1;
        }
        let bytes: usize = parts
            .iter()
            .flat_map(|p| &p.chunks)
            .map(BatchBuilder::len)
            .sum();
        // Travels with the command (see [`Reservation`]).
        let reservation = match self.shared().config.max_disk_bytes {
            Some(max) => Some(self.make_room(&t, bytes as u64, max).await?),
            None => None,
        };
        let partition_of_slot: Vec<u32> = parts.iter().map(|p| p.partition).collect();
        let permits = bytes.clamp(1, self.shared().config.max_pending_bytes) as u32;
        let permit = self
            .inner
            .pending
            .clone()
            .acquire_many_owned(permits)
            .await
            .map_err(|_| Error::Closed)?;
        let (reply, answer) = oneshot::channel();
        let cmd = Command::Append {
            topic: t.clone(),
            parts,
            bytes,
            reply,
            _permit: permit,
            _reservation: reservation,
        };
        self.inner.tx.send(cmd).await.map_err(|_| Error::Closed)?;
        let firsts = answer.await.map_err(|_| Error::Closed)??;
        t.bytes.fetch_add(bytes as u64, Relaxed);
        t.events.fetch_add(placement.len() as u64, Relaxed);
        self.shared()
            .stats
            .append_bytes
            .fetch_add(bytes as u64, Relaxed);
        let partition_of_slot: Vec<u32> = partition_of_slot;
        Ok(placement
            .into_iter()
            .map(|(slot, i)| Position {
                partition: partition_of_slot[slot as usize],
                offset: firsts[slot as usize] + i,
            })
            .collect())
    }

    async fn barrier(&self) -> Result<()> {
        let (reply, answer) = oneshot::channel();
        self.inner
            .tx
            .send(Command::Barrier { reply })
            .await
            .map_err(|_| Error::Closed)?;
        answer.await.map_err(|_| Error::Closed)?
    }

    /// Makes everything appended so far durable (whatever the durability mode).
    pub async fn flush(&self) -> Result<()> {
        self.barrier().await
    }

    /// Refuses new appends, then makes everything accepted before durable.
    pub async fn close(&self) -> Result<()> {
        self.shared().closed.store(true, SeqCst);
        self.barrier().await
    }

    /// Reads up to `max_records` records (and about `max_bytes` of keys and
    /// values, at least one record) from `offset`. Reading at the end offset
    /// returns no records; outside `start..=end` is an error naming the range.
    pub fn read(
        &self,
        topic: &str,
        partition: u32,
        offset: u64,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<ReadResult> {
        let t = self.existing(topic)?;
        let ps = t.partition(partition)?;
        let start = ps.start.load(SeqCst);
        let end = *ps.end.borrow();
        let out_of_range = |start, end| Error::OffsetOutOfRange {
            topic: topic.to_owned(),
            partition,
            offset,
            start,
            end,
        };
        // Retention moved the start while we read: report the range as it is now
        // (start first: both only grow, so the range stays valid).
        let current_range = || out_of_range(ps.start.load(SeqCst), *ps.end.borrow());
        if offset < start || offset > end {
            return Err(out_of_range(start, end));
        }
        let mut records = Vec::new();
        let mut next = offset;
        if offset < end && max_records > 0 {
            let mut bytes = 0usize;
            for (base, value) in ps.store.read(offset, max_bytes)? {
                if base > next {
                    // Retention removed the batch holding `next` while we read.
                    if records.is_empty() {
                        return Err(current_range());
                    }
                    break;
                }
                let mut full = false;
                decode_records(&value, base, partition, next, end, |r| {
                    bytes += r.value.len() + r.key.as_ref().map_or(0, Vec::len);
                    next = r.offset + 1;
                    records.push(r);
                    full = records.len() >= max_records || bytes >= max_bytes;
                    !full
                })
                .map_err(|d| corruption(topic, partition, base, d))?;
                if full || next >= end {
                    break;
                }
            }
            if records.is_empty() {
                return Err(current_range());
            }
        }
        Ok(ReadResult {
            records,
            next_offset: next,
            start_offset: start,
            end_offset: end,
        })
    }

    /// Like [`Log::read`], but when `offset` is the end, waits up to `wait` for
    /// new records first. Reads run on the blocking pool.
    pub async fn fetch(
        &self,
        topic: &str,
        partition: u32,
        offset: u64,
        max_records: usize,
        max_bytes: usize,
        wait: Duration,
    ) -> Result<ReadResult> {
        let t = self.existing(topic)?;
        let ps = t.partition(partition)?;
        let mut end_rx = ps.end.subscribe();
        let (start, end) = (ps.start.load(SeqCst), *end_rx.borrow());
        if offset < start || offset > end {
            return Err(Error::OffsetOutOfRange {
                topic: topic.to_owned(),
                partition,
                offset,
                start,
                end,
            });
        }
        if offset == end && !wait.is_zero() {
            let _ = tokio::time::timeout(wait, end_rx.wait_for(|&e| e > offset)).await;
        }
        let log = self.clone();
        let topic = topic.to_owned();
        tokio::task::spawn_blocking(move || {
            log.read(&topic, partition, offset, max_records, max_bytes)
        })
        .await
        .map_err(|e| Error::Io(std::io::Error::other(e.to_string())))?
    }

    /// Event bytes stored now, across all topics (what the disk quota counts).
    pub fn stored_bytes(&self) -> u64 {
        self.shared().stored_bytes()
    }

    /// Admits `incoming` bytes under the quota, evicting the oldest durable
    /// batches of `drop_oldest` topics when needed (one evictor at a time, on
    /// a blocking thread, reserving as soon as there is room so no other
    /// producer takes it).
    async fn make_room(&self, t: &Arc<TopicState>, incoming: u64, max: u64) -> Result<Reservation> {
        let shared = &self.inner.shared;
        let refuse = || {
            shared.stats.quota_rejected_appends.fetch_add(1, Relaxed);
            Err(Error::QuotaExceeded {
                topic: t.config.name.clone(),
                used: shared.stored_bytes() + shared.reserved.load(SeqCst),
                max,
            })
        };
        if incoming > max {
            return refuse();
        }
        if let Some(r) = Reservation::try_new(shared, incoming, max) {
            return Ok(r);
        }
        let _one_evictor = shared.evicting.lock().await;
        let evictor = shared.clone();
        let admitted = tokio::task::spawn_blocking(move || evict_oldest(&evictor, incoming, max))
            .await
            .map_err(|e| Error::Io(std::io::Error::other(e.to_string())))??;
        match admitted {
            Some(r) => Ok(r),
            None => refuse(),
        }
    }

    /// A partition's first stored offset and its end offset (the next to be
    /// written), without building a whole [`TopicInfo`].
    pub fn offsets(&self, topic: &str, partition: u32) -> Result<(u64, u64)> {
        let t = self.existing(topic)?;
        let ps = t.partition(partition)?;
        let end = *ps.end.borrow();
        Ok((ps.start.load(SeqCst), end))
    }

    /// A receiver of a partition's end offset: it changes when new records
    /// become readable, so tails wait on it instead of polling.
    pub fn watch_end(&self, topic: &str, partition: u32) -> Result<watch::Receiver<u64>> {
        Ok(self.existing(topic)?.partition(partition)?.end.subscribe())
    }

    /// Says that the core holds every event of a partition below `offset`:
    /// retention may remove them now, and the disk quota evicts them before
    /// unforwarded ones. The mark only moves forward.
    pub fn mark_forwarded(&self, topic: &str, partition: u32, offset: u64) -> Result<()> {
        let t = self.existing(topic)?;
        t.partition(partition)?.forwarded.fetch_max(offset, SeqCst);
        Ok(())
    }

    /// A partition's forwarded mark (`u64::MAX` when it is not forwarded).
    pub fn forwarded(&self, topic: &str, partition: u32) -> Result<u64> {
        let t = self.existing(topic)?;
        Ok(t.partition(partition)?.forwarded.load(SeqCst))
    }

    /// Stores a consumer group's positions durably (same commit cycle as appends).
    pub async fn commit_offsets(&self, group: &str, offsets: Vec<GroupOffset>) -> Result<()> {
        validate_group(group)?;
        self.shared().check_writable()?;
        for o in &offsets {
            let t = self.existing(&o.topic)?;
            let end = *t.partition(o.partition)?.end.borrow();
            if o.offset > end {
                return Err(Error::OffsetOutOfRange {
                    topic: o.topic.clone(),
                    partition: o.partition,
                    offset: o.offset,
                    start: t.partition(o.partition)?.start.load(SeqCst),
                    end,
                });
            }
        }
        let (reply, answer) = oneshot::channel();
        let cmd = Command::Commit {
            group: group.to_owned(),
            offsets,
            reply,
        };
        self.inner.tx.send(cmd).await.map_err(|_| Error::Closed)?;
        answer.await.map_err(|_| Error::Closed)?
    }

    /// A group's committed positions, sorted by topic and partition.
    pub fn group_offsets(&self, group: &str) -> Result<Vec<GroupOffset>> {
        validate_group(group)?;
        let mut out: Vec<GroupOffset> = self
            .shared()
            .store
            .group_offsets(group)?
            .into_iter()
            .map(|(topic, partition, offset)| GroupOffset {
                topic,
                partition,
                offset,
            })
            .collect();
        out.sort();
        Ok(out)
    }

    /// Writes or removes small metadata values under `space` (front ends keep
    /// sessions and retained messages here). Resolves once durable, in the same
    /// commit cycle as appends that were queued with it.
    pub async fn put_meta(&self, space: &str, entries: Vec<MetaEntry>) -> Result<()> {
        validate_group(space)?;
        self.shared().check_writable()?;
        let (reply, answer) = oneshot::channel();
        let cmd = Command::Meta {
            space: space.to_owned(),
            entries,
            reply,
        };
        self.inner.tx.send(cmd).await.map_err(|_| Error::Closed)?;
        answer.await.map_err(|_| Error::Closed)?
    }

    /// Every metadata entry of `space`, sorted by key (includes writes not yet durable).
    pub fn meta(&self, space: &str) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        validate_group(space)?;
        self.shared().store.meta(space)
    }

    /// One metadata value (includes writes not yet durable).
    pub fn meta_get(&self, space: &str, key: &[u8]) -> Result<Option<Vec<u8>>> {
        validate_group(space)?;
        self.shared().store.get_meta(space, key)
    }

    /// The keys of a metadata space, sorted.
    pub fn meta_keys(&self, space: &str) -> Result<Vec<Vec<u8>>> {
        validate_group(space)?;
        self.shared().store.meta_keys(space)
    }

    /// A receiver of the number of topics: it changes when a topic is created,
    /// so wildcard subscribers pick up new topics without polling.
    pub fn watch_topics(&self) -> watch::Receiver<usize> {
        self.shared().topic_count.subscribe()
    }

    /// Runs one retention pass now (the background thread does this every
    /// `retention_interval`).
    pub fn enforce_retention(&self) {
        enforce_retention(self.shared(), &self.inner.stopper);
    }
}

/// Group names: 1..=249 bytes, no NUL (it separates key parts on disk).
pub fn validate_group(group: &str) -> Result<()> {
    if group.is_empty() || group.len() > 249 || group.contains('\0') {
        return Err(Error::Config(format!(
            "group name must be 1..=249 bytes without NUL, got {group:?}"
        )));
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// The committer thread
// ---------------------------------------------------------------------------

impl Command {
    fn bytes(&self) -> usize {
        match self {
            Command::Append { bytes, .. } => *bytes,
            Command::Commit { offsets, .. } => offsets.len() * 32,
            Command::Meta { entries, .. } => entries
                .iter()
                .map(|(k, v)| k.len() + v.as_ref().map_or(0, Vec::len))
                .sum(),
            Command::Barrier { .. } => 0,
        }
    }
}

/// While a sync runs, the committer writes the next cycle only once this much
/// is queued; smaller cycles wait for the sync to finish and grow meanwhile.
const PIPELINE_MIN_BYTES: usize = 256 * 1024;

/// One cycle written to the engine, on its way to the syncer.
struct Job {
    cycle: Vec<Command>,
    answers: Vec<Vec<u64>>,
    written: Result<Written>,
    started: Instant,
}

/// What a written cycle needs before it may be acknowledged.
struct Written {
    must_sync: bool,
    /// Per touched partition, its end offset once this cycle is durable.
    ends: Vec<(Arc<TopicState>, u32, u64)>,
}

/// Writes cycles into the engine; hands each to the syncer, so that cycle N+1
/// is written while cycle N is being fsynced. At most two cycles are in flight.
fn committer(
    shared: &Shared,
    mut rx: mpsc::Receiver<Command>,
    jobs: std::sync::mpsc::SyncSender<Job>,
) {
    let _ = shared.committer_thread.set(std::thread::current());
    while let Some(first) = rx.blocking_recv() {
        let mut bytes = first.bytes();
        let mut cycle = vec![first];
        loop {
            while bytes < shared.config.max_cycle_bytes {
                match rx.try_recv() {
                    Ok(c) => {
                        bytes += c.bytes();
                        cycle.push(c);
                    }
                    Err(_) => break,
                }
            }
            // Pipeline only under load: while the syncer is busy, a small cycle
            // waits to grow (the syncer wakes us when it is done), so a few
            // producers still share one fsync per cycle.
            if bytes >= PIPELINE_MIN_BYTES
                || bytes >= shared.config.max_cycle_bytes
                || !shared.syncing.load(SeqCst)
            {
                break;
            }
            std::thread::park_timeout(Duration::from_micros(500));
        }
        let started = Instant::now();
        // The free-space reserve: a cycle whose appends would eat into it
        // answers them DiskFull and writes only the rest (offset commits and
        // metadata, which are small).
        let append_bytes: usize = cycle
            .iter()
            .map(|c| match c {
                Command::Append { bytes, .. } => *bytes,
                _ => 0,
            })
            .sum();
        if append_bytes > 0 {
            if let Err(Error::DiskFull { free, reserve }) = shared.check_room(append_bytes as u64) {
                let (refused, rest): (Vec<Command>, Vec<Command>) = cycle
                    .into_iter()
                    .partition(|c| matches!(c, Command::Append { .. }));
                for c in refused {
                    if let Command::Append { reply, .. } = c {
                        shared
                            .stats
                            .disk_full_rejected_appends
                            .fetch_add(1, Relaxed);
                        let _ = reply.send(Err(Error::DiskFull { free, reserve }));
                    }
                }
                cycle = rest;
                if cycle.is_empty() {
                    continue;
                }
            }
        }
        let mut answers = Vec::new();
        let written = match shared.check_writable() {
            Err(e) if !matches!(e, Error::Closed) => Err(e),
            _ => write_cycle(shared, &mut cycle[..], &mut answers).map_err(|e| {
                let msg = e.to_string();
                shared.fail(msg.clone());
                Error::Unwritable(msg)
            }),
        };
        if jobs
            .send(Job {
                cycle,
                answers,
                written,
                started,
            })
            .is_err()
        {
            return;
        }
    }
}

/// Makes each written cycle durable (one sync covers it and anything written
/// before it), publishes its end offsets, then answers its producers.
fn syncer(shared: &Shared, jobs: std::sync::mpsc::Receiver<Job>) {
    for job in jobs {
        shared.syncing.store(true, SeqCst);
        let outcome = job.written.and_then(|w| {
            // A failed earlier sync leaves this cycle's outcome unknown too.
            if shared.failed.load(SeqCst) {
                return Err(shared.check_writable().err().unwrap_or(Error::Closed));
            }
            if w.must_sync {
                shared.store.sync().map_err(|e| {
                    let msg = e.to_string();
                    shared.fail(msg.clone());
                    Error::Unwritable(msg)
                })?;
            } else {
                shared.dirty.store(true, SeqCst);
            }
            // Publish the new ends only now: readers never see what is not durable.
            for (topic, partition, end) in &w.ends {
                topic.partitions[*partition as usize].end.send_replace(*end);
            }
            Ok(())
        });
        if outcome.is_ok() {
            shared.stats.observe_commit(job.started.elapsed());
        }
        shared.syncing.store(false, SeqCst);
        if let Some(t) = shared.committer_thread.get() {
            t.unpark();
        }
        answer(job.cycle, job.answers, &outcome);
    }
    if !shared.failed.load(SeqCst) {
        if let Err(e) = shared.store.sync() {
            tracing::error!(error = %e, "final sync at shutdown failed");
        }
    }
}

struct OpenBatch {
    topic: Arc<TopicState>,
    partition: u32,
    base: u64,
    builder: Option<BatchBuilder>,
}

impl OpenBatch {
    fn seal(&mut self) -> Result<()> {
        let Some(builder) = self.builder.take() else {
            return Ok(());
        };
        let ps = &self.topic.partitions[self.partition as usize];
        let (value, end_pos) = builder.finish(ps.next_pos.load(Relaxed));
        ps.store.insert(self.base, value)?;
        ps.next_pos.store(end_pos, Relaxed);
        self.base = ps.next.load(Relaxed);
        Ok(())
    }
}

fn write_cycle(
    shared: &Shared,
    cycle: &mut [Command],
    answers: &mut Vec<Vec<u64>>,
) -> Result<Written> {
    let batch_bytes = shared.config.batch_bytes;
    let mut open: HashMap<(usize, u32), OpenBatch> = HashMap::new();
    let mut must_sync = shared.config.durability == Durability::Fsync;
    for cmd in cycle {
        match cmd {
            Command::Append { topic, parts, .. } => {
                let mut firsts = Vec::with_capacity(parts.len());
                for part in parts {
                    let ps = &topic.partitions[part.partition as usize];
                    firsts.push(ps.next.load(Relaxed));
                    let ob = open
                        .entry((Arc::as_ptr(topic) as usize, part.partition))
                        .or_insert_with(|| OpenBatch {
                            topic: topic.clone(),
                            partition: part.partition,
                            base: ps.next.load(Relaxed),
                            builder: None,
                        });
                    // Small chunks from many producers share a batch (a memcpy);
                    // a full chunk becomes a batch as it is.
                    for chunk in std::mem::take(&mut part.chunks) {
                        let count = u64::from(chunk.count());
                        match &mut ob.builder {
                            Some(b) if b.len() + chunk.len() - HEADER_LEN <= batch_bytes => {
                                b.append(&chunk)
                            }
                            Some(_) => {
                                ob.seal()?;
                                ob.builder = Some(chunk);
                            }
                            None => ob.builder = Some(chunk),
                        }
                        ps.next.fetch_add(count, Relaxed);
                    }
                }
                answers.push(firsts);
            }
            Command::Commit { group, offsets, .. } => {
                for o in offsets {
                    shared
                        .store
                        .put_group_offset(group, &o.topic, o.partition, o.offset)?;
                }
            }
            Command::Meta { space, entries, .. } => {
                for (k, v) in entries.iter() {
                    shared.store.put_meta(space, k, v.as_deref())?;
                }
            }
            Command::Barrier { .. } => must_sync = true,
        }
    }
    for ob in open.values_mut() {
        ob.seal()?;
    }
    let ends = open
        .into_values()
        .map(|ob| {
            let end = ob.topic.partitions[ob.partition as usize]
                .next
                .load(Relaxed);
            (ob.topic, ob.partition, end)
        })
        .collect();
    Ok(Written { must_sync, ends })
}

fn answer(cycle: Vec<Command>, answers: Vec<Vec<u64>>, outcome: &Result<()>) {
    let mut answers = answers.into_iter();
    for cmd in cycle {
        let err = || match &outcome {
            Err(Error::Unwritable(m)) => Error::Unwritable(m.clone()),
            Err(Error::Closed) => Error::Closed,
            Err(e) => Error::Unwritable(e.to_string()),
            Ok(()) => Error::Closed,
        };
        match cmd {
            Command::Append { reply, .. } => {
                let r = match (outcome, answers.next()) {
                    (Ok(_), Some(firsts)) => Ok(firsts),
                    _ => Err(err()),
                };
                let _ = reply.send(r);
            }
            Command::Commit { reply, .. }
            | Command::Meta { reply, .. }
            | Command::Barrier { reply } => {
                let _ = reply.send(outcome.as_ref().map(|_| ()).map_err(|_| err()));
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Retention
// ---------------------------------------------------------------------------

/// Most batches one partition loses per pass; the rest waits for the next pass.
const MAX_REMOVALS_PER_PASS: usize = 4096;

fn enforce_retention(shared: &Shared, stopper: &Stopper) {
    let _one_pass_at_a_time = shared.retention.lock().unwrap_or_else(|p| p.into_inner());
    for t in shared.topic_states(|_| true) {
        if t.config.retention_ms.is_none() && t.config.retention_bytes.is_none() {
            continue;
        }
        for ps in &t.partitions {
            if let Err(e) = retain_partition(shared, &t, ps, stopper) {
                tracing::warn!(topic = %t.config.name, partition = ps.id, error = %e, "retention pass failed");
            }
        }
    }
}

impl Shared {
    /// The topics whose config passes `keep`, outside the topics lock.
    fn topic_states(&self, keep: impl Fn(&TopicConfig) -> bool) -> Vec<Arc<TopicState>> {
        self.topics
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter(|t| keep(&t.config))
            .cloned()
            .collect()
    }

    /// Event bytes stored now, across all topics.
    fn stored_bytes(&self) -> u64 {
        self.topics
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .flat_map(|t| &t.partitions)
            .map(PartitionState::stored_bytes)
            .sum()
    }
}

/// Evicts the oldest durable batches of `drop_oldest` topics until
/// `incoming` more bytes can be reserved under `max`, and reserves them.
/// Oldest by the batch's newest timestamp, clamped to now (a producer's
/// future timestamps do not pin a batch). Evicts nothing when the
/// `drop_oldest` topics clearly cannot make enough room (their stored bytes
/// fall short; a last commit cycle not yet durable counts there, so in a
/// rare case some is evicted before a refusal).
fn evict_oldest(shared: &Arc<Shared>, incoming: u64, max: u64) -> Result<Option<Reservation>> {
    let _one_pass_at_a_time = shared.retention.lock().unwrap_or_else(|p| p.into_inner());
    let candidates = shared.topic_states(|c| c.on_full == OnFull::DropOldest);
    let evictable = || -> u64 {
        candidates
            .iter()
            .flat_map(|t| &t.partitions)
            .map(PartitionState::stored_bytes)
            .sum()
    };
    let now = now_ms();
    loop {
        if let Some(r) = Reservation::try_new(shared, incoming, max) {
            return Ok(Some(r));
        }
        let over =
            (shared.stored_bytes() + shared.reserved.load(SeqCst) + incoming).saturating_sub(max);
        if over > evictable() {
            return Ok(None);
        }
        // The partition whose first durable batch is the oldest, among
        // batches already forwarded upstream first, then among all.
        let mut oldest: Option<(bool, i64, &TopicState, &PartitionState, u64, BatchHeader)> = None;
        for t in &candidates {
            for ps in &t.partitions {
                let Some((base, value)) = ps.store.first()? else {
                    continue;
                };
                let h = decode_header(&value)
                    .map_err(|d| corruption(&t.config.name, ps.id, base, d))?;
                let next_start = base + u64::from(h.count);
                if next_start > *ps.end.borrow() {
                    continue; // not durable yet
                }
                let unforwarded = next_start > ps.forwarded.load(SeqCst);
                let age = h.max_ts.min(now);
                if oldest
                    .as_ref()
                    .is_none_or(|(u, ts, ..)| (unforwarded, age) < (*u, *ts))
                {
                    oldest = Some((unforwarded, age, t, ps, base, h));
                }
            }
        }
        let Some((unforwarded, _, t, ps, base, h)) = oldest else {
            return Ok(None);
        };
        drop_first_batch(shared, t, ps, base, &h)?;
        let stats = &shared.stats;
        stats.quota_dropped_batches.fetch_add(1, Relaxed);
        stats
            .quota_dropped_events
            .fetch_add(u64::from(h.count), Relaxed);
        if unforwarded {
            // Only the part above the mark was never forwarded.
            let end = base + u64::from(h.count);
            let lost = end - ps.forwarded.load(SeqCst).clamp(base, end);
            stats
                .quota_dropped_unforwarded_events
                .fetch_add(lost, Relaxed);
        }
    }
}

/// Removes a partition's first batch (at `base`, header `h`). Floor first:
/// after a crash between the two, the floor keeps offsets from being reused
/// even if this was the partition's last batch.
fn drop_first_batch(
    shared: &Shared,
    t: &TopicState,
    ps: &PartitionState,
    base: u64,
    h: &BatchHeader,
) -> Result<()> {
    let next_start = base + u64::from(h.count);
    shared.store.put_floor(&t.config.name, ps.id, next_start)?;
    ps.start.fetch_max(next_start, SeqCst);
    ps.start_pos.store(h.end_position, Relaxed);
    ps.store.remove(base)
}

fn retain_partition(
    shared: &Shared,
    t: &TopicState,
    ps: &PartitionState,
    stopper: &Stopper,
) -> Result<()> {
    // Not `ms as i64`: a huge retention_ms would turn negative and expire everything.
    let max_age = |ms: u64| i64::try_from(ms).unwrap_or(i64::MAX);
    let oldest_kept = t
        .config
        .retention_ms
        .map(|ms| now_ms().saturating_sub(max_age(ms)));
    for removed in 0..MAX_REMOVALS_PER_PASS {
        // Throttle: a pass never hogs the engine; give appends room every 64 removals.
        if removed > 0 && removed % 64 == 0 && stopper.sleep(Duration::from_millis(1)) {
            return Ok(());
        }
        let Some((base, value)) = ps.store.first()? else {
            return Ok(());
        };
        let h = decode_header(&value).map_err(|d| corruption(&t.config.name, ps.id, base, d))?;
        let next_start = base + u64::from(h.count);
        // Not durable yet, or not forwarded upstream yet: retention keeps it
        // (the disk quota is what bounds an edge that cannot reach its core).
        if next_start > *ps.end.borrow() || next_start > ps.forwarded.load(SeqCst) {
            return Ok(());
        }
        let size = ps.stored_bytes();
        let expired = oldest_kept.is_some_and(|cutoff| h.max_ts < cutoff);
        let oversize = t.config.retention_bytes.is_some_and(|max| size > max);
        if !expired && !oversize {
            return Ok(());
        }
        drop_first_batch(shared, t, ps, base, &h)?;
        shared.stats.retention_removed_batches.fetch_add(1, Relaxed);
        shared
            .stats
            .retention_removed_events
            .fetch_add(u64::from(h.count), Relaxed);
    }
    Ok(())
}
