//! The one append path. Every front end hands its records to the log here:
//! records of any topics in, one outcome per record out, and a refusal typed
//! as a [`Rejection`] that each protocol maps to its own code (an MQTT reason
//! code, an AMQP nack, an HTTP status). The acknowledgement a front end sends
//! waits for these outcomes, which come only once the log says durable
//! (`docs/design.md`, section 3). Its own crate, so the sync core (which
//! knows nothing of the protocols) appends through it too.

pub mod leader;
pub mod mapping;
pub mod tasks;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use tokio::sync::oneshot;
use tributary_storage::{
    AppendOptions, AppendRecord, Error as LogError, Guard, Log, Position, ProducerBatch,
};

/// Why the log refused records, in the terms every protocol must tell its
/// client about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// The topic does not exist (and is not created by that name).
    UnknownTopic,
    /// An event is larger than the topic allows.
    TooLarge,
    /// A keyless event for a compacted topic.
    KeyRequired,
    /// The node's disk quota is used up.
    Quota,
    /// The disk is (nearly) full.
    DiskFull,
    /// The log cannot write: failed for good, or shutting down.
    Unwritable,
}

impl Rejection {
    /// What a log error means for the client that sent the records.
    pub fn of(e: &LogError) -> Rejection {
        match e {
            LogError::UnknownTopic(_)
            | LogError::TopicDeleting(_)
            | LogError::InvalidTopic(_)
            | LogError::InvalidName(_) => Rejection::UnknownTopic,
            LogError::EventTooLarge { .. } | LogError::WriteTooLarge { .. } => Rejection::TooLarge,
            LogError::KeyRequired(_) => Rejection::KeyRequired,
            LogError::QuotaExceeded { .. } => Rejection::Quota,
            LogError::DiskFull { .. } => Rejection::DiskFull,
            _ => Rejection::Unwritable,
        }
    }

    /// True when the node, not the client, is at fault (the disk, the
    /// quota, a log that cannot write): worth a warning in the node's log.
    pub fn is_node_fault(self) -> bool {
        matches!(
            self,
            Rejection::Quota | Rejection::DiskFull | Rejection::Unwritable
        )
    }

    /// The `reason` label a refused publish is counted under.
    pub fn label(self) -> &'static str {
        match self {
            Rejection::UnknownTopic => "unknown_topic",
            Rejection::TooLarge => "event_too_large",
            Rejection::KeyRequired => "key_required",
            Rejection::Quota => "disk_quota",
            Rejection::DiskFull => "disk_full",
            Rejection::Unwritable => "log_unwritable",
        }
    }
}

/// The log refused a group of records: why, and the log's own error (shared
/// by every record of the group).
#[derive(Debug, Clone)]
pub struct Refused {
    /// What it means for the client.
    pub rejection: Rejection,
    /// What the log said.
    pub error: Arc<LogError>,
}

impl Refused {
    fn new(error: LogError) -> Refused {
        Refused {
            rejection: Rejection::of(&error),
            error: Arc::new(error),
        }
    }
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.error.fmt(f)
    }
}

/// Displays as the log's error, which it stands for (so no `source`).
impl std::error::Error for Refused {}

/// One record's outcome: where it was stored, or why not.
pub type Outcome = Result<Position, Refused>;

/// Records of any topics, each with the caller's tag (what it needs to answer
/// that record: an index, a delivery tag), gathered for one append.
#[derive(Debug)]
pub struct Batch<T> {
    topics: BTreeMap<String, Vec<(T, AppendRecord)>>,
    count: usize,
}

impl<T> Default for Batch<T> {
    fn default() -> Self {
        Batch {
            topics: BTreeMap::new(),
            count: 0,
        }
    }
}

impl<T> Batch<T> {
    /// Adds a record for `topic`.
    pub fn push(&mut self, topic: &str, tag: T, record: AppendRecord) {
        match self.topics.get_mut(topic) {
            Some(records) => records.push((tag, record)),
            None => {
                self.topics.insert(topic.to_owned(), vec![(tag, record)]);
            }
        }
        self.count += 1;
    }

    /// Records gathered.
    pub fn len(&self) -> usize {
        self.count
    }

    /// No records gathered.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
}

/// Appends a batch: each topic's records in one [`Log::append`], every topic
/// at once (so they share a commit cycle). Outcomes come back topic by topic
/// in name order, each topic's records in the order they were pushed; a
/// topic's records are stored all or none.
pub async fn append<T>(log: &Log, batch: Batch<T>) -> Vec<(T, Outcome)> {
    append_guarded(log, batch, None).await
}

/// [`append`], each topic's records written only while `guard`'s claim
/// holds ([`Log::claim`]).
pub async fn append_guarded<T>(
    log: &Log,
    batch: Batch<T>,
    guard: Option<&Guard>,
) -> Vec<(T, Outcome)> {
    let appends = batch.topics.into_iter().map(|(topic, items)| async move {
        let (tags, records): (Vec<T>, Vec<AppendRecord>) = items.into_iter().unzip();
        let options = AppendOptions {
            guard: guard.cloned(),
            ..AppendOptions::default()
        };
        let result = append_topic_with(log, &topic, records, options).await;
        (tags, result)
    });
    per_record(futures_util::future::join_all(appends).await, batch.count)
}

/// One topic's records (their tags) and the log's answer for them.
type TopicAnswer<T> = (Vec<T>, Result<Vec<Position>, Refused>);

/// Each topic's answer spread over its records, in order.
fn per_record<T>(topics: Vec<TopicAnswer<T>>, count: usize) -> Vec<(T, Outcome)> {
    let mut outcomes = Vec::with_capacity(count);
    for (tags, result) in topics {
        match result {
            Ok(positions) => {
                let mut positions = positions.into_iter();
                for tag in tags {
                    // The log answers a position per record; were one missing,
                    // that record is not known to be stored.
                    let outcome = positions
                        .next()
                        .ok_or_else(|| Refused::new(LogError::Unwritable("no position".into())));
                    outcomes.push((tag, outcome));
                }
            }
            Err(refused) => outcomes.extend(tags.into_iter().map(|t| (t, Err(refused.clone())))),
        }
    }
    outcomes
}

/// A client's place in the order of its appends: taken when its request is
/// read ([`Turn::next`]), so requests a client pipelines are written in the
/// order it sent them even though they are handled at once.
#[derive(Debug, Default)]
pub struct Turn {
    after: Option<oneshot::Receiver<()>>,
    then: Option<oneshot::Sender<()>>,
}

impl Turn {
    /// The turn after the one `last` was handed to; `last` keeps what the
    /// next turn waits for.
    pub fn next(last: &mut Option<oneshot::Receiver<()>>) -> Turn {
        let (then, next) = oneshot::channel();
        Turn {
            after: last.replace(next),
            then: Some(then),
        }
    }
}

/// One idempotent producer's records for one partition of a topic.
#[derive(Debug)]
pub struct Sequenced<T> {
    /// The caller's tag.
    pub tag: T,
    /// The topic.
    pub topic: String,
    /// Who sent them and their first sequence number.
    pub producer: ProducerBatch,
    /// The records, every one naming the partition.
    pub records: Vec<AppendRecord>,
    /// They belong to the producer's open transaction.
    pub transactional: bool,
}

/// [`append`] in the client's turn, with idempotent producers' batches
/// beside: once the client's earlier request is queued, every topic's
/// records and every sequenced batch are queued at once, then the next
/// request's turn comes. A sequenced batch the log already holds answers
/// with the positions it got then; one out of sequence or fenced is refused
/// with the log's error.
pub async fn append_in_turn<T, S>(
    log: &Log,
    batch: Batch<T>,
    sequenced: Vec<Sequenced<S>>,
    turn: Turn,
) -> (Vec<(T, Outcome)>, Vec<(S, Result<Vec<Position>, Refused>)>) {
    let Turn { after, then } = turn;
    if let Some(after) = after {
        let _ = after.await;
    }
    let mut queued = Vec::new();
    let mut hook = || {
        let (tx, rx) = oneshot::channel();
        queued.push(rx);
        AppendOptions {
            queued: Some(tx),
            ..AppendOptions::default()
        }
    };
    let plain: Vec<_> = batch
        .topics
        .into_iter()
        .map(|(topic, items)| {
            let options = hook();
            async move {
                let (tags, records): (Vec<T>, Vec<AppendRecord>) = items.into_iter().unzip();
                (tags, append_topic_with(log, &topic, records, options).await)
            }
        })
        .collect();
    let sequenced: Vec<_> = sequenced
        .into_iter()
        .map(|s| {
            let options = AppendOptions {
                producer: Some(s.producer),
                transactional: s.transactional,
                ..hook()
            };
            async move {
                (
                    s.tag,
                    append_topic_with(log, &s.topic, s.records, options).await,
                )
            }
        })
        .collect();
    let release = async move {
        for rx in queued {
            let _ = rx.await;
        }
        drop(then);
    };
    let (plain, sequenced, ()) = futures_util::future::join3(
        futures_util::future::join_all(plain),
        futures_util::future::join_all(sequenced),
        release,
    )
    .await;
    (per_record(plain, batch.count), sequenced)
}

/// Appends one topic's records, all or none: their positions, in order.
pub async fn append_topic(
    log: &Log,
    topic: &str,
    records: Vec<AppendRecord>,
) -> Result<Vec<Position>, Refused> {
    append_topic_with(log, topic, records, AppendOptions::default()).await
}

/// [`append_topic`] with the log's [`AppendOptions`].
pub async fn append_topic_with(
    log: &Log,
    topic: &str,
    records: Vec<AppendRecord>,
    options: AppendOptions,
) -> Result<Vec<Position>, Refused> {
    log.append_with(topic, records, options).await.map_err(|e| {
        let refused = Refused::new(e);
        if refused.rejection == Rejection::Unwritable {
            tracing::warn!(%topic, error = %refused, "records were not stored");
        }
        refused
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tributary_storage::log::LogConfig;
    use tributary_storage::store::MemStore;
    use tributary_storage::topic::TopicConfig;
    use tributary_storage::Event;

    fn record(v: &str) -> AppendRecord {
        AppendRecord::from(Event::new(v))
    }

    #[tokio::test]
    async fn outcomes_per_record_in_order_with_the_refusal_typed() {
        let config = LogConfig {
            auto_create_topics: false,
            ..LogConfig::default()
        };
        let log = Log::with_store(Arc::new(MemStore::new()), config).expect("log");
        let mut small = TopicConfig::new("small", 1);
        small.max_event_bytes = 64;
        log.create_topic(small).await.expect("topic");
        log.create_topic(TopicConfig::new("a", 1))
            .await
            .expect("topic");

        let mut batch = Batch::default();
        batch.push("a", 0, record("a0"));
        batch.push("missing", 1, record("m"));
        batch.push("a", 2, record("a1"));
        batch.push("small", 3, record(&"x".repeat(200)));
        batch.push("small", 4, record("fits"));
        assert_eq!(batch.len(), 5);
        let outcomes = append(&log, batch).await;
        let got: Vec<(i32, Result<u64, Rejection>)> = outcomes
            .into_iter()
            .map(|(t, o)| (t, o.map(|p| p.offset).map_err(|r| r.rejection)))
            .collect();
        assert_eq!(
            got,
            vec![
                (0, Ok(0)),
                (2, Ok(1)),
                (1, Err(Rejection::UnknownTopic)),
                // All or none within a topic: the record that fits is refused with it.
                (3, Err(Rejection::TooLarge)),
                (4, Err(Rejection::TooLarge)),
            ]
        );
        assert_eq!(log.offsets("small", 0).expect("offsets"), (0, 0));
    }
}
