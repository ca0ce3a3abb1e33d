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
//!
//! ## Where things live
//! - this file: the [`Log`] handle and its public API (topics, flush and
//!   close, reads and tails, consumer-group offsets, metadata spaces) and the
//!   types it takes and answers with.
//! - `append`: [`Log::append`], the producer's side of the write path
//!   (placing, encoding, quota and permits, queueing for the committer).
//! - `config`: [`LogConfig`], [`Durability`], [`TopicDefaults`], [`Forwarded`].
//! - `recovery`: [`Log::open`] and [`Log::with_store`]: recovering partition
//!   state from the store and starting the background threads.
//! - `state`: the state shared by the handle and those threads.
//! - `committer`: the committer and syncer threads (group commit).
//! - `retention`: retention passes, the disk quota and its evictor.
//!
//! [`Store`]: crate::store::Store
//! [`Store::sync`]: crate::store::Store::sync

mod append;
mod committer;
mod compaction;
mod config;
mod producers;
mod recovery;
mod replica;
mod retention;
mod snapshot;
mod state;
mod txns;

pub use crate::batch::Marker;
pub use append::AppendOptions;
pub use compaction::CompactionInfo;
pub use config::{Durability, Forwarded, LogConfig, TopicDefaults};
pub use producers::{ProducerBatch, ProducerState};
pub use replica::{Applied, Guard, Leadership, Op, OpPart, Pending, Replicator};
pub use snapshot::{read_snapshot_header, snapshot_header, Cut};

use std::sync::atomic::Ordering::SeqCst;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch, Semaphore};

use crate::batch::{decode_header, decode_records, walk, walk_refs, RecordRef};
use crate::error::{Error, Result};
use crate::event::Record;
use crate::stats::StatsSnapshot;
use crate::topic::{TopicChange, TopicConfig};
use committer::Command;
use recovery::{build_topic, recover_partition};
use retention::enforce_retention;
use state::{Shared, Stopper, TopicState};

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
    /// What the cleaner did (compacted topics only).
    pub compaction: Option<CompactionInfo>,
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
    /// The last stable offset when read: committed reads stop there (the
    /// first offset of the oldest transaction not yet decided).
    pub last_stable: u64,
    /// Transaction markers among the offsets read, never records: (offset,
    /// producer, epoch, marker). Kafka's consumers are handed them (as
    /// control batches) to move past them; other readers ignore them.
    pub markers: Vec<(u64, i64, i16, Marker)>,
}

/// Where a read puts what it finds, in offset order: the records of each
/// stored batch in its range, and the transaction markers between them.
/// [`Log::read_isolated`] makes owned [`Record`]s of them; Kafka's fetch
/// writes them into its answer's batches without that copy.
pub trait ReadSink {
    /// The records (at least one) of one stored batch that the read takes,
    /// borrowing the batch's bytes.
    fn records(&mut self, partition: u32, records: &[RecordRef<'_>]) -> Result<()>;
    /// A transaction marker at `offset`: (producer, epoch, marker).
    fn marker(&mut self, offset: u64, producer_id: i64, epoch: i16, marker: Marker) -> Result<()>;
}

/// A read's range, as [`ReadResult`] has it, for a read into a [`ReadSink`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadRange {
    /// Where the next read should start.
    pub next_offset: u64,
    /// First offset stored when read.
    pub start_offset: u64,
    /// End offset when read.
    pub end_offset: u64,
    /// The last stable offset when read.
    pub last_stable: u64,
    /// Records handed to the sink.
    pub records: usize,
}

/// The owned reading: [`Record`]s and the markers apart.
struct Collect {
    records: Vec<Record>,
    markers: Vec<(u64, i64, i16, Marker)>,
}

impl ReadSink for Collect {
    fn records(&mut self, partition: u32, records: &[RecordRef<'_>]) -> Result<()> {
        self.records.reserve(records.len());
        for r in records {
            self.records.push(r.to_record(partition)?);
        }
        Ok(())
    }

    fn marker(&mut self, offset: u64, producer_id: i64, epoch: i16, marker: Marker) -> Result<()> {
        self.markers.push((offset, producer_id, epoch, marker));
        Ok(())
    }
}

/// Which records a read returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Isolation {
    /// Only what is decided: no record past the last stable offset, none
    /// of an aborted transaction, no marker. What every reader but Kafka's
    /// `read_uncommitted` consumers gets.
    #[default]
    Committed,
    /// Every data record to the end, aborted transactions' too (markers
    /// are never records).
    Uncommitted,
}

/// A consumer group's position in one partition.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct GroupOffset {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: u32,
    /// Next offset the group will read.
    pub offset: u64,
}

/// The longest commit metadata a position keeps (Kafka's default
/// `offset.metadata.max.bytes`).
pub const MAX_COMMIT_METADATA: usize = 4096;

/// A metadata write: `None` removes the key.
pub type MetaEntry = (Vec<u8>, Option<Vec<u8>>);

struct Inner {
    shared: Arc<Shared>,
    tx: mpsc::Sender<Command>,
    /// Where writes go when this log is one node's copy of a replicated log.
    replicator: std::sync::OnceLock<Arc<dyn Replicator>>,
    /// The pending-bytes budget of ops applied from the replicated log: a
    /// budget of its own, since the writers waiting for those ops to be
    /// applied hold theirs in `pending`.
    applying: Arc<Semaphore>,
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
    /// Appends and metadata writes through this handle carry this claim
    /// ([`Log::guarded`]) unless they name one of their own.
    guard: Option<Arc<Guard>>,
}

impl std::fmt::Debug for Log {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Log").finish_non_exhaustive()
    }
}

fn corruption(topic: &str, partition: u32, offset: u64, detail: Error) -> Error {
    Error::Corruption {
        topic: topic.to_owned(),
        partition,
        offset,
        detail: detail.to_string(),
    }
}

impl Log {
    /// A handle to the same log whose appends, metadata writes and group
    /// positions (commits, removals) are made under `guard` ([`Log::claim`]): once another writer claims its key,
    /// they are refused ([`Error::Superseded`]), wherever in a cluster they
    /// were made. What a task that must run in one place gets to write
    /// with.
    pub fn guarded(&self, guard: Guard) -> Log {
        Log {
            inner: self.inner.clone(),
            guard: Some(Arc::new(guard)),
        }
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

    /// Counts a transaction coordinator's `event` in [`Log::stats`].
    pub fn count_transaction(&self, event: crate::stats::TxnEvent) {
        self.shared().stats.transaction(event);
    }

    /// Bytes free on the log's file system (`None`: not on a disk).
    pub fn free_disk_bytes(&self) -> Option<u64> {
        self.shared().store.free_bytes()
    }

    /// Bytes the store occupies on disk.
    pub fn disk_bytes(&self) -> u64 {
        self.shared().store.disk_bytes()
    }

    /// Creates a topic; durable when this returns. A config without an id
    /// gets a new random one (a UUID, version 4, as Kafka's).
    pub async fn create_topic(&self, mut config: TopicConfig) -> Result<TopicInfo> {
        if config.id == [0; 16] {
            config.id = new_topic_id();
        }
        let Some(r) = self.replicator() else {
            return self.create_topic_here(config).await;
        };
        config.validate()?;
        self.shared().check_writable()?;
        if self.shared().topic(&config.name).is_some() {
            return Err(Error::TopicExists(config.name));
        }
        let name = config.name.clone();
        self.replicate(r, replica::Op::CreateTopic(config)).await?;
        self.topic(&name)
    }

    async fn create_topic_here(&self, config: TopicConfig) -> Result<TopicInfo> {
        config.validate()?;
        self.shared().check_writable()?;
        let state = {
            let shared = self.shared();
            let mut topics = shared.topics.write().unwrap_or_else(|p| p.into_inner());
            if topics.contains_key(&config.name) {
                return Err(Error::TopicExists(config.name));
            }
            if crate::util::lock(&shared.deleting).contains(&config.name) {
                return Err(Error::TopicDeleting(config.name));
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

    /// Changes a topic's settings (see [`TopicChange`]); durable when this
    /// returns. Added partitions are empty; records already stored stay in
    /// their partitions, and keys map to partitions by the new count from
    /// now on.
    pub async fn alter_topic(&self, name: &str, change: &TopicChange) -> Result<TopicInfo> {
        let Some(r) = self.replicator() else {
            return self
                .alter_topic_here(name, |old| change.applied_to(old))
                .await;
        };
        self.shared().check_writable()?;
        let old = self.existing(name)?;
        let config = change.applied_to(&old.config)?;
        if config == old.config {
            return Ok(old.info());
        }
        self.replicate(r, replica::Op::AlterTopic(config)).await?;
        self.topic(name)
    }

    /// Changes a topic's settings here to what `change` makes of them.
    async fn alter_topic_here(
        &self,
        name: &str,
        change: impl FnOnce(&TopicConfig) -> Result<TopicConfig>,
    ) -> Result<TopicInfo> {
        self.shared().check_writable()?;
        let state = {
            let shared = self.shared();
            let mut topics = shared.topics.write().unwrap_or_else(|p| p.into_inner());
            let old = topics
                .get(name)
                .cloned()
                .ok_or_else(|| Error::UnknownTopic(name.to_owned()))?;
            let config = change(&old.config)?;
            if config == old.config {
                return Ok(old.info());
            }
            shared.store.put_topic(&config)?;
            let forwarded = shared.config.forwarded.includes(name);
            let mut partitions = old.partitions.clone();
            for p in old.config.partitions..config.partitions {
                let added = recover_partition(shared.store.as_ref(), name, p, forwarded)?;
                partitions.push(Arc::new(added));
            }
            let state = Arc::new(TopicState {
                config,
                partitions,
                live: old.live.clone(),
            });
            topics.insert(name.to_owned(), state.clone());
            // Watchers of the topic list look again (new partitions).
            shared.topic_count.send_replace(topics.len());
            state
        };
        tracing::info!(topic = %name, partitions = state.config.partitions, "topic changed");
        self.barrier().await?;
        Ok(state.info())
    }

    /// Deletes a topic with its records, the groups' positions in it and
    /// its idempotent producers' states; done (and durable) when this
    /// returns. Appends to it that were queued are refused; its name is
    /// free again when this returns, and a topic created under it continues
    /// each partition's offsets where the deleted one ended (Kafka starts
    /// again at 0; here a position stored anywhere, by a synced edge, an
    /// MQTT session or a client, never points into other records). A crash
    /// part way leaves either the whole topic or none of it (partitions a
    /// removed topic left behind are removed when the log opens).
    pub async fn delete_topic(&self, name: &str) -> Result<()> {
        let Some(r) = self.replicator() else {
            return self.delete_topic_here(name).await;
        };
        self.shared().check_writable()?;
        self.existing(name)?;
        self.replicate(r, replica::Op::DeleteTopic(name.to_owned()))
            .await
            .map(drop)
    }

    async fn delete_topic_here(&self, name: &str) -> Result<()> {
        self.shared().check_writable()?;
        let state = {
            let shared = self.shared();
            let mut topics = shared.topics.write().unwrap_or_else(|p| p.into_inner());
            let state = topics
                .remove(name)
                .ok_or_else(|| Error::UnknownTopic(name.to_owned()))?;
            crate::util::lock(&shared.deleting).insert(name.to_owned());
            state.live.deleted.store(true, SeqCst);
            shared.topic_count.send_replace(topics.len());
            state
        };
        // Every append queued before the flag was set is written by now;
        // the committer refuses those after it.
        self.barrier().await?;
        let shared = self.inner.shared.clone();
        let (topic, gone) = (name.to_owned(), state.clone());
        let removed = tokio::task::spawn_blocking(move || -> Result<()> {
            // Not while retention or the quota evictor works on its partitions.
            let _pass = crate::util::lock(&shared.retention);
            producers::forget_topic(&shared, &topic)?;
            compaction::forget_topic(shared.store.as_ref(), &topic, gone.config.partitions)?;
            shared.store.remove_topic(&topic)?;
            // The name never reuses an offset: a topic created under it
            // later continues each partition where this one ended.
            for ps in &gone.partitions {
                shared
                    .store
                    .put_floor(&topic, ps.id, ps.next.load(SeqCst))?;
            }
            Ok(())
        });
        removed
            .await
            .map_err(|e| Error::Io(std::io::Error::other(e.to_string())))??;
        self.barrier().await?;
        // Durably gone: now its batches.
        let shared = self.inner.shared.clone();
        let topic = name.to_owned();
        tokio::task::spawn_blocking(move || shared.store.drop_partitions(&topic))
            .await
            .map_err(|e| Error::Io(std::io::Error::other(e.to_string())))??;
        crate::util::lock(&self.shared().deleting).remove(name);
        tracing::info!(topic = %name, partitions = state.config.partitions, "topic deleted");
        Ok(())
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

    /// Reads up to `max_records` committed records (and about `max_bytes`
    /// of keys and values, at least one record) from `offset`. Reading at the
    /// end offset (or the last stable one) returns no records; outside
    /// `start..=end` is an error naming the range.
    pub fn read(
        &self,
        topic: &str,
        partition: u32,
        offset: u64,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<ReadResult> {
        self.read_isolated(
            topic,
            partition,
            offset,
            max_records,
            max_bytes,
            Isolation::Committed,
        )
    }

    /// [`Log::read`] with an [`Isolation`].
    pub fn read_isolated(
        &self,
        topic: &str,
        partition: u32,
        offset: u64,
        max_records: usize,
        max_bytes: usize,
        isolation: Isolation,
    ) -> Result<ReadResult> {
        let mut sink = Collect {
            records: Vec::new(),
            markers: Vec::new(),
        };
        let range = self.read_into(
            topic,
            partition,
            offset,
            (max_records, max_bytes),
            isolation,
            &mut sink,
        )?;
        Ok(ReadResult {
            records: sink.records,
            next_offset: range.next_offset,
            start_offset: range.start_offset,
            end_offset: range.end_offset,
            last_stable: range.last_stable,
            markers: sink.markers,
        })
    }

    /// [`Log::read_isolated`] into a [`ReadSink`]: the records are handed
    /// over in place, batch by batch; `limits` = (records, bytes).
    pub fn read_into(
        &self,
        topic: &str,
        partition: u32,
        offset: u64,
        limits: (usize, usize),
        isolation: Isolation,
        sink: &mut dyn ReadSink,
    ) -> Result<ReadRange> {
        let (max_records, max_bytes) = limits;
        let t = self.existing(topic)?;
        let ps = t.partition(partition)?;
        let start = ps.start.load(SeqCst);
        let durable = *ps.end.borrow();
        let (last_stable, any_aborted) = {
            let mut txns = crate::util::lock(&ps.txns);
            (txns.last_stable(durable), txns.aborted > 0)
        };
        let aborted = txns::Aborted {
            store: &*self.shared().store,
            topic,
            partition,
        };
        let end = match isolation {
            Isolation::Committed => last_stable,
            Isolation::Uncommitted => durable,
        };
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
        if offset < start || offset > durable {
            return Err(out_of_range(start, durable));
        }
        let mut count = 0usize;
        let mut next = offset;
        let mut bytes = 0usize;
        let mut full = max_records == 0;
        // A batch missing where a read stands: retention removed it, or a
        // compaction pass removed an original between two reads of the
        // store (which are no snapshot). The latter is read again.
        let mut retries = 0;
        // A compacted partition has gaps: a read goes on past batches
        // whose records compaction removed until it has one or reaches the end.
        'reading: while next < end && !full {
            let batches = ps.store.read(next, max_bytes).map_err(|e| {
                if t.live.deleted.load(SeqCst) {
                    Error::UnknownTopic(topic.to_owned())
                } else {
                    e
                }
            })?;
            let before = next;
            for (base, value) in batches {
                if base > next {
                    if count > 0 {
                        break 'reading;
                    }
                    if next < ps.start.load(SeqCst) || retries == 3 {
                        return Err(current_range());
                    }
                    retries += 1;
                    continue 'reading;
                }
                // A transactional batch (version 4): markers are never
                // records, and committed readers skip aborted transactions.
                if value.get(1) == Some(&4) {
                    let h =
                        decode_header(&value).map_err(|d| corruption(topic, partition, base, d))?;
                    let skip = match h.txn {
                        Some(x) if x.control => true,
                        Some(x) if isolation == Isolation::Committed => {
                            aborted.at(any_aborted, x.producer_id, base, durable)?
                        }
                        _ => false,
                    };
                    if let Some(x) = h.txn.filter(|x| x.control && base >= next && base < end) {
                        let mut kind = None;
                        walk(&value, base, partition, base, base + 1, |r, _| {
                            kind = r.key.as_deref().and_then(Marker::of_key);
                            false
                        })
                        .map_err(|d| corruption(topic, partition, base, d))?;
                        if let Some(kind) = kind {
                            sink.marker(base, x.producer_id, x.epoch, kind)?;
                        }
                    }
                    if skip {
                        next = next.max((base + h.span).min(end));
                        if next >= end {
                            break 'reading;
                        }
                        continue;
                    }
                }
                let mut taken: Vec<RecordRef<'_>> = Vec::new();
                let h = walk_refs(&value, base, next, end, |r, _| {
                    bytes += r.size();
                    next = r.offset + 1;
                    taken.push(r);
                    full = count + taken.len() >= max_records || bytes >= max_bytes;
                    !full
                })
                .map_err(|d| corruption(topic, partition, base, d))?;
                if !taken.is_empty() {
                    count += taken.len();
                    // A stored record a reader cannot take (a header name
                    // that is not UTF-8 for an owned record) is damage;
                    // the sink's own failures pass as they are.
                    sink.records(partition, &taken).map_err(|d| match d {
                        Error::BadBatch(_) => corruption(topic, partition, base, d),
                        other => other,
                    })?;
                }
                if full {
                    break 'reading;
                }
                // Past the batch's gaps (a batch starting inside one read
                // before is an original a compaction pass is replacing: its
                // records below `next` were skipped).
                next = next.max((base + h.span).min(end));
                if next >= end {
                    break 'reading;
                }
            }
            if next == before {
                break;
            }
        }
        if next == offset && offset < end && max_records > 0 {
            return Err(current_range());
        }
        Ok(ReadRange {
            next_offset: next,
            start_offset: start,
            end_offset: durable,
            last_stable,
            records: count,
        })
    }

    /// The record with the largest timestamp below `end` (the first of
    /// them in offset order): its offset and timestamp, `None` when the
    /// partition has no record there (ListOffsets' "max timestamp", KIP-734).
    /// Each batch's header says its largest timestamp, so only the batch
    /// holding the answer is decoded; transaction markers are no records.
    /// (The partition is read from its start: there is no time index.)
    pub fn max_timestamp(
        &self,
        topic: &str,
        partition: u32,
        end: u64,
    ) -> Result<Option<(u64, i64)>> {
        let t = self.existing(topic)?;
        let ps = t.partition(partition)?;
        let end = end.min(*ps.end.borrow());
        // The batch holding the largest timestamp so far: (timestamp, base).
        let mut best: Option<(i64, u64)> = None;
        batch_headers(topic, partition, ps, end, |base, h, value, from| {
            let marker = h.txn.is_some_and(|x| x.control);
            if marker || h.count == 0 || best.is_some_and(|(ts, _)| h.max_ts <= ts) {
                // Nothing larger here.
            } else if base >= from && base + h.span <= end {
                best = Some((h.max_ts, base));
            } else {
                // Cut by the range: its records inside it, one by one.
                let mut largest: Option<(i64, u64)> = None;
                decode_records(value, base, partition, from, end, |r| {
                    if largest.is_none_or(|(ts, _)| r.timestamp > ts) {
                        largest = Some((r.timestamp, r.offset));
                    }
                    true
                })
                .map_err(|d| corruption(topic, partition, base, d))?;
                if let Some((ts, offset)) = largest {
                    if best.is_none_or(|(b, _)| ts > b) {
                        // A record's own offset: decoding it again
                        // below finds it first.
                        best = Some((ts, offset));
                    }
                }
            }
            Ok(true)
        })?;
        let Some((max, base)) = best else {
            return Ok(None);
        };
        for (b, value) in ps.store.read(base, 1)? {
            if b > base {
                continue;
            }
            let mut found = None;
            decode_records(&value, b, partition, base, end, |r| {
                if r.timestamp == max {
                    found = Some((r.offset, r.timestamp));
                }
                found.is_none()
            })
            .map_err(|d| corruption(topic, partition, b, d))?;
            return Ok(found);
        }
        Ok(None)
    }

    /// The first record (in offset order) whose timestamp is at or after
    /// `timestamp`: its offset and timestamp, `None` when there is none.
    /// Batches whose newest record is older are skipped by their header,
    /// without decoding a record; only the batch holding the answer is
    /// decoded. (The partition is still read from its start: there is no
    /// time index.)
    pub fn offset_for_timestamp(
        &self,
        topic: &str,
        partition: u32,
        timestamp: i64,
    ) -> Result<Option<(u64, i64)>> {
        let t = self.existing(topic)?;
        let ps = t.partition(partition)?;
        let end = *ps.end.borrow();
        let mut found = None;
        batch_headers(topic, partition, ps, end, |base, h, value, from| {
            if h.max_ts >= timestamp {
                decode_records(value, base, partition, from, end, |r| {
                    if r.timestamp >= timestamp {
                        found = Some((r.offset, r.timestamp));
                    }
                    found.is_none()
                })
                .map_err(|d| corruption(topic, partition, base, d))?;
            }
            Ok(found.is_none())
        })?;
        Ok(found)
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
        self.fetch_isolated(
            topic,
            partition,
            offset,
            (max_records, max_bytes),
            wait,
            Isolation::Committed,
        )
        .await
    }

    /// [`Log::fetch`] with an [`Isolation`]; `limits` = (records, bytes).
    pub async fn fetch_isolated(
        &self,
        topic: &str,
        partition: u32,
        offset: u64,
        limits: (usize, usize),
        wait: Duration,
        isolation: Isolation,
    ) -> Result<ReadResult> {
        let (max_records, max_bytes) = limits;
        self.wait_to_read(topic, partition, offset, wait, isolation)
            .await?;
        let log = self.clone();
        let topic = topic.to_owned();
        tokio::task::spawn_blocking(move || {
            log.read_isolated(&topic, partition, offset, max_records, max_bytes, isolation)
        })
        .await
        .map_err(|e| Error::Io(std::io::Error::other(e.to_string())))?
    }

    /// [`Log::fetch_isolated`] into a [`ReadSink`], which is handed back
    /// with the read's range (the read runs on the blocking pool).
    #[allow(clippy::too_many_arguments)]
    pub async fn fetch_into<S: ReadSink + Send + 'static>(
        &self,
        topic: &str,
        partition: u32,
        offset: u64,
        limits: (usize, usize),
        wait: Duration,
        isolation: Isolation,
        mut sink: S,
    ) -> Result<(S, ReadRange)> {
        self.wait_to_read(topic, partition, offset, wait, isolation)
            .await?;
        let log = self.clone();
        let topic = topic.to_owned();
        tokio::task::spawn_blocking(move || {
            let range = log.read_into(&topic, partition, offset, limits, isolation, &mut sink)?;
            Ok((sink, range))
        })
        .await
        .map_err(|e| Error::Io(std::io::Error::other(e.to_string())))?
    }

    /// Checks that `offset` is in a partition's range and, when it is at
    /// the end or at the last stable offset (a transaction still
    /// undecided), waits up to `wait` for the end to move (new records or a
    /// marker).
    async fn wait_to_read(
        &self,
        topic: &str,
        partition: u32,
        offset: u64,
        wait: Duration,
        isolation: Isolation,
    ) -> Result<()> {
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
        let stable = match isolation {
            Isolation::Committed => crate::util::lock(&ps.txns).last_stable(end),
            Isolation::Uncommitted => end,
        };
        if offset >= stable && !wait.is_zero() {
            let _ = tokio::time::timeout(wait, end_rx.wait_for(|&e| e > end)).await;
        }
        Ok(())
    }

    /// Event bytes stored now, across all topics (what the disk quota counts).
    pub fn stored_bytes(&self) -> u64 {
        self.shared().stored_bytes()
    }

    /// A partition's first stored offset and its end offset (the next to be
    /// written), without building a whole [`TopicInfo`].
    pub fn offsets(&self, topic: &str, partition: u32) -> Result<(u64, u64)> {
        let t = self.existing(topic)?;
        let ps = t.partition(partition)?;
        let end = *ps.end.borrow();
        Ok((ps.start.load(SeqCst), end))
    }

    /// A partition's last stable offset: the first offset of its oldest
    /// undecided transaction, or its end.
    pub fn last_stable(&self, topic: &str, partition: u32) -> Result<u64> {
        let t = self.existing(topic)?;
        let ps = t.partition(partition)?;
        let end = *ps.end.borrow();
        let stable = crate::util::lock(&ps.txns).last_stable(end);
        Ok(stable)
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

    /// Closes `producer_id`'s open transaction in a partition with a commit
    /// or abort marker (one offset); durable when this returns, and from
    /// then on committed readers see its records (commit) or never will
    /// (abort). `Ok(None)` when the producer had no transaction open there:
    /// nothing is written (so writing the markers of a transaction again,
    /// after a crash, is harmless).
    #[allow(clippy::too_many_arguments)]
    pub async fn write_marker(
        &self,
        topic: &str,
        partition: u32,
        producer_id: i64,
        epoch: i16,
        marker: Marker,
        coordinator_epoch: i32,
    ) -> Result<Option<u64>> {
        self.shared().check_writable()?;
        let t = self.existing(topic)?;
        t.partition(partition)?;
        if let Some(r) = self.replicator() {
            let op = replica::Op::Marker {
                topic: topic.to_owned(),
                partition,
                producer_id,
                epoch,
                marker,
                coordinator_epoch,
                written_at: crate::util::now_ms(),
            };
            return match self.replicate(r, op).await? {
                replica::Applied::Marker(at) => Ok(at),
                other => Err(unexpected(&other)),
            };
        }
        let (reply, answer) = oneshot::channel();
        let cmd = Command::Marker {
            topic: t,
            partition,
            producer_id,
            epoch,
            marker,
            coordinator_epoch,
            written_at: None,
            applied: None,
            reply,
        };
        self.inner.tx.send(cmd).await.map_err(|_| Error::Closed)?;
        answer.await.map_err(|_| Error::Closed)?
    }

    /// Stores a consumer group's positions durably (same commit cycle as appends).
    pub async fn commit_offsets(&self, group: &str, offsets: Vec<GroupOffset>) -> Result<()> {
        self.commit_offsets_with(group, offsets, Vec::new()).await
    }

    /// Like [`Log::commit_offsets`], with each position's commit metadata
    /// (a Kafka client's string, at most [`MAX_COMMIT_METADATA`] bytes;
    /// empty: none for any), stored with it in the same write.
    pub async fn commit_offsets_with(
        &self,
        group: &str,
        offsets: Vec<GroupOffset>,
        metadata: Vec<String>,
    ) -> Result<()> {
        validate_group(group)?;
        if !metadata.is_empty() && metadata.len() != offsets.len() {
            return Err(Error::Config(
                "commit metadata must be given for every position or none".into(),
            ));
        }
        if let Some(m) = metadata.iter().find(|m| m.len() > MAX_COMMIT_METADATA) {
            return Err(Error::Config(format!(
                "commit metadata of {} bytes is over the {MAX_COMMIT_METADATA}-byte limit",
                m.len()
            )));
        }
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
        let op = replica::Op::Commit {
            group: group.to_owned(),
            offsets,
            metadata,
        };
        self.write_small(op, self.guard.as_deref()).await
    }

    /// A write of group positions or metadata ([`replica::Op::Commit`],
    /// [`replica::Op::ForgetGroup`] or [`replica::Op::Meta`]) under
    /// `guard`, if any: handed to the replicated log; alone, the claim is
    /// checked and the write queued here.
    async fn write_small(&self, op: replica::Op, guard: Option<&Guard>) -> Result<()> {
        if let Some(r) = self.replicator() {
            return self
                .replicate(r, replica::guarded(op, guard))
                .await
                .map(drop);
        }
        if let Some(g) = guard {
            self.check_guard(g)?;
        }
        let (reply, answer) = oneshot::channel();
        let cmd = match op {
            replica::Op::Commit {
                group,
                offsets,
                metadata,
            } => Command::Commit {
                group,
                offsets,
                metadata,
                reply,
            },
            replica::Op::ForgetGroup { group, partitions } => Command::ForgetGroup {
                group,
                partitions,
                reply,
            },
            replica::Op::Meta { space, entries } => Command::Meta {
                space,
                entries,
                reply,
            },
            _ => return Err(Error::Config("not a write of positions or metadata".into())),
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
            .map(|(topic, partition, offset, _)| GroupOffset {
                topic,
                partition,
                offset,
            })
            .collect();
        out.sort();
        Ok(out)
    }

    /// A group's committed positions with each one's commit metadata
    /// (empty: none), sorted by topic and partition.
    pub fn group_offsets_with_metadata(&self, group: &str) -> Result<Vec<(GroupOffset, String)>> {
        validate_group(group)?;
        let mut out: Vec<(GroupOffset, String)> = self
            .shared()
            .store
            .group_offsets(group)?
            .into_iter()
            .map(|(topic, partition, offset, metadata)| {
                let position = GroupOffset {
                    topic,
                    partition,
                    offset,
                };
                (position, String::from_utf8_lossy(&metadata).into_owned())
            })
            .collect();
        out.sort();
        Ok(out)
    }

    /// A producer id no other producer of this node got or will get, also
    /// across restarts (ids are reserved on disk a block at a time).
    pub async fn allocate_producer_id(&self) -> Result<i64> {
        const BLOCK: i64 = 1000;
        let mut ids = self.shared().producer_ids.lock().await;
        if ids.0 >= ids.1 {
            if let Some(r) = self.replicator() {
                // In a cluster the replicated log hands out the blocks, in
                // its order: no two nodes ever get the same one.
                let op = replica::Op::ReserveProducerIds { count: BLOCK };
                match self.replicate(r, op).await? {
                    replica::Applied::Reserved(from) => *ids = (from, from + BLOCK),
                    other => return Err(unexpected(&other)),
                }
            } else {
                let limit = ids.1 + BLOCK;
                self.put_meta(
                    producers::ID_SPACE,
                    vec![(b"next".to_vec(), Some(limit.to_be_bytes().to_vec()))],
                )
                .await?;
                ids.1 = limit;
            }
        }
        let id = ids.0;
        ids.0 += 1;
        Ok(id)
    }

    /// The producers a partition holds state for (DescribeProducers), by id:
    /// the idempotent and transactional producers whose batches it
    /// remembers, each with its open transaction's first offset.
    pub fn producers(&self, topic: &str, partition: u32) -> Result<Vec<ProducerState>> {
        let t = self.existing(topic)?;
        let p = t.partition(partition)?;
        let mut out: Vec<ProducerState> = crate::util::lock(&self.shared().producers)
            .entries
            .iter()
            .filter(|((name, at, _), _)| name == topic && *at == partition)
            .filter_map(|(&(_, _, producer_id), e)| {
                Some(ProducerState {
                    producer_id,
                    epoch: e.epoch,
                    last_sequence: e.recent.last()?.last,
                    last_timestamp: e.last_timestamp,
                    coordinator_epoch: e.coordinator_epoch,
                    transaction_start: None,
                })
            })
            .collect();
        let txns = crate::util::lock(&p.txns);
        for s in &mut out {
            s.transaction_start = txns.open_of(s.producer_id);
        }
        out.sort_by_key(|s| s.producer_id);
        Ok(out)
    }

    /// Idempotent producer states held now (one per producer and partition).
    pub fn producer_states(&self) -> usize {
        crate::util::lock(&self.shared().producers).entries.len()
    }

    /// Removes every committed position of a group, durably.
    pub async fn forget_group(&self, group: &str) -> Result<()> {
        validate_group(group)?;
        self.shared().check_writable()?;
        let op = replica::Op::ForgetGroup {
            group: group.to_owned(),
            partitions: None,
        };
        self.write_small(op, self.guard.as_deref()).await
    }

    /// Removes a group's committed positions in these partitions, durably
    /// (a partition without one is no error).
    pub async fn forget_group_offsets(
        &self,
        group: &str,
        partitions: Vec<(String, u32)>,
    ) -> Result<()> {
        validate_group(group)?;
        self.shared().check_writable()?;
        let op = replica::Op::ForgetGroup {
            group: group.to_owned(),
            partitions: Some(partitions),
        };
        self.write_small(op, self.guard.as_deref()).await
    }

    /// The groups with committed positions, sorted by name.
    pub fn group_names(&self) -> Result<Vec<String>> {
        self.shared().store.group_names()
    }

    /// Writes or removes small metadata values under `space` (front ends keep
    /// sessions and retained messages here). Resolves once durable, in the same
    /// commit cycle as appends that were queued with it.
    pub async fn put_meta(&self, space: &str, entries: Vec<MetaEntry>) -> Result<()> {
        self.put_meta_guarded(space, entries, None).await
    }

    /// [`Log::put_meta`], written only while `guard` holds.
    pub async fn put_meta_guarded(
        &self,
        space: &str,
        entries: Vec<MetaEntry>,
        guard: Option<&Guard>,
    ) -> Result<()> {
        validate_group(space)?;
        self.shared().check_writable()?;
        let op = replica::Op::Meta {
            space: space.to_owned(),
            entries,
        };
        self.write_small(op, guard.or(self.guard.as_deref())).await
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

    /// The entries of a metadata space whose keys are in `from..to`,
    /// sorted (includes writes not yet durable).
    pub fn meta_range(
        &self,
        space: &str,
        from: &[u8],
        to: &[u8],
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        validate_group(space)?;
        self.shared().store.meta_range(space, from, to, usize::MAX)
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

    /// Runs a compaction pass now over each compacted partition that needs
    /// one (the background thread does this every `retention_interval`).
    pub fn compact(&self) {
        compaction::clean(self.shared(), &self.inner.stopper, &mut None);
    }

    /// Runs one retention pass now (the background thread does this every
    /// `retention_interval`).
    pub fn enforce_retention(&self) {
        enforce_retention(self.shared(), &self.inner.stopper);
    }
}

/// Walks a partition's batches in offset order from its start up to `end`,
/// decoding only their headers: `visit(base, header, batch, from)` for each
/// batch reaching past `from` (the offset the walk has reached: the first
/// batch may begin before it), until it answers `false`.
fn batch_headers(
    topic: &str,
    partition: u32,
    ps: &state::PartitionState,
    end: u64,
    mut visit: impl FnMut(u64, &crate::batch::BatchHeader, &[u8], u64) -> Result<bool>,
) -> Result<()> {
    let mut from = ps.start.load(SeqCst);
    while from < end {
        let batches = ps.store.read(from, 1 << 20)?;
        let before = from;
        for (base, value) in batches {
            let h = decode_header(&value).map_err(|d| corruption(topic, partition, base, d))?;
            let next = base + h.span;
            if next <= from {
                continue;
            }
            if !visit(base, &h, &value, from)? {
                return Ok(());
            }
            from = next;
            if from >= end {
                break;
            }
        }
        if from == before {
            break;
        }
    }
    Ok(())
}

/// An answer of the wrong kind from the replicated log.
pub(super) fn unexpected(applied: &replica::Applied) -> Error {
    Error::Unwritable(format!("the replicated log answered {applied:?}"))
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

/// A random version 4 UUID, never the all-zero one (no id).
fn new_topic_id() -> [u8; 16] {
    let mut id = fastrand::u128(..).to_be_bytes();
    id[6] = (id[6] & 0x0f) | 0x40;
    id[8] = (id[8] & 0x3f) | 0x80;
    id
}
