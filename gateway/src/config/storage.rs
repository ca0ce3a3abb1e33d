//! `[storage]` and `[[topics]]`: the log's settings, the defaults of
//! auto-created topics and the topics declared up front, and their conversion
//! into [`LogConfig`], [`TopicConfig`] and [`SledOptions`].

use std::time::Duration;

use serde::Deserialize;
use tributary_storage::{
    CleanupPolicy, Durability, Forwarded, LogConfig, OnFull, SledOptions, TopicConfig,
    TopicDefaults,
};

use super::{Config, Mode};

/// `durability` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DurabilityMode {
    /// Ack after fsync.
    Fsync,
    /// Ack before a periodic flush.
    Interval,
}

/// `[storage]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct StorageSection {
    /// `fsync` (ack means on disk) or `interval`.
    pub durability: DurabilityMode,
    /// Flush period with `durability = "interval"`.
    pub flush_interval_ms: u64,
    /// sled page cache.
    pub cache_capacity_bytes: u64,
    /// sled segment size (power of two).
    pub segment_size_bytes: usize,
    /// Appends waiting for the committer, in bytes; producers beyond it wait.
    pub max_pending_bytes: usize,
    /// Retention and compaction pass period.
    pub retention_check_ms: u64,
    /// Memory of the compaction cleaner's key map (24 bytes per key, 3/4
    /// usable); more keys than it holds take several passes.
    pub compaction_map_bytes: usize,
    /// Create topics on first write (default: true on edge, false on core).
    pub auto_create_topics: Option<bool>,
    /// Partitions of auto-created topics.
    pub default_partitions: u32,
    /// Age retention of auto-created topics.
    pub default_retention_ms: Option<u64>,
    /// Size retention (per partition) of auto-created topics.
    pub default_retention_bytes: Option<u64>,
    /// Largest event of auto-created topics.
    pub max_event_bytes: usize,
    /// Disk quota: event bytes the log holds at most (0: none).
    pub max_disk_bytes: u64,
    /// Free space left on the data directory's file system: appends that would
    /// eat into it are refused (disk full) and resume once space is back (0: off).
    pub min_free_bytes: u64,
    /// `on_full` of auto-created topics: `reject` or `drop_oldest`.
    pub default_on_full: OnFull,
    /// Idempotent producers' states kept (one per producer and partition);
    /// the least recently used are forgotten past it.
    pub max_producer_states: usize,
}

impl Default for StorageSection {
    fn default() -> Self {
        let sled = SledOptions::default();
        let log = LogConfig::default();
        StorageSection {
            durability: DurabilityMode::Fsync,
            flush_interval_ms: 5,
            cache_capacity_bytes: sled.cache_capacity,
            segment_size_bytes: sled.segment_size,
            max_pending_bytes: log.max_pending_bytes,
            max_producer_states: log.max_producer_states,
            compaction_map_bytes: log.compaction_map_bytes,
            retention_check_ms: log.retention_interval.as_millis() as u64,
            auto_create_topics: None,
            default_partitions: log.topic_defaults.partitions,
            default_retention_ms: None,
            default_retention_bytes: None,
            max_event_bytes: log.topic_defaults.max_event_bytes,
            max_disk_bytes: 0,
            min_free_bytes: log.min_free_bytes,
            default_on_full: OnFull::Reject,
        }
    }
}

/// `[[topics]]`.
#[derive(Debug, Clone, Deserialize)]
pub struct TopicSection {
    /// Name.
    pub name: String,
    /// Partitions (default: storage.default_partitions).
    pub partitions: Option<u32>,
    /// Age retention.
    pub retention_ms: Option<u64>,
    /// Size retention per partition.
    pub retention_bytes: Option<u64>,
    /// Largest event.
    pub max_event_bytes: Option<usize>,
    /// Policy at the disk quota.
    pub on_full: Option<OnFull>,
    /// `delete` (retention), `compact` (latest record per key) or
    /// `compact,delete`.
    pub cleanup_policy: Option<CleanupPolicy>,
    /// How long tombstones stay after compaction first kept them.
    pub delete_retention_ms: Option<u64>,
    /// Records younger than this are not compacted.
    pub min_compaction_lag_ms: Option<u64>,
    /// Records older than this are compacted whatever the dirty ratio.
    pub max_compaction_lag_ms: Option<u64>,
    /// The dirty share of a partition that starts a compaction pass.
    pub min_cleanable_dirty_ratio: Option<f64>,
}

impl Config {
    /// Defaults for topics created implicitly.
    pub fn topic_defaults(&self) -> TopicDefaults {
        let s = &self.storage;
        TopicDefaults {
            partitions: s.default_partitions,
            retention_ms: s.default_retention_ms,
            retention_bytes: s.default_retention_bytes,
            max_event_bytes: s.max_event_bytes,
            on_full: s.default_on_full,
        }
    }

    /// A declared topic's full config.
    pub fn topic_config(&self, t: &TopicSection) -> TopicConfig {
        let d = self.topic_defaults();
        let base = d.config(&t.name);
        TopicConfig {
            partitions: t.partitions.unwrap_or(d.partitions),
            retention_ms: t.retention_ms.or(d.retention_ms),
            retention_bytes: t.retention_bytes.or(d.retention_bytes),
            max_event_bytes: t.max_event_bytes.unwrap_or(d.max_event_bytes),
            on_full: t.on_full.unwrap_or(d.on_full),
            cleanup_policy: t.cleanup_policy.unwrap_or(base.cleanup_policy),
            delete_retention_ms: t.delete_retention_ms.unwrap_or(base.delete_retention_ms),
            min_compaction_lag_ms: t
                .min_compaction_lag_ms
                .unwrap_or(base.min_compaction_lag_ms),
            max_compaction_lag_ms: t.max_compaction_lag_ms.or(base.max_compaction_lag_ms),
            min_cleanable_dirty_ratio: t
                .min_cleanable_dirty_ratio
                .unwrap_or(base.min_cleanable_dirty_ratio),
            ..base
        }
    }

    /// The log's settings.
    pub fn log_config(&self, mode: Mode) -> LogConfig {
        let s = &self.storage;
        LogConfig {
            durability: match s.durability {
                // A cluster node's acknowledgement waits for the Raft log's
                // fsync on a majority; what the node applies to its own log
                // it can apply again from there after a crash (the marks make
                // that harmless), so the log itself syncs on the interval.
                _ if self.clustered() => {
                    Durability::Interval(Duration::from_millis(s.flush_interval_ms))
                }
                DurabilityMode::Fsync => Durability::Fsync,
                DurabilityMode::Interval => {
                    Durability::Interval(Duration::from_millis(s.flush_interval_ms))
                }
            },
            max_pending_bytes: s.max_pending_bytes,
            max_producer_states: s.max_producer_states,
            compaction_map_bytes: s.compaction_map_bytes,
            retention_interval: Duration::from_millis(s.retention_check_ms),
            auto_create_topics: s.auto_create_topics.unwrap_or(mode == Mode::Edge),
            topic_defaults: self.topic_defaults(),
            max_disk_bytes: (s.max_disk_bytes > 0).then_some(s.max_disk_bytes),
            min_free_bytes: s.min_free_bytes,
            forwarded: match mode {
                Mode::Edge if self.forwards() && self.upstream.topics.is_empty() => Forwarded::All,
                Mode::Edge if self.forwards() => Forwarded::Topics(
                    self.upstream
                        .topics
                        .iter()
                        .map(|t| t.name.clone())
                        .collect(),
                ),
                _ => Forwarded::None,
            },
            ..LogConfig::default()
        }
    }

    /// sled's settings.
    pub fn sled_options(&self) -> SledOptions {
        SledOptions {
            cache_capacity: self.storage.cache_capacity_bytes,
            segment_size: self.storage.segment_size_bytes,
        }
    }
}
