//! The committer thread and its syncer: group commit. The committer drains
//! queued [`Command`]s into cycles, assigns offsets, packs batches and writes
//! them into the engine; the syncer makes each cycle durable with one sync,
//! publishes the new end offsets and answers the waiting producers.

use std::collections::HashMap;
use std::sync::atomic::{Ordering::Relaxed, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit};

use super::producers::{self, ProducerBatch, Verdict};
use super::retention::Reservation;
use super::state::{PartitionState, Shared, TopicState};
use super::txns;
use super::{Durability, GroupOffset, MetaEntry};
use crate::batch::{BatchBuilder, Marker, TxnBatch, HEADER_LEN};
use crate::error::{Error, Result};
use crate::util::now_ms;

/// One partition's share of an append, already encoded by the producer's task
/// into batch-sized chunks, so the committer only copies bytes.
pub(super) struct Part {
    pub(super) partition: u32,
    pub(super) count: u32,
    pub(super) chunks: Vec<BatchBuilder>,
}

/// The committer's answer to an append: each part's first offset, and
/// whether it was written (an idempotent producer's duplicate is not).
pub(super) struct Appended {
    pub(super) firsts: Vec<u64>,
    pub(super) written: bool,
}

pub(super) enum Command {
    Append {
        topic: Arc<TopicState>,
        parts: Vec<Part>,
        bytes: usize,
        reply: oneshot::Sender<Result<Appended>>,
        _permit: OwnedSemaphorePermit,
        /// Its bytes under the disk quota, released with the command (after
        /// its batch is sealed and counted), also if the producer gave up.
        _reservation: Option<Reservation>,
        /// An idempotent producer's batch (then `parts` has one part).
        producer: Option<ProducerBatch>,
        /// Its producer's open transaction's (see `txns`).
        transactional: bool,
        /// The replicated log's entry it applies (see `replica`): its
        /// records in a partition whose mark says they are stored already
        /// are not written again.
        applied: Option<u64>,
    },
    /// A transaction marker for one partition.
    Marker {
        topic: Arc<TopicState>,
        partition: u32,
        producer_id: i64,
        epoch: i16,
        marker: Marker,
        coordinator_epoch: i32,
        /// The marker's time; `None`: now.
        written_at: Option<i64>,
        /// The replicated log's entry it applies (see `Append`).
        applied: Option<u64>,
        /// The marker's offset, or `None` when the producer had no
        /// transaction open in the partition (nothing is written).
        reply: oneshot::Sender<Result<Option<u64>>>,
    },
    Commit {
        group: String,
        offsets: Vec<GroupOffset>,
        /// Each position's commit metadata (empty: none for any).
        metadata: Vec<String>,
        reply: oneshot::Sender<Result<()>>,
    },
    ForgetGroup {
        group: String,
        /// `None`: every position of the group; else these partitions'.
        partitions: Option<Vec<(String, u32)>>,
        reply: oneshot::Sender<Result<()>>,
    },
    Meta {
        space: String,
        entries: Vec<MetaEntry>,
        reply: oneshot::Sender<Result<()>>,
    },
    Barrier {
        reply: oneshot::Sender<Result<()>>,
    },
}

impl Command {
    fn bytes(&self) -> usize {
        match self {
            Command::Append { bytes, .. } => *bytes,
            Command::Commit {
                offsets, metadata, ..
            } => offsets.len() * 32 + metadata.iter().map(String::len).sum::<usize>(),
            Command::Meta { entries, .. } => entries
                .iter()
                .map(|(k, v)| k.len() + v.as_ref().map_or(0, Vec::len))
                .sum(),
            Command::Barrier { .. } => 0,
            Command::Marker { .. } => 64,
            Command::ForgetGroup {
                group, partitions, ..
            } => {
                group.len()
                    + partitions
                        .as_ref()
                        .map_or(0, |l| l.iter().map(|(t, _)| t.len() + 4).sum())
            }
        }
    }
}

/// While a sync runs, the committer writes the next cycle only once this much
/// is queued; smaller cycles wait for the sync to finish and grow meanwhile.
const PIPELINE_MIN_BYTES: usize = 256 * 1024;

/// One cycle written to the engine, on its way to the syncer.
pub(super) struct Job {
    cycle: Vec<Command>,
    answers: Vec<Result<Appended>>,
    marks: Vec<Result<Option<u64>>>,
    written: Result<Written>,
    started: Instant,
}

/// What a written cycle needs before it may be acknowledged.
struct Written {
    must_sync: bool,
    /// Per touched partition, its end offset once this cycle is durable.
    ends: Vec<(Arc<TopicState>, u32, u64)>,
}

/// Writes cycles into the engine; hands each to the syncer, so that cycle N+1
/// is written while cycle N is being fsynced. At most two cycles are in flight.
pub(super) fn committer(
    shared: &Shared,
    mut rx: mpsc::Receiver<Command>,
    jobs: std::sync::mpsc::SyncSender<Job>,
) {
    let _ = shared.committer_thread.set(std::thread::current());
    while let Some(first) = rx.blocking_recv() {
        let mut bytes = first.bytes();
        let mut cycle = vec![first];
        loop {
            while bytes < shared.config.max_cycle_bytes {
                match rx.try_recv() {
                    Ok(c) => {
                        bytes += c.bytes();
                        cycle.push(c);
                    }
                    Err(_) => break,
                }
            }
            // Pipeline only under load: while the syncer is busy, a small cycle
            // waits to grow (the syncer wakes us when it is done), so a few
            // producers still share one fsync per cycle.
            if bytes >= PIPELINE_MIN_BYTES
                || bytes >= shared.config.max_cycle_bytes
                || !shared.syncing.load(SeqCst)
            {
                break;
            }
            std::thread::park_timeout(Duration::from_micros(500));
        }
        let started = Instant::now();
        // The free-space reserve: a cycle whose appends would eat into it
        // answers them DiskFull and writes only the rest (offset commits and
        // metadata, which are small).
        let append_bytes: usize = cycle
            .iter()
            .map(|c| match c {
                Command::Append { bytes, .. } => *bytes,
                _ => 0,
            })
            .sum();
        if append_bytes > 0 {
            if let Err(Error::DiskFull { free, reserve }) = shared.check_room(append_bytes as u64) {
                let (refused, rest): (Vec<Command>, Vec<Command>) = cycle
                    .into_iter()
                    .partition(|c| matches!(c, Command::Append { .. }));
                for c in refused {
                    if let Command::Append { reply, .. } = c {
                        shared
                            .stats
                            .disk_full_rejected_appends
                            .fetch_add(1, Relaxed);
                        let _ = reply.send(Err(Error::DiskFull { free, reserve }));
                    }
                }
                cycle = rest;
                if cycle.is_empty() {
                    continue;
                }
            }
        }
        let mut answers = Vec::new();
        let mut marks = Vec::new();
        let written = match shared.check_writable() {
            Err(e) if !matches!(e, Error::Closed) => Err(e),
            _ => write_cycle(shared, &mut cycle[..], &mut answers, &mut marks).map_err(|e| {
                let msg = e.to_string();
                shared.fail(msg.clone());
                Error::Unwritable(msg)
            }),
        };
        if jobs
            .send(Job {
                cycle,
                answers,
                marks,
                written,
                started,
            })
            .is_err()
        {
            return;
        }
    }
}

/// Makes each written cycle durable (one sync covers it and anything written
/// before it), publishes its end offsets, then answers its producers.
pub(super) fn syncer(shared: &Shared, jobs: std::sync::mpsc::Receiver<Job>) {
    for job in jobs {
        shared.syncing.store(true, SeqCst);
        let outcome = job.written.and_then(|w| {
            // A failed earlier sync leaves this cycle's outcome unknown too.
            if shared.failed.load(SeqCst) {
                return Err(shared.check_writable().err().unwrap_or(Error::Closed));
            }
            if w.must_sync {
                shared.store.sync().map_err(|e| {
                    let msg = e.to_string();
                    shared.fail(msg.clone());
                    Error::Unwritable(msg)
                })?;
            } else {
                shared.dirty.store(true, SeqCst);
            }
            // Publish the new ends only now: readers never see what is not durable.
            for (topic, partition, end) in &w.ends {
                topic.partitions[*partition as usize].end.send_replace(*end);
            }
            Ok(())
        });
        if outcome.is_ok() {
            shared.stats.observe_commit(job.started.elapsed());
        }
        shared.syncing.store(false, SeqCst);
        if let Some(t) = shared.committer_thread.get() {
            t.unpark();
        }
        answer(job.cycle, job.answers, job.marks, &outcome);
    }
    if !shared.failed.load(SeqCst) {
        if let Err(e) = shared.store.sync() {
            tracing::error!(error = %e, "final sync at shutdown failed");
        }
    }
}

struct OpenBatch {
    topic: Arc<TopicState>,
    partition: u32,
    base: u64,
    builder: Option<BatchBuilder>,
    /// The last replicated entry whose records are all in `builder` or
    /// sealed before it: the mark the batch is stored with.
    mark: Option<u64>,
}

impl OpenBatch {
    fn seal(&mut self) -> Result<()> {
        let Some(builder) = self.builder.take() else {
            return Ok(());
        };
        let ps = &self.topic.partitions[self.partition as usize];
        let (value, end_pos) = builder.finish(ps.next_pos.load(Relaxed));
        store_batch(ps, self.base, value, self.mark)?;
        ps.next_pos.store(end_pos, Relaxed);
        self.base = ps.next.load(Relaxed);
        Ok(())
    }
}

/// Stores a batch, with the replicated log's mark when it completes an
/// entry (batch and mark in one atomic write).
fn store_batch(ps: &PartitionState, base: u64, value: Vec<u8>, mark: Option<u64>) -> Result<()> {
    match mark {
        None => ps.store.insert(base, value),
        Some(m) => {
            ps.store.insert_marked(base, value, m)?;
            ps.applied.fetch_max(m.saturating_add(1), Relaxed);
            Ok(())
        }
    }
}

/// Did the partition store the records of replicated entry `index` already
/// (a replay after a restart)?
fn replayed(ps: &PartitionState, index: Option<u64>) -> bool {
    index.is_some_and(|i| i < ps.applied.load(Relaxed))
}

/// One chunk holding all of `chunks` (a replicated entry's records in a
/// partition go into one stored batch, so that its mark covers them all).
fn merged(chunks: Vec<BatchBuilder>) -> Option<BatchBuilder> {
    let mut chunks = chunks.into_iter();
    let mut first = chunks.next()?;
    for c in chunks {
        first.append(&c);
    }
    Some(first)
}

fn write_cycle(
    shared: &Shared,
    cycle: &mut [Command],
    answers: &mut Vec<Result<Appended>>,
    marks: &mut Vec<Result<Option<u64>>>,
) -> Result<Written> {
    let batch_bytes = shared.config.batch_bytes;
    let mut open: HashMap<usize, OpenBatch> = HashMap::new();
    let mut must_sync = shared.config.durability == Durability::Fsync;
    for cmd in cycle {
        match cmd {
            Command::Append {
                topic,
                parts,
                producer,
                transactional,
                applied,
                ..
            } => {
                if topic.live.deleted.load(SeqCst) {
                    answers.push(Err(Error::UnknownTopic(topic.config.name.clone())));
                    continue;
                }
                // A replay: what the partitions hold already is not written
                // again, and nobody waits for the answer.
                let before = parts.len();
                parts.retain(|p| !replayed(&topic.partitions[p.partition as usize], *applied));
                if parts.len() < before {
                    if !parts.is_empty() {
                        write_parts(topic, parts, *applied, batch_bytes, &mut open)?;
                    }
                    answers.push(Err(Error::Closed));
                    continue;
                }
                if let Some(b) = producer {
                    match sequence(shared, topic, parts, b, *applied)? {
                        Ok(Verdict::Append) => {}
                        Ok(Verdict::Duplicate(base)) => {
                            answers.push(Ok(Appended {
                                firsts: vec![base],
                                written: false,
                            }));
                            continue;
                        }
                        Err(refused) => {
                            answers.push(Err(refused));
                            continue;
                        }
                    }
                }
                if let (true, Some(b)) = (*transactional, producer.as_ref()) {
                    let firsts = write_transactional(shared, topic, parts, b, *applied, &mut open)?;
                    answers.push(Ok(Appended {
                        firsts,
                        written: true,
                    }));
                    continue;
                }
                let firsts = write_parts(topic, parts, *applied, batch_bytes, &mut open)?;
                answers.push(Ok(Appended {
                    firsts,
                    written: true,
                }));
            }
            Command::Commit {
                group,
                offsets,
                metadata,
                ..
            } => {
                for (i, o) in offsets.iter().enumerate() {
                    // Not for a topic deleted since the commit was checked.
                    if shared.topic(&o.topic).is_none() {
                        continue;
                    }
                    let m = metadata.get(i).map_or(&b""[..], |m| m.as_bytes());
                    shared
                        .store
                        .put_group_offset(group, &o.topic, o.partition, o.offset, m)?;
                }
            }
            Command::ForgetGroup {
                group,
                partitions: None,
                ..
            } => shared.store.forget_group(group)?,
            Command::ForgetGroup {
                group,
                partitions: Some(partitions),
                ..
            } => {
                for (topic, partition) in partitions {
                    shared.store.forget_group_offset(group, topic, *partition)?;
                }
            }
            Command::Meta { space, entries, .. } => {
                // Written after the appends queued before it: the engine
                // keeps a prefix of its writes, so metadata recorded after
                // records (a replicated log's applied index, say) is never
                // there without them.
                for ob in open.values_mut() {
                    ob.seal()?;
                }
                for (k, v) in entries.iter() {
                    shared.store.put_meta(space, k, v.as_deref())?;
                }
            }
            Command::Barrier { .. } => must_sync = true,
            Command::Marker {
                topic,
                partition,
                producer_id,
                epoch,
                marker,
                coordinator_epoch,
                written_at,
                applied,
                ..
            } => {
                if topic.live.deleted.load(SeqCst) {
                    marks.push(Err(Error::UnknownTopic(topic.config.name.clone())));
                    continue;
                }
                if replayed(&topic.partitions[*partition as usize], *applied) {
                    marks.push(Err(Error::Closed));
                    continue;
                }
                // A coordinator acts on a marker once answered: durable
                // whatever the durability mode.
                must_sync = true;
                let ob = open_batch(&mut open, topic, *partition);
                ob.seal()?;
                let ps = &topic.partitions[*partition as usize];
                let mut t = crate::util::lock(&ps.txns);
                let Some(first) = t.open_of(*producer_id) else {
                    marks.push(Ok(None));
                    continue;
                };
                let name = &topic.config.name;
                let at = ps.next.load(Relaxed);
                // The abort's entry, then the marker, then the open entry
                // goes: a crash between the marker and that last write
                // leaves an open entry whose marker is in the log, which
                // recovery removes (`txns::recover`); one before the marker
                // leaves an abort entry past the end, also removed.
                if *marker == Marker::Abort {
                    shared.store.put_meta(
                        txns::ABORTED,
                        &txns::aborted_key(name, *partition, *producer_id, at),
                        Some(&first.to_be_bytes()),
                    )?;
                    t.aborted += 1;
                }
                let written_at = written_at.unwrap_or_else(now_ms);
                remember_marker(
                    shared,
                    name,
                    *partition,
                    *producer_id,
                    *coordinator_epoch,
                    written_at,
                )?;
                let (value, end_pos) = BatchBuilder::marker(
                    *marker,
                    *coordinator_epoch,
                    written_at,
                    *producer_id,
                    *epoch,
                    ps.next_pos.load(Relaxed),
                );
                store_batch(ps, at, value, *applied)?;
                shared.store.put_meta(
                    txns::OPEN,
                    &txns::open_key(name, *partition, *producer_id, first),
                    None,
                )?;
                ps.next_pos.store(end_pos, Relaxed);
                ps.next.store(at + 1, Relaxed);
                ob.base = at + 1;
                if let Some(x) = t.open.get_mut(&(*producer_id, first)) {
                    x.closing = Some(at);
                }
                marks.push(Ok(Some(at)));
            }
        }
    }
    for ob in open.values_mut() {
        ob.seal()?;
    }
    let ends = open
        .into_values()
        .map(|ob| {
            let end = ob.topic.partitions[ob.partition as usize]
                .next
                .load(Relaxed);
            (ob.topic, ob.partition, end)
        })
        .collect();
    Ok(Written { must_sync, ends })
}

/// The partition's open batch in this cycle (created empty).
fn open_batch<'a>(
    open: &'a mut HashMap<usize, OpenBatch>,
    topic: &Arc<TopicState>,
    partition: u32,
) -> &'a mut OpenBatch {
    let ps = &topic.partitions[partition as usize];
    open.entry(Arc::as_ptr(ps) as usize)
        .or_insert_with(|| OpenBatch {
            topic: topic.clone(),
            partition,
            base: ps.next.load(Relaxed),
            builder: None,
            mark: None,
        })
}

/// Writes an append's parts into their partitions' open batches; answers
/// each part's first offset.
fn write_parts(
    topic: &Arc<TopicState>,
    parts: &mut [Part],
    applied: Option<u64>,
    batch_bytes: usize,
    open: &mut HashMap<usize, OpenBatch>,
) -> Result<Vec<u64>> {
    let mut firsts = Vec::with_capacity(parts.len());
    for part in parts {
        let ps = &topic.partitions[part.partition as usize];
        firsts.push(ps.next.load(Relaxed));
        // By partition, not by topic state: an append queued before a topic
        // change holds the old state, which shares its partitions with the
        // new one.
        let ob = open_batch(open, topic, part.partition);
        let mut chunks = std::mem::take(&mut part.chunks);
        if applied.is_some() {
            // A replicated entry's records in one stored batch: its mark
            // then never covers a part of them.
            chunks = merged(chunks).into_iter().collect();
        }
        // Small chunks from many producers share a batch (a memcpy); a full
        // chunk becomes a batch as it is.
        for chunk in chunks {
            let count = u64::from(chunk.count());
            match &mut ob.builder {
                Some(b) if b.len() + chunk.len() - HEADER_LEN <= batch_bytes => b.append(&chunk),
                Some(_) => {
                    ob.seal()?;
                    ob.builder = Some(chunk);
                }
                None => ob.builder = Some(chunk),
            }
            ps.next.fetch_add(count, Relaxed);
        }
        if applied.is_some() {
            ob.mark = applied;
        }
    }
    Ok(firsts)
}

/// Writes a transactional producer's batch (one part) as stored batches of
/// its own naming the producer, opening its transaction in the partition
/// with the first; answers the part's first offset.
fn write_transactional(
    shared: &Shared,
    topic: &Arc<TopicState>,
    parts: &mut [Part],
    b: &ProducerBatch,
    applied: Option<u64>,
    open: &mut HashMap<usize, OpenBatch>,
) -> Result<Vec<u64>> {
    let mut firsts = Vec::new();
    for part in parts {
        let ob = open_batch(open, topic, part.partition);
        ob.seal()?;
        let ps = &topic.partitions[part.partition as usize];
        let base = ps.next.load(Relaxed);
        firsts.push(base);
        {
            let mut t = crate::util::lock(&ps.txns);
            if t.open_of(b.producer_id).is_none() {
                let key = txns::open_key(&topic.config.name, part.partition, b.producer_id, base);
                shared
                    .store
                    .put_meta(txns::OPEN, &key, Some(&b.epoch.to_be_bytes()))?;
                t.open.insert(
                    (b.producer_id, base),
                    txns::Txn {
                        epoch: b.epoch,
                        closing: None,
                    },
                );
            }
        }
        let txn = TxnBatch {
            producer_id: b.producer_id,
            epoch: b.epoch,
            control: false,
        };
        let mut chunks = std::mem::take(&mut part.chunks);
        if applied.is_some() {
            chunks = merged(chunks).into_iter().collect();
        }
        for chunk in chunks {
            let at = ps.next.load(Relaxed);
            let count = u64::from(chunk.count());
            let (value, end_pos) = chunk.finish_transactional(ps.next_pos.load(Relaxed), txn);
            store_batch(ps, at, value, applied)?;
            ps.next_pos.store(end_pos, Relaxed);
            ps.next.store(at + count, Relaxed);
        }
        ob.base = ps.next.load(Relaxed);
    }
    Ok(firsts)
}

/// Checks an idempotent producer's batch against its sequence and, when it
/// is new, records it: the entry is written before the batch (see
/// `producers`). `Err` for the engine, `Ok(Err)` for a refused batch.
/// `applied`: the replicated entry's index, which stands for the time of
/// the entry's use (see [`producers::Entry::used`]).
fn sequence(
    shared: &Shared,
    topic: &TopicState,
    parts: &[Part],
    b: &ProducerBatch,
    applied: Option<u64>,
) -> Result<Result<Verdict>> {
    let [part] = parts else {
        return Ok(Err(Error::BadBatch(
            "an idempotent producer's batch is for one partition".into(),
        )));
    };
    let name = &topic.config.name;
    let key = (name.clone(), part.partition, b.producer_id);
    let mut table = crate::util::lock(&shared.producers);
    let verdict = match producers::check(table.entries.get(&key), b, part.count) {
        Ok(v) => v,
        Err(e) => return Ok(Err(e)),
    };
    // In a cluster the entry's index: the same on every node, whether the
    // entry is applied for the first time or again after a crash (a
    // duplicate leaves no mark, so it is applied again).
    let clock = match applied {
        Some(index) => index,
        None => table.clock + 1,
    };
    table.clock = table.clock.max(clock);
    if matches!(verdict, Verdict::Duplicate(_)) {
        if let Some(e) = table.entries.get_mut(&key) {
            e.used = clock;
            // Stored too: what a restarted node forgets first follows it.
            let stored = postcard::to_allocvec(&*e).map_err(|e| Error::BadBatch(e.to_string()))?;
            shared.store.put_meta(
                producers::SPACE,
                &producers::key(name, part.partition, b.producer_id),
                Some(&stored),
            )?;
        }
        return Ok(Ok(verdict));
    }
    if !table.entries.contains_key(&key) {
        for gone in table.evictions(shared.config.max_producer_states) {
            table.entries.remove(&gone);
            shared.store.put_meta(
                producers::SPACE,
                &producers::key(&gone.0, gone.1, gone.2),
                None,
            )?;
        }
    }
    let base = topic.partitions[part.partition as usize].next.load(Relaxed);
    let timestamp = part
        .chunks
        .iter()
        .map(BatchBuilder::max_timestamp)
        .max()
        .filter(|&t| t != i64::MIN)
        .unwrap_or(-1);
    let mut entry = producers::after(table.entries.get(&key), b, part.count, base, timestamp);
    entry.used = clock;
    let stored = postcard::to_allocvec(&entry).map_err(|e| Error::BadBatch(e.to_string()))?;
    shared.store.put_meta(
        producers::SPACE,
        &producers::key(name, part.partition, b.producer_id),
        Some(&stored),
    )?;
    table.entries.insert(key, entry);
    Ok(Ok(verdict))
}

/// A marker ends the producer's transaction: its state shows the marker's
/// coordinator epoch and time (stored in the same cycle, before the marker).
fn remember_marker(
    shared: &Shared,
    topic: &str,
    partition: u32,
    producer_id: i64,
    coordinator_epoch: i32,
    at: i64,
) -> Result<()> {
    let mut table = crate::util::lock(&shared.producers);
    let Some(entry) = table
        .entries
        .get_mut(&(topic.to_owned(), partition, producer_id))
    else {
        return Ok(());
    };
    entry.coordinator_epoch = coordinator_epoch;
    entry.last_timestamp = at;
    let stored = postcard::to_allocvec(&*entry).map_err(|e| Error::BadBatch(e.to_string()))?;
    shared.store.put_meta(
        producers::SPACE,
        &producers::key(topic, partition, producer_id),
        Some(&stored),
    )
}

fn answer(
    cycle: Vec<Command>,
    answers: Vec<Result<Appended>>,
    marks: Vec<Result<Option<u64>>>,
    outcome: &Result<()>,
) {
    let mut answers = answers.into_iter();
    let mut marks = marks.into_iter();
    for cmd in cycle {
        let err = || match &outcome {
            Err(Error::Unwritable(m)) => Error::Unwritable(m.clone()),
            Err(Error::Closed) => Error::Closed,
            Err(e) => Error::Unwritable(e.to_string()),
            Ok(()) => Error::Closed,
        };
        match cmd {
            Command::Append {
                reply,
                _permit,
                _reservation,
                ..
            } => {
                // Its bytes are in the stored bytes since its batch was
                // sealed: released before the answer, so a producer that
                // sends again at once is not refused by its own last append
                // counted twice under the quota (a test saw that race).
                drop(_reservation);
                drop(_permit);
                let r = match (outcome, answers.next()) {
                    (Ok(_), Some(answer)) => answer,
                    _ => Err(err()),
                };
                let _ = reply.send(r);
            }
            Command::Marker { reply, .. } => {
                let r = match (outcome, marks.next()) {
                    (Ok(_), Some(answer)) => answer,
                    _ => Err(err()),
                };
                let _ = reply.send(r);
            }
            Command::Commit { reply, .. }
            | Command::ForgetGroup { reply, .. }
            | Command::Meta { reply, .. }
            | Command::Barrier { reply } => {
                let _ = reply.send(outcome.as_ref().map(|_| ()).map_err(|_| err()));
            }
        }
    }
}
