//! The storage backend behind the log: a trait with two implementations,
//! [`SledStore`] (the real one) and [`MemStore`] (an in-memory twin for tests,
//! which can also hold a commit or simulate a crash).
//!
//! Backends only store bytes: batch values under base offsets per partition,
//! topic configs, group offsets, and each partition's "floor" (the first offset
//! retention kept). Offsets, batching, checksums and durability ordering are the
//! log's business. Writes become durable only at [`Store::sync`].
//!
//! ## Where things live
//! - this file: the [`Store`] and [`PartitionStore`] traits and [`StoredBatch`].
//! - `keys`: how keys are laid out in the backends' trees (batch, floor,
//!   group-offset and metadata keys).
//! - `sled`: [`SledOptions`] and [`SledStore`]: the topic, floor, group and
//!   metadata trees.
//! - `sled/disk`: [`SledDisk`]: opening a sled database in a directory of its
//!   own (one process per directory, clean-up after a crash) and durable
//!   syncs (sled's flush alone is not one); the cluster's Raft log uses it too.
//! - `sled/partition`: one sled partition, with large batches stored in chunks
//!   ([`CHUNKED_OVER`], [`CHUNK`]; the format is documented there).
//! - `mem`: [`MemStore`], the in-memory twin, and its test hooks (held or
//!   failing syncs, crashes, a filling disk).

mod keys;
mod mem;
mod sled;

pub use self::sled::{SledDisk, SledOptions, SledStore, CHUNK, CHUNKED_OVER};
pub use mem::MemStore;

use std::sync::Arc;

use crate::error::Result;
use crate::topic::TopicConfig;

/// What [`Store::for_each_meta`] calls with each entry: (space, key, value).
pub type MetaVisitor<'a> = dyn FnMut(&str, &[u8], &[u8]) -> Result<()> + 'a;

/// A group's stored position: topic, partition, offset, the commit's
/// metadata.
pub type GroupPosition = (String, u32, u64, Vec<u8>);

/// One stored batch: base offset and value.
pub type StoredBatch = (u64, Vec<u8>);

/// A partition's batches, keyed by base offset.
pub trait PartitionStore: Send + Sync {
    /// Stores a batch (durable at the next [`Store::sync`]).
    fn insert(&self, base: u64, value: Vec<u8>) -> Result<()>;
    /// Stores a batch and sets the partition's mark to `mark` in one atomic
    /// write: after a crash both are there or neither is. A replicated log
    /// marks each batch with the index of the last entry it completes, so an
    /// entry applied again after a crash is recognized (see `log::replica`).
    fn insert_marked(&self, base: u64, value: Vec<u8>, mark: u64) -> Result<()>;
    /// The partition's mark, if one was ever set.
    fn mark(&self) -> Result<Option<u64>>;
    /// Removes a batch.
    fn remove(&self, base: u64) -> Result<()>;
    /// The batch with the smallest base offset.
    fn first(&self) -> Result<Option<StoredBatch>>;
    /// The batch with the largest base offset.
    fn last(&self) -> Result<Option<StoredBatch>>;
    /// The batch whose base is the greatest ≤ `from` (if any), then following
    /// batches in order, until at least `max_bytes` of values are collected.
    fn read(&self, from: u64, max_bytes: usize) -> Result<Vec<StoredBatch>>;
    /// The batches whose base is greater than `after`, in order, until at
    /// least `max_bytes` of values (at least one batch) are collected.
    fn read_after(&self, after: u64, max_bytes: usize) -> Result<Vec<StoredBatch>>;
}

/// A whole log's storage.
pub trait Store: Send + Sync {
    /// Topic configs that were stored.
    fn load_topics(&self) -> Result<Vec<TopicConfig>>;
    /// Stores a topic config.
    fn put_topic(&self, config: &TopicConfig) -> Result<()>;
    /// Removes a topic's config and every group's committed positions in
    /// it, durable with the next sync. Its batches stay until
    /// [`Store::drop_partitions`]; its floors stay (the log sets them to
    /// where the topic ended, so its name never reuses an offset).
    fn remove_topic(&self, topic: &str) -> Result<()>;
    /// Removes every partition store of `topic` with its batches. Called
    /// once the removal of its config is durable, so that a crash in between
    /// leaves partitions no topic names ([`Store::partition_topics`] finds
    /// them when the log opens).
    fn drop_partitions(&self, topic: &str) -> Result<()>;
    /// The topics that have partition stores, sorted.
    fn partition_topics(&self) -> Result<Vec<String>>;
    /// Opens (creating if needed) a partition's batch store.
    fn partition(&self, topic: &str, partition: u32) -> Result<Arc<dyn PartitionStore>>;
    /// Records the first offset a partition keeps after retention.
    fn put_floor(&self, topic: &str, partition: u32, start: u64) -> Result<()>;
    /// The recorded floor, if any.
    fn floor(&self, topic: &str, partition: u32) -> Result<Option<u64>>;
    /// Stores a consumer group's position, with its commit's metadata
    /// (empty: none).
    fn put_group_offset(
        &self,
        group: &str,
        topic: &str,
        partition: u32,
        offset: u64,
        metadata: &[u8],
    ) -> Result<()>;
    /// A group's positions as (topic, partition, offset, metadata).
    fn group_offsets(&self, group: &str) -> Result<Vec<GroupPosition>>;
    /// Removes every position of a group, durable with the next sync.
    fn forget_group(&self, group: &str) -> Result<()>;
    /// Removes a group's position in one partition, durable with the next sync.
    fn forget_group_offset(&self, group: &str, topic: &str, partition: u32) -> Result<()>;
    /// The names of the groups with committed positions, sorted.
    fn group_names(&self) -> Result<Vec<String>>;
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
    /// The entries of `space` whose keys are in `from..to`, sorted by key,
    /// at most `limit` of them.
    fn meta_range(
        &self,
        space: &str,
        from: &[u8],
        to: &[u8],
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        Ok(self
            .meta(space)?
            .into_iter()
            .filter(|(k, _)| k.as_slice() >= from && k.as_slice() < to)
            .take(limit)
            .collect())
    }
    /// The keys of a metadata space, sorted (values are not copied).
    fn meta_keys(&self, space: &str) -> Result<Vec<Vec<u8>>> {
        Ok(self.meta(space)?.into_iter().map(|(k, _)| k).collect())
    }
    /// Every recorded floor, as (topic, partition, start).
    fn floors(&self) -> Result<Vec<(String, u32, u64)>>;
    /// Calls `f` with every metadata entry, as (space, key, value), in key
    /// order (a snapshot copies them without holding them all).
    fn for_each_meta(&self, f: &mut MetaVisitor<'_>) -> Result<()>;
    /// Removes everything: topic configs, partitions, floors, group
    /// positions, metadata (durable with the next sync). Restoring a
    /// snapshot starts here.
    fn clear(&self) -> Result<()>;
    /// Makes every earlier write durable.
    fn sync(&self) -> Result<()>;
    /// Bytes the store occupies on disk (0 in memory).
    fn disk_bytes(&self) -> u64;
    /// Bytes free for this store on its file system (`None`: not on a disk).
    fn free_bytes(&self) -> Option<u64> {
        None
    }
}
