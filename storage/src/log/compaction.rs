//! Log compaction: the cleaner keeps, in each partition of a compacted topic
//! (`cleanup_policy` `compact` or `compact,delete`), the latest record of
//! each key, and removes tombstones (null values) `delete_retention_ms`
//! after the pass that first kept them. Offsets never change: a compacted
//! partition has gaps, and readers step over them.
//!
//! ## A pass over one partition
//! A partition is cut in two at its *dirty* offset: below it, what earlier
//! passes cleaned; from it, records written since. A pass starts when the
//! dirty share of the partition's bytes reaches `min_cleanable_dirty_ratio`,
//! when its oldest dirty record is older than `max_compaction_lag_ms`, or
//! when a kept tombstone's horizon has come.
//!
//! 1. **Map** the dirty section: each key's hash (128 bits) → the offset of
//!    its latest record, in a [`KeyMap`] of fixed size (the node's
//!    `compaction_map_bytes`). The section ends before the partition's last
//!    batch (never cleaned, as Kafka never cleans the active segment), before
//!    any batch younger than `min_compaction_lag_ms`, before any batch not yet
//!    durable, and where the map is full: the rest waits for the next pass.
//! 2. **Size**: the range the pass would rewrite (from the first batch to
//!    the end of the mapped section) is read once to size the new batches;
//!    a range where nothing would be removed is only marked clean, and a
//!    pass for which the disk lacks room (twice the range above the
//!    append reserve) is put off.
//! 3. **Intent**: the range is written to the metadata and synced.
//! 4. **Rewrite**: the range's batches are read in order; a record is kept
//!    unless a later record of its key is in the map, or it is a tombstone
//!    whose horizon has passed. Kept records are packed into compacted
//!    batches (format version 3, `batch`) of about `batch_bytes`, each stored
//!    under the base offset of the first original batch it replaces and
//!    covering exactly the original batches' offsets, their positions
//!    aligned to the range's end (so the partition's byte count stays
//!    exact) by the sizes step 2 found. Then a sync.
//! 5. **Resolve**: the original batches now covered by a new one are removed;
//!    the dirty offset moves to the range's end; the intent is removed; a
//!    sync.
//!
//! A crash at any moment loses nothing compaction keeps: before 4 ends every
//! original batch a new one did not overwrite is still there, and readers
//! (and [`recover_intents`] when the log opens) treat a batch that starts
//! inside the one before it as covered. The pass holds the retention lock
//! (retention and the quota evictor wait) and sleeps a millisecond every 64
//! batches it writes, so producers keep their share of the disk.

use std::hash::Hasher;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed, Ordering::SeqCst};
use std::time::Duration;

use super::corruption;
use super::state::{PartitionState, Shared, Stopper, TopicState};
use crate::batch::{decode_header, walk, BatchHeader, CompactBuilder};
use crate::error::{Error, Result};
use crate::event::Record;
use crate::store::{PartitionStore, Store};
use crate::util::now_ms;

/// Metadata space of each partition's dirty offset, its position and the
/// earliest horizon of a tombstone kept.
pub(super) const CHECKPOINTS: &str = "compaction";
/// Metadata space of the ranges passes are rewriting.
pub(super) const INTENTS: &str = "compaction.pass";

/// Bytes of one [`KeyMap`] slot.
const SLOT_BYTES: usize = 24;
/// A map never holds fewer keys than this, whatever the config says (a
/// batch's keys must fit).
const MIN_SLOTS: usize = 1 << 16;

/// The cleaner's state of one partition (in memory; the dirty offset is
/// also stored).
#[derive(Debug)]
pub(super) struct CleanerState {
    /// The first offset not yet cleaned.
    pub(super) dirty: AtomicU64,
    /// The partition position at `dirty`.
    pub(super) dirty_pos: AtomicU64,
    /// The earliest horizon of a tombstone kept (`i64::MAX`: none;
    /// `i64::MIN`: not known, no pass ran).
    pub(super) next_horizon: AtomicI64,
    /// The dirty share of the partition's bytes when last looked at, in
    /// millionths.
    pub(super) dirty_ppm: AtomicU64,
    pub(super) passes: AtomicU64,
    pub(super) records_removed: AtomicU64,
    pub(super) bytes_reclaimed: AtomicU64,
    /// Time spent in passes (µs).
    pub(super) busy_us: AtomicU64,
    /// When the last pass ended (ms since the epoch; 0: none yet).
    pub(super) last_pass_ms: AtomicI64,
}

impl CleanerState {
    pub(super) fn new(dirty: u64, dirty_pos: u64, next_horizon: i64) -> CleanerState {
        CleanerState {
            dirty: AtomicU64::new(dirty),
            dirty_pos: AtomicU64::new(dirty_pos),
            next_horizon: AtomicI64::new(next_horizon),
            dirty_ppm: AtomicU64::new(0),
            passes: AtomicU64::new(0),
            records_removed: AtomicU64::new(0),
            bytes_reclaimed: AtomicU64::new(0),
            busy_us: AtomicU64::new(0),
            last_pass_ms: AtomicI64::new(0),
        }
    }
}

/// What a compacted topic's cleaner did, summed over its partitions.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CompactionInfo {
    /// The largest dirty share of a partition's bytes (0..=1) when the
    /// cleaner last looked.
    pub dirty_ratio: f64,
    /// Passes since the process started.
    pub passes: u64,
    /// Records removed since the process started.
    pub records_removed: u64,
    /// Bytes of batches given back since the process started.
    pub bytes_reclaimed: u64,
    /// Seconds spent in passes since the process started.
    pub pass_seconds: f64,
    /// When the last pass ended (ms since the epoch), if one ran.
    pub last_pass_ms: Option<i64>,
}

impl CompactionInfo {
    pub(super) fn of(t: &TopicState) -> CompactionInfo {
        let mut info = CompactionInfo::default();
        for p in &t.partitions {
            let c = &p.cleaner;
            info.dirty_ratio = info.dirty_ratio.max(c.dirty_ppm.load(Relaxed) as f64 / 1e6);
            info.passes += c.passes.load(Relaxed);
            info.records_removed += c.records_removed.load(Relaxed);
            info.bytes_reclaimed += c.bytes_reclaimed.load(Relaxed);
            info.pass_seconds += c.busy_us.load(Relaxed) as f64 / 1e6;
            let last = c.last_pass_ms.load(Relaxed);
            if last > 0 {
                info.last_pass_ms = Some(info.last_pass_ms.unwrap_or(0).max(last));
            }
        }
        info
    }
}

/// The metadata key of a partition: `topic NUL partition` (big-endian).
pub(super) fn meta_key(topic: &str, partition: u32) -> Vec<u8> {
    let mut k = topic.as_bytes().to_vec();
    k.push(0);
    k.extend_from_slice(&partition.to_be_bytes());
    k
}

fn parse_meta_key(k: &[u8]) -> Option<(String, u32)> {
    let (topic, part) = k.split_at(k.len().checked_sub(5)?);
    let part = part.strip_prefix(&[0])?;
    Some((
        String::from_utf8(topic.to_vec()).ok()?,
        u32::from_be_bytes(part.try_into().ok()?),
    ))
}

fn pair(a: u64, b: u64) -> Vec<u8> {
    let mut v = a.to_be_bytes().to_vec();
    v.extend_from_slice(&b.to_be_bytes());
    v
}

fn parse_pair(v: &[u8]) -> Option<(u64, u64)> {
    Some((
        u64::from_be_bytes(v.get(..8)?.try_into().ok()?),
        u64::from_be_bytes(v.get(8..16)?.try_into().ok()?),
    ))
}

/// A partition's stored dirty offset, its position and the earliest
/// tombstone horizon, if a pass ran.
pub(super) fn checkpoint(
    store: &dyn Store,
    topic: &str,
    partition: u32,
) -> Result<Option<(u64, u64, i64)>> {
    Ok(store
        .get_meta(CHECKPOINTS, &meta_key(topic, partition))?
        .and_then(|v| {
            let (dirty, pos) = parse_pair(&v)?;
            let horizon = i64::from_be_bytes(v.get(16..24)?.try_into().ok()?);
            Some((dirty, pos, horizon))
        }))
}

/// Forgets a deleted topic's checkpoints and intents (durable with the next sync).
pub(super) fn forget_topic(store: &dyn Store, topic: &str, partitions: u32) -> Result<()> {
    for p in 0..partitions {
        store.put_meta(CHECKPOINTS, &meta_key(topic, p), None)?;
        store.put_meta(INTENTS, &meta_key(topic, p), None)?;
    }
    Ok(())
}

/// Finishes the passes a crash interrupted: in each range an intent names,
/// batches covered by the one before them are removed. Runs when the log
/// opens, before partitions are recovered.
pub(super) fn recover_intents(store: &dyn Store) -> Result<()> {
    let intents = store.meta(INTENTS)?;
    if intents.is_empty() {
        return Ok(());
    }
    for (k, v) in intents {
        if let (Some((topic, partition)), Some((from, until))) =
            (parse_meta_key(&k), parse_pair(&v))
        {
            if store.partition_topics()?.contains(&topic) {
                let part = store.partition(&topic, partition)?;
                let removed = resolve(part.as_ref(), &topic, partition, from, until)?;
                tracing::info!(%topic, partition, from, until, removed, "finished an interrupted compaction pass");
            }
        }
        store.put_meta(INTENTS, &k, None)?;
    }
    store.sync()
}

/// Removes the batches in `from..until` that start inside the batch before
/// them (originals a compacted batch replaced); returns how many.
fn resolve(
    part: &dyn PartitionStore,
    topic: &str,
    partition: u32,
    from: u64,
    until: u64,
) -> Result<u64> {
    let mut covered = from;
    let mut doomed = Vec::new();
    scan(part, topic, partition, from, until, |base, _, h| {
        if base < covered {
            doomed.push(base);
        } else {
            covered = base + h.span;
        }
        Ok(true)
    })?;
    for base in &doomed {
        part.remove(*base)?;
    }
    Ok(doomed.len() as u64)
}

/// Calls `f` with each stored batch whose base is in `from..until`, in
/// order, until it returns false.
fn scan(
    part: &dyn PartitionStore,
    topic: &str,
    partition: u32,
    from: u64,
    until: u64,
    mut f: impl FnMut(u64, &[u8], &BatchHeader) -> Result<bool>,
) -> Result<()> {
    let mut seen: Option<u64> = None;
    loop {
        // After the first read, strictly after the last batch seen: a
        // batch of a MiB or more must not be read again and again.
        let batches = match seen {
            None => part.read(from, 1 << 20)?,
            Some(s) => part.read_after(s, 1 << 20)?,
        };
        let mut progressed = false;
        for (base, value) in batches {
            if base < from || seen.is_some_and(|s| base <= s) {
                continue;
            }
            if base >= until {
                return Ok(());
            }
            let h = decode_header(&value).map_err(|d| corruption(topic, partition, base, d))?;
            seen = Some(base);
            progressed = true;
            if !f(base, &value, &h)? {
                return Ok(());
            }
        }
        if !progressed {
            return Ok(());
        }
    }
}

/// Key hash → offset of the key's latest record in the dirty section: open
/// addressing over a table allocated once, so its memory is fixed.
pub(super) struct KeyMap {
    /// (hash high, hash low, offset); a zero hash marks an empty slot.
    slots: Vec<[u64; 3]>,
    used: usize,
    limit: usize,
}

impl KeyMap {
    /// A map of about `bytes` bytes.
    pub(super) fn with_bytes(bytes: usize) -> KeyMap {
        let n = (bytes / SLOT_BYTES).max(MIN_SLOTS);
        KeyMap {
            slots: vec![[0; 3]; n],
            used: 0,
            // Linear probing stays short below this load.
            limit: n / 4 * 3,
        }
    }

    fn clear(&mut self) {
        if self.used > 0 {
            self.slots.fill([0; 3]);
            self.used = 0;
        }
    }

    fn slot(&self, h: u128) -> usize {
        let (hi, lo) = ((h >> 64) as u64, h as u64);
        let mut i = (lo as usize) % self.slots.len();
        loop {
            let s = &self.slots[i];
            if (s[0] == hi && s[1] == lo) || (s[0] == 0 && s[1] == 0) {
                return i;
            }
            i = (i + 1) % self.slots.len();
        }
    }

    /// Records `offset` for `h`; false when the map is full (a new key).
    fn put(&mut self, h: u128, offset: u64) -> bool {
        let i = self.slot(h);
        let s = &mut self.slots[i];
        if s[0] == 0 && s[1] == 0 {
            if self.used >= self.limit {
                return false;
            }
            self.used += 1;
            *s = [(h >> 64) as u64, h as u64, offset];
        } else {
            s[2] = offset;
        }
        true
    }

    fn get(&self, h: u128) -> Option<u64> {
        let s = &self.slots[self.slot(h)];
        (s[0] != 0 || s[1] != 0).then_some(s[2])
    }
}

/// A 128-bit hash of a key (never 0): two SipHashes with different inputs.
/// A collision would lose a key's latest record; at 128 bits (Kafka uses
/// MD5's 128) it is not a risk worth a byte comparison.
fn key_hash(key: &[u8]) -> u128 {
    let mut a = std::hash::DefaultHasher::new();
    a.write(key);
    a.write_u8(0x5a);
    let mut b = std::hash::DefaultHasher::new();
    b.write_u8(0xa5);
    b.write(key);
    ((u128::from(a.finish()) << 64) | u128::from(b.finish())).max(1)
}

/// Runs a pass over every compacted partition that needs one.
pub(super) fn clean(shared: &Shared, stopper: &Stopper, map: &mut Option<KeyMap>) {
    let topics: Vec<_> = shared
        .topics
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .values()
        .filter(|t| t.config.cleanup_policy.compacts())
        .cloned()
        .collect();
    for listed in topics {
        for p in 0..listed.partitions.len() {
            if stopper.sleep(Duration::ZERO)
                || shared.failed.load(SeqCst)
                || shared.snapshotting.load(SeqCst) > 0
            {
                return;
            }
            let map =
                map.get_or_insert_with(|| KeyMap::with_bytes(shared.config.compaction_map_bytes));
            let _one_pass_at_a_time = shared.retention.lock().unwrap_or_else(|p| p.into_inner());
            // A snapshot's copy may have begun while this waited for the
            // lock: it waits for no pass after its start.
            if shared.snapshotting.load(SeqCst) > 0 {
                return;
            }
            // The topic as it is now: deleted or changed since it was listed.
            let Some(t) = shared.topic(&listed.config.name) else {
                break;
            };
            if t.live.deleted.load(SeqCst) || !t.config.cleanup_policy.compacts() {
                break;
            }
            let ps = &t.partitions[p];
            if let Err(e) = clean_partition(shared, &t, ps, map, stopper, now_ms()) {
                tracing::warn!(topic = %t.config.name, partition = ps.id, error = %e, "compaction pass failed");
            }
        }
    }
}

/// What one pass decided about each record.
struct Verdicts<'a> {
    map: &'a KeyMap,
    now: i64,
    delete_retention_ms: i64,
    removed: u64,
    next_horizon: i64,
}

impl Verdicts<'_> {
    /// `Some(horizon)` when the record is kept (the horizon only for a tombstone).
    fn keep(&mut self, r: &Record, horizon: Option<i64>) -> Option<Option<i64>> {
        let superseded = r
            .key
            .as_deref()
            .and_then(|k| self.map.get(key_hash(k)))
            .is_some_and(|latest| r.offset < latest);
        if superseded {
            self.removed += 1;
            return None;
        }
        if r.value.is_some() {
            return Some(None);
        }
        let h = horizon.unwrap_or_else(|| self.now.saturating_add(self.delete_retention_ms));
        if h <= self.now {
            self.removed += 1;
            return None;
        }
        self.next_horizon = self.next_horizon.min(h);
        Some(Some(h))
    }
}

/// One pass over one partition (see the module's doc). True when it ran.
pub(super) fn clean_partition(
    shared: &Shared,
    t: &TopicState,
    ps: &PartitionState,
    map: &mut KeyMap,
    stopper: &Stopper,
    now: i64,
) -> Result<bool> {
    let (topic, id) = (t.config.name.as_str(), ps.id);
    let c = &t.config;
    let bad = |base, d| corruption(topic, id, base, d);
    let (Some((first, first_v)), Some((last, last_v))) = (ps.store.first()?, ps.store.last()?)
    else {
        return Ok(false);
    };
    if first == last {
        return Ok(false);
    }
    let first_h = decode_header(&first_v).map_err(|d| bad(first, d))?;
    let last_h = decode_header(&last_v).map_err(|d| bad(last, d))?;
    let start_pos = first_h.end_position.saturating_sub(first_v.len() as u64);
    let last_pos = last_h.end_position.saturating_sub(last_v.len() as u64);
    let cleaner = &ps.cleaner;
    let mut dirty = cleaner.dirty.load(SeqCst).max(first);
    let mut dirty_pos = if dirty == first {
        start_pos
    } else {
        cleaner.dirty_pos.load(SeqCst).max(start_pos)
    };
    // A pass cut by a crash may have written a compacted batch across the
    // stored dirty offset: it is clean up to that batch's end.
    if let Some((base, v)) = ps.store.read(dirty, 1)?.into_iter().next() {
        let h = decode_header(&v).map_err(|d| bad(base, d))?;
        if base < dirty && base + h.span > dirty {
            (dirty, dirty_pos) = (base + h.span, h.end_position);
        }
    }
    let dirty_bytes = last_pos.saturating_sub(dirty_pos);
    let ratio = dirty_bytes as f64 / last_pos.saturating_sub(start_pos).max(1) as f64;
    cleaner.dirty_ppm.store((ratio * 1e6) as u64, Relaxed);
    let horizon_due = cleaner.next_horizon.load(SeqCst) <= now;
    let mut due = dirty_bytes > 0 && ratio >= c.min_cleanable_dirty_ratio;
    if !due && dirty_bytes > 0 {
        if let Some(max_lag) = c.max_compaction_lag_ms {
            let max_lag = i64::try_from(max_lag).unwrap_or(i64::MAX);
            if let Some((base, v)) = ps
                .store
                .read(dirty, 1)?
                .into_iter()
                .find(|(b, _)| *b >= dirty)
            {
                let h = decode_header(&v).map_err(|d| bad(base, d))?;
                due = h.min_ts <= now.saturating_sub(max_lag);
            }
        }
    }
    if !due && !horizon_due {
        return Ok(false);
    }

    // 1. Map the dirty section.
    let started = std::time::Instant::now();
    map.clear();
    // Never past an undecided transaction.
    let durable = crate::util::lock(&ps.txns).last_stable(*ps.end.borrow());
    let lag_cut = now.saturating_sub(i64::try_from(c.min_compaction_lag_ms).unwrap_or(i64::MAX));
    let (mut until, mut until_pos) = (dirty, dirty_pos);
    if due {
        scan(
            ps.store.as_ref(),
            topic,
            id,
            dirty,
            last,
            |base, value, h| {
                if base + h.span > durable || h.max_ts > lag_cut {
                    return Ok(false);
                }
                let mut full = false;
                let mut offsets = Vec::new();
                walk(value, base, id, 0, u64::MAX, |r, _| {
                    if let Some(k) = &r.key {
                        offsets.push((key_hash(k), r.offset));
                    }
                    true
                })
                .map_err(|d| bad(base, d))?;
                for (h, o) in offsets {
                    full |= !map.put(h, o);
                }
                if full {
                    // Keys of this batch already in the map point at records
                    // that exist, beyond the range: still true, and safe.
                    if until == dirty {
                        tracing::warn!(topic, partition = id, "compaction: one batch has more keys than storage.compaction_map_bytes holds; raise it");
                    }
                    return Ok(false);
                }
                (until, until_pos) = (base + h.span, h.end_position);
                Ok(true)
            },
        )?;
    }
    if until == first || (until == dirty && !horizon_due) {
        return Ok(false);
    }

    let end = *ps.end.borrow();
    let any_aborted = crate::util::lock(&ps.txns).aborted > 0;
    let index = super::txns::Aborted {
        store: &*shared.store,
        topic,
        partition: id,
    };
    let aborted = |producer: i64, base: u64| index.at(any_aborted, producer, base, end);
    // 2. Sized first (reads only): what the rewrite would write.
    let target = shared.config.batch_bytes;
    let mut sizes = Vec::new();
    let mut verdicts = Verdicts {
        map,
        now,
        delete_retention_ms: i64::try_from(c.delete_retention_ms).unwrap_or(i64::MAX),
        removed: 0,
        next_horizon: i64::MAX,
    };
    rewrite(
        ps.store.as_ref(),
        topic,
        id,
        first,
        until,
        target,
        &mut verdicts,
        &aborted,
        |_, _, b| {
            sizes.push(b.len() as u64);
            Ok(())
        },
    )?;
    let key = meta_key(topic, id);
    let checkpoint = |horizon: i64| {
        let mut v = pair(until, until_pos);
        v.extend_from_slice(&horizon.to_be_bytes());
        shared.store.put_meta(CHECKPOINTS, &key, Some(&v))
    };
    if verdicts.removed == 0 {
        // Nothing to remove: the section is clean as it is (tombstones not
        // yet stamped are stamped by the pass that next writes).
        checkpoint(verdicts.next_horizon)?;
        cleaner.dirty_pos.store(until_pos, SeqCst);
        cleaner.dirty.store(until, SeqCst);
        cleaner.next_horizon.store(verdicts.next_horizon, SeqCst);
        cleaner.passes.fetch_add(1, Relaxed);
        shared.stats.compaction_passes.fetch_add(1, Relaxed);
        cleaner.last_pass_ms.store(now_ms(), Relaxed);
        cleaner
            .busy_us
            .fetch_add(started.elapsed().as_micros() as u64, Relaxed);
        return Ok(true);
    }
    let range_bytes = until_pos.saturating_sub(start_pos);
    if let Some(free) = shared.store.free_bytes() {
        // The originals stay until the new batches are durable: room for
        // both, above the reserve appends keep.
        if free
            < shared
                .config
                .min_free_bytes
                .saturating_add(range_bytes.saturating_mul(2))
        {
            tracing::warn!(
                topic,
                partition = id,
                free,
                "compaction pass put off: too little free disk"
            );
            return Ok(false);
        }
    }

    // 3. Intent.
    shared
        .store
        .put_meta(INTENTS, &key, Some(&pair(first, until)))?;
    let synced = |what: &str| {
        shared.store.sync().inspect_err(|e| {
            shared.fail(format!(
                "compaction of {topic}/{id}: {what} sync failed: {e}"
            ));
        })
    };
    synced("intent")?;

    // 4. Rewrite.
    let total: u64 = sizes.iter().sum();
    let mut pos = until_pos.saturating_sub(total);
    let new_start_pos = pos;
    let mut i = 0;
    let mut written = 0usize;
    verdicts.removed = 0;
    verdicts.next_horizon = i64::MAX;
    let result = rewrite(
        ps.store.as_ref(),
        topic,
        id,
        first,
        until,
        target,
        &mut verdicts,
        &aborted,
        |base, span, b| {
            if sizes.get(i) != Some(&(b.len() as u64)) {
                return Err(Error::BadBatch(format!(
                    "compaction of {topic}/{id}: batch at {base} sized {} then {}",
                    sizes.get(i).copied().unwrap_or(0),
                    b.len()
                )));
            }
            i += 1;
            pos += b.len() as u64;
            ps.store.insert(base, b.finish(span, pos))?;
            written += 1;
            if written.is_multiple_of(64) {
                stopper.sleep(Duration::from_millis(1));
            }
            Ok(())
        },
    );
    if let Err(e) = result {
        shared.fail(format!("compaction of {topic}/{id} stopped half way: {e}"));
        return Err(e);
    }
    synced("rewrite")?;

    // 5. Resolve.
    let resolved = resolve(ps.store.as_ref(), topic, id, first, until)
        .and_then(|_| checkpoint(verdicts.next_horizon))
        .and_then(|_| shared.store.put_meta(INTENTS, &key, None));
    if let Err(e) = resolved {
        shared.fail(format!("compaction of {topic}/{id} stopped half way: {e}"));
        return Err(e);
    }
    let before = ps.stored_bytes();
    ps.start_pos.store(new_start_pos, Relaxed);
    let reclaimed = before.saturating_sub(ps.stored_bytes());
    cleaner.dirty_pos.store(until_pos, SeqCst);
    cleaner.dirty.store(until, SeqCst);
    cleaner.next_horizon.store(verdicts.next_horizon, SeqCst);
    cleaner.passes.fetch_add(1, Relaxed);
    cleaner.records_removed.fetch_add(verdicts.removed, Relaxed);
    cleaner.bytes_reclaimed.fetch_add(reclaimed, Relaxed);
    cleaner.last_pass_ms.store(now_ms(), Relaxed);
    cleaner
        .busy_us
        .fetch_add(started.elapsed().as_micros() as u64, Relaxed);
    let stats = &shared.stats;
    stats.compaction_passes.fetch_add(1, Relaxed);
    stats
        .compaction_records_removed
        .fetch_add(verdicts.removed, Relaxed);
    stats
        .compaction_bytes_reclaimed
        .fetch_add(reclaimed, Relaxed);
    synced("checkpoint")?;
    // Aborted transactions whose records the pass removed.
    let forgotten = index.forget_below(until)?;
    if forgotten > 0 {
        let mut txns = crate::util::lock(&ps.txns);
        txns.aborted = txns.aborted.saturating_sub(forgotten);
    }
    tracing::debug!(
        topic,
        partition = id,
        from = first,
        until,
        removed = verdicts.removed,
        reclaimed,
        "compaction pass"
    );
    Ok(true)
}

/// Reads the batches of `from..until` and hands `emit` the compacted
/// batches (base, span, builder) that replace them. Deterministic for a
/// given map and time, so it can size before it writes.
#[allow(clippy::too_many_arguments)]
fn rewrite(
    part: &dyn PartitionStore,
    topic: &str,
    id: u32,
    from: u64,
    until: u64,
    target: usize,
    verdicts: &mut Verdicts<'_>,
    aborted: &dyn Fn(i64, u64) -> Result<bool>,
    mut emit: impl FnMut(u64, u64, CompactBuilder) -> Result<()>,
) -> Result<()> {
    let mut group: Option<CompactBuilder> = None;
    let mut group_base = from;
    let mut kept = Vec::new();
    let mut covered = from;
    scan(part, topic, id, from, until, |base, value, h| {
        if base < covered {
            // An original a crashed pass already replaced (see `resolve`).
            return Ok(true);
        }
        // Markers and aborted transactions' records go; committed ones
        // stay as plain records (the range is below the last stable offset).
        let gone = match h.txn {
            Some(x) => x.control || aborted(x.producer_id, base)?,
            None => false,
        };
        if gone {
            verdicts.removed += u64::from(h.count);
            covered = base + h.span;
            if covered > until {
                return Err(corruption(
                    topic,
                    id,
                    base,
                    Error::BadBatch(format!("a pass's range ends at {until}, inside this batch")),
                ));
            }
            if group.is_none() {
                group_base = base;
                group = Some(CompactBuilder::new(base, target));
            }
            return Ok(true);
        }
        covered = base + h.span;
        if covered > until {
            return Err(corruption(
                topic,
                id,
                base,
                Error::BadBatch(format!("a pass's range ends at {until}, inside this batch")),
            ));
        }
        kept.clear();
        walk(value, base, id, 0, u64::MAX, |r, horizon| {
            if let Some(h) = verdicts.keep(&r, horizon) {
                kept.push((r, h));
            }
            true
        })
        .map_err(|d| corruption(topic, id, base, d))?;
        if let Some(b) = &group {
            let adds: usize = kept.iter().map(|(r, h)| b.record_len(r, *h)).sum();
            if b.len() > HEADER_ROOM && b.len() + adds > target {
                if let Some(b) = group.take() {
                    emit(group_base, base - group_base, b)?;
                }
            }
        }
        let b = group.get_or_insert_with(|| {
            group_base = base;
            CompactBuilder::new(base, target)
        });
        for (r, h) in &kept {
            b.push(r, *h);
        }
        Ok(true)
    })?;
    if let Some(b) = group {
        emit(group_base, until - group_base, b)?;
    }
    Ok(())
}

/// A builder holding no record is this long.
const HEADER_ROOM: usize = crate::batch::HEADER_LEN_V3;
