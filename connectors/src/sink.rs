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
use std::time::Duration;

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
}

/// Delivers batches to one outside system.
pub trait Deliver: Send {
    /// Delivers `records` of `topic` (one partition, in offset order).
    fn deliver(&mut self, topic: &str, records: &[Record]) -> impl Future<Output = Outcome> + Send;
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
    fn failed(&self, error: &str) {
        *lock(&self.last_error) = Some(error.to_owned());
    }

    fn cleared(&self) {
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

/// Runs a sink until `cancel`; `paused` holds it between batches.
pub async fn run<D: Deliver>(
    log: Log,
    settings: Settings,
    mut target: D,
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
    let mut idle = Backoff::new(settings.min_backoff, settings.max_backoff);
    loop {
        if cancel.is_cancelled() {
            return;
        }
        if *paused.borrow_and_update() {
            tokio::select! {
                () = cancel.cancelled() => return,
                _ = paused.changed() => continue,
            }
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
        for key in work {
            let (topic, partition) = (&key.0, key.1);
            let Some(&pos) = positions.get(&key) else {
                continue;
            };
            let read = log.read(topic, partition, pos, settings.batch_size, MAX_READ_BYTES);
            let batch = match read {
                Ok(r) => r,
                Err(LogError::OffsetOutOfRange { start, .. }) if pos < start => {
                    // Retention removed them before they were delivered.
                    tracing::warn!(connector = %settings.name, topic, partition, from = pos, to = start, "records removed by retention before delivery");
                    positions.insert(key.clone(), start);
                    moved = true;
                    continue;
                }
                Err(e) => {
                    status.failed(&e.to_string());
                    failed = true;
                    continue;
                }
            };
            lock(&status.positions).insert(key.clone(), pos);
            if batch.records.is_empty() {
                if batch.next_offset > pos {
                    positions.insert(key.clone(), batch.next_offset);
                    lock(&status.positions).insert(key.clone(), batch.next_offset);
                }
                continue;
            }
            let done = deliver(
                &log,
                &settings,
                &mut target,
                &status,
                &cancel,
                topic,
                &batch.records,
            )
            .await;
            if !done {
                // Cancelled, or the dead-letter topic cannot be written:
                // the position stays.
                failed = true;
                continue;
            }
            match commit(&log, &group, topic, partition, batch.next_offset).await {
                Ok(()) => {
                    positions.insert(key.clone(), batch.next_offset);
                    lock(&status.positions).insert(key.clone(), batch.next_offset);
                    moved = true;
                }
                Err(e) => {
                    status.failed(&format!("cannot commit its position: {e}"));
                    failed = true;
                }
            }
        }
        if moved {
            idle.reset();
            continue;
        }
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
async fn deliver<D: Deliver>(
    log: &Log,
    settings: &Settings,
    target: &mut D,
    status: &Status,
    cancel: &CancellationToken,
    topic: &str,
    records: &[Record],
) -> bool {
    let mut backoff = Backoff::new(settings.min_backoff, settings.max_backoff);
    let mut attempts = 0;
    loop {
        attempts += 1;
        let outcome = tokio::select! {
            () = cancel.cancelled() => return false,
            o = target.deliver(topic, records) => o,
        };
        let error = match outcome {
            Outcome::Delivered => {
                status.delivered.fetch_add(records.len() as u64, Relaxed);
                status.batches.fetch_add(1, Relaxed);
                status.cleared();
                return true;
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
        return match dead_letter(log, settings, topic, records, &error).await {
            Ok(()) => {
                status.dead_letters.fetch_add(records.len() as u64, Relaxed);
                true
            }
            Err(e) => {
                status.failed(&format!(
                    "cannot write the dead-letter topic {}: {e}",
                    settings.dead_letter_topic
                ));
                false
            }
        };
    }
}

/// Appends `records` to the dead-letter topic (created if missing) through
/// the one write path, each with its key, value, timestamp and headers, and
/// headers saying why and from where.
async fn dead_letter(
    log: &Log,
    settings: &Settings,
    topic: &str,
    records: &[Record],
    error: &str,
) -> Result<(), String> {
    let dlq = &settings.dead_letter_topic;
    if log.topic(dlq).is_err() {
        match log.create_topic(TopicConfig::new(dlq, 1)).await {
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
            e.with_header("dead_letter.connector", settings.name.clone())
                .with_header("dead_letter.error", error.to_owned())
                .with_header("dead_letter.topic", topic.to_owned())
                .with_header("dead_letter.partition", r.partition.to_string())
                .with_header("dead_letter.offset", r.offset.to_string())
                .into()
        })
        .collect();
    tributary_ingest::append_topic(log, dlq, events)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}
