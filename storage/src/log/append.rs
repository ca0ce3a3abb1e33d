//! The append path: [`Log::append`] checks the log is writable and has disk,
//! creates the topic if allowed, places each event in a partition (explicit,
//! by key, or one rotating partition per keyless call), encodes the events into
//! batch-sized chunks on the producer's task, reserves disk-quota room and
//! pending-byte permits, then queues one command for the committer and maps
//! the first offsets it answers with back to each event's position.

use std::sync::atomic::Ordering::Relaxed;

use tokio::sync::oneshot;

use super::committer::{Appended, Command, Part};
use super::replica::{Applied, Op, OpPart};
use super::Log;
use super::ProducerBatch;
use crate::batch::{encoded_len, BatchBuilder, HEADER_LEN};
use crate::error::{Error, Result};
use crate::event::{AppendRecord, Position};
use crate::partitioner::partition_for_key;
use crate::util::now_ms;

/// How an append is queued, beyond its records.
#[derive(Debug, Default)]
pub struct AppendOptions {
    /// An idempotent producer's batch: every record must name the same
    /// partition; a batch sent before is not stored again (its first offset
    /// comes back), one out of sequence or from a fenced epoch is refused.
    pub producer: Option<ProducerBatch>,
    /// Waited for before the append is queued to the committer: a client's
    /// earlier append fires it once queued, so the client's appends are
    /// written in the order it sent them.
    pub after: Option<oneshot::Receiver<()>>,
    /// Fired (dropped) once this append is queued, or refused before.
    pub queued: Option<oneshot::Sender<()>>,
    /// The producer's batch belongs to its open transaction: stored as a
    /// batch of its own naming the producer (the first one opens the
    /// transaction in the partition), read by committed readers only once
    /// a commit marker closes it. Needs `producer`.
    pub transactional: bool,
    /// Written only while this claim holds ([`Log::claim`]).
    pub guard: Option<super::Guard>,
}

impl AppendOptions {
    /// Options that queue this append after the one `last` was handed to,
    /// and leave in `last` what the next append waits for.
    pub fn in_order(last: &mut Option<oneshot::Receiver<()>>) -> AppendOptions {
        let (queued, next) = oneshot::channel();
        AppendOptions {
            producer: None,
            after: last.replace(next),
            queued: Some(queued),
            transactional: false,
            guard: None,
        }
    }
}

impl Log {
    /// Appends events to `topic`; resolves with each event's position, in input
    /// order, once they are durable (per [`Durability`](super::Durability)). Events with a key go to
    /// `murmur2(key) % partitions`; keyless events of one call go to one partition,
    /// rotating per call; an explicit partition wins over both.
    pub async fn append(&self, topic: &str, records: Vec<AppendRecord>) -> Result<Vec<Position>> {
        self.append_with(topic, records, AppendOptions::default())
            .await
    }

    /// [`Log::append`] with [`AppendOptions`].
    pub async fn append_with(
        &self,
        topic: &str,
        records: Vec<AppendRecord>,
        options: AppendOptions,
    ) -> Result<Vec<Position>> {
        let result = self.append_inner(topic, records, options).await;
        let stats = &self.shared().stats;
        match &result {
            Ok(p) => {
                stats.append_requests.fetch_add(1, Relaxed);
                stats.append_events.fetch_add(p.len() as u64, Relaxed);
            }
            Err(_) => {
                stats.append_errors.fetch_add(1, Relaxed);
            }
        }
        result
    }

    async fn append_inner(
        &self,
        topic: &str,
        records: Vec<AppendRecord>,
        options: AppendOptions,
    ) -> Result<Vec<Position>> {
        let AppendOptions {
            producer,
            after,
            queued,
            transactional,
            guard,
        } = options;
        let guard = guard.or_else(|| self.guard.as_deref().cloned());
        if transactional && producer.is_none() {
            return Err(Error::BadBatch(
                "a transactional batch names its producer".into(),
            ));
        }
        // Fired when this function returns, queued or not.
        let _queued = queued;
        if let Some(after) = after {
            // Our turn once the earlier append is queued (or gave up). Waiting
            // here, before any permit is taken, so an earlier append never
            // waits for permits a later one holds.
            let _ = after.await;
        }
        self.shared().check_writable()?;
        self.shared().check_disk().inspect_err(|_| {
            self.shared()
                .stats
                .disk_full_rejected_appends
                .fetch_add(1, Relaxed);
        })?;
        let t = self.topic_or_create(topic).await?;
        if records.is_empty() {
            return Ok(Vec::new());
        }
        let n = t.config.partitions;
        let now = now_ms();
        let keyless = t.live.round_robin.fetch_add(1, Relaxed) % n;
        let batch_bytes = self.shared().config.batch_bytes;
        let mut slot_of_partition = vec![u32::MAX; n as usize];
        let mut parts: Vec<Part> = Vec::new();
        let mut placement = Vec::with_capacity(records.len());
        // A chunk's first allocation fits the whole call (up to a batch): calls of
        // one small event do not hold a batch-sized buffer while they queue.
        let lens: Vec<usize> = records.iter().map(|r| encoded_len(&r.event)).collect();
        let first_capacity = batch_bytes.min(lens.iter().sum::<usize>() + HEADER_LEN);
        // Encode here, on the producer's task: the committer thread, which every
        // producer waits on, then only moves or concatenates finished chunks.
        for (AppendRecord { partition, event }, len) in records.into_iter().zip(lens) {
            let size = event.size();
            if size > t.config.max_event_bytes {
                return Err(Error::EventTooLarge {
                    size,
                    max: t.config.max_event_bytes,
                });
            }
            if event.key.is_none() && t.config.cleanup_policy.compacts() {
                return Err(Error::KeyRequired(t.config.name.clone()));
            }
            let p = match (partition, &event.key) {
                (Some(p), _) => t.partition(p)?.id,
                (None, Some(k)) => partition_for_key(k, n),
                (None, None) => keyless,
            };
            let slot = &mut slot_of_partition[p as usize];
            if *slot == u32::MAX {
                *slot = parts.len() as u32;
                parts.push(Part {
                    partition: p,
                    count: 0,
                    chunks: Vec::new(),
                });
            }
            let part = &mut parts[*slot as usize];
            let chunk = match part.chunks.last_mut() {
                Some(c) if c.is_empty() || c.len() + len <= batch_bytes => c,
                _ => {
                    part.chunks.push(BatchBuilder::with_capacity(
                        first_capacity.max(len + HEADER_LEN),
                    ));
                    part.chunks.last_mut().ok_or(Error::Closed)?
                }
            };
            chunk.push(&event, event.timestamp.unwrap_or(now));
            placement.push((*slot, u64::from(part.count)));
            part.count += 1;
        }
        let bytes: usize = parts
            .iter()
            .flat_map(|p| &p.chunks)
            .map(BatchBuilder::len)
            .sum();
        // Travels with the command (see [`Reservation`]).
        let reservation = match self.shared().config.max_disk_bytes {
            Some(max) => Some(self.make_room(&t, bytes as u64, max).await?),
            None => None,
        };
        let partition_of_slot: Vec<u32> = parts.iter().map(|p| p.partition).collect();
        let permits = bytes.clamp(1, self.shared().config.max_pending_bytes) as u32;
        let permit = self
            .inner
            .pending
            .clone()
            .acquire_many_owned(permits)
            .await
            .map_err(|_| Error::Closed)?;
        if producer.is_some() && parts.len() != 1 {
            return Err(Error::BadBatch(
                "an idempotent producer's batch is for one partition".into(),
            ));
        }
        if let Some(r) = self.replicator() {
            // Handed to the replicated log; the permit and the quota room
            // are held until it is applied here.
            let op = Op::Append {
                topic: t.config.name.clone(),
                parts: parts.into_iter().map(OpPart::from).collect(),
                producer,
                transactional,
            };
            let pending = r
                .submit(super::replica::guarded(op, guard.as_ref()))
                .await?;
            drop(_queued);
            let applied = pending.await;
            drop((permit, reservation));
            let Applied::Appended { firsts, .. } = applied? else {
                return Err(Error::Unwritable(
                    "the replicated log answered an append with something else".into(),
                ));
            };
            // Counted where it was applied.
            return positions(placement, &partition_of_slot, &firsts);
        }
        if let Some(g) = &guard {
            self.check_guard(g)?;
        }
        let (reply, answer) = oneshot::channel();
        let cmd = Command::Append {
            topic: t.clone(),
            parts,
            bytes,
            reply,
            _permit: permit,
            _reservation: reservation,
            producer,
            transactional,
            applied: None,
        };
        self.inner.tx.send(cmd).await.map_err(|_| Error::Closed)?;
        drop(_queued);
        let Appended { firsts, written } = answer.await.map_err(|_| Error::Closed)??;
        if written {
            t.live.bytes.fetch_add(bytes as u64, Relaxed);
            t.live.events.fetch_add(placement.len() as u64, Relaxed);
            self.shared()
                .stats
                .append_bytes
                .fetch_add(bytes as u64, Relaxed);
        }
        positions(placement, &partition_of_slot, &firsts)
    }
}

/// Each event's position: its part's first offset plus its place in the part.
fn positions(
    placement: Vec<(u32, u64)>,
    partition_of_slot: &[u32],
    firsts: &[u64],
) -> Result<Vec<Position>> {
    placement
        .into_iter()
        .map(|(slot, i)| {
            let first = firsts.get(slot as usize).ok_or_else(|| {
                Error::Unwritable("the committer answered fewer parts than it was given".into())
            })?;
            Ok(Position {
                partition: partition_of_slot[slot as usize],
                offset: first + i,
            })
        })
        .collect()
}
