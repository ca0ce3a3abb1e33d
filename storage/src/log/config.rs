//! The log's settings: [`LogConfig`], the [`Durability`] of acks, the
//! [`TopicDefaults`] for implicitly created topics, and which topics are
//! [`Forwarded`] upstream.

use std::time::Duration;

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
            retention_ms: self.retention_ms,
            retention_bytes: self.retention_bytes,
            max_event_bytes: self.max_event_bytes,
            on_full: self.on_full,
            ..TopicConfig::new(name, self.partitions)
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
    ///
    /// [`Error::DiskFull`]: crate::Error::DiskFull
    pub min_free_bytes: u64,
    /// Topics forwarded upstream (an edge with `[upstream]`): their events are
    /// kept by retention until [`Log::mark_forwarded`] says the core has them,
    /// and the disk quota evicts their forwarded events first.
    ///
    /// [`Log::mark_forwarded`]: super::Log::mark_forwarded
    pub forwarded: Forwarded,
    /// Idempotent producer states (one per producer and partition) kept
    /// across the node; past this the least recently used are forgotten.
    pub max_producer_states: usize,
    /// Memory of the cleaner's key map (24 bytes a key, 3/4 usable): a
    /// compaction pass maps at most this many keys' bytes of a partition's
    /// new records, and leaves the rest to the next pass.
    pub compaction_map_bytes: usize,
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
            max_producer_states: 100_000,
            compaction_map_bytes: 8 * 1024 * 1024,
        }
    }
}
