//! Events as producers hand them in, and records as consumers read them back.

/// One event: Kafka's record without the offset.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Event {
    /// Optional key; decides the partition when present.
    pub key: Option<Vec<u8>>,
    /// The payload; `None` is a null value (Kafka's tombstone), which is
    /// not the same as an empty one.
    pub value: Option<Vec<u8>>,
    /// Milliseconds since the Unix epoch. `None` on input means "stamp at ingest".
    pub timestamp: Option<i64>,
    /// Ordered headers; names may repeat.
    pub headers: Vec<(String, Vec<u8>)>,
}

impl Event {
    /// An event with only a value.
    pub fn new(value: impl Into<Vec<u8>>) -> Self {
        Event {
            value: Some(value.into()),
            ..Event::default()
        }
    }

    /// An event with a null value (a tombstone: a key's value removed).
    pub fn null() -> Self {
        Event::default()
    }

    /// The value's bytes; a null value reads as empty.
    pub fn bytes(&self) -> &[u8] {
        self.value.as_deref().unwrap_or_default()
    }

    /// Builder: set the key.
    pub fn with_key(mut self, key: impl Into<Vec<u8>>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Builder: add a header.
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Builder: set the timestamp (ms since epoch).
    pub fn with_timestamp(mut self, ts: i64) -> Self {
        self.timestamp = Some(ts);
        self
    }

    /// Bytes this event counts against `max_event_bytes`: key, value and headers.
    pub fn size(&self) -> usize {
        self.key.as_ref().map_or(0, Vec::len)
            + self.value.as_ref().map_or(0, Vec::len)
            + self
                .headers
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>()
    }
}

/// An event as stored: offset assigned, timestamp always set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Partition it lives in.
    pub partition: u32,
    /// Offset within the partition.
    pub offset: u64,
    /// Key, if any.
    pub key: Option<Vec<u8>>,
    /// Payload; `None` is a null value.
    pub value: Option<Vec<u8>>,
    /// Milliseconds since the Unix epoch.
    pub timestamp: i64,
    /// Ordered headers.
    pub headers: Vec<(String, Vec<u8>)>,
}

impl Record {
    /// The value's bytes; a null value reads as empty (for protocols whose
    /// payloads cannot be null: MQTT, AMQP, WebSocket frames).
    pub fn bytes(&self) -> &[u8] {
        self.value.as_deref().unwrap_or_default()
    }
}

/// An event to append, optionally pinned to a partition.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AppendRecord {
    /// Explicit partition; otherwise the key (murmur2) or round-robin decides.
    pub partition: Option<u32>,
    /// The event.
    pub event: Event,
}

impl From<Event> for AppendRecord {
    fn from(event: Event) -> Self {
        AppendRecord {
            partition: None,
            event,
        }
    }
}

/// Where an appended event landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    /// Partition.
    pub partition: u32,
    /// Offset.
    pub offset: u64,
}
