//! The storage crate's one error type.

use std::io;

/// Everything that can go wrong in the log. Expected outcomes that a caller
/// must handle (unknown topic, offset out of range) are variants too, so a front
/// end can map each to its protocol's own error.
///
/// Serializable, so that an outcome applied on a cluster's leader reaches the
/// node that asked for it (engine and I/O errors travel as their message).
#[derive(Debug, thiserror::Error, serde::Serialize, serde::Deserialize)]
pub enum Error {
    /// The topic does not exist (and auto-creation is off).
    #[error("topic `{0}` does not exist")]
    UnknownTopic(String),
    /// The partition is outside the topic's partition count.
    #[error("topic `{topic}` has {partitions} partition(s); partition {partition} does not exist")]
    UnknownPartition {
        /// Topic name.
        topic: String,
        /// Requested partition.
        partition: u32,
        /// How many partitions the topic has.
        partitions: u32,
    },
    /// A topic with this name exists already.
    #[error("topic `{0}` already exists")]
    TopicExists(String),
    /// The topic is being deleted: its name is free again once that ends.
    #[error("topic `{0}` is being deleted; try again shortly")]
    TopicDeleting(String),
    /// A topic configuration failed validation.
    #[error("invalid topic config: {0}")]
    InvalidTopic(String),
    /// A topic name breaks the naming rules; the message says which, and is
    /// shown as is.
    #[error("{0}")]
    InvalidName(String),
    /// A compacted topic keeps the latest record per key: a keyless one has
    /// no place in it.
    #[error("topic `{0}` is compacted: every record needs a key")]
    KeyRequired(String),
    /// One event is larger than the topic allows.
    #[error("event of {size} bytes exceeds the topic's max_event_bytes of {max}")]
    EventTooLarge {
        /// Encoded size of the event.
        size: usize,
        /// The topic's limit.
        max: usize,
    },
    /// An offset outside `[start, end]` was requested.
    #[error("offset {offset} is outside the log of {topic}/{partition}: valid offsets are {start}..={end}")]
    OffsetOutOfRange {
        /// Topic name.
        topic: String,
        /// Partition.
        partition: u32,
        /// Requested offset.
        offset: u64,
        /// First offset still stored.
        start: u64,
        /// Next offset to be written (reading at it waits for new data).
        end: u64,
    },
    /// An idempotent producer's batch does not continue its sequence (a
    /// batch before it is missing).
    #[error("producer {producer_id}: sequence {got} out of order, expected {expected}")]
    OutOfOrderSequence {
        /// The producer.
        producer_id: i64,
        /// The sequence that would continue it.
        expected: i32,
        /// The batch's first sequence.
        got: i32,
    },
    /// An idempotent producer's batch carries an epoch older than one
    /// already seen: a newer incarnation of the producer fenced it.
    #[error("producer {producer_id}: epoch {epoch} is fenced by epoch {current}")]
    ProducerFenced {
        /// The producer.
        producer_id: i64,
        /// The batch's epoch.
        epoch: i16,
        /// The newest epoch seen.
        current: i16,
    },
    /// A write made under a claim ([`crate::Guard`]) after another writer
    /// claimed the same thing: it is not written.
    #[error("{0}")]
    Superseded(String),
    /// An idempotent producer this partition has no state for sent a batch
    /// that does not start a sequence (its state expired, or was never kept).
    #[error("producer {producer_id} is not known in this partition")]
    UnknownProducer {
        /// The producer.
        producer_id: i64,
    },
    /// The bytes of a stored batch do not decode (see [`crate::batch`]); the
    /// message says what is wrong, and is shown as is. The log reports it as
    /// [`Error::Corruption`], with the batch's place.
    #[error("{0}")]
    BadBatch(String),
    /// A stored batch failed its checksum or could not be decoded.
    #[error("corrupt batch in {topic}/{partition} at offset {offset}: {detail}")]
    Corruption {
        /// Topic name.
        topic: String,
        /// Partition.
        partition: u32,
        /// Base offset of the damaged batch.
        offset: u64,
        /// What was wrong.
        detail: String,
    },
    /// The disk quota is reached and the topic's `on_full` is `reject` (or
    /// nothing can be evicted to make room).
    #[error("the disk quota of {max} bytes is reached ({used} bytes of events stored); topic `{topic}` refuses new events")]
    QuotaExceeded {
        /// The topic appended to.
        topic: String,
        /// Event bytes stored now.
        used: u64,
        /// `max_disk_bytes`.
        max: u64,
    },
    /// The disk holding the log has less free space than the reserve the log
    /// keeps (`min_free_bytes`): appends are refused, every stored event stays
    /// readable, and appends resume by themselves once space is back.
    #[error("the disk is full: {free} bytes free, the log keeps {reserve} bytes free; new events are refused until space is freed")]
    DiskFull {
        /// Bytes free on the log's file system when checked.
        free: u64,
        /// The reserve the log keeps (`min_free_bytes`).
        reserve: u64,
    },
    /// The log hit an I/O error earlier and refuses writes until restarted.
    #[error("the log is not writable: {0}")]
    Unwritable(String),
    /// The log is shutting down.
    #[error("the log is closed")]
    Closed,
    /// An invalid configuration value.
    #[error("invalid storage config: {0}")]
    Config(String),
    /// An error from sled.
    #[error("storage engine error: {0}")]
    Engine(
        #[from]
        #[serde(with = "as_message")]
        sled::Error,
    ),
    /// A filesystem error.
    #[error("i/o error: {0}")]
    Io(
        #[from]
        #[serde(with = "as_message")]
        io::Error,
    ),
    /// A write larger than a cluster carries in one entry (one message
    /// between nodes): refused before it is proposed, as no follower could
    /// ever receive it. (Last, so that the others keep their encoding on
    /// the wire between nodes.)
    #[error("a write of {size} bytes is over the {max} bytes a cluster replicates in one entry")]
    WriteTooLarge {
        /// Its encoded size.
        size: usize,
        /// The most one entry may be.
        max: usize,
    },
}

/// Engine and I/O errors on the wire: their message, read back as an I/O
/// error of kind `Other`.
mod as_message {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<E: std::fmt::Display, S: Serializer>(e: &E, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&e.to_string())
    }

    pub fn deserialize<'de, E: From<std::io::Error>, D: Deserializer<'de>>(
        d: D,
    ) -> Result<E, D::Error> {
        Ok(E::from(std::io::Error::other(String::deserialize(d)?)))
    }
}

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
