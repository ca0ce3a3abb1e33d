//! Retention and the disk quota: the background retention pass (age and
//! size limits, never past the forwarded mark), [`Reservation`]s of bytes
//! under `max_disk_bytes`, and the evictor that makes room at the quota by
//! dropping the oldest batches of `drop_oldest` topics.

use std::sync::atomic::{Ordering::Relaxed, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use super::state::{PartitionState, Shared, Stopper, TopicState};
use super::{corruption, Log};
use crate::batch::{decode_header, BatchHeader};
use crate::error::{Error, Result};
use crate::topic::{OnFull, TopicConfig};
use crate::util::now_ms;

/// Bytes admitted under the disk quota. It travels with the append's
/// command and is released when the committer is done with it, after the
/// batch is sealed and counted in [`Shared::stored_bytes`] (in between it
/// counts twice, which only errs on the safe side), whether or not the
/// producer still waits for the answer.
pub(super) struct Reservation {
    shared: Arc<Shared>,
    bytes: u64,
}

impl Reservation {
    /// Adds first, then checks (and takes back on failure): two producers
    /// racing for the last room can both be refused, never both admitted.
    fn try_new(shared: &Arc<Shared>, bytes: u64, max: u64) -> Option<Reservation> {
        let reserved = shared.reserved.fetch_add(bytes, SeqCst) + bytes;
        if shared.stored_bytes() + reserved > max {
            shared.reserved.fetch_sub(bytes, SeqCst);
            return None;
        }
        Some(Reservation {
            shared: shared.clone(),
            bytes,
        })
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.shared.reserved.fetch_sub(self.bytes, SeqCst);
    }
}

impl Log {
    /// Admits `incoming` bytes under the quota, evicting the oldest durable
    /// batches of `drop_oldest` topics when needed (one evictor at a time, on
    /// a blocking thread, reserving as soon as there is room so no other
    /// producer takes it).
    pub(super) async fn make_room(
        &self,
        t: &Arc<TopicState>,
        incoming: u64,
        max: u64,
    ) -> Result<Reservation> {
        let shared = &self.inner.shared;
        let refuse = || {
            shared.stats.quota_rejected_appends.fetch_add(1, Relaxed);
            Err(Error::QuotaExceeded {
                topic: t.config.name.clone(),
                used: shared.stored_bytes() + shared.reserved.load(SeqCst),
                max,
            })
        };
        if incoming > max {
            return refuse();
        }
        if let Some(r) = Reservation::try_new(shared, incoming, max) {
            return Ok(r);
        }
        let _one_evictor = shared.evicting.lock().await;
        let evictor = shared.clone();
        let admitted = tokio::task::spawn_blocking(move || evict_oldest(&evictor, incoming, max))
            .await
            .map_err(|e| Error::Io(std::io::Error::other(e.to_string())))??;
        match admitted {
            Some(r) => Ok(r),
            None => refuse(),
        }
    }
}

impl Log {
    /// Deletes a partition's records below `before` (Kafka's DeleteRecords;
    /// `None`: below the end): the start offset moves there exactly (a read
    /// below it is out of range), the batches wholly below it are removed,
    /// and the new start is durable before the answer. Records not yet
    /// forwarded upstream are kept (the start stops at the forwarded mark).
    /// Returns the new start. In a cluster it is an op of the replicated
    /// log: every node moves its start there, in the log's order (`None`
    /// is the end where the op is applied, the same on every node).
    pub async fn delete_records(
        &self,
        topic: &str,
        partition: u32,
        before: Option<u64>,
    ) -> Result<u64> {
        self.shared().check_writable()?;
        if let Some(r) = self.replicator() {
            self.existing(topic)?.partition(partition)?;
            let op = super::replica::Op::DeleteRecords {
                topic: topic.to_owned(),
                partition,
                before,
            };
            return match self.replicate(r, op).await? {
                super::replica::Applied::Start(start) => Ok(start),
                other => Err(super::unexpected(&other)),
            };
        }
        self.delete_records_here(topic, partition, before).await
    }

    /// [`Log::delete_records`] on this node. Applied again (after a crash),
    /// it finds the start already there and changes nothing.
    pub(super) async fn delete_records_here(
        &self,
        topic: &str,
        partition: u32,
        before: Option<u64>,
    ) -> Result<u64> {
        let t = self.existing(topic)?;
        let ps = t.partition(partition)?;
        let end = *ps.end.borrow();
        let start = ps.start.load(SeqCst);
        let target = before.unwrap_or(end);
        if target > end {
            return Err(Error::OffsetOutOfRange {
                topic: topic.to_owned(),
                partition,
                offset: target,
                start,
                end,
            });
        }
        let target = target.min(ps.forwarded.load(SeqCst));
        if target <= start {
            return Ok(start);
        }
        // One remover at a time (the quota's evictor takes the same lock).
        let _one_evictor = self.inner.shared.evicting.lock().await;
        let shared = self.inner.shared.clone();
        let name = topic.to_owned();
        let removed = tokio::task::spawn_blocking(move || -> Result<u64> {
            let t = shared
                .topic(&name)
                .ok_or_else(|| Error::UnknownTopic(name.clone()))?;
            let ps = t.partition(partition)?;
            raise_floor(&shared, &name, ps, target)?;
            let mut removed = 0u64;
            while let Some((base, value)) = ps.store.first()? {
                let h = decode_header(&value).map_err(|d| corruption(&name, partition, base, d))?;
                if base + h.span > target {
                    break;
                }
                drop_first_batch(&shared, &t, ps, base, &h)?;
                removed += u64::from(h.count);
            }
            Ok(removed)
        })
        .await
        .map_err(|e| Error::Io(std::io::Error::other(e.to_string())))??;
        self.inner
            .shared
            .stats
            .retention_removed_events
            .fetch_add(removed, Relaxed);
        self.flush().await?;
        Ok(ps.start.load(SeqCst))
    }
}

/// Most batches one partition loses per pass; the rest waits for the next pass.
const MAX_REMOVALS_PER_PASS: usize = 4096;

pub(super) fn enforce_retention(shared: &Shared, stopper: &Stopper) {
    let _one_pass_at_a_time = shared.retention.lock().unwrap_or_else(|p| p.into_inner());
    for t in shared.topic_states(|c| c.cleanup_policy.deletes()) {
        if t.config.retention_ms.is_none() && t.config.retention_bytes.is_none() {
            continue;
        }
        for ps in &t.partitions {
            if let Err(e) = retain_partition(shared, &t, ps, stopper) {
                tracing::warn!(topic = %t.config.name, partition = ps.id, error = %e, "retention pass failed");
            }
        }
    }
}

impl Shared {
    /// The topics whose config passes `keep`, outside the topics lock.
    fn topic_states(&self, keep: impl Fn(&TopicConfig) -> bool) -> Vec<Arc<TopicState>> {
        self.topics
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter(|t| keep(&t.config))
            .cloned()
            .collect()
    }

    /// Event bytes stored now, across all topics.
    pub(super) fn stored_bytes(&self) -> u64 {
        self.topics
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .flat_map(|t| &t.partitions)
            .map(|p| p.stored_bytes())
            .sum()
    }
}

/// Evicts the oldest durable batches of `drop_oldest` topics until
/// `incoming` more bytes can be reserved under `max`, and reserves them.
/// Oldest by the batch's newest timestamp, clamped to now (a producer's
/// future timestamps do not pin a batch). Evicts nothing when the
/// `drop_oldest` topics clearly cannot make enough room (their stored bytes
/// fall short; a last commit cycle not yet durable counts there, so in a
/// rare case some is evicted before a refusal).
fn evict_oldest(shared: &Arc<Shared>, incoming: u64, max: u64) -> Result<Option<Reservation>> {
    let _one_pass_at_a_time = shared.retention.lock().unwrap_or_else(|p| p.into_inner());
    let candidates = shared.topic_states(|c| c.on_full == OnFull::DropOldest);
    let evictable = || -> u64 {
        candidates
            .iter()
            .flat_map(|t| &t.partitions)
            .map(|p| p.stored_bytes())
            .sum()
    };
    let now = now_ms();
    loop {
        if let Some(r) = Reservation::try_new(shared, incoming, max) {
            return Ok(Some(r));
        }
        let over =
            (shared.stored_bytes() + shared.reserved.load(SeqCst) + incoming).saturating_sub(max);
        if over > evictable() {
            return Ok(None);
        }
        // The partition whose first durable batch is the oldest, among
        // batches already forwarded upstream first, then among all.
        type Candidate<'a> = (
            bool,
            bool,
            i64,
            &'a TopicState,
            &'a PartitionState,
            u64,
            BatchHeader,
        );
        let mut oldest: Option<Candidate> = None;
        for t in &candidates {
            for ps in &t.partitions {
                let Some((base, value)) = ps.store.first()? else {
                    continue;
                };
                let h = decode_header(&value)
                    .map_err(|d| corruption(&t.config.name, ps.id, base, d))?;
                let next_start = base + h.span;
                if next_start > *ps.end.borrow() {
                    continue; // not durable yet
                }
                // Compacted topics last: what they hold is each key's latest.
                let compacted = t.config.cleanup_policy.compacts();
                let unforwarded = next_start > ps.forwarded.load(SeqCst);
                let age = h.max_ts.min(now);
                if oldest
                    .as_ref()
                    .is_none_or(|(c, u, ts, ..)| (compacted, unforwarded, age) < (*c, *u, *ts))
                {
                    oldest = Some((compacted, unforwarded, age, t, ps, base, h));
                }
            }
        }
        let Some((_, unforwarded, _, t, ps, base, h)) = oldest else {
            return Ok(None);
        };
        drop_first_batch(shared, t, ps, base, &h)?;
        let stats = &shared.stats;
        stats.quota_dropped_batches.fetch_add(1, Relaxed);
        stats
            .quota_dropped_events
            .fetch_add(u64::from(h.count), Relaxed);
        if unforwarded {
            // Only the part above the mark was never forwarded.
            let end = base + h.span;
            let lost = end - ps.forwarded.load(SeqCst).clamp(base, end);
            stats
                .quota_dropped_unforwarded_events
                .fetch_add(lost, Relaxed);
        }
    }
}

/// Raises a partition's start to `to` (never lowers it: DeleteRecords may
/// have set one inside the batch a retention pass drops) and stores the
/// start as its floor. One at a time per partition: DeleteRecords and a
/// retention pass or the quota's evictor take different locks, and without
/// this one could store an older, lower start after the other's newer one,
/// which a restart would then find.
fn raise_floor(shared: &Shared, topic: &str, ps: &PartitionState, to: u64) -> Result<()> {
    let _one_at_a_time = crate::util::lock(&ps.floor);
    let start = ps.start.fetch_max(to, SeqCst).max(to);
    shared.store.put_floor(topic, ps.id, start)
}

/// Removes a partition's first batch (at `base`, header `h`). Floor first:
/// after a crash between the two, the floor keeps offsets from being reused
/// even if this was the partition's last batch.
fn drop_first_batch(
    shared: &Shared,
    t: &TopicState,
    ps: &PartitionState,
    base: u64,
    h: &BatchHeader,
) -> Result<()> {
    let next_start = base + h.span;
    raise_floor(shared, &t.config.name, ps, next_start)?;
    ps.start_pos.store(h.end_position, Relaxed);
    ps.store.remove(base)?;
    // A marker gone: an aborted transaction it ended is forgotten.
    if h.txn.is_some_and(|x| x.control) && crate::util::lock(&ps.txns).aborted > 0 {
        let forgotten = super::txns::Aborted {
            store: &*shared.store,
            topic: &t.config.name,
            partition: ps.id,
        }
        .forget_below(next_start)?;
        let mut txns = crate::util::lock(&ps.txns);
        txns.aborted = txns.aborted.saturating_sub(forgotten);
    }
    Ok(())
}

fn retain_partition(
    shared: &Shared,
    t: &TopicState,
    ps: &PartitionState,
    stopper: &Stopper,
) -> Result<()> {
    // Not `ms as i64`: a huge retention_ms would turn negative and expire everything.
    let max_age = |ms: u64| i64::try_from(ms).unwrap_or(i64::MAX);
    let oldest_kept = t
        .config
        .retention_ms
        .map(|ms| now_ms().saturating_sub(max_age(ms)));
    for removed in 0..MAX_REMOVALS_PER_PASS {
        // Throttle: a pass never hogs the engine; give appends room every 64 removals.
        if removed > 0 && removed % 64 == 0 && stopper.sleep(Duration::from_millis(1)) {
            return Ok(());
        }
        let Some((base, value)) = ps.store.first()? else {
            return Ok(());
        };
        let h = decode_header(&value).map_err(|d| corruption(&t.config.name, ps.id, base, d))?;
        let next_start = base + h.span;
        // Not durable yet, or not forwarded upstream yet: retention keeps it
        // (the disk quota is what bounds an edge that cannot reach its core).
        if next_start > *ps.end.borrow() || next_start > ps.forwarded.load(SeqCst) {
            return Ok(());
        }
        let size = ps.stored_bytes();
        let expired = oldest_kept.is_some_and(|cutoff| h.max_ts < cutoff);
        let oversize = t.config.retention_bytes.is_some_and(|max| size > max);
        if !expired && !oversize {
            return Ok(());
        }
        drop_first_batch(shared, t, ps, base, &h)?;
        shared.stats.retention_removed_batches.fetch_add(1, Relaxed);
        shared
            .stats
            .retention_removed_events
            .fetch_add(u64::from(h.count), Relaxed);
    }
    Ok(())
}
