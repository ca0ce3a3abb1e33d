//! The sink engine every sink connector runs: it reads its topics as a
//! consumer group (`connector-<name>`, committed records only, stepping
//! over compaction gaps and aborted transactions), hands batches of one
//! partition to a [`Deliver`], and commits the position after each batch
//! is delivered or dead-lettered. At least once: a crash between delivery
//! and commit delivers the batch again (with the same idempotency key).
//!
//! A batch the outside system refuses for good, or one still failing after
//! `max_attempts` tries, is appended to the dead-letter topic (each record
//! with headers naming the connector, the error and where it came from)
//! and the sink goes on. Retries wait with exponential backoff and full
//! jitter, or what the outside system asked (`Retry-After`), up to
//! `max_backoff`.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tributary_storage::util::backoff::Backoff;
use tributary_storage::util::lock;
use tributary_storage::{Error as LogError, Event, GroupOffset, Log, Record, TopicConfig};

use crate::config::Start;

/// What one delivery attempt came to.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Taken by the outside system.
    Delivered,
    /// Worth trying again (after `after`, when the system said).
    Retry {
        /// The system's own wait (`Retry-After`).
        after: Option<Duration>,
        /// What went wrong.
        error: String,
    },
    /// Refused for good: goes to the dead-letter topic.
    Refused(String),
    /// Delivered, except `dead_lettered` records the outside system
    /// refused one by one, which the target already sent to the
    /// dead-letter topic.
    DeliveredExcept {
        /// Records dead-lettered.
        dead_lettered: u64,
    },
    /// The outside system cannot be reached: tried again without limit
    /// (the records wait in the log; the lag grows).
    Unavailable(String),
}

/// A source's wait after its connection failed: the error recorded and
/// counted as a retry, then the backoff's delay (cut short by a pause or
/// resume); false once cancelled.
pub(crate) async fn wait_after_failure(
    status: &Status,
    backoff: &mut tributary_storage::util::backoff::Backoff,
    cancel: &CancellationToken,
    paused: &mut watch::Receiver<bool>,
    error: &str,
    what: &str,
) -> bool {
    status.failed(error);
    status.retries.fetch_add(1, Relaxed);
    let wait = backoff.next_delay();
    tracing::debug!(?wait, error, "{what}: trying again");
    tokio::select! {
        () = cancel.cancelled() => false,
        _ = paused.changed() => true,
        () = tokio::time::sleep(wait) => true,
    }
}

/// A partition's position: ((topic, partition), next offset).
pub type Position = ((String, u32), u64);

/// Delivers batches to one outside system.
pub trait Deliver: Send {
    /// Delivers `records` of `topic` (one partition, in offset order);
    /// `next` is the position after them (past any gap that follows).
    fn deliver(
        &mut self,
        topic: &str,
        records: &[Record],
        next: u64,
    ) -> impl Future<Output = Outcome> + Send;

    /// The positions the outside system keeps itself (an exactly-once
    /// target stores them with the data), read once at start; a position
    /// ahead of the group's wins. None: it keeps none.
    fn positions(&mut self) -> impl Future<Output = Result<Vec<Position>, String>> + Send {
        async { Ok(Vec::new()) }
    }

    /// Whether the target stores the position with each batch (and
    /// [`Deliver::positions`] reads it back): then the consumer group's copy
    /// is committed at most once a second, not after every batch.
    fn keeps_positions(&self) -> bool {
        false
    }
}

/// A sink's settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The connector's name.
    pub name: String,
    /// Its topics.
    pub topics: Vec<String>,
    /// Records per batch.
    pub batch_size: usize,
    /// Partitions delivered at once (one target each).
    pub concurrency: usize,
    /// Tries of a batch before it is dead-lettered.
    pub max_attempts: u32,
    /// Backoff bounds.
    pub min_backoff: Duration,
    /// Largest wait between tries.
    pub max_backoff: Duration,
    /// Where undeliverable records go.
    pub dead_letter_topic: String,
    /// Where a partition with no position starts.
    pub start: Start,
}

impl Settings {
    /// The settings of connector `name`; `(batch_size, concurrency)` when
    /// the config names none.
    pub fn new(name: &str, d: &crate::config::Delivery, defaults: (usize, usize)) -> Settings {
        Settings {
            name: name.to_owned(),
            topics: d.topics.clone(),
            batch_size: d.batch_size.unwrap_or(defaults.0),
            concurrency: d.concurrency.unwrap_or(defaults.1),
            max_attempts: d.max_attempts,
            min_backoff: Duration::from_millis(d.min_backoff_ms),
            max_backoff: Duration::from_millis(d.max_backoff_ms.max(d.min_backoff_ms)),
            dead_letter_topic: d.dead_letters(name),
            start: d.start,
        }
    }

    /// Where its dead letters go.
    pub fn dead_letters(&self, log: &Log) -> DeadLetters {
        DeadLetters {
            log: log.clone(),
            connector: self.name.clone(),
            topic: self.dead_letter_topic.clone(),
        }
    }

    /// The consumer group the sink reads as.
    pub fn group(&self) -> String {
        group_of(&self.name)
    }
}

/// The consumer group of connector `name`.
pub fn group_of(name: &str) -> String {
    format!("connector-{name}")
}

/// Bytes one read takes at most.
const MAX_READ_BYTES: usize = 4 << 20;

/// What a running connector reports.
#[derive(Debug, Default)]
pub struct Status {
    /// Records delivered.
    pub delivered: AtomicU64,
    /// Batches delivered.
    pub batches: AtomicU64,
    /// Failed attempts that were tried again.
    pub retries: AtomicU64,
    /// Records sent to the dead-letter topic.
    pub dead_letters: AtomicU64,
    /// The last error, if the last attempt failed.
    pub last_error: Mutex<Option<String>>,
    /// Where the sink stands in each partition it reads.
    pub positions: Mutex<HashMap<(String, u32), u64>>,
}

impl Status {
    pub(crate) fn failed(&self, error: &str) {
        *lock(&self.last_error) = Some(error.to_owned());
    }

    pub(crate) fn cleared(&self) {
        *lock(&self.last_error) = None;
    }

    /// Records written to its topics and not yet delivered.
    pub fn lag(&self, log: &Log) -> u64 {
        lock(&self.positions)
            .iter()
            .filter_map(|((t, p), pos)| {
                let (_, end) = log.offsets(t, *p).ok()?;
                Some(end.saturating_sub(*pos))
            })
            .sum()
    }
}

/// Runs a sink until `cancel`; `paused` holds it between batches. Each of
/// `targets` (at least one) delivers one partition's batch at a time.
pub async fn run<D: Deliver>(
    log: Log,
    settings: Settings,
    mut targets: Vec<D>,
    status: Arc<Status>,
    cancel: CancellationToken,
    mut paused: watch::Receiver<bool>,
) {
    let group = settings.group();
    let mut positions: HashMap<(String, u32), u64> = match log.group_offsets(&group) {
        Ok(o) => o
            .into_iter()
            .map(|o| ((o.topic, o.partition), o.offset))
            .collect(),
        Err(e) => {
            status.failed(&format!("cannot read its positions: {e}"));
            HashMap::new()
        }
    };
    let Some(first) = targets.first_mut() else {
        status.failed("no target to deliver to");
        return;
    };
    let keeps_positions = first.keeps_positions();
    match first.positions().await {
        Ok(kept) => {
            for (key, pos) in kept {
                if settings.topics.contains(&key.0)
                    && positions.get(&key).is_none_or(|&have| pos > have)
                {
                    if let Err(e) = commit(&log, &group, &key.0, key.1, pos).await {
                        status.failed(&format!("cannot commit its position: {e}"));
                    }
                    positions.insert(key, pos);
                }
            }
        }
        // Each delivery reads the position again, so going on is safe.
        Err(e) => {
            tracing::warn!(connector = %settings.name, error = %e, "cannot read the positions the target keeps; each batch checks them when it is written");
            status.failed(&e);
        }
    }
    let dead = settings.dead_letters(&log);
    let mut unsaved: HashMap<(String, u32), u64> = HashMap::new();
    let mut saved_at = Instant::now();
    let mut idle = Backoff::new(settings.min_backoff, settings.max_backoff);
    loop {
        if *paused.borrow() {
            save(&log, &group, &mut unsaved, &status).await;
        }
        if !unpaused(&cancel, &mut paused).await {
            return;
        }
        let mut moved = false;
        let mut failed = false;
        // Every partition placed first (so the lag covers them all, also
        // while one partition's delivery is being retried).
        let mut work = Vec::new();
        for topic in &settings.topics {
            let Ok(info) = log.topic(topic) else {
                continue;
            };
            for p in &info.partitions {
                let key = (topic.clone(), p.partition);
                if !positions.contains_key(&key) {
                    let pos = match settings.start {
                        Start::Earliest => p.start_offset,
                        Start::Latest => p.end_offset,
                    };
                    // Committed at once, so "latest" means where it first
                    // looked, also after a restart.
                    if settings.start == Start::Latest {
                        if let Err(e) = commit(&log, &group, topic, p.partition, pos).await {
                            status.failed(&e.to_string());
                            failed = true;
                            continue;
                        }
                    }
                    positions.insert(key.clone(), pos);
                }
                if let Some(&pos) = positions.get(&key) {
                    lock(&status.positions).insert(key.clone(), pos);
                }
                work.push(key);
            }
        }
        // Partitions in groups, each group's batches delivered at once (one
        // target each), their positions committed together.
        for chunk in work.chunks(targets.len()) {
            let jobs = chunk.iter().zip(targets.iter_mut()).map(|(key, target)| {
                let pos = positions.get(key).copied();
                step(&log, &settings, &dead, &status, &cancel, target, key, pos)
            });
            let steps = futures_util::future::join_all(jobs).await;
            let mut delivered = Vec::new();
            for (key, step) in chunk.iter().zip(steps) {
                match step {
                    Step::Idle => {}
                    Step::Failed => failed = true,
                    Step::Skip { to, removed } => {
                        positions.insert(key.clone(), to);
                        lock(&status.positions).insert(key.clone(), to);
                        moved |= removed;
                    }
                    Step::Delivered(next) => delivered.push((key.clone(), next)),
                }
            }
            if delivered.is_empty() {
                continue;
            }
            if keeps_positions {
                // The target holds the position (written with the data):
                // the group's copy follows at most a second behind.
                unsaved.extend(delivered.iter().cloned());
            } else {
                let offsets = delivered
                    .iter()
                    .map(|((topic, partition), next)| GroupOffset {
                        topic: topic.clone(),
                        partition: *partition,
                        offset: *next,
                    })
                    .collect();
                if let Err(e) = log.commit_offsets(&group, offsets).await {
                    status.failed(&format!("cannot commit its position: {e}"));
                    failed = true;
                    continue;
                }
            }
            for (key, next) in delivered {
                positions.insert(key.clone(), next);
                lock(&status.positions).insert(key, next);
            }
            moved = true;
            if keeps_positions && saved_at.elapsed() >= SAVE_EVERY {
                failed |= !save(&log, &group, &mut unsaved, &status).await;
                saved_at = Instant::now();
            }
        }
        if moved {
            idle.reset();
            continue;
        }
        if !save(&log, &group, &mut unsaved, &status).await {
            failed = true;
        }
        saved_at = Instant::now();
        // Nothing to do (or only failures): wait for new records, a change
        // of topics, a pause, or (after a failure) a backoff.
        let wait = if failed {
            idle.next_delay()
        } else {
            Duration::from_secs(1)
        };
        let mut ends: Vec<watch::Receiver<u64>> = Vec::new();
        for topic in &settings.topics {
            if let Ok(info) = log.topic(topic) {
                for p in &info.partitions {
                    if let Ok(rx) = log.watch_end(topic, p.partition) {
                        ends.push(rx);
                    }
                }
            }
        }
        let mut topics = log.watch_topics();
        let any_end = async {
            if ends.is_empty() {
                std::future::pending::<()>().await;
            }
            let changes = ends.iter_mut().map(|rx| Box::pin(rx.changed()));
            let _ = futures_util::future::select_all(changes).await;
        };
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = paused.changed() => {}
            _ = topics.changed() => {}
            () = any_end, if !failed => {}
            () = tokio::time::sleep(wait) => {}
        }
    }
}

/// Waits while `paused` holds; false once `cancel` fires.
pub(crate) async fn unpaused(
    cancel: &CancellationToken,
    paused: &mut watch::Receiver<bool>,
) -> bool {
    loop {
        if cancel.is_cancelled() {
            return false;
        }
        if !*paused.borrow_and_update() {
            return true;
        }
        tokio::select! {
            () = cancel.cancelled() => return false,
            _ = paused.changed() => {}
        }
    }
}

/// What one partition's turn came to.
enum Step {
    /// Nothing to deliver.
    Idle,
    /// Failed (the error is in the status); the position stays.
    Failed,
    /// Nothing to deliver up to `to` (aborted or compacted records, or
    /// records `removed` by retention before delivery).
    Skip { to: u64, removed: bool },
    /// Delivered up to the position.
    Delivered(u64),
}

/// Reads a batch of partition `key` from `pos` and delivers it.
#[allow(clippy::too_many_arguments)]
async fn step<D: Deliver>(
    log: &Log,
    settings: &Settings,
    dead: &DeadLetters,
    status: &Status,
    cancel: &CancellationToken,
    target: &mut D,
    key: &(String, u32),
    pos: Option<u64>,
) -> Step {
    let (topic, partition) = (&key.0, key.1);
    let Some(pos) = pos else {
        return Step::Idle;
    };
    let batch = match log.read(topic, partition, pos, settings.batch_size, MAX_READ_BYTES) {
        Ok(r) => r,
        Err(LogError::OffsetOutOfRange { start, .. }) if pos < start => {
            tracing::warn!(connector = %settings.name, topic, partition, from = pos, to = start, "records removed by retention before delivery");
            return Step::Skip {
                to: start,
                removed: true,
            };
        }
        Err(e) => {
            status.failed(&e.to_string());
            return Step::Failed;
        }
    };
    if batch.records.is_empty() {
        return if batch.next_offset > pos {
            Step::Skip {
                to: batch.next_offset,
                removed: false,
            }
        } else {
            Step::Idle
        };
    }
    let done = deliver(
        dead,
        settings,
        target,
        status,
        cancel,
        topic,
        &batch.records,
        batch.next_offset,
    )
    .await;
    if done {
        Step::Delivered(batch.next_offset)
    } else {
        // Cancelled, or the dead-letter topic cannot be written: the
        // position stays.
        Step::Failed
    }
}

/// How often a sink whose target keeps the positions commits the group's.
const SAVE_EVERY: Duration = Duration::from_secs(1);

/// Commits the positions not yet committed to the group; false if that
/// failed (they stay to be tried again).
async fn save(
    log: &Log,
    group: &str,
    unsaved: &mut HashMap<(String, u32), u64>,
    status: &Status,
) -> bool {
    if unsaved.is_empty() {
        return true;
    }
    let offsets = unsaved
        .iter()
        .map(|((topic, partition), &offset)| GroupOffset {
            topic: topic.clone(),
            partition: *partition,
            offset,
        })
        .collect();
    match log.commit_offsets(group, offsets).await {
        Ok(()) => {
            unsaved.clear();
            true
        }
        Err(e) => {
            status.failed(&format!("cannot commit its position: {e}"));
            false
        }
    }
}

async fn commit(
    log: &Log,
    group: &str,
    topic: &str,
    partition: u32,
    offset: u64,
) -> Result<(), LogError> {
    log.commit_offsets(
        group,
        vec![GroupOffset {
            topic: topic.to_owned(),
            partition,
            offset,
        }],
    )
    .await
}

/// Delivers one batch, retrying, or dead-letters it. False: cancelled
/// first, or the dead-letter topic could not take it.
#[allow(clippy::too_many_arguments)]
async fn deliver<D: Deliver>(
    dead: &DeadLetters,
    settings: &Settings,
    target: &mut D,
    status: &Status,
    cancel: &CancellationToken,
    topic: &str,
    records: &[Record],
    next: u64,
) -> bool {
    let mut backoff = Backoff::new(settings.min_backoff, settings.max_backoff);
    let mut attempts = 0;
    loop {
        attempts += 1;
        let outcome = tokio::select! {
            () = cancel.cancelled() => return false,
            o = target.deliver(topic, records, next) => o,
        };
        let error = match outcome {
            Outcome::Delivered | Outcome::DeliveredExcept { .. } => {
                let refused = match outcome {
                    Outcome::DeliveredExcept { dead_lettered } => dead_lettered,
                    _ => 0,
                };
                status
                    .delivered
                    .fetch_add((records.len() as u64).saturating_sub(refused), Relaxed);
                status.dead_letters.fetch_add(refused, Relaxed);
                status.batches.fetch_add(1, Relaxed);
                status.cleared();
                return true;
            }
            Outcome::Unavailable(error) => {
                status.failed(&error);
                status.retries.fetch_add(1, Relaxed);
                let wait = backoff.next_delay();
                tracing::debug!(connector = %settings.name, topic, ?wait, error, "target unavailable; trying again");
                tokio::select! {
                    () = cancel.cancelled() => return false,
                    () = tokio::time::sleep(wait) => continue,
                }
            }
            Outcome::Refused(error) => error,
            Outcome::Retry { after, error } => {
                status.failed(&error);
                if attempts < settings.max_attempts {
                    status.retries.fetch_add(1, Relaxed);
                    let wait =
                        after.map_or_else(|| backoff.next_delay(), |a| a.min(settings.max_backoff));
                    tracing::debug!(connector = %settings.name, topic, attempts, ?wait, error, "delivery failed; trying again");
                    tokio::select! {
                        () = cancel.cancelled() => return false,
                        () = tokio::time::sleep(wait) => continue,
                    }
                }
                format!("{error} (after {attempts} attempts)")
            }
        };
        status.failed(&error);
        tracing::warn!(connector = %settings.name, topic, records = records.len(), error, "records dead-lettered");
        return match dead.send(topic, records, &error).await {
            Ok(()) => {
                status.dead_letters.fetch_add(records.len() as u64, Relaxed);
                true
            }
            Err(e) => {
                status.failed(&format!(
                    "cannot write the dead-letter topic {}: {e}",
                    dead.topic()
                ));
                false
            }
        };
    }
}

/// A sink's dead-letter topic.
#[derive(Debug, Clone)]
pub struct DeadLetters {
    log: Log,
    connector: String,
    topic: String,
}

impl DeadLetters {
    /// Appends `records` of `topic` to the dead-letter topic (created if
    /// missing) through the one write path, each with its key, value,
    /// timestamp and headers, and headers saying why and from where;
    /// returns when they are durable.
    pub async fn send(&self, topic: &str, records: &[Record], error: &str) -> Result<(), String> {
        let dlq = &self.topic;
        if self.log.topic(dlq).is_err() {
            match self.log.create_topic(TopicConfig::new(dlq, 1)).await {
                Ok(_) | Err(LogError::TopicExists(_)) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
        let events = records
            .iter()
            .map(|r| {
                let mut e = match &r.value {
                    Some(v) => Event::new(v.clone()),
                    None => Event::null(),
                }
                .with_timestamp(r.timestamp);
                if let Some(k) = &r.key {
                    e = e.with_key(k.clone());
                }
                for (name, value) in &r.headers {
                    e = e.with_header(name.clone(), value.clone());
                }
                e.with_header("dead_letter.connector", self.connector.clone())
                    .with_header("dead_letter.error", error.to_owned())
                    .with_header("dead_letter.topic", topic.to_owned())
                    .with_header("dead_letter.partition", r.partition.to_string())
                    .with_header("dead_letter.offset", r.offset.to_string())
                    .into()
            })
            .collect();
        tributary_ingest::append_topic(&self.log, dlq, events)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    /// The topic's name.
    pub fn topic(&self) -> &str {
        &self.topic
    }
}
