//! Topic configuration and its validation.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Largest partition count a topic may have.
pub const MAX_PARTITIONS: u32 = 1024;
/// Hard ceiling for `max_event_bytes` (the storage engine's value size limit).
pub const MAX_EVENT_BYTES_LIMIT: usize = 64 * 1024 * 1024;

/// What a topic does when the disk quota (`LogConfig::max_disk_bytes`) is
/// reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum OnFull {
    /// Keep every stored event: new events are refused with the protocol's
    /// error unless `drop_oldest` topics can make room.
    #[default]
    Reject,
    /// The topic's oldest events may be evicted (counted) to make room for
    /// new events of any topic.
    DropOldest,
}

/// How a topic's old records go: Kafka's `cleanup.policy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum CleanupPolicy {
    /// Retention removes the oldest batches by age and size.
    #[default]
    #[serde(rename = "delete")]
    Delete,
    /// The cleaner keeps the latest record of each key, for ever; retention
    /// limits do not apply.
    #[serde(rename = "compact")]
    Compact,
    /// Both: compacted, and retention removes what is too old or too much.
    #[serde(rename = "compact,delete")]
    CompactDelete,
    /// Both, as [`CleanupPolicy::CompactDelete`], given in the other order
    /// (kept so that it reads back as it was written, as Kafka's list does).
    #[serde(rename = "delete,compact")]
    DeleteCompact,
}

impl CleanupPolicy {
    /// Kafka's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            CleanupPolicy::Delete => "delete",
            CleanupPolicy::Compact => "compact",
            CleanupPolicy::CompactDelete => "compact,delete",
            CleanupPolicy::DeleteCompact => "delete,compact",
        }
    }

    /// Parses Kafka's spelling (a list of `delete` and `compact`, in any
    /// order, spaces allowed; the order of their first mentions is kept).
    pub fn parse(s: &str) -> Option<CleanupPolicy> {
        let mut first = None;
        let (mut compact, mut delete) = (false, false);
        for part in s.split(',').map(str::trim) {
            match part {
                "compact" => compact = true,
                "delete" => delete = true,
                _ => return None,
            }
            first.get_or_insert(part == "compact");
        }
        match (compact, delete) {
            (true, true) if first == Some(true) => Some(CleanupPolicy::CompactDelete),
            (true, true) => Some(CleanupPolicy::DeleteCompact),
            (true, false) => Some(CleanupPolicy::Compact),
            (false, true) => Some(CleanupPolicy::Delete),
            (false, false) => None,
        }
    }

    /// Is the topic compacted?
    pub fn compacts(self) -> bool {
        self != CleanupPolicy::Delete
    }

    /// Do the retention limits apply?
    pub fn deletes(self) -> bool {
        self != CleanupPolicy::Compact
    }
}

/// Kafka's default `delete.retention.ms`: a day.
pub const DEFAULT_DELETE_RETENTION_MS: u64 = 86_400_000;
/// Kafka's default `min.cleanable.dirty.ratio`.
pub const DEFAULT_MIN_CLEANABLE_DIRTY_RATIO: f64 = 0.5;

fn default_delete_retention_ms() -> u64 {
    DEFAULT_DELETE_RETENTION_MS
}

fn default_dirty_ratio() -> f64 {
    DEFAULT_MIN_CLEANABLE_DIRTY_RATIO
}

/// A topic's settings, persisted with the topic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TopicConfig {
    /// `[A-Za-z0-9._-]{1,249}`.
    pub name: String,
    /// Fixed at creation.
    pub partitions: u32,
    /// Remove batches whose newest event is older than this (ms).
    pub retention_ms: Option<u64>,
    /// Keep each partition at most this many bytes (oldest batches go first).
    pub retention_bytes: Option<u64>,
    /// Largest single event (key + value + headers).
    pub max_event_bytes: usize,
    /// Policy when the disk quota is reached.
    pub on_full: OnFull,
    /// Retention, compaction or both.
    #[serde(default)]
    pub cleanup_policy: CleanupPolicy,
    /// How long a tombstone stays after the cleaner first kept it (so
    /// consumers behind see the deletion), in ms.
    #[serde(default = "default_delete_retention_ms")]
    pub delete_retention_ms: u64,
    /// Records younger than this (ms) are not compacted.
    #[serde(default)]
    pub min_compaction_lag_ms: u64,
    /// A record older than this (ms) is compacted even when the partition's
    /// dirty ratio is low; `None`: no limit.
    #[serde(default)]
    pub max_compaction_lag_ms: Option<u64>,
    /// The share of a partition's bytes written since its last pass that
    /// starts a pass (0..=1).
    #[serde(default = "default_dirty_ratio")]
    pub min_cleanable_dirty_ratio: f64,
    /// The topic's id (Kafka's topic id: random, given when the topic is
    /// created); all zero for a topic created before topics had ids.
    #[serde(default, deserialize_with = "added_later")]
    pub id: [u8; 16],
    /// The settings given explicitly, by their Kafka config names
    /// (`retention.ms`): Kafka's DescribeConfigs reports them as the topic's
    /// own even when they equal the node's default.
    #[serde(default, deserialize_with = "added_later")]
    pub explicit: BTreeSet<String>,
}

/// A field added at the end of [`TopicConfig`]'s stored form. A config
/// written before it existed ends where the field would start: postcard
/// has no optional trailing fields, but a config is the last thing in what
/// holds it (the store's value, a cluster's stored entry, a snapshot's
/// item), so the end of the input there reads as the default. (Those are
/// written whole and checked: sled's log, the snapshot's checksums.)
fn added_later<'de, D, T>(d: D) -> std::result::Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    match T::deserialize(d) {
        Err(e) if e.to_string() == postcard::Error::DeserializeUnexpectedEnd.to_string() => {
            Ok(T::default())
        }
        other => other,
    }
}

/// [`TopicConfig`] as stored before compaction settings existed.
#[derive(Deserialize)]
#[cfg_attr(test, derive(Serialize))]
struct StoredV1 {
    name: String,
    partitions: u32,
    retention_ms: Option<u64>,
    retention_bytes: Option<u64>,
    max_event_bytes: usize,
    on_full: OnFull,
}

impl From<StoredV1> for TopicConfig {
    fn from(v1: StoredV1) -> TopicConfig {
        TopicConfig {
            retention_ms: v1.retention_ms,
            retention_bytes: v1.retention_bytes,
            max_event_bytes: v1.max_event_bytes,
            on_full: v1.on_full,
            ..TopicConfig::new(v1.name, v1.partitions)
        }
    }
}

/// Reads a stored topic config, in any of its layouts (the newest first).
pub(crate) fn decode_stored(bytes: &[u8]) -> std::result::Result<TopicConfig, postcard::Error> {
    postcard::from_bytes::<TopicConfig>(bytes).or_else(|current| {
        postcard::from_bytes::<StoredV1>(bytes)
            .map(TopicConfig::from)
            .map_err(|_| current)
    })
}

impl TopicConfig {
    /// A topic with `partitions` partitions and default limits.
    pub fn new(name: impl Into<String>, partitions: u32) -> Self {
        TopicConfig {
            name: name.into(),
            partitions,
            retention_ms: None,
            retention_bytes: None,
            max_event_bytes: 1024 * 1024,
            on_full: OnFull::Reject,
            cleanup_policy: CleanupPolicy::Delete,
            delete_retention_ms: DEFAULT_DELETE_RETENTION_MS,
            min_compaction_lag_ms: 0,
            max_compaction_lag_ms: None,
            min_cleanable_dirty_ratio: DEFAULT_MIN_CLEANABLE_DIRTY_RATIO,
            id: [0; 16],
            explicit: BTreeSet::new(),
        }
    }

    /// Checks every rule and reports all that fail.
    pub fn validate(&self) -> Result<()> {
        let mut problems = Vec::new();
        if let Err(e) = validate_name(&self.name) {
            problems.push(e.to_string());
        }
        if self.partitions == 0 || self.partitions > MAX_PARTITIONS {
            problems.push(format!(
                "partitions must be 1..={MAX_PARTITIONS}, got {}",
                self.partitions
            ));
        }
        if self.retention_ms == Some(0) {
            problems.push("retention_ms must be positive (omit it to keep events forever)".into());
        }
        if self.retention_bytes == Some(0) {
            problems.push("retention_bytes must be positive (omit it for no size limit)".into());
        }
        if self.max_event_bytes == 0 || self.max_event_bytes > MAX_EVENT_BYTES_LIMIT {
            problems.push(format!(
                "max_event_bytes must be 1..={MAX_EVENT_BYTES_LIMIT}, got {}",
                self.max_event_bytes
            ));
        }
        if !(0.0..=1.0).contains(&self.min_cleanable_dirty_ratio) {
            problems.push(format!(
                "min_cleanable_dirty_ratio must be 0..=1, got {}",
                self.min_cleanable_dirty_ratio
            ));
        }
        if self.max_compaction_lag_ms == Some(0) {
            problems.push("max_compaction_lag_ms must be positive (omit it for none)".into());
        }
        if let Some(max) = self.max_compaction_lag_ms {
            if max < self.min_compaction_lag_ms {
                problems.push(format!(
                    "max_compaction_lag_ms ({max}) is below min_compaction_lag_ms ({})",
                    self.min_compaction_lag_ms
                ));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(Error::InvalidTopic(problems.join("; ")))
        }
    }
}

/// A change to a topic's settings: each field that is `Some` is set, the
/// others stay. For the optional limits, `Some(None)` removes the limit (in
/// JSON: `"retention_ms": null`). Partitions can only be added.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicChange {
    /// The new partition count (more than now).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partitions: Option<u32>,
    /// The new age limit, or `Some(None)` for none.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub retention_ms: Option<Option<u64>>,
    /// The new size limit per partition, or `Some(None)` for none.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub retention_bytes: Option<Option<u64>>,
    /// The new largest event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_event_bytes: Option<usize>,
    /// The new policy when the disk quota is reached.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_full: Option<OnFull>,
    /// Retention, compaction or both.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cleanup_policy: Option<CleanupPolicy>,
    /// How long tombstones stay (ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delete_retention_ms: Option<u64>,
    /// Records younger than this are not compacted (ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_compaction_lag_ms: Option<u64>,
    /// Records older than this are compacted whatever the dirty ratio, or
    /// `Some(None)` for no limit.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_compaction_lag_ms: Option<Option<u64>>,
    /// The dirty ratio that starts a pass.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_cleanable_dirty_ratio: Option<f64>,
    /// The settings given explicitly from now on (see
    /// [`TopicConfig::explicit`]); Kafka's admin requests set it, JSON
    /// cannot.
    #[serde(skip)]
    pub explicit: Option<BTreeSet<String>>,
}

/// A field that is present, even as `null`, is `Some`.
fn present<'de, D, T>(d: D) -> std::result::Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

impl TopicChange {
    /// `config` with this change, validated: partitions may only grow.
    pub fn applied_to(&self, config: &TopicConfig) -> Result<TopicConfig> {
        let mut c = config.clone();
        if let Some(p) = self.partitions {
            if p < config.partitions {
                return Err(Error::InvalidTopic(format!(
                    "topic `{}` has {} partitions; partitions can be added, not removed (asked for {p})",
                    config.name, config.partitions
                )));
            }
            c.partitions = p;
        }
        if let Some(v) = self.retention_ms {
            c.retention_ms = v;
        }
        if let Some(v) = self.retention_bytes {
            c.retention_bytes = v;
        }
        if let Some(v) = self.max_event_bytes {
            c.max_event_bytes = v;
        }
        if let Some(v) = self.on_full {
            c.on_full = v;
        }
        if let Some(v) = self.cleanup_policy {
            c.cleanup_policy = v;
        }
        if let Some(v) = self.delete_retention_ms {
            c.delete_retention_ms = v;
        }
        if let Some(v) = self.min_compaction_lag_ms {
            c.min_compaction_lag_ms = v;
        }
        if let Some(v) = self.max_compaction_lag_ms {
            c.max_compaction_lag_ms = v;
        }
        if let Some(v) = self.min_cleanable_dirty_ratio {
            c.min_cleanable_dirty_ratio = v;
        }
        if let Some(v) = &self.explicit {
            c.explicit = v.clone();
        }
        c.validate()?;
        Ok(c)
    }
}

/// Topic names follow Kafka's rules: 1..=249 of `[A-Za-z0-9._-]`. A name
/// that breaks them is an [`Error::InvalidName`] saying how.
pub fn validate_name(name: &str) -> Result<()> {
    if name.is_empty() || name.len() > 249 {
        return Err(Error::InvalidName(format!(
            "topic name must be 1..=249 characters, got {}",
            name.len()
        )));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(Error::InvalidName(format!(
            "topic name `{name}` has `{c}`; allowed are A-Z a-z 0-9 . _ -"
        )));
    }
    if name == "." || name == ".." {
        return Err(Error::InvalidName(
            "topic name may not be `.` or `..`".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(validate_name("sensors.temp-1_a").is_ok());
        assert!(validate_name(&"a".repeat(249)).is_ok());
        assert!(validate_name(&"a".repeat(250)).is_err());
        assert!(validate_name("").is_err());
        assert!(validate_name("a/b").is_err());
        assert!(validate_name("ä").is_err());
        assert!(validate_name("..").is_err());
    }

    #[test]
    fn validate_collects_every_problem() {
        let mut c = TopicConfig::new("bad name", 0);
        c.retention_ms = Some(0);
        let Err(Error::InvalidTopic(msg)) = c.validate() else {
            panic!("expected invalid")
        };
        assert!(msg.contains("topic name"), "{msg}");
        assert!(msg.contains("partitions"), "{msg}");
        assert!(msg.contains("retention_ms"), "{msg}");
        assert!(TopicConfig::new("ok", 3).validate().is_ok());
    }

    #[test]
    fn a_change_sets_what_it_names_and_partitions_only_grow() {
        let mut c = TopicConfig::new("t", 2);
        c.retention_ms = Some(1000);
        let change: TopicChange = serde_json::from_str(
            r#"{"partitions": 4, "retention_ms": null, "retention_bytes": 10}"#,
        )
        .expect("json");
        let after = change.applied_to(&c).expect("valid");
        assert_eq!(after.partitions, 4);
        assert_eq!(after.retention_ms, None);
        assert_eq!(after.retention_bytes, Some(10));
        assert_eq!(after.max_event_bytes, c.max_event_bytes);
        let absent: TopicChange = serde_json::from_str("{}").expect("json");
        assert_eq!(absent, TopicChange::default());
        assert_eq!(absent.applied_to(&c).expect("valid"), c);
        let shrink = TopicChange {
            partitions: Some(1),
            ..TopicChange::default()
        };
        let Err(Error::InvalidTopic(msg)) = shrink.applied_to(&c) else {
            panic!("partitions shrank")
        };
        assert!(msg.contains("added, not removed"), "{msg}");
        let zero = TopicChange {
            retention_bytes: Some(Some(0)),
            ..TopicChange::default()
        };
        assert!(zero.applied_to(&c).is_err());
        assert!(serde_json::from_str::<TopicChange>(r#"{"name": "x"}"#).is_err());
        assert!(serde_json::from_str::<TopicChange>(r#"{"explicit": []}"#).is_err());
    }

    #[test]
    fn a_cleanup_policy_keeps_the_order_it_was_given_in() {
        for (given, kept) in [
            ("compact,delete", "compact,delete"),
            ("delete, compact", "delete,compact"),
            ("delete,compact,delete", "delete,compact"),
            ("compact", "compact"),
        ] {
            let p = CleanupPolicy::parse(given).expect("valid");
            assert_eq!(p.as_str(), kept);
            assert!(p.compacts());
            let json = serde_json::to_string(&p).expect("json");
            assert_eq!(serde_json::from_str::<CleanupPolicy>(&json).ok(), Some(p));
        }
        let both = CleanupPolicy::parse("delete,compact").expect("valid");
        assert!(both.compacts() && both.deletes());
        assert_eq!(CleanupPolicy::parse("delete,nope"), None);
        assert_eq!(CleanupPolicy::parse(""), None);
    }

    #[test]
    fn topic_configs_stored_in_every_earlier_layout_are_read() {
        #[derive(Serialize)]
        struct V2 {
            v1: StoredV1,
            cleanup_policy: CleanupPolicy,
            delete_retention_ms: u64,
            min_compaction_lag_ms: u64,
            max_compaction_lag_ms: Option<u64>,
            min_cleanable_dirty_ratio: f64,
        }
        let v1 = StoredV1 {
            name: "old".into(),
            partitions: 3,
            retention_ms: Some(5),
            retention_bytes: None,
            max_event_bytes: 77,
            on_full: OnFull::DropOldest,
        };
        let bytes = postcard::to_stdvec(&v1).expect("encode");
        let c = decode_stored(&bytes).expect("v1");
        assert_eq!(
            (c.name.as_str(), c.partitions, c.retention_ms),
            ("old", 3, Some(5))
        );
        assert_eq!((c.max_event_bytes, c.on_full), (77, OnFull::DropOldest));
        assert_eq!(c.cleanup_policy, CleanupPolicy::Delete);
        let v2 = V2 {
            v1,
            cleanup_policy: CleanupPolicy::Compact,
            delete_retention_ms: 9,
            min_compaction_lag_ms: 8,
            max_compaction_lag_ms: Some(70),
            min_cleanable_dirty_ratio: 0.25,
        };
        let bytes = postcard::to_stdvec(&v2).expect("encode");
        let c = decode_stored(&bytes).expect("v2");
        assert_eq!((c.name.as_str(), c.max_event_bytes), ("old", 77));
        assert_eq!(c.cleanup_policy, CleanupPolicy::Compact);
        assert_eq!((c.delete_retention_ms, c.min_compaction_lag_ms), (9, 8));
        assert_eq!(c.max_compaction_lag_ms, Some(70));
        assert_eq!(c.min_cleanable_dirty_ratio, 0.25);
        assert_eq!((c.id, c.explicit.len()), ([0; 16], 0));
        let mut now = TopicConfig::new("new", 2);
        now.id = [7; 16];
        now.explicit.insert("retention.ms".into());
        now.cleanup_policy = CleanupPolicy::DeleteCompact;
        let bytes = postcard::to_stdvec(&now).expect("encode");
        assert_eq!(decode_stored(&bytes).expect("current"), now);
        // A cluster's entry written before ids: the config is its tail.
        let mut old = now.clone();
        old.id = [0; 16];
        old.explicit.clear();
        let op = crate::Op::CreateTopic(old.clone());
        let bytes = postcard::to_stdvec(&op).expect("encode");
        let before_ids = &bytes[..bytes.len() - 17];
        match postcard::from_bytes::<crate::Op>(before_ids) {
            Ok(crate::Op::CreateTopic(read)) => assert_eq!(read, old),
            other => panic!("{other:?}"),
        }
        // Cut before the last layout's fields: damage, not a default.
        assert!(postcard::from_bytes::<crate::Op>(&bytes[..bytes.len() - 20]).is_err());
    }
}
