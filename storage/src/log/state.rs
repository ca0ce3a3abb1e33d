//! The state the [`Log`] handle shares with its background threads: each
//! partition's offsets and store handle ([`PartitionState`]), each topic's
//! ([`TopicState`]), the log-wide [`Shared`] state with its writability and
//! free-space checks, and the [`Stopper`] that ends the background threads.
//!
//! [`Log`]: super::Log

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{
    AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering::Relaxed, Ordering::SeqCst,
};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::Duration;

use tokio::sync::watch;

use super::{LogConfig, PartitionInfo, TopicInfo};
use crate::error::{Error, Result};
use crate::stats::Stats;
use crate::store::{PartitionStore, Store};
use crate::topic::TopicConfig;

pub(super) struct PartitionState {
    pub(super) id: u32,
    pub(super) store: Arc<dyn PartitionStore>,
    /// Next offset to hand out (the committer's).
    pub(super) next: AtomicU64,
    /// Cumulative bytes after the last batch (the committer's).
    pub(super) next_pos: AtomicU64,
    /// Durable end: readers see offsets below it.
    pub(super) end: watch::Sender<u64>,
    pub(super) start: AtomicU64,
    pub(super) start_pos: AtomicU64,
    /// Held while the start is raised and stored as the floor (see
    /// `retention::raise_floor`).
    pub(super) floor: Mutex<()>,
    /// Offsets below this are forwarded upstream (or need not be: `u64::MAX`
    /// for topics that are not forwarded). Retention keeps what is above it.
    pub(super) forwarded: AtomicU64,
    /// The cleaner's progress (compacted topics).
    pub(super) cleaner: super::compaction::CleanerState,
    /// Transactions open and aborted in the partition.
    pub(super) txns: Mutex<super::txns::Txns>,
    /// A replicated log's mark: one more than the index of the last entry
    /// whose records in this partition are all stored (0: none). The
    /// committer's; see `replica`.
    pub(super) applied: AtomicU64,
}

impl PartitionState {
    /// Event bytes stored now (what retention and the disk quota count).
    pub(super) fn stored_bytes(&self) -> u64 {
        self.next_pos
            .load(Relaxed)
            .saturating_sub(self.start_pos.load(Relaxed))
    }
}

/// A topic as it is now. Changing a topic (its config, more partitions)
/// puts a new `TopicState` in the map that shares the partitions and
/// [`TopicLive`] of the old one: whoever still holds the old one (an append
/// in flight) works on the same partitions and sees the same deletion.
pub(super) struct TopicState {
    pub(super) config: TopicConfig,
    pub(super) partitions: Vec<Arc<PartitionState>>,
    pub(super) live: Arc<TopicLive>,
}

/// What every version of a topic's state shares.
#[derive(Default)]
pub(super) struct TopicLive {
    pub(super) round_robin: AtomicU32,
    pub(super) events: AtomicU64,
    pub(super) bytes: AtomicU64,
    /// Set when the topic is deleted: the committer refuses appends that
    /// were queued before, readers answer that the topic does not exist.
    pub(super) deleted: AtomicBool,
}

impl TopicState {
    pub(super) fn partition(&self, partition: u32) -> Result<&PartitionState> {
        self.partitions
            .get(partition as usize)
            .map(|p| &**p)
            .ok_or_else(|| Error::UnknownPartition {
                topic: self.config.name.clone(),
                partition,
                partitions: self.config.partitions,
            })
    }

    pub(super) fn info(&self) -> TopicInfo {
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
            compaction: self
                .config
                .cleanup_policy
                .compacts()
                .then(|| super::compaction::CompactionInfo::of(self)),
            events_appended: self.live.events.load(Relaxed),
            bytes_appended: self.live.bytes.load(Relaxed),
        }
    }
}

pub(super) struct Shared {
    pub(super) store: Arc<dyn Store>,
    pub(super) config: LogConfig,
    pub(super) topics: RwLock<BTreeMap<String, Arc<TopicState>>>,
    pub(super) stats: Stats,
    pub(super) failure: Mutex<Option<String>>,
    pub(super) failed: AtomicBool,
    /// Set when a cycle found the disk under the free-space reserve; cleared
    /// by the first check that finds room again.
    pub(super) disk_low: AtomicBool,
    pub(super) closed: AtomicBool,
    pub(super) dirty: AtomicBool,
    /// Held for a whole retention pass: two passes at once could write a stale floor.
    pub(super) retention: Mutex<()>,
    /// How many snapshots are being written out in full: while any is, no
    /// compaction pass starts (one could rewrite batches under the copy).
    pub(super) snapshotting: AtomicUsize,
    /// True while the syncer makes a cycle durable.
    pub(super) syncing: AtomicBool,
    /// The committer, woken by the syncer when a sync ends.
    pub(super) committer_thread: std::sync::OnceLock<std::thread::Thread>,
    /// Number of topics, for [`Log::watch_topics`].
    ///
    /// [`Log::watch_topics`]: super::Log::watch_topics
    pub(super) topic_count: watch::Sender<usize>,
    /// Bytes admitted under the disk quota whose appends have not ended.
    pub(super) reserved: AtomicU64,
    /// One quota evictor at a time (waiting appends do not hold threads).
    pub(super) evicting: tokio::sync::Mutex<()>,
    /// Topics being deleted: their names are not free again until their
    /// partitions are gone from the store.
    pub(super) deleting: Mutex<BTreeSet<String>>,
    /// Idempotent producers' sequences (see `producers`).
    pub(super) producers: Mutex<super::producers::Table>,
    /// Producer ids: the next to hand out and the end of the block reserved
    /// on disk.
    pub(super) producer_ids: tokio::sync::Mutex<(i64, i64)>,
}

impl Shared {
    pub(super) fn fail(&self, message: String) {
        tracing::error!(error = %message, "the log can no longer write; restart to recover");
        let mut f = self.failure.lock().unwrap_or_else(|p| p.into_inner());
        f.get_or_insert(message);
        self.failed.store(true, SeqCst);
    }

    pub(super) fn check_writable(&self) -> Result<()> {
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
    pub(super) fn check_room(&self, incoming: u64) -> Result<()> {
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
    pub(super) fn check_disk(&self) -> Result<()> {
        if self.disk_low.load(SeqCst) {
            self.check_room(self.config.max_cycle_bytes as u64)?;
        }
        Ok(())
    }

    pub(super) fn topic(&self, name: &str) -> Option<Arc<TopicState>> {
        self.topics
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
    }
}

/// Stops background threads: a flag and a condvar to sleep on.
#[derive(Default)]
pub(super) struct Stopper {
    stopped: Mutex<bool>,
    cv: Condvar,
}

impl Stopper {
    /// Sleeps up to `d`; true when stopping.
    pub(super) fn sleep(&self, d: Duration) -> bool {
        let g = self.stopped.lock().unwrap_or_else(|p| p.into_inner());
        let (g, _) = self
            .cv
            .wait_timeout_while(g, d, |s| !*s)
            .unwrap_or_else(|p| p.into_inner());
        *g
    }

    pub(super) fn stop(&self) {
        *self.stopped.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.cv.notify_all();
    }
}
