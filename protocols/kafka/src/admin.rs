//! The admin APIs: CreateTopics, DeleteTopics, CreatePartitions,
//! DescribeConfigs, AlterConfigs and IncrementalAlterConfigs, over the
//! log's own topic operations (the same the HTTP API and the CLI use).
//!
//! Topic configs, Kafka's names for ours:
//! - `retention.ms`, `retention.bytes` (per partition; `-1` = no limit),
//!   `max.message.bytes` (ours is per record: `max_event_bytes`),
//!   `tributary.on.full` (`reject` or `drop_oldest`, at the disk quota);
//! - `cleanup.policy` is `delete` (compaction is not served: `compact` is
//!   refused with INVALID_CONFIG);
//! - Kafka topic configs that mean nothing on this node (segments,
//!   indexes, replication, flushing: see [`NO_EFFECT`]) are accepted and
//!   ignored, so tools that always send them work; any other name is
//!   INVALID_CONFIG, as Apache Kafka answers.
//!
//! Rights under device auth: creating a topic takes publish on it (as over
//! HTTP); deleting a topic, adding partitions and changing configs take the
//! admin ([`tributary_devices::auth::may_administer`]: SASL PLAIN as `admin`
//! with the admin token), which a device is not: TOPIC_AUTHORIZATION_FAILED.

use std::collections::BTreeSet;

use kafka_protocol::messages::alter_configs_response::AlterConfigsResourceResponse;
use kafka_protocol::messages::create_partitions_response::CreatePartitionsTopicResult;
use kafka_protocol::messages::create_topics_response::{
    CreatableTopicConfigs, CreatableTopicResult,
};
use kafka_protocol::messages::delete_topics_response::DeletableTopicResult;
use kafka_protocol::messages::describe_configs_response::{
    DescribeConfigsResourceResult, DescribeConfigsResult,
};
use kafka_protocol::messages::incremental_alter_configs_response::AlterConfigsResourceResponse as IncrementalResult;
use kafka_protocol::messages::{
    AlterConfigsRequest, AlterConfigsResponse, CreatePartitionsRequest, CreatePartitionsResponse,
    CreateTopicsRequest, CreateTopicsResponse, DeleteTopicsRequest, DeleteTopicsResponse,
    DescribeConfigsRequest, DescribeConfigsResponse, IncrementalAlterConfigsRequest,
    IncrementalAlterConfigsResponse,
};
use kafka_protocol::protocol::StrBytes;
use kafka_protocol::ResponseError;
use tributary_devices::auth::{may_administer, Action};
use tributary_storage::topic::{validate_name, MAX_PARTITIONS};
use tributary_storage::{CleanupPolicy, Error as LogError, OnFull, TopicChange, TopicConfig};

use crate::brokers;
use crate::conn::Session;

/// Config resource types (`DescribeConfigs`, `AlterConfigs`).
const TOPIC: i8 = 2;
const BROKER: i8 = 4;

/// Config sources and types, as Kafka numbers them.
const SOURCE_TOPIC: i8 = 1;
const SOURCE_DEFAULT: i8 = 5;
const TYPE_STRING: i8 = 2;
const TYPE_INT: i8 = 3;
const TYPE_LONG: i8 = 5;
const TYPE_DOUBLE: i8 = 6;
const TYPE_LIST: i8 = 7;

const RETENTION_MS: &str = "retention.ms";
const RETENTION_BYTES: &str = "retention.bytes";
const MAX_MESSAGE_BYTES: &str = "max.message.bytes";
const CLEANUP_POLICY: &str = "cleanup.policy";
const ON_FULL: &str = "tributary.on.full";
const DELETE_RETENTION_MS: &str = "delete.retention.ms";
const MIN_COMPACTION_LAG_MS: &str = "min.compaction.lag.ms";
const MAX_COMPACTION_LAG_MS: &str = "max.compaction.lag.ms";
const MIN_CLEANABLE_DIRTY_RATIO: &str = "min.cleanable.dirty.ratio";
const TIMESTAMP_TYPE: &str = "message.timestamp.type";

/// Kafka topic configs accepted and ignored: what they tune (log segments
/// and indexes, replicas, flushing, tiered storage, timestamps, the
/// cleaner's threads and buffers) does not exist on this node.
const NO_EFFECT: &[&str] = &[
    "compression.type",
    "file.delete.delay.ms",
    "flush.messages",
    "flush.ms",
    "follower.replication.throttled.replicas",
    "index.interval.bytes",
    "leader.replication.throttled.replicas",
    "local.retention.bytes",
    "local.retention.ms",
    "message.downconversion.enable",
    "message.format.version",
    "message.timestamp.after.max.ms",
    "message.timestamp.before.max.ms",
    "message.timestamp.difference.max.ms",
    "message.timestamp.type",
    "min.insync.replicas",
    "preallocate",
    "remote.storage.enable",
    "segment.bytes",
    "segment.index.bytes",
    "segment.jitter.ms",
    "segment.ms",
    "unclean.leader.election.enable",
];

pub(crate) fn st(v: impl Into<String>) -> StrBytes {
    StrBytes::from_string(v.into())
}

/// An answer for one topic or resource that carries an error code and
/// message.
trait Refusable: Sized {
    fn refused(self, failure: Failure) -> Self;

    /// `self` as is when `outcome` is Ok, else refused with its failure.
    fn settled(self, outcome: Result<(), Failure>) -> Self {
        match outcome {
            Ok(()) => self,
            Err(f) => self.refused(f),
        }
    }
}

macro_rules! refusable {
    ($($ty:ty),*) => {$(
        impl Refusable for $ty {
            fn refused(self, (code, message): Failure) -> Self {
                self.with_error_code(code.code())
                    .with_error_message(Some(st(message)))
            }
        }
    )*};
}

refusable!(
    CreatableTopicResult,
    DeletableTopicResult,
    CreatePartitionsTopicResult,
    DescribeConfigsResult,
    AlterConfigsResourceResponse,
    IncrementalResult
);

fn may_admin(s: &Session) -> bool {
    may_administer(&*s.server.cx.auth, &s.who())
}

/// An answer's code and message.
type Failure = (ResponseError, String);

fn fail(code: ResponseError, message: impl Into<String>) -> Failure {
    (code, message.into())
}

/// Kafka's answer to a refusal of the log's topic operations.
fn log_failure(e: &LogError) -> Failure {
    let code = match e {
        LogError::UnknownTopic(_) => ResponseError::UnknownTopicOrPartition,
        LogError::TopicExists(_) | LogError::TopicDeleting(_) => ResponseError::TopicAlreadyExists,
        LogError::InvalidName(_) => ResponseError::InvalidTopicException,
        LogError::InvalidTopic(_) => ResponseError::InvalidConfig,
        LogError::Unwritable(_) | LogError::DiskFull { .. } | LogError::Closed => {
            ResponseError::KafkaStorageError
        }
        _ => ResponseError::UnknownServerError,
    };
    (code, e.to_string())
}

fn limit(name: &str, value: &str) -> Result<Option<u64>, String> {
    match value.trim().parse::<i64>() {
        Ok(-1) => Ok(None),
        Ok(v) if v > 0 => Ok(Some(v as u64)),
        _ => Err(format!(
            "{name} must be a positive number or -1, got `{value}`"
        )),
    }
}

/// Sets one config (`None`: back to the node's default for topics).
fn set(
    config: &mut TopicConfig,
    defaults: &TopicConfig,
    name: &str,
    value: Option<&str>,
) -> Result<(), String> {
    set_value(config, defaults, name, value)?;
    // Given explicitly (even as the default's value) or back to the default.
    match value {
        Some(_) => config.explicit.insert(name.to_owned()),
        None => config.explicit.remove(name),
    };
    Ok(())
}

fn set_value(
    config: &mut TopicConfig,
    defaults: &TopicConfig,
    name: &str,
    value: Option<&str>,
) -> Result<(), String> {
    match (name, value) {
        (RETENTION_MS, None) => config.retention_ms = defaults.retention_ms,
        (RETENTION_MS, Some(v)) => config.retention_ms = limit(name, v)?,
        (RETENTION_BYTES, None) => config.retention_bytes = defaults.retention_bytes,
        (RETENTION_BYTES, Some(v)) => config.retention_bytes = limit(name, v)?,
        (MAX_MESSAGE_BYTES, None) => config.max_event_bytes = defaults.max_event_bytes,
        (MAX_MESSAGE_BYTES, Some(v)) => {
            config.max_event_bytes = v
                .trim()
                .parse()
                .map_err(|_| format!("{name} must be a positive number, got `{v}`"))?;
        }
        (ON_FULL, None) => config.on_full = defaults.on_full,
        (ON_FULL, Some(v)) => {
            config.on_full = match v.trim() {
                "reject" => OnFull::Reject,
                "drop_oldest" => OnFull::DropOldest,
                _ => return Err(format!("{name} is `reject` or `drop_oldest`, got `{v}`")),
            }
        }
        (CLEANUP_POLICY, None) => config.cleanup_policy = defaults.cleanup_policy,
        (CLEANUP_POLICY, Some(v)) => {
            config.cleanup_policy = CleanupPolicy::parse(v)
                .ok_or_else(|| format!("{name} is a list of `delete` and `compact`, got `{v}`"))?;
        }
        (DELETE_RETENTION_MS, None) => config.delete_retention_ms = defaults.delete_retention_ms,
        (DELETE_RETENTION_MS, Some(v)) => config.delete_retention_ms = millis(name, v)?,
        (MIN_COMPACTION_LAG_MS, None) => {
            config.min_compaction_lag_ms = defaults.min_compaction_lag_ms
        }
        (MIN_COMPACTION_LAG_MS, Some(v)) => config.min_compaction_lag_ms = millis(name, v)?,
        (MAX_COMPACTION_LAG_MS, None) => {
            config.max_compaction_lag_ms = defaults.max_compaction_lag_ms
        }
        (MAX_COMPACTION_LAG_MS, Some(v)) => {
            config.max_compaction_lag_ms = match millis(name, v)? {
                0 => return Err(format!("{name} must be positive, got `{v}`")),
                u if u >= i64::MAX as u64 => None,
                u => Some(u),
            }
        }
        (MIN_CLEANABLE_DIRTY_RATIO, None) => {
            config.min_cleanable_dirty_ratio = defaults.min_cleanable_dirty_ratio
        }
        (MIN_CLEANABLE_DIRTY_RATIO, Some(v)) => {
            config.min_cleanable_dirty_ratio = v
                .trim()
                .parse::<f64>()
                .ok()
                .filter(|r| (0.0..=1.0).contains(r))
                .ok_or_else(|| format!("{name} must be 0..=1, got `{v}`"))?;
        }
        // Producers' timestamps are kept (CreateTime); the broker's clock
        // is never stamped over them.
        (TIMESTAMP_TYPE, Some(v)) if v.trim() != "CreateTime" => {
            return Err(format!(
                "{name}: this node keeps producers' timestamps (CreateTime), got `{v}`"
            ))
        }
        (other, _) if NO_EFFECT.contains(&other) => {}
        (other, _) => return Err(format!("unknown topic config `{other}`")),
    }
    Ok(())
}

fn millis(name: &str, value: &str) -> Result<u64, String> {
    value
        .trim()
        .parse::<u64>()
        .map_err(|_| format!("{name} must be a number of ms ≥ 0, got `{value}`"))
}

/// A config entry as DescribeConfigs (and CreateTopics v5+) show it.
struct Entry {
    name: &'static str,
    value: String,
    default: bool,
    kind: i8,
}

/// The configs a topic describes; a config given explicitly is the
/// topic's own even at the default's value, as Kafka's.
fn entries(config: &TopicConfig, defaults: &TopicConfig) -> Vec<Entry> {
    let mut all = values(config, defaults);
    for e in &mut all {
        e.default &= !config.explicit.contains(e.name);
    }
    all
}

fn values(config: &TopicConfig, defaults: &TopicConfig) -> Vec<Entry> {
    let opt = |v: Option<u64>| v.map_or_else(|| "-1".to_owned(), |v| v.to_string());
    let on_full = |o: OnFull| match o {
        OnFull::Reject => "reject",
        OnFull::DropOldest => "drop_oldest",
    };
    vec![
        Entry {
            name: CLEANUP_POLICY,
            value: config.cleanup_policy.as_str().into(),
            default: config.cleanup_policy == defaults.cleanup_policy,
            kind: TYPE_LIST,
        },
        Entry {
            name: DELETE_RETENTION_MS,
            value: config.delete_retention_ms.to_string(),
            default: config.delete_retention_ms == defaults.delete_retention_ms,
            kind: TYPE_LONG,
        },
        Entry {
            name: MAX_COMPACTION_LAG_MS,
            value: config
                .max_compaction_lag_ms
                .unwrap_or(i64::MAX as u64)
                .to_string(),
            default: config.max_compaction_lag_ms == defaults.max_compaction_lag_ms,
            kind: TYPE_LONG,
        },
        Entry {
            name: MIN_CLEANABLE_DIRTY_RATIO,
            value: config.min_cleanable_dirty_ratio.to_string(),
            default: config.min_cleanable_dirty_ratio == defaults.min_cleanable_dirty_ratio,
            kind: TYPE_DOUBLE,
        },
        Entry {
            name: MIN_COMPACTION_LAG_MS,
            value: config.min_compaction_lag_ms.to_string(),
            default: config.min_compaction_lag_ms == defaults.min_compaction_lag_ms,
            kind: TYPE_LONG,
        },
        Entry {
            name: MAX_MESSAGE_BYTES,
            value: config.max_event_bytes.to_string(),
            default: config.max_event_bytes == defaults.max_event_bytes,
            kind: TYPE_INT,
        },
        Entry {
            name: RETENTION_BYTES,
            value: opt(config.retention_bytes),
            default: config.retention_bytes == defaults.retention_bytes,
            kind: TYPE_LONG,
        },
        Entry {
            name: RETENTION_MS,
            value: opt(config.retention_ms),
            default: config.retention_ms == defaults.retention_ms,
            kind: TYPE_LONG,
        },
        Entry {
            name: TIMESTAMP_TYPE,
            value: "CreateTime".into(),
            default: true,
            kind: TYPE_STRING,
        },
        Entry {
            name: ON_FULL,
            value: on_full(config.on_full).into(),
            default: config.on_full == defaults.on_full,
            kind: TYPE_STRING,
        },
    ]
}

fn source(e: &Entry) -> i8 {
    if e.default {
        SOURCE_DEFAULT
    } else {
        SOURCE_TOPIC
    }
}

/// Everything of `config` but its name and partitions, as a change.
fn change_to(config: &TopicConfig) -> TopicChange {
    TopicChange {
        partitions: None,
        retention_ms: Some(config.retention_ms),
        retention_bytes: Some(config.retention_bytes),
        max_event_bytes: Some(config.max_event_bytes),
        on_full: Some(config.on_full),
        cleanup_policy: Some(config.cleanup_policy),
        delete_retention_ms: Some(config.delete_retention_ms),
        min_compaction_lag_ms: Some(config.min_compaction_lag_ms),
        max_compaction_lag_ms: Some(config.max_compaction_lag_ms),
        min_cleanable_dirty_ratio: Some(config.min_cleanable_dirty_ratio),
        explicit: Some(config.explicit.clone()),
    }
}

fn defaults(s: &Session, topic: &str) -> TopicConfig {
    s.server.cx.log.config().topic_defaults.config(topic)
}

/// CreateTopics: a topic with one replica (this node), the partitions and
/// configs asked for; `validate_only` checks without creating.
pub(crate) async fn create_topics(s: &Session, req: CreateTopicsRequest) -> CreateTopicsResponse {
    let mut seen = BTreeSet::new();
    let repeated: BTreeSet<String> = req
        .topics
        .iter()
        .filter(|t| !seen.insert(t.name.0.to_string()))
        .map(|t| t.name.0.to_string())
        .collect();
    let mut results = Vec::new();
    for topic in req.topics {
        let name = topic.name.0.to_string();
        let result = CreatableTopicResult::default().with_name(topic.name.clone());
        let outcome = if repeated.contains(&name) {
            Err(fail(
                ResponseError::InvalidRequest,
                format!("topic `{name}` is named more than once in the request"),
            ))
        } else {
            create_one(s, &name, &topic, req.validate_only).await
        };
        results.push(match outcome {
            Ok(config) => {
                let d = defaults(s, &name);
                let configs = entries(&config, &d)
                    .into_iter()
                    .map(|e| {
                        CreatableTopicConfigs::default()
                            .with_config_source(source(&e))
                            .with_name(st(e.name))
                            .with_value(Some(st(e.value)))
                    })
                    .collect();
                result
                    .with_topic_id(crate::handlers::topic_id(&config))
                    .with_num_partitions(config.partitions as i32)
                    .with_replication_factor(1)
                    .with_configs(Some(configs))
            }
            Err(failure) => result
                .refused(failure)
                .with_num_partitions(-1)
                .with_replication_factor(-1),
        });
    }
    CreateTopicsResponse::default().with_topics(results)
}

async fn create_one(
    s: &Session,
    name: &str,
    topic: &kafka_protocol::messages::create_topics_request::CreatableTopic,
    validate_only: bool,
) -> Result<TopicConfig, Failure> {
    let auth = &*s.server.cx.auth;
    if !auth.authorize(&s.who(), Action::Publish, name).allowed() {
        return Err(fail(
            ResponseError::TopicAuthorizationFailed,
            format!("creating topic `{name}` takes the right to publish to it"),
        ));
    }
    validate_name(name).map_err(|e| log_failure(&e))?;
    let d = defaults(s, name);
    let mut config = d.clone();
    let ids = brokers::broker_ids(s);
    if !topic.assignments.is_empty() {
        let mut indexes: Vec<i32> = topic
            .assignments
            .iter()
            .map(|a| a.partition_index)
            .collect();
        indexes.sort_unstable();
        let dense = indexes.iter().enumerate().all(|(i, &p)| p == i as i32);
        let here = topic.assignments.iter().all(|a| {
            let replicas: Vec<i32> = a.broker_ids.iter().map(|b| b.0).collect();
            brokers::names_brokers(&replicas, &ids)
        });
        if !dense || !here {
            return Err(fail(
                ResponseError::InvalidReplicaAssignment,
                brokers::assignment_rule(&ids, false),
            ));
        }
        config.partitions = indexes.len() as u32;
    } else if topic.num_partitions != -1 {
        if topic.num_partitions < 1 || topic.num_partitions as u32 > MAX_PARTITIONS {
            return Err(fail(
                ResponseError::InvalidPartitions,
                format!(
                    "partitions must be 1..={MAX_PARTITIONS}, got {}",
                    topic.num_partitions
                ),
            ));
        }
        config.partitions = topic.num_partitions as u32;
    }
    let factor = topic.replication_factor;
    if !(factor == -1 || (1..=ids.len() as i32).contains(&i32::from(factor))) {
        let message = match ids.len() {
            1 => format!("replication factor {factor} is more than the one broker this node is"),
            n => format!(
                "replication factor {factor} is not 1..={n}, the brokers of this cluster (each keeps every partition)"
            ),
        };
        return Err(fail(ResponseError::InvalidReplicationFactor, message));
    }
    for c in &topic.configs {
        set(&mut config, &d, &c.name, c.value.as_deref())
            .map_err(|m| fail(ResponseError::InvalidConfig, m))?;
    }
    config.validate().map_err(|e| log_failure(&e))?;
    if validate_only {
        return match s.server.cx.log.topic(name) {
            Ok(_) => Err(log_failure(&LogError::TopicExists(name.to_owned()))),
            Err(_) => Ok(config),
        };
    }
    s.server
        .cx
        .log
        .create_topic(config)
        .await
        .map(|info| info.config)
        .map_err(|e| log_failure(&e))
}

/// DeleteRecords: each partition's records below the asked offset (−1:
/// the end) removed, the start moved exactly there; the answer's low
/// watermark is the new start. It takes the right to publish to the topic.
pub(crate) async fn delete_records(
    s: &Session,
    req: kafka_protocol::messages::DeleteRecordsRequest,
) -> kafka_protocol::messages::DeleteRecordsResponse {
    use kafka_protocol::messages::delete_records_response::{
        DeleteRecordsPartitionResult, DeleteRecordsTopicResult,
    };
    let auth = &*s.server.cx.auth;
    let log = &s.server.cx.log;
    let mut topics = Vec::new();
    for t in req.topics {
        let name = t.name.0.to_string();
        let allowed = auth.authorize(&s.who(), Action::Publish, &name).allowed();
        let mut partitions = Vec::new();
        for p in t.partitions {
            let answer = DeleteRecordsPartitionResult::default()
                .with_partition_index(p.partition_index)
                .with_low_watermark(-1);
            let code = if !allowed {
                Err(ResponseError::TopicAuthorizationFailed)
            } else {
                match (u32::try_from(p.partition_index), p.offset) {
                    (Ok(partition), -1) => Ok((partition, None)),
                    (Ok(partition), o) if o >= 0 => Ok((partition, Some(o as u64))),
                    (Ok(_), _) => Err(ResponseError::OffsetOutOfRange),
                    (Err(_), _) => Err(ResponseError::UnknownTopicOrPartition),
                }
            };
            let outcome = match code {
                Err(c) => Err(c),
                Ok((partition, before)) => log
                    .delete_records(&name, partition, before)
                    .await
                    .map_err(|e| match e {
                        LogError::OffsetOutOfRange { .. } => ResponseError::OffsetOutOfRange,
                        LogError::UnknownTopic(_) | LogError::UnknownPartition { .. } => {
                            ResponseError::UnknownTopicOrPartition
                        }
                        other => log_failure(&other).0,
                    }),
            };
            partitions.push(match outcome {
                Ok(start) => answer.with_low_watermark(start as i64),
                Err(c) => answer.with_error_code(c.code()),
            });
        }
        topics.push(
            DeleteRecordsTopicResult::default()
                .with_name(t.name)
                .with_partitions(partitions),
        );
    }
    kafka_protocol::messages::DeleteRecordsResponse::default().with_topics(topics)
}

/// DeleteTopics: by name, or (v6) by id (an id no topic has:
/// UNKNOWN_TOPIC_ID).
pub(crate) async fn delete_topics(s: &Session, req: DeleteTopicsRequest) -> DeleteTopicsResponse {
    let mut asked: Vec<DeletableTopicResult> = req
        .topic_names
        .into_iter()
        .map(|n| DeletableTopicResult::default().with_name(Some(n)))
        .collect();
    // v6 names a topic by name or by id.
    let log = &s.server.cx.log;
    asked.extend(req.topics.into_iter().map(|t| {
        let name = t.name.or_else(|| {
            crate::handlers::named_by_id(log, t.topic_id).map(|n| crate::handlers::topic_name(&n))
        });
        DeletableTopicResult::default()
            .with_name(name)
            .with_topic_id(t.topic_id)
    }));
    let mut responses = Vec::new();
    for result in asked {
        let outcome = match result.name.clone() {
            None => Err(fail(
                ResponseError::UnknownTopicId,
                format!("no topic has the id {}", result.topic_id),
            )),
            Some(_) if !may_admin(s) => Err(fail(
                ResponseError::TopicAuthorizationFailed,
                "deleting topics takes the admin (SASL PLAIN as admin with the admin token)",
            )),
            Some(n) => s
                .server
                .cx
                .log
                .delete_topic(&n.0)
                .await
                .map_err(|e| log_failure(&e)),
        };
        responses.push(result.settled(outcome));
    }
    DeleteTopicsResponse::default().with_responses(responses)
}

/// CreatePartitions: a topic grows to `count` partitions.
pub(crate) async fn create_partitions(
    s: &Session,
    req: CreatePartitionsRequest,
) -> CreatePartitionsResponse {
    let mut results = Vec::new();
    for t in req.topics {
        let name = t.name.0.to_string();
        let outcome = grow(s, &name, &t, req.validate_only).await;
        let result = CreatePartitionsTopicResult::default().with_name(t.name);
        results.push(result.settled(outcome));
    }
    CreatePartitionsResponse::default().with_results(results)
}

async fn grow(
    s: &Session,
    name: &str,
    t: &kafka_protocol::messages::create_partitions_request::CreatePartitionsTopic,
    validate_only: bool,
) -> Result<(), Failure> {
    if !may_admin(s) {
        return Err(fail(
            ResponseError::TopicAuthorizationFailed,
            "adding partitions takes the admin (SASL PLAIN as admin with the admin token)",
        ));
    }
    let log = &s.server.cx.log;
    let now = log
        .topic(name)
        .map_err(|e| log_failure(&e))?
        .config
        .partitions;
    let count = u32::try_from(t.count).unwrap_or(0);
    if count <= now || count > MAX_PARTITIONS {
        let message = if count == now {
            format!("topic `{name}` already has {now} partitions")
        } else if count < now {
            format!("topic `{name}` has {now} partitions, more than the {count} asked for: partitions can be added, not removed")
        } else {
            format!(
                "partitions must be at most {MAX_PARTITIONS}, got {}",
                t.count
            )
        };
        return Err(fail(ResponseError::InvalidPartitions, message));
    }
    if let Some(assignments) = t.assignments.as_ref().filter(|a| !a.is_empty()) {
        let ids = brokers::broker_ids(s);
        let here = assignments.iter().all(|a| {
            let replicas: Vec<i32> = a.broker_ids.iter().map(|b| b.0).collect();
            brokers::names_brokers(&replicas, &ids)
        });
        if !here || assignments.len() as u32 != count - now {
            return Err(fail(
                ResponseError::InvalidReplicaAssignment,
                brokers::assignment_rule(&ids, true),
            ));
        }
    }
    if validate_only {
        return Ok(());
    }
    let change = TopicChange {
        partitions: Some(count),
        ..TopicChange::default()
    };
    log.alter_topic(name, &change)
        .await
        .map(drop)
        .map_err(|e| log_failure(&e))
}

/// DescribeConfigs: a topic's configs (all, or the keys asked for); a
/// broker has none that clients can change here (its settings are the
/// node's config file).
pub(crate) fn describe_configs(
    s: &Session,
    req: DescribeConfigsRequest,
) -> DescribeConfigsResponse {
    let auth = &*s.server.cx.auth;
    let mut results = Vec::new();
    for r in req.resources {
        let result = DescribeConfigsResult::default()
            .with_resource_type(r.resource_type)
            .with_resource_name(r.resource_name.clone());
        let name = r.resource_name.to_string();
        let outcome = match r.resource_type {
            BROKER => Ok(Vec::new()),
            TOPIC if !auth.may_see(&s.who(), &name) => Err(fail(
                ResponseError::TopicAuthorizationFailed,
                format!("topic `{name}` is not visible to this client"),
            )),
            TOPIC => match s.server.cx.log.topic(&name) {
                Ok(info) => {
                    let wanted = r.configuration_keys.as_ref();
                    let configs = entries(&info.config, &defaults(s, &name))
                        .into_iter()
                        .filter(|e| wanted.is_none_or(|w| w.iter().any(|k| **k == *e.name)))
                        .map(|e| {
                            DescribeConfigsResourceResult::default()
                                .with_config_source(source(&e))
                                .with_config_type(e.kind)
                                .with_name(st(e.name))
                                .with_value(Some(st(e.value)))
                        })
                        .collect();
                    Ok(configs)
                }
                Err(e) => Err(log_failure(&e)),
            },
            other => Err(fail(
                ResponseError::InvalidRequest,
                format!(
                    "config resource type {other} is not served: topics (2) and brokers (4) are"
                ),
            )),
        };
        results.push(match outcome {
            Ok(configs) => result.with_configs(configs),
            Err(failure) => result.refused(failure),
        });
    }
    DescribeConfigsResponse::default().with_results(results)
}

/// How a resource's configs change: AlterConfigs replaces every config
/// (those not named go back to the defaults), IncrementalAlterConfigs
/// sets or deletes the ones named.
enum Edit<'a> {
    Replace(Vec<(&'a str, Option<&'a str>)>),
    Incremental(Vec<(&'a str, i8, Option<&'a str>)>),
}

async fn alter_resource(
    s: &Session,
    resource_type: i8,
    name: &str,
    edit: Edit<'_>,
    validate_only: bool,
) -> Result<(), Failure> {
    if resource_type != TOPIC {
        return Err(fail(
            ResponseError::InvalidRequest,
            "only topic configs change here: a broker's settings are the node's config file",
        ));
    }
    if !may_admin(s) {
        return Err(fail(
            ResponseError::TopicAuthorizationFailed,
            "changing topic configs takes the admin (SASL PLAIN as admin with the admin token)",
        ));
    }
    let log = &s.server.cx.log;
    let current = log.topic(name).map_err(|e| log_failure(&e))?.config;
    let d = defaults(s, name);
    let invalid = |m| fail(ResponseError::InvalidConfig, m);
    let config = match edit {
        Edit::Replace(configs) => {
            let mut c = TopicConfig {
                name: current.name.clone(),
                partitions: current.partitions,
                ..d.clone()
            };
            for (k, v) in configs {
                set(&mut c, &d, k, v).map_err(invalid)?;
            }
            c
        }
        Edit::Incremental(ops) => {
            let mut c = current.clone();
            for (k, op, v) in ops {
                match op {
                    0 => set(&mut c, &d, k, v).map_err(invalid)?,
                    1 => set(&mut c, &d, k, None).map_err(invalid)?,
                    // APPEND and SUBTRACT: the one list config.
                    // The list keeps its order; APPEND adds at the end what
                    // it lacks, as Kafka's.
                    2 | 3 if k == CLEANUP_POLICY => {
                        let mut items: Vec<String> = c
                            .cleanup_policy
                            .as_str()
                            .split(',')
                            .map(str::to_owned)
                            .collect();
                        for item in v.unwrap_or("").split(',').map(str::trim) {
                            if item.is_empty() {
                                continue;
                            }
                            if op == 2 {
                                if !items.iter().any(|i| i == item) {
                                    items.push(item.to_owned());
                                }
                            } else {
                                items.retain(|i| i != item);
                            }
                        }
                        let joined = items.join(",");
                        set(&mut c, &d, k, Some(&joined)).map_err(invalid)?;
                    }
                    _ => {
                        return Err(invalid(format!(
                            "`{k}`: APPEND (2) and SUBTRACT (3) apply to list configs \
                             (cleanup.policy); SET (0) and DELETE (1) to all"
                        )))
                    }
                }
            }
            c
        }
    };
    let change = change_to(&config);
    change.applied_to(&current).map_err(|e| log_failure(&e))?;
    if validate_only {
        return Ok(());
    }
    log.alter_topic(name, &change)
        .await
        .map(drop)
        .map_err(|e| log_failure(&e))
}

/// AlterConfigs: a topic's configs replaced as a whole.
pub(crate) async fn alter_configs(s: &Session, req: AlterConfigsRequest) -> AlterConfigsResponse {
    let mut responses = Vec::new();
    for r in req.resources {
        let name = r.resource_name.to_string();
        let edit = Edit::Replace(
            r.configs
                .iter()
                .map(|c| (&*c.name, c.value.as_deref()))
                .collect(),
        );
        let outcome = alter_resource(s, r.resource_type, &name, edit, req.validate_only).await;
        let result = AlterConfigsResourceResponse::default()
            .with_resource_type(r.resource_type)
            .with_resource_name(r.resource_name.clone());
        responses.push(result.settled(outcome));
    }
    AlterConfigsResponse::default().with_responses(responses)
}

/// IncrementalAlterConfigs: the configs named are set or reset.
pub(crate) async fn incremental_alter_configs(
    s: &Session,
    req: IncrementalAlterConfigsRequest,
) -> IncrementalAlterConfigsResponse {
    let mut responses = Vec::new();
    for r in req.resources {
        let name = r.resource_name.to_string();
        let edit = Edit::Incremental(
            r.configs
                .iter()
                .map(|c| (&*c.name, c.config_operation, c.value.as_deref()))
                .collect(),
        );
        let outcome = alter_resource(s, r.resource_type, &name, edit, req.validate_only).await;
        let result = IncrementalResult::default()
            .with_resource_type(r.resource_type)
            .with_resource_name(r.resource_name.clone());
        responses.push(result.settled(outcome));
    }
    IncrementalAlterConfigsResponse::default().with_responses(responses)
}

/// DescribeProducers (`kafka-transactions describe-producers`,
/// `Admin.describeProducers`): per partition, the idempotent and
/// transactional producers it holds state for. As Kafka: reading the topic
/// is the permission (subscribe, in devices mode); an unknown topic or
/// partition is UNKNOWN_TOPIC_OR_PARTITION.
pub(crate) fn describe_producers(
    s: &Session,
    req: kafka_protocol::messages::DescribeProducersRequest,
) -> kafka_protocol::messages::DescribeProducersResponse {
    use kafka_protocol::messages::describe_producers_response::{
        PartitionResponse, ProducerState, TopicResponse,
    };
    use kafka_protocol::messages::ProducerId;
    let log = &s.server.cx.log;
    let topics = req
        .topics
        .into_iter()
        .map(|t| {
            let name = t.name.0.to_string();
            let allowed = crate::groups::may_read(s, &name);
            let partitions = t
                .partition_indexes
                .into_iter()
                .map(|index| {
                    let answer = PartitionResponse::default().with_partition_index(index);
                    if !allowed {
                        return answer
                            .with_error_code(ResponseError::TopicAuthorizationFailed.code());
                    }
                    let states = u32::try_from(index)
                        .map_err(|_| ResponseError::UnknownTopicOrPartition)
                        .and_then(|p| {
                            log.producers(&name, p).map_err(|e| match e {
                                LogError::UnknownTopic(_) | LogError::UnknownPartition { .. } => {
                                    ResponseError::UnknownTopicOrPartition
                                }
                                other => log_failure(&other).0,
                            })
                        });
                    match states {
                        Err(code) => answer.with_error_code(code.code()),
                        Ok(states) => answer.with_active_producers(
                            states
                                .into_iter()
                                .map(|p| {
                                    ProducerState::default()
                                        .with_producer_id(ProducerId(p.producer_id))
                                        .with_producer_epoch(i32::from(p.epoch))
                                        .with_last_sequence(p.last_sequence)
                                        .with_last_timestamp(p.last_timestamp)
                                        .with_coordinator_epoch(p.coordinator_epoch)
                                        .with_current_txn_start_offset(
                                            p.transaction_start.map_or(-1, |o| o as i64),
                                        )
                                })
                                .collect(),
                        ),
                    }
                })
                .collect();
            TopicResponse::default()
                .with_name(t.name)
                .with_partitions(partitions)
        })
        .collect();
    kafka_protocol::messages::DescribeProducersResponse::default().with_topics(topics)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kafka_config_names_map_to_ours() {
        let d = TopicConfig::new("t", 1);
        let mut c = d.clone();
        set(&mut c, &d, RETENTION_MS, Some("60000")).expect("ms");
        set(&mut c, &d, RETENTION_BYTES, Some("-1")).expect("bytes");
        set(&mut c, &d, MAX_MESSAGE_BYTES, Some("2048")).expect("max");
        set(&mut c, &d, ON_FULL, Some("drop_oldest")).expect("on full");
        set(&mut c, &d, CLEANUP_POLICY, Some("delete")).expect("delete");
        set(&mut c, &d, "segment.bytes", Some("1")).expect("no effect");
        assert_eq!(c.retention_ms, Some(60_000));
        assert_eq!(c.retention_bytes, None);
        assert_eq!(c.max_event_bytes, 2048);
        assert_eq!(c.on_full, OnFull::DropOldest);
        set(&mut c, &d, RETENTION_MS, None).expect("reset");
        assert_eq!(c.retention_ms, d.retention_ms);
        for (k, v) in [
            (RETENTION_MS, "0"),
            (RETENTION_MS, "-2"),
            (RETENTION_BYTES, "lots"),
            (MAX_MESSAGE_BYTES, "-1"),
            (ON_FULL, "panic"),
            (CLEANUP_POLICY, "compact,shred"),
            (CLEANUP_POLICY, ""),
            (MIN_CLEANABLE_DIRTY_RATIO, "1.5"),
            (MAX_COMPACTION_LAG_MS, "0"),
            (DELETE_RETENTION_MS, "-1"),
            ("no.such.config", "1"),
        ] {
            assert!(set(&mut c, &d, k, Some(v)).is_err(), "{k}={v}");
        }
        let shown = entries(&c, &d);
        let ms = shown
            .iter()
            .find(|e| e.name == RETENTION_MS)
            .expect("shown");
        assert_eq!((ms.value.as_str(), ms.default), ("-1", true));
        let max = shown
            .iter()
            .find(|e| e.name == MAX_MESSAGE_BYTES)
            .expect("shown");
        assert_eq!((max.value.as_str(), max.default), ("2048", false));
        // Given explicitly at the default's value: the topic's own.
        let policy = shown
            .iter()
            .find(|e| e.name == CLEANUP_POLICY)
            .expect("shown");
        assert_eq!((policy.value.as_str(), policy.default), ("delete", false));
        assert_eq!(source(policy), SOURCE_TOPIC);
        assert!(!c.explicit.contains(RETENTION_MS), "reset: not explicit");
        // Compaction's settings, in Kafka's spelling both ways.
        set(&mut c, &d, CLEANUP_POLICY, Some("delete, compact")).expect("both");
        set(&mut c, &d, MIN_CLEANABLE_DIRTY_RATIO, Some("0.25")).expect("ratio");
        set(
            &mut c,
            &d,
            MAX_COMPACTION_LAG_MS,
            Some("9223372036854775807"),
        )
        .expect("max lag");
        set(&mut c, &d, MIN_COMPACTION_LAG_MS, Some("1000")).expect("min lag");
        assert_eq!(c.cleanup_policy, CleanupPolicy::DeleteCompact);
        assert_eq!(c.max_compaction_lag_ms, None, "Long.MAX is no limit");
        let shown = entries(&c, &d);
        let value = |name| {
            shown
                .iter()
                .find(|e| e.name == name)
                .map(|e| e.value.clone())
                .expect("shown")
        };
        assert_eq!(value(CLEANUP_POLICY), "delete,compact");
        assert_eq!(value(MIN_CLEANABLE_DIRTY_RATIO), "0.25");
        assert_eq!(value(MAX_COMPACTION_LAG_MS), "9223372036854775807");
        assert_eq!(value(MIN_COMPACTION_LAG_MS), "1000");
        assert_eq!(value(DELETE_RETENTION_MS), "86400000");
    }
}
