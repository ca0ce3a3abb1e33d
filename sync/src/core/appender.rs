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
    /// Per core topic, the link the connection's next append to it is in
    /// its chain under the claim ([`ingest::append_chained`]).
    pub(super) links: HashMap<String, u64>,
}

/// Rounds a connection has handed to the log and not yet settled, at most:
/// the next round is built and proposed while the last one is on its way
/// (on a cluster, a whole Raft round).
const ROUNDS_IN_FLIGHT: usize = 2;

/// A round handed to the log: what settling it needs.
struct Sent {
    round: Vec<Work>,
    new_events: Vec<u64>,
    /// Works left out of the round (see [`Appender::build`]).
    excluded: Vec<bool>,
    /// The core topics appended, by their index in the append's tags.
    names: Vec<String>,
    duplicates: u64,
    skipped: u64,
    compacted_offsets: u64,
    has_skip: bool,
    /// A record the core cannot store: the connection ends after this round.
    oversize: Option<ErrorFrame>,
}

/// A round's append and checkpoint write, on their way; resolves with the
/// round and their answers.
type InFlight = std::pin::Pin<
    Box<
        dyn std::future::Future<
                Output = (Sent, Vec<(usize, ingest::Outcome)>, Result<(), LogError>),
            > + Send,
    >,
>;

impl Appender {
    /// Takes the connection's queued work in rounds and hands each to the
    /// log while the one before is on its way: up to [`ROUNDS_IN_FLIGHT`].
    /// Rounds are settled (held, acknowledged) in order. Each round's
    /// appends are links of the connection's chains under its claim, queued
    /// in round order, so a round is stored only if the one before it was:
    /// an edge partition's records stay in order even when a round is lost
    /// and a later one was already proposed. After a failure no round is
    /// built; those on their way are settled (what they stored is held, or
    /// it would be stored twice), then the first failure ends the connection.
    pub(super) async fn run(mut self, mut rx: mpsc::Receiver<Work>) -> Result<(), ErrorFrame> {
        use futures_util::StreamExt as _;
        let max = self.core.inner.config.max_round_bytes;
        let guard = lock(&self.slot.state).claim.clone();
        // Without a claim there are no chains: one round at a time.
        let depth = if guard.is_some() { ROUNDS_IN_FLIGHT } else { 1 };
        let mut pending_meta: Vec<MetaEntry> = Vec::new();
        let mut in_flight: futures_util::stream::FuturesOrdered<InFlight> =
            futures_util::stream::FuturesOrdered::new();
        let mut last_turn = None;
        let mut failure: Option<ErrorFrame> = None;
        let mut building = true;
        loop {
            let room = building && failure.is_none() && in_flight.len() < depth;
            tokio::select! {
                biased;
                Some((sent, results, meta_written)) = in_flight.next(), if !in_flight.is_empty() => {
                    match self.settle(sent, results, meta_written, guard.as_ref()).await {
                        Ok(checkpoints) => {
                            pending_meta.retain(|(k, _)| !checkpoints.iter().any(|(n, _)| n == k));
                            pending_meta.extend(checkpoints);
                        }
                        Err(e) => {
                            failure.get_or_insert(e);
                        }
                    }
                }
                Some(first) = rx.recv(), if room => {
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
                    match self.build(round, meta, guard.as_ref(), &mut last_turn) {
                        Ok((sent, oversize)) => {
                            // The ranges of a stream stopped at a record too
                            // large cover works it left out: no round after it.
                            building &= !oversize;
                            in_flight.push_back(sent);
                        }
                        Err(e) => {
                            failure.get_or_insert(e);
                        }
                    }
                }
                // Nothing on its way, and no round to build: the channel
                // closed, or a failure or a record too large stopped it.
                else => break,
            }
            if failure.is_none()
                && in_flight.is_empty()
                && rx.is_empty()
                && !pending_meta.is_empty()
            {
                let meta = std::mem::take(&mut pending_meta);
                if let Err(e) = self
                    .core
                    .inner
                    .log
                    .put_meta_guarded(META_SPACE, meta, guard.as_ref())
                    .await
                {
                    failure.get_or_insert(write_error(e));
                }
            }
        }
        if let Some(e) = failure {
            return Err(e);
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

    /// Builds a round: checks every work against the ranges held or being
    /// appended, and hands what is new to the log (one append per core
    /// topic, each the next link of its chain, `meta` written alongside),
    /// queued after the last round's appends (`last_turn`). Also answers
    /// whether a record too large for the core stopped a stream. Every
    /// write is made under the connection's claim (`guard`).
    fn build(
        &mut self,
        round: Vec<Work>,
        meta: Vec<MetaEntry>,
        guard: Option<&Guard>,
        last_turn: &mut Option<tokio::sync::oneshot::Receiver<()>>,
    ) -> Result<(InFlight, bool), ErrorFrame> {
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
        let log = core.log.clone();
        // Through the one append path; each record is tagged with its topic's
        // index in `per_topic`, whose names stay here to name failures.
        let mut batch = ingest::Batch::default();
        let names: Vec<String> = per_topic.iter().map(|(t, _)| t.clone()).collect();
        let mut links = HashMap::new();
        for (i, (topic, records)) in per_topic.into_iter().enumerate() {
            let link = self.links.entry(topic.clone()).or_insert(0);
            links.insert(topic.clone(), *link);
            *link += 1;
            for record in records {
                batch.push(&topic, i, record);
            }
        }
        let turn = ingest::Turn::next(last_turn);
        let guard = guard.cloned();
        let stopped = oversize.is_some();
        let sent = Sent {
            round,
            new_events,
            excluded,
            names,
            duplicates,
            skipped,
            compacted_offsets,
            has_skip,
            oversize,
        };
        Ok((
            Box::pin(async move {
                let appends = async {
                    match &guard {
                        Some(g) => ingest::append_chained(&log, batch, g, &links, turn).await,
                        None => ingest::append_guarded(&log, batch, None).await,
                    }
                };
                let write_meta = async {
                    if meta.is_empty() {
                        Ok(())
                    } else {
                        log.put_meta_guarded(META_SPACE, meta, guard.as_ref()).await
                    }
                };
                let (results, meta_written) = tokio::join!(appends, write_meta);
                (sent, results, meta_written)
            }),
            stopped,
        ))
    }

    /// Settles a round once its appends are answered: the ranges of what
    /// was stored grow, checkpoints follow, and the edge is acknowledged.
    /// Returns the checkpoints to write next.
    async fn settle(
        &mut self,
        sent: Sent,
        results: Vec<(usize, ingest::Outcome)>,
        meta_written: Result<(), LogError>,
        guard: Option<&Guard>,
    ) -> Result<Vec<MetaEntry>, ErrorFrame> {
        let Sent {
            round,
            new_events,
            excluded,
            names,
            duplicates,
            skipped,
            compacted_offsets,
            has_skip,
            oversize,
        } = sent;
        let core = &self.core.inner;
        let log = &core.log;
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
