//! A connection's batches from decoding to acknowledgement: a Batch frame
//! checked and decoded into [`Work`] (and what it costs in memory), and the
//! [`Appender`], which gathers queued work into rounds, drops what the core
//! already holds, appends the rest (one append per core topic, checkpoints
//! written alongside), grows the held ranges and acknowledges.

use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use tokio::sync::mpsc;
use tributary_ingest::{self as ingest, Rejection};
use tributary_storage::{AppendRecord, Error as LogError, Event, Guard, MetaEntry};

use super::connection::{not_opened, Out};
use super::recovery::checkpoint;
use super::{lock, storage_error, superseded, write_error, EdgeSlot, SyncCore, META_SPACE};
use crate::ranges::RangeSet;
use crate::wire::{
    self, code, Ack, Batch, ErrorFrame, Frame, Skip, WireRecord, HEADER_EDGE, HEADER_OFFSET,
    HEADER_PARTITION, MAX_RANGES,
};

impl SyncCore {
    pub(super) fn check_batch(
        &self,
        opened: &HashMap<String, Vec<u32>>,
        version: u16,
        b: Batch,
        permit: tokio::sync::OwnedSemaphorePermit,
    ) -> Result<Work, ErrorFrame> {
        let Some(mapping) = opened.get(&b.topic) else {
            return Err(match self.inner.log.topic(&b.topic) {
                Err(LogError::UnknownTopic(_)) => ErrorFrame {
                    topic: Some(b.topic.clone()),
                    ..ErrorFrame::new(
                        code::UNKNOWN_TOPIC,
                        format!("no topic {} at the core", b.topic),
                    )
                },
                _ => not_opened(&b.topic),
            });
        };
        let Some(&core_partition) = mapping.get(b.partition as usize) else {
            return Err(
                ErrorFrame::new(code::BAD_FRAME, "batch for a partition the topic lacks")
                    .at(&b.topic, b.partition),
            );
        };
        let raw = wire::decompress(&b, self.inner.config.max_batch_bytes).map_err(|e| {
            let c = if matches!(e, crate::Error::TooLarge { .. }) {
                code::TOO_LARGE
            } else {
                code::BAD_FRAME
            };
            ErrorFrame::new(c, e.to_string()).at(&b.topic, b.partition)
        })?;
        let records = wire::decode_records(&raw, b.count, version).map_err(|e| {
            ErrorFrame::new(code::BAD_FRAME, e.to_string()).at(&b.topic, b.partition)
        })?;
        if b.base_offset.checked_add(u64::from(b.count)).is_none() {
            return Err(
                ErrorFrame::new(code::BAD_FRAME, "offsets overflow").at(&b.topic, b.partition)
            );
        }
        self.inner.metrics.batches.fetch_add(1, Relaxed);
        Ok(Work::Batch {
            core_partition,
            bytes: charge(&b),
            _permit: permit,
            batch: Batch {
                records: Vec::new(),
                ..b
            },
            records,
        })
    }
}

/// What a batch costs in memory once decoded and turned into appends: its
/// block plus each record's own allocations (key, value, headers and the
/// three origin headers), whatever the block's size says.
pub(super) fn charge(b: &Batch) -> usize {
    (b.raw_len as usize).saturating_add((b.count as usize).saturating_mul(RECORD_OVERHEAD))
}

/// Bytes a decoded record costs beyond its block bytes (measured shape:
/// `WireRecord`, `AppendRecord` and six header allocations).
const RECORD_OVERHEAD: usize = 256;

/// A connection's appends, in the order its frames arrived.
pub(super) enum Work {
    Batch {
        batch: Batch,
        core_partition: u32,
        records: Vec<WireRecord>,
        bytes: usize,
        /// Its share of the connection's [`QUEUED_BYTES`](super::QUEUED_BYTES), given back after its round.
        _permit: tokio::sync::OwnedSemaphorePermit,
    },
    /// Offsets the edge no longer has; true when its compaction removed
    /// them (not lost: each key's latest record is still sent).
    Skip(Skip, bool),
}

impl Work {
    fn bytes(&self) -> usize {
        match self {
            Work::Batch { bytes, .. } => *bytes,
            Work::Skip(..) => 64,
        }
    }

    fn at(&self) -> (&str, u32, u64, u64) {
        match self {
            Work::Batch { batch, .. } => (
                &batch.topic,
                batch.partition,
                batch.base_offset,
                batch.base_offset + u64::from(batch.count),
            ),
            Work::Skip(s, _) => (&s.topic, s.partition, s.from, s.to),
        }
    }
}

pub(super) struct Appender {
    pub(super) core: SyncCore,
    pub(super) edge: String,
    pub(super) slot: Arc<EdgeSlot>,
    pub(super) out: mpsc::Sender<Out>,
    /// Per stream, what is held or being appended on this connection.
    pub(super) accepted: HashMap<(String, u32), RangeSet>,
}

impl Appender {
    pub(super) async fn run(mut self, mut rx: mpsc::Receiver<Work>) -> Result<(), ErrorFrame> {
        let max = self.core.inner.config.max_round_bytes;
        let guard = lock(&self.slot.state).claim.clone();
        let mut pending_meta: Vec<MetaEntry> = Vec::new();
        while let Some(first) = rx.recv().await {
            let mut bytes = first.bytes();
            let mut round = vec![first];
            while bytes < max {
                match rx.try_recv() {
                    Ok(w) => {
                        bytes += w.bytes();
                        round.push(w);
                    }
                    Err(_) => break,
                }
            }
            let meta = std::mem::take(&mut pending_meta);
            pending_meta = self.round(round, meta, guard.as_ref()).await?;
            if rx.is_empty() && !pending_meta.is_empty() {
                let meta = std::mem::take(&mut pending_meta);
                self.core
                    .inner
                    .log
                    .put_meta_guarded(META_SPACE, meta, guard.as_ref())
                    .await
                    .map_err(write_error)?;
            }
        }
        if !pending_meta.is_empty() {
            self.core
                .inner
                .log
                .put_meta_guarded(META_SPACE, pending_meta, guard.as_ref())
                .await
                .map_err(write_error)?;
        }
        Ok(())
    }

    /// One round: checks every batch against the held ranges, appends what is
    /// new (one append per core topic, `meta` written alongside), updates the
    /// ranges, acknowledges. Returns the checkpoints to write next. Every
    /// write is made under the connection's claim (`guard`).
    async fn round(
        &mut self,
        round: Vec<Work>,
        meta: Vec<MetaEntry>,
        guard: Option<&Guard>,
    ) -> Result<Vec<MetaEntry>, ErrorFrame> {
        let core = &self.core.inner;
        let mut per_topic: Vec<(String, Vec<AppendRecord>)> = Vec::new();
        let mut duplicates = 0u64;
        let mut skipped = 0u64;
        let mut compacted_offsets = 0u64;
        let mut has_skip = false;
        let mut new_events = Vec::with_capacity(round.len());
        // Works left out of this round: a stream stops at a record the core
        // cannot store (too large for its topic), and so do its later works.
        let mut excluded = vec![false; round.len()];
        let mut blocked: Vec<(String, u32)> = Vec::new();
        let mut oversize: Option<ErrorFrame> = None;
        let mut max_event: HashMap<String, usize> = HashMap::new();
        for (wi, w) in round.iter().enumerate() {
            let (topic, partition, from, to) = w.at();
            if blocked.iter().any(|(t, p)| t == topic && *p == partition) {
                excluded[wi] = true;
                new_events.push(0);
                continue;
            }
            let key = (topic.to_owned(), partition);
            let slot = &self.slot;
            let accepted = self.accepted.entry(key).or_insert_with_key(|key| {
                lock(&slot.state)
                    .streams
                    .get(key)
                    .map(|s| s.held.clone())
                    .unwrap_or_default()
            });
            let new_lane = matches!(w, Work::Batch { batch, .. } if batch.new_lane);
            if !(accepted.continues_at(from) || new_lane && accepted.len() < MAX_RANGES) {
                return Err(ErrorFrame {
                    expected: Some(accepted.expected_below(from)),
                    ..ErrorFrame::new(
                        code::GAP,
                        format!("offset {from} neither continues a held range nor opens a lane"),
                    )
                    .at(topic, partition)
                });
            }
            let missing = accepted.missing(from, to);
            accepted.insert(from, to);
            let fresh = missing
                .iter()
                .fold(0u64, |n, (a, b)| n.saturating_add(b - a));
            new_events.push(fresh);
            match w {
                Work::Skip(_, compacted) => {
                    if *compacted {
                        compacted_offsets = compacted_offsets.saturating_add(fresh);
                    } else {
                        skipped = skipped.saturating_add(fresh);
                    }
                    has_skip = true;
                }
                Work::Batch {
                    batch,
                    core_partition,
                    records,
                    ..
                } => {
                    duplicates += u64::from(batch.count).saturating_sub(fresh);
                    if missing.is_empty() {
                        continue;
                    }
                    let max = *max_event.entry(topic.to_owned()).or_insert_with(|| {
                        core.log
                            .topic(topic)
                            .map_or(usize::MAX, |t| t.config.max_event_bytes)
                    });
                    let mut list = Vec::with_capacity(fresh as usize);
                    let p = partition.to_string();
                    for (a, b) in missing {
                        for o in a..b {
                            let r = &records[(o - from) as usize];
                            let mut headers = r.headers.clone();
                            headers.push((HEADER_EDGE.to_owned(), self.edge.as_bytes().to_vec()));
                            headers.push((HEADER_PARTITION.to_owned(), p.as_bytes().to_vec()));
                            headers.push((HEADER_OFFSET.to_owned(), o.to_string().into_bytes()));
                            let event = Event {
                                key: r.key.clone(),
                                value: r.value.clone(),
                                timestamp: Some(r.timestamp),
                                headers,
                            };
                            if event.size() > max && oversize.is_none() {
                                oversize = Some(ErrorFrame {
                                    expected: Some(o),
                                    ..ErrorFrame::new(
                                        code::TOO_LARGE,
                                        format!(
                                            "record {o} of {topic}/{partition} has {} bytes with its origin headers; the core's topic takes {max}",
                                            event.size()
                                        ),
                                    )
                                    .at(topic, partition)
                                });
                            }
                            if event.size() > max {
                                list.clear();
                                break;
                            }
                            list.push(AppendRecord {
                                partition: Some(*core_partition),
                                event,
                            });
                        }
                    }
                    if list.len() as u64 != fresh {
                        excluded[wi] = true;
                        blocked.push((topic.to_owned(), partition));
                        continue;
                    }
                    match per_topic.iter_mut().find(|(t, _)| t == topic) {
                        Some((_, all)) => all.extend(list),
                        None => per_topic.push((topic.to_owned(), list)),
                    }
                }
            }
        }
        let log = &core.log;
        // Through the one append path; each record is tagged with its topic's
        // index in `per_topic`, whose names stay here to name failures.
        let mut batch = ingest::Batch::default();
        let names: Vec<String> = per_topic.iter().map(|(t, _)| t.clone()).collect();
        for (i, (topic, records)) in per_topic.into_iter().enumerate() {
            for record in records {
                batch.push(&topic, i, record);
            }
        }
        let appends = ingest::append_guarded(log, batch, guard);
        let write_meta = async {
            if meta.is_empty() {
                Ok(())
            } else {
                log.put_meta_guarded(META_SPACE, meta, guard).await
            }
        };
        let (results, meta_written) = tokio::join!(appends, write_meta);
        // Topics whose append failed are neither held nor acknowledged; the
        // others are durable and must be both, or the edge would resend them
        // after the connection ends and they would be stored twice.
        let mut failure = oversize.or(meta_written.err().map(write_error));
        let mut failed: Vec<String> = Vec::new();
        let mut ends: HashMap<(String, u32), u64> = HashMap::new();
        for (i, outcome) in results {
            let topic = &names[i];
            match outcome {
                Ok(p) => {
                    let end = ends.entry((topic.clone(), p.partition)).or_default();
                    *end = (*end).max(p.offset + 1);
                }
                // A topic's records are stored all or none: one failure names it.
                Err(_) if failed.contains(topic) => {}
                Err(refused) => {
                    let frame = match refused.rejection {
                        _ if matches!(*refused.error, LogError::Superseded(_)) => superseded(),
                        // A record this core can never store: the edge sets it
                        // aside and goes on (a keyless one for a topic
                        // compacted here is refused as one too large is).
                        Rejection::TooLarge | Rejection::KeyRequired => {
                            ErrorFrame::new(code::TOO_LARGE, format!("topic {topic}: {refused}"))
                        }
                        _ => storage_error(&refused),
                    };
                    failure.get_or_insert(frame);
                    failed.push(topic.clone());
                }
            }
        }
        let done_at = |i: usize, w: &Work| {
            !excluded[i]
                && match w {
                    Work::Batch { batch, .. } => !failed.contains(&batch.topic),
                    Work::Skip(..) => true,
                }
        };
        core.metrics.rounds.fetch_add(1, Relaxed);
        let mut appended = 0u64;
        for (i, (w, fresh)) in round.iter().zip(&new_events).enumerate() {
            if matches!(w, Work::Batch { .. }) && done_at(i, w) {
                appended = appended.saturating_add(*fresh);
            }
        }
        core.metrics.events.fetch_add(appended, Relaxed);
        core.metrics.duplicates.fetch_add(duplicates, Relaxed);
        core.metrics.skipped.fetch_add(skipped, Relaxed);
        core.metrics.compacted.fetch_add(compacted_offsets, Relaxed);
        // Durable now: the shared ranges grow, checkpoints follow.
        let mut checkpoints = Vec::new();
        {
            let mut st = lock(&self.slot.state);
            let mut touched = Vec::new();
            for (i, (w, fresh)) in round.iter().zip(&new_events).enumerate() {
                if !done_at(i, w) {
                    continue;
                }
                let (topic, partition, from, to) = w.at();
                let s = st.streams.entry((topic.to_owned(), partition)).or_default();
                s.held.insert(from, to);
                if matches!(w, Work::Batch { .. }) {
                    s.received = s.received.saturating_add(*fresh);
                }
                if let Work::Batch {
                    batch,
                    core_partition,
                    ..
                } = w
                {
                    s.edge_end = s.edge_end.max(batch.edge_end);
                    s.core_partition = *core_partition;
                    if let Some(&end) = ends.get(&(topic.to_owned(), *core_partition)) {
                        s.scan_from = s.scan_from.max(end);
                    }
                }
                touched.push((topic.to_owned(), partition));
            }
            touched.sort();
            touched.dedup();
            for (t, p) in touched {
                if let Some(s) = st.streams.get(&(t.clone(), p)) {
                    checkpoints.push(checkpoint(&self.edge, &t, p, s));
                }
            }
        }
        let mut skips_durable = true;
        if has_skip {
            // A skip is in no record: its checkpoint must be durable before it is acked.
            let written = log
                .put_meta_guarded(META_SPACE, std::mem::take(&mut checkpoints), guard)
                .await;
            if let Err(e) = written {
                failure.get_or_insert(write_error(e));
                skips_durable = false;
            }
        }
        for (i, w) in round.iter().enumerate() {
            if !done_at(i, w) || (matches!(w, Work::Skip(..)) && !skips_durable) {
                continue;
            }
            let (topic, partition, from, to) = w.at();
            let ack = Ack {
                topic: topic.to_owned(),
                partition,
                base_offset: from,
                next_offset: to,
            };
            if self.out.send(Out::Frame(Frame::Ack(ack))).await.is_err() {
                break;
            }
        }
        match failure {
            Some(e) => Err(e),
            None => Ok(checkpoints),
        }
    }
}
