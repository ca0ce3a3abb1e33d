//! Tributary's durable, partitioned log (Kafka's model) on sled. The design
//! (concepts, the write path, storage on sled) is in `docs/design.md`.
//!
//! What lives where:
//! - [`event`]: [`Event`] (what producers send), [`Record`] (what consumers read).
//! - [`topic`]: [`TopicConfig`] and its validation.
//! - [`partitioner`]: Kafka's murmur2 partitioner.
//! - [`batch`]: the on-disk record batch format (documented there).
//! - [`store`]: the [`Store`] backend trait, [`SledStore`] (large batches
//!   stored in chunks, documented there), and the in-memory twin [`MemStore`]
//!   that tests use to hold commits or simulate crashes.
//! - [`log`]: [`Log`], the one write path: append with group commit, reads,
//!   tails, retention, the disk quota and free-space reserve, consumer-group
//!   offsets, metadata spaces, crash recovery.
//! - [`stats`]: counters for metrics.
//! - [`error`]: the one [`Error`] type.
//!
//! No networking lives here; front ends call [`Log`].

pub mod batch;
pub mod error;
pub mod event;
pub mod log;
pub mod partitioner;
pub mod stats;
pub mod store;
pub mod topic;
pub mod util;

pub use batch::RecordRef;
pub use error::{Error, Result};
pub use event::{AppendRecord, Event, Position, Record};
pub use log::{
    read_snapshot_header, snapshot_header, validate_group, AppendOptions, Applied, CompactionInfo,
    Cut, Durability, Forwarded, GroupOffset, Guard, Isolation, Leadership, Log, LogConfig, Marker,
    MetaEntry, Op, OpPart, PartitionInfo, Pending, ProducerBatch, ProducerState, ReadRange,
    ReadResult, ReadSink, Replicator, TopicDefaults, TopicInfo, MAX_COMMIT_METADATA,
};
pub use stats::{StatsSnapshot, TxnEvent, COMMIT_BUCKETS};
pub use store::{MemStore, PartitionStore, SledOptions, SledStore, Store};
pub use topic::{CleanupPolicy, OnFull, TopicChange, TopicConfig};
