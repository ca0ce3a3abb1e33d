//! Opening a log: recovering each partition's offsets from the store
//! (batches, floors), validating the config, and starting the committer,
//! syncer, flusher and retention threads.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::sync::{mpsc, watch, Semaphore};

use super::committer::{committer, syncer};
use super::compaction;
use super::producers;
use super::retention::enforce_retention;
use super::state::{PartitionState, Shared, Stopper, TopicState};
use super::{corruption, Durability, Forwarded, Inner, Log, LogConfig};
use crate::batch::decode_header;
use crate::error::{Error, Result};
use crate::stats::Stats;
use crate::store::{SledOptions, SledStore, Store};
use crate::topic::TopicConfig;

pub(super) fn recover_partition(
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
            (base + h.span, h.end_position)
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
    let applied = handle.mark()?.map_or(0, |m| m.saturating_add(1));
    let txns = super::txns::recover(store, handle.as_ref(), topic, id, next)?;
    Ok(PartitionState {
        id,
        store: handle,
        next: AtomicU64::new(next),
        next_pos: AtomicU64::new(next_pos),
        end: watch::Sender::new(next),
        start: AtomicU64::new(start),
        start_pos: AtomicU64::new(start_pos),
        floor: std::sync::Mutex::new(()),
        // Forwarded topics start protected: the uploader raises the mark from
        // its durable cursors before anything is sent.
        forwarded: AtomicU64::new(if forwarded { 0 } else { u64::MAX }),
        txns: std::sync::Mutex::new(txns),
        applied: AtomicU64::new(applied),
        cleaner: {
            let (dirty, dirty_pos, horizon) =
                compaction::checkpoint(store, topic, id)?.unwrap_or((start, start_pos, i64::MIN));
            compaction::CleanerState::new(dirty, dirty_pos, horizon)
        },
    })
}

/// The producer table as stored, less what the recovered partitions do not
/// hold: a batch past a partition's end was not durable (the crash came
/// between its entry and its sync), so its producer will send it again.
pub(super) fn recover_producers(
    store: &dyn Store,
    topics: &BTreeMap<String, Arc<TopicState>>,
) -> Result<producers::Table> {
    let mut table = producers::Table::default();
    for (k, v) in store.meta(producers::SPACE)? {
        let Some((topic, partition, id)) = producers::parse_key(&k) else {
            continue;
        };
        let Some(end) = topics
            .get(&topic)
            .and_then(|t| t.partitions.get(partition as usize))
            .map(|p| p.next.load(SeqCst))
        else {
            continue;
        };
        let Some(mut entry) = producers::decode(&v) else {
            tracing::warn!(%topic, partition, producer = id, "unreadable producer state dropped");
            continue;
        };
        entry.recent.retain(|s| s.base + u64::from(s.count) <= end);
        if !entry.recent.is_empty() {
            table.clock = table.clock.max(entry.used);
            table.entries.insert((topic, partition, id), entry);
        }
    }
    Ok(table)
}

/// Removes the partitions of topics that no longer exist: a crash came
/// after a deletion was durable and before its partitions were removed.
fn remove_orphans(store: &dyn Store, topics: &[TopicConfig]) -> Result<()> {
    let mut removed = false;
    for name in store.partition_topics()? {
        if topics.iter().any(|t| t.name == name) {
            continue;
        }
        tracing::info!(topic = %name, "removing the partitions of a deleted topic");
        store.remove_topic(&name)?;
        store.drop_partitions(&name)?;
        removed = true;
    }
    if removed {
        store.sync()?;
    }
    Ok(())
}

pub(super) fn build_topic(
    store: &dyn Store,
    config: TopicConfig,
    fwd: &Forwarded,
) -> Result<TopicState> {
    let forwarded = fwd.includes(&config.name);
    let partitions = (0..config.partitions)
        .map(|p| recover_partition(store, &config.name, p, forwarded).map(Arc::new))
        .collect::<Result<_>>()?;
    Ok(TopicState {
        config,
        partitions,
        live: Arc::default(),
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
        let stored = store.load_topics()?;
        remove_orphans(store.as_ref(), &stored)?;
        compaction::recover_intents(store.as_ref())?;
        let mut topics = BTreeMap::new();
        for tc in stored {
            let name = tc.name.clone();
            let state = build_topic(store.as_ref(), tc, &config.forwarded)?;
            topics.insert(name, Arc::new(state));
        }
        let topic_total = topics.len();
        let producer_table = recover_producers(store.as_ref(), &topics)?;
        let id_floor =
            producers::id_block(store.get_meta(producers::ID_SPACE, b"next")?.as_deref()).0;
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
            snapshotting: AtomicUsize::new(0),
            syncing: AtomicBool::new(false),
            committer_thread: std::sync::OnceLock::new(),
            topic_count: watch::Sender::new(topic_total),
            reserved: AtomicU64::new(0),
            evicting: tokio::sync::Mutex::new(()),
            deleting: Mutex::default(),
            producers: Mutex::new(producer_table),
            producer_ids: tokio::sync::Mutex::new((id_floor, id_floor)),
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
                    .name("log-cleaner".into())
                    .spawn(move || {
                        // Allocated at the first pass, kept after.
                        let mut map = None;
                        while !stopper.sleep(shared.config.retention_interval) {
                            compaction::clean(&shared, &stopper, &mut map);
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
        let applying = Arc::new(Semaphore::new(shared.config.max_pending_bytes));
        Ok(Log {
            inner: Arc::new(Inner {
                shared,
                tx,
                replicator: std::sync::OnceLock::new(),
                applying,
                pending,
                stopper,
                threads: Mutex::new(threads),
            }),
            guard: None,
        })
    }
}
