//! Topic configuration and its validation.

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

/// A topic's settings, persisted with the topic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
        if problems.is_empty() {
            Ok(())
        } else {
            Err(Error::InvalidTopic(problems.join("; ")))
        }
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
}
