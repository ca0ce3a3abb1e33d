//! [`SledStore`], the real backend, on sled 0.34: its [`SledOptions`] and
//! the topic, floor, group-offset and metadata trees. Opening a data
//! directory and durable syncs are [`SledDisk`]'s (`disk`), which the
//! cluster's Raft log shares; partitions, with large batches stored in
//! chunks, are in `partition`.

mod disk;
mod partition;

pub use disk::SledDisk;
pub use partition::{CHUNK, CHUNKED_OVER};

use std::path::Path;
use std::sync::Arc;

use super::keys::{
    be, floor_key, group_key, group_of_key, group_value, key_offset, meta_key, parse_floor_key,
    parse_group_key, partition_tree_prefix, split_meta_key, topic_of_group_key, topic_of_tree,
};
use super::{GroupPosition, MetaVisitor, PartitionStore, Store};
use crate::error::{Error, Result};
use crate::topic::TopicConfig;
use partition::SledPartition;

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
    disk: SledDisk,
    db: sled::Db,
    topics: sled::Tree,
    floors: sled::Tree,
    groups: sled::Tree,
    meta: sled::Tree,
}

impl SledStore {
    /// Opens or creates the store in `dir`, cleaning up after a crash first.
    pub fn open(dir: &Path, options: &SledOptions) -> Result<Self> {
        let disk = SledDisk::open(dir, options.cache_capacity, options.segment_size)?;
        let db = disk.db().clone();
        let topics = db.open_tree("__topics")?;
        let floors = db.open_tree("__floors")?;
        let groups = db.open_tree("__groups")?;
        let meta = db.open_tree("__meta")?;
        disk.sync()?;
        Ok(SledStore {
            disk,
            db,
            topics,
            floors,
            groups,
            meta,
        })
    }
}

impl Store for SledStore {
    fn load_topics(&self) -> Result<Vec<TopicConfig>> {
        let mut out = Vec::new();
        for item in self.topics.iter() {
            let (k, v) = item?;
            let config: TopicConfig =
                crate::topic::decode_stored(&v).map_err(|e| Error::Corruption {
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

    fn remove_topic(&self, topic: &str) -> Result<()> {
        self.topics.remove(topic.as_bytes())?;
        for item in self.groups.iter() {
            let (k, _) = item?;
            if topic_of_group_key(&k) == Some(topic.as_bytes()) {
                self.groups.remove(k)?;
            }
        }
        Ok(())
    }

    fn drop_partitions(&self, topic: &str) -> Result<()> {
        let prefix = partition_tree_prefix(topic);
        for name in self.db.tree_names() {
            if name.starts_with(prefix.as_bytes()) {
                self.db.drop_tree(name)?;
            }
        }
        Ok(())
    }

    fn partition_topics(&self) -> Result<Vec<String>> {
        let mut out: Vec<String> = self
            .db
            .tree_names()
            .iter()
            .filter_map(|n| topic_of_tree(n).map(str::to_owned))
            .collect();
        out.sort();
        out.dedup();
        Ok(out)
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
        metadata: &[u8],
    ) -> Result<()> {
        self.groups.insert(
            group_key(group, topic, partition),
            group_value(offset, metadata),
        )?;
        Ok(())
    }

    fn group_offsets(&self, group: &str) -> Result<Vec<GroupPosition>> {
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

    fn forget_group(&self, group: &str) -> Result<()> {
        let mut prefix = group.as_bytes().to_vec();
        prefix.push(0);
        for item in self.groups.scan_prefix(prefix) {
            let (k, _) = item?;
            self.groups.remove(k)?;
        }
        Ok(())
    }

    fn forget_group_offset(&self, group: &str, topic: &str, partition: u32) -> Result<()> {
        self.groups.remove(group_key(group, topic, partition))?;
        Ok(())
    }

    fn group_names(&self) -> Result<Vec<String>> {
        let mut out: Vec<String> = Vec::new();
        let mut next: Option<Vec<u8>> = None;
        // One key per group: after each, skip past every key of that group.
        loop {
            let item = match &next {
                None => self.groups.iter().next(),
                Some(from) => self.groups.range(from.clone()..).next(),
            };
            let Some(item) = item else { break };
            let (k, _) = item?;
            let Some(name) = group_of_key(&k) else { break };
            out.push(name.to_owned());
            let mut after = name.as_bytes().to_vec();
            after.push(1);
            next = Some(after);
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

    fn meta_range(
        &self,
        space: &str,
        from: &[u8],
        to: &[u8],
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let skip = meta_key(space, b"").len();
        let (from, to) = (meta_key(space, from), meta_key(space, to));
        let mut out = Vec::new();
        if from >= to {
            return Ok(out);
        }
        for item in self.meta.range(from..to).take(limit) {
            let (k, v) = item?;
            out.push((k[skip..].to_vec(), v.to_vec()));
        }
        Ok(out)
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

    fn floors(&self) -> Result<Vec<(String, u32, u64)>> {
        let mut out = Vec::new();
        for item in self.floors.iter() {
            let (k, v) = item?;
            let bad = || Error::Io(std::io::Error::other("a floor entry does not decode"));
            let (topic, partition) = parse_floor_key(&k).ok_or_else(bad)?;
            out.push((topic, partition, key_offset(&v)?));
        }
        Ok(out)
    }

    fn for_each_meta(&self, f: &mut MetaVisitor<'_>) -> Result<()> {
        for item in self.meta.iter() {
            let (k, v) = item?;
            let (space, key) = split_meta_key(&k)
                .ok_or_else(|| Error::Io(std::io::Error::other("a metadata key has no space")))?;
            f(space, key, &v)?;
        }
        Ok(())
    }

    fn clear(&self) -> Result<()> {
        for tree in [&self.topics, &self.floors, &self.groups, &self.meta] {
            tree.clear()?;
        }
        for name in self.db.tree_names() {
            if topic_of_tree(&name).is_some() {
                self.db.drop_tree(name)?;
            }
        }
        Ok(())
    }

    fn sync(&self) -> Result<()> {
        self.disk.sync()
    }

    fn disk_bytes(&self) -> u64 {
        self.db.size_on_disk().unwrap_or(0)
    }

    fn free_bytes(&self) -> Option<u64> {
        // What an unprivileged writer may use (f_bavail), as sled would.
        let st = rustix::fs::statvfs(self.disk.dir()).ok()?;
        Some(st.f_bavail.saturating_mul(st.f_frsize))
    }
}
