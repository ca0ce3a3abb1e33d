//! [`MemStore`], the in-memory twin of [`SledStore`] for tests: writes apply at
//! once and are journaled, and the journal becomes durable at each sync, so
//! [`MemStore::crashed`] keeps exactly what was synced. Test hooks hold syncs
//! until released, make them fail, or fake the free disk space.
//!
//! [`SledStore`]: super::SledStore

use std::collections::BTreeMap;
use std::ops::Bound::{Excluded, Unbounded};
use std::sync::{Arc, Condvar, Mutex};

use super::keys::{
    group_key, group_of_key, group_value, meta_key, parse_group_key, split_meta_key,
    topic_of_group_key,
};
use super::{GroupPosition, MetaVisitor, PartitionStore, Store, StoredBatch};
use crate::error::{Error, Result};
use crate::topic::TopicConfig;
use crate::util::lock;

#[derive(Clone, Default)]
struct MemState {
    topics: BTreeMap<String, TopicConfig>,
    partitions: BTreeMap<(String, u32), BTreeMap<u64, Vec<u8>>>,
    floors: BTreeMap<(String, u32), u64>,
    /// Values as stored: the offset, then the metadata.
    groups: BTreeMap<Vec<u8>, Vec<u8>>,
    meta: BTreeMap<Vec<u8>, Vec<u8>>,
    marks: BTreeMap<(String, u32), u64>,
}

enum MemOp {
    Topic(TopicConfig),
    Insert(String, u32, u64, Vec<u8>),
    /// An insert and the partition's new mark, as one write.
    InsertMarked(String, u32, u64, Vec<u8>, u64),
    Remove(String, u32, u64),
    Floor(String, u32, u64),
    Group(Vec<u8>, Vec<u8>),
    ForgetGroup(String),
    ForgetGroupOffset(Vec<u8>),
    Meta(Vec<u8>, Option<Vec<u8>>),
    RemoveTopic(String),
    DropPartitions(String),
    Clear,
}

impl MemState {
    fn apply(&mut self, op: MemOp) {
        match op {
            MemOp::Topic(c) => {
                self.topics.insert(c.name.clone(), c);
            }
            MemOp::Insert(t, p, base, v) => {
                self.partitions.entry((t, p)).or_default().insert(base, v);
            }
            MemOp::InsertMarked(t, p, base, v, mark) => {
                self.partitions
                    .entry((t.clone(), p))
                    .or_default()
                    .insert(base, v);
                self.marks.insert((t, p), mark);
            }
            MemOp::Remove(t, p, base) => {
                if let Some(tree) = self.partitions.get_mut(&(t, p)) {
                    tree.remove(&base);
                }
            }
            MemOp::Floor(t, p, s) => {
                self.floors.insert((t, p), s);
            }
            MemOp::Group(k, v) => {
                self.groups.insert(k, v);
            }
            MemOp::ForgetGroup(g) => {
                self.groups
                    .retain(|k, _| group_of_key(k) != Some(g.as_str()));
            }
            MemOp::ForgetGroupOffset(k) => {
                self.groups.remove(&k);
            }
            MemOp::Meta(k, Some(v)) => {
                self.meta.insert(k, v);
            }
            MemOp::Meta(k, None) => {
                self.meta.remove(&k);
            }
            MemOp::RemoveTopic(t) => {
                self.topics.remove(&t);
                self.groups
                    .retain(|k, _| topic_of_group_key(k) != Some(t.as_bytes()));
            }
            MemOp::DropPartitions(t) => {
                self.partitions.retain(|(topic, _), _| *topic != t);
                self.marks.retain(|(topic, _), _| *topic != t);
            }
            MemOp::Clear => *self = MemState::default(),
        }
    }
}

#[derive(Default)]
struct MemInner {
    live: MemState,
    durable: MemState,
    journal: Vec<MemOp>,
    syncs: u64,
    held: bool,
    fail_sync: Option<String>,
    free_bytes: Option<u64>,
    /// When recording: the durable state it started from, and every write
    /// since, in order.
    tape: Option<(MemState, Vec<MemOp>)>,
}

/// An in-memory [`Store`]: what is synced survives [`MemStore::crashed`], what is
/// not is lost, as on a real disk after a power cut. Tests can hold syncs to prove
/// that nothing is acknowledged before durability.
#[derive(Clone, Default)]
pub struct MemStore {
    inner: Arc<(Mutex<MemInner>, Condvar)>,
}

impl MemStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes every following [`Store::sync`] wait until [`MemStore::release_sync`].
    pub fn hold_sync(&self) {
        lock(&self.inner.0).held = true;
    }

    /// Lets held and future syncs complete.
    pub fn release_sync(&self) {
        lock(&self.inner.0).held = false;
        self.inner.1.notify_all();
    }

    /// Makes syncs fail with this message (None: succeed again).
    pub fn fail_sync(&self, message: Option<&str>) {
        lock(&self.inner.0).fail_sync = message.map(str::to_owned);
    }

    /// What [`Store::free_bytes`] answers from now on (a disk filling up).
    pub fn set_free_bytes(&self, free: Option<u64>) {
        lock(&self.inner.0).free_bytes = free;
    }

    /// How many syncs completed.
    pub fn syncs(&self) -> u64 {
        lock(&self.inner.0).syncs
    }

    /// A new store holding only what was synced: the state after a crash.
    pub fn crashed(&self) -> MemStore {
        let durable = lock(&self.inner.0).durable.clone();
        let inner = MemInner {
            live: durable.clone(),
            durable,
            ..MemInner::default()
        };
        MemStore {
            inner: Arc::new((Mutex::new(inner), Condvar::new())),
        }
    }

    /// Records every write from now on, for [`MemStore::crashed_after`]
    /// (everything not yet synced counts as written after the start).
    pub fn record_writes(&self) {
        let mut g = lock(&self.inner.0);
        let ops = g.journal.iter().map(clone_op).collect();
        g.tape = Some((g.durable.clone(), ops));
    }

    /// Writes recorded since [`MemStore::record_writes`].
    pub fn recorded_writes(&self) -> usize {
        lock(&self.inner.0).tape.as_ref().map_or(0, |t| t.1.len())
    }

    /// The state after a crash that kept the first `n` recorded writes and
    /// none after, syncs or not: a disk that makes writes durable in the
    /// order they were made, cut at any point.
    pub fn crashed_after(&self, n: usize) -> MemStore {
        let g = lock(&self.inner.0);
        let mut state = MemState::default();
        if let Some((start, ops)) = &g.tape {
            state = start.clone();
            for op in ops.iter().take(n) {
                state.apply(clone_op(op));
            }
        }
        let inner = MemInner {
            live: state.clone(),
            durable: state,
            ..MemInner::default()
        };
        MemStore {
            inner: Arc::new((Mutex::new(inner), Condvar::new())),
        }
    }

    /// Applies `op` now; it becomes durable at the next sync.
    fn write(&self, op: MemOp) {
        let mirror = clone_op(&op);
        let mut g = lock(&self.inner.0);
        if let Some((_, ops)) = &mut g.tape {
            ops.push(clone_op(&op));
        }
        g.live.apply(op);
        g.journal.push(mirror);
    }
}

fn clone_op(op: &MemOp) -> MemOp {
    match op {
        MemOp::Topic(c) => MemOp::Topic(c.clone()),
        MemOp::Insert(t, p, b, v) => MemOp::Insert(t.clone(), *p, *b, v.clone()),
        MemOp::InsertMarked(t, p, b, v, m) => MemOp::InsertMarked(t.clone(), *p, *b, v.clone(), *m),
        MemOp::Remove(t, p, b) => MemOp::Remove(t.clone(), *p, *b),
        MemOp::Floor(t, p, s) => MemOp::Floor(t.clone(), *p, *s),
        MemOp::Group(k, v) => MemOp::Group(k.clone(), v.clone()),
        MemOp::ForgetGroup(g) => MemOp::ForgetGroup(g.clone()),
        MemOp::ForgetGroupOffset(k) => MemOp::ForgetGroupOffset(k.clone()),
        MemOp::Meta(k, v) => MemOp::Meta(k.clone(), v.clone()),
        MemOp::RemoveTopic(t) => MemOp::RemoveTopic(t.clone()),
        MemOp::DropPartitions(t) => MemOp::DropPartitions(t.clone()),
        MemOp::Clear => MemOp::Clear,
    }
}

struct MemPartition {
    store: MemStore,
    topic: String,
    partition: u32,
}

impl MemPartition {
    fn with_tree<R>(&self, f: impl FnOnce(Option<&BTreeMap<u64, Vec<u8>>>) -> R) -> R {
        let g = lock(&self.store.inner.0);
        f(g.live.partitions.get(&(self.topic.clone(), self.partition)))
    }

    fn op(&self, op: MemOp) {
        self.store.write(op);
    }
}

impl PartitionStore for MemPartition {
    fn insert(&self, base: u64, value: Vec<u8>) -> Result<()> {
        self.op(MemOp::Insert(
            self.topic.clone(),
            self.partition,
            base,
            value,
        ));
        Ok(())
    }

    fn insert_marked(&self, base: u64, value: Vec<u8>, mark: u64) -> Result<()> {
        self.op(MemOp::InsertMarked(
            self.topic.clone(),
            self.partition,
            base,
            value,
            mark,
        ));
        Ok(())
    }

    fn mark(&self) -> Result<Option<u64>> {
        let g = lock(&self.store.inner.0);
        Ok(g.live
            .marks
            .get(&(self.topic.clone(), self.partition))
            .copied())
    }

    fn remove(&self, base: u64) -> Result<()> {
        self.op(MemOp::Remove(self.topic.clone(), self.partition, base));
        Ok(())
    }

    fn first(&self) -> Result<Option<StoredBatch>> {
        Ok(self.with_tree(|t| t.and_then(|t| t.iter().next().map(|(k, v)| (*k, v.clone())))))
    }

    fn last(&self) -> Result<Option<StoredBatch>> {
        Ok(self.with_tree(|t| t.and_then(|t| t.iter().next_back().map(|(k, v)| (*k, v.clone())))))
    }

    fn read(&self, from: u64, max_bytes: usize) -> Result<Vec<StoredBatch>> {
        Ok(self.with_tree(|t| {
            let mut out = Vec::new();
            let Some(t) = t else { return out };
            let mut bytes = 0;
            if let Some((k, v)) = t.range(..=from).next_back() {
                bytes += v.len();
                out.push((*k, v.clone()));
            }
            for (k, v) in t.range((Excluded(from), Unbounded)) {
                if bytes >= max_bytes && !out.is_empty() {
                    break;
                }
                bytes += v.len();
                out.push((*k, v.clone()));
            }
            out
        }))
    }

    fn read_after(&self, after: u64, max_bytes: usize) -> Result<Vec<StoredBatch>> {
        Ok(self.with_tree(|t| {
            let mut out = Vec::new();
            let mut bytes = 0;
            for (k, v) in t
                .into_iter()
                .flat_map(|t| t.range((Excluded(after), Unbounded)))
            {
                if bytes >= max_bytes && !out.is_empty() {
                    break;
                }
                bytes += v.len();
                out.push((*k, v.clone()));
            }
            out
        }))
    }
}

impl Store for MemStore {
    fn load_topics(&self) -> Result<Vec<TopicConfig>> {
        Ok(lock(&self.inner.0).live.topics.values().cloned().collect())
    }

    fn put_topic(&self, config: &TopicConfig) -> Result<()> {
        self.write(MemOp::Topic(config.clone()));
        Ok(())
    }

    fn remove_topic(&self, topic: &str) -> Result<()> {
        self.write(MemOp::RemoveTopic(topic.to_owned()));
        Ok(())
    }

    fn drop_partitions(&self, topic: &str) -> Result<()> {
        self.write(MemOp::DropPartitions(topic.to_owned()));
        Ok(())
    }

    fn partition_topics(&self) -> Result<Vec<String>> {
        let g = lock(&self.inner.0);
        let mut out: Vec<String> = g.live.partitions.keys().map(|(t, _)| t.clone()).collect();
        out.dedup();
        Ok(out)
    }

    fn partition(&self, topic: &str, partition: u32) -> Result<Arc<dyn PartitionStore>> {
        Ok(Arc::new(MemPartition {
            store: self.clone(),
            topic: topic.to_owned(),
            partition,
        }))
    }

    fn put_floor(&self, topic: &str, partition: u32, start: u64) -> Result<()> {
        self.write(MemOp::Floor(topic.to_owned(), partition, start));
        Ok(())
    }

    fn floor(&self, topic: &str, partition: u32) -> Result<Option<u64>> {
        Ok(lock(&self.inner.0)
            .live
            .floors
            .get(&(topic.to_owned(), partition))
            .copied())
    }

    fn put_group_offset(
        &self,
        group: &str,
        topic: &str,
        partition: u32,
        offset: u64,
        metadata: &[u8],
    ) -> Result<()> {
        let key = group_key(group, topic, partition);
        self.write(MemOp::Group(key, group_value(offset, metadata)));
        Ok(())
    }

    fn group_offsets(&self, group: &str) -> Result<Vec<GroupPosition>> {
        let g = lock(&self.inner.0);
        Ok(g.live
            .groups
            .iter()
            .filter_map(|(k, v)| parse_group_key(group, k, v))
            .collect())
    }

    fn forget_group(&self, group: &str) -> Result<()> {
        self.write(MemOp::ForgetGroup(group.to_owned()));
        Ok(())
    }

    fn forget_group_offset(&self, group: &str, topic: &str, partition: u32) -> Result<()> {
        self.write(MemOp::ForgetGroupOffset(group_key(group, topic, partition)));
        Ok(())
    }

    fn group_names(&self) -> Result<Vec<String>> {
        let g = lock(&self.inner.0);
        let mut out: Vec<String> = g
            .live
            .groups
            .keys()
            .filter_map(|k| group_of_key(k).map(str::to_owned))
            .collect();
        out.dedup();
        Ok(out)
    }

    fn put_meta(&self, space: &str, key: &[u8], value: Option<&[u8]>) -> Result<()> {
        self.write(MemOp::Meta(meta_key(space, key), value.map(<[u8]>::to_vec)));
        Ok(())
    }

    fn meta(&self, space: &str) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let prefix = meta_key(space, b"");
        let g = lock(&self.inner.0);
        Ok(g.live
            .meta
            .range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .map(|(k, v)| (k[prefix.len()..].to_vec(), v.clone()))
            .collect())
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
        if from >= to {
            return Ok(Vec::new());
        }
        let g = lock(&self.inner.0);
        Ok(g.live
            .meta
            .range(from..to)
            .take(limit)
            .map(|(k, v)| (k[skip..].to_vec(), v.clone()))
            .collect())
    }

    fn floors(&self) -> Result<Vec<(String, u32, u64)>> {
        let g = lock(&self.inner.0);
        Ok(g.live
            .floors
            .iter()
            .map(|((t, p), s)| (t.clone(), *p, *s))
            .collect())
    }

    fn for_each_meta(&self, f: &mut MetaVisitor<'_>) -> Result<()> {
        let entries: Vec<(Vec<u8>, Vec<u8>)> = {
            let g = lock(&self.inner.0);
            g.live
                .meta
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        };
        for (k, v) in entries {
            let (space, key) = split_meta_key(&k)
                .ok_or_else(|| Error::Io(std::io::Error::other("a metadata key has no space")))?;
            f(space, key, &v)?;
        }
        Ok(())
    }

    fn clear(&self) -> Result<()> {
        self.write(MemOp::Clear);
        Ok(())
    }

    fn sync(&self) -> Result<()> {
        let (m, cv) = &*self.inner;
        let mut g = lock(m);
        while g.held {
            g = cv.wait(g).unwrap_or_else(|p| p.into_inner());
        }
        if let Some(msg) = &g.fail_sync {
            return Err(Error::Io(std::io::Error::other(msg.clone())));
        }
        let journal = std::mem::take(&mut g.journal);
        for op in journal {
            g.durable.apply(op);
        }
        g.syncs += 1;
        Ok(())
    }

    fn disk_bytes(&self) -> u64 {
        0
    }

    fn free_bytes(&self) -> Option<u64> {
        lock(&self.inner.0).free_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_crash_keeps_only_synced_writes() {
        let s = MemStore::new();
        let p = s.partition("t", 0).expect("partition");
        p.insert(0, vec![1]).expect("insert");
        s.sync().expect("sync");
        p.insert(1, vec![2]).expect("insert");
        let after = s.crashed();
        let p2 = after.partition("t", 0).expect("partition");
        assert_eq!(p2.last().expect("last"), Some((0, vec![1])));
    }
}
