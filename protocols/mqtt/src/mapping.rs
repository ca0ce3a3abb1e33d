//! The MQTT ↔ log mapping: the headers a PUBLISH leaves on its event
//! ([`header`]), the event a PUBLISH (or a will) becomes ([`event_for`]), what
//! a stored record looks like to an MQTT subscriber ([`delivery_of`]), and the
//! ACL subjects of a record that arrives other than by MQTT
//! ([`publish_subjects`], [`all_publish_subjects`]). Routing (the log topic
//! and key of an MQTT topic) and the MQTT topic of a stored record are in
//! [`super::topic`].

use bytes::Bytes;
use tributary_storage::{AppendRecord, Event, Record};

use super::codec::MsgProps;
use super::topic::record_topic;

pub use tributary_ingest::mapping::{
    all_publish_subjects, mqtt_header as header, publish_subjects,
};

/// Builds the event a PUBLISH becomes: (log topic, record).
pub fn event_for(
    (log_topic, key): (String, String),
    topic: &str,
    payload: &Bytes,
    qos: u8,
    retain: bool,
    props: &MsgProps,
    publisher: Option<&str>,
) -> (String, AppendRecord) {
    let mut headers = Vec::with_capacity(2 + props.user.len());
    headers.push((header::TOPIC.to_owned(), topic.as_bytes().to_vec()));
    // QoS 1 is the default (records from HTTP and AMQP have no header).
    match qos {
        0 => headers.push((header::QOS.to_owned(), b"0".to_vec())),
        2 => headers.push((header::QOS.to_owned(), b"2".to_vec())),
        _ => {}
    }
    if retain {
        headers.push((header::RETAIN.to_owned(), b"1".to_vec()));
    }
    if let Some(f) = props.payload_format {
        headers.push((
            header::PAYLOAD_FORMAT.to_owned(),
            f.to_string().into_bytes(),
        ));
    }
    if let Some(e) = props.expiry {
        headers.push((header::EXPIRY.to_owned(), e.to_string().into_bytes()));
    }
    if let Some(c) = &props.content_type {
        headers.push((header::CONTENT_TYPE.to_owned(), c.clone().into_bytes()));
    }
    if let Some(r) = &props.response_topic {
        headers.push((header::RESPONSE_TOPIC.to_owned(), r.clone().into_bytes()));
    }
    if let Some(c) = &props.correlation {
        headers.push((header::CORRELATION.to_owned(), c.to_vec()));
    }
    if let Some(c) = publisher {
        headers.push((header::CLIENT.to_owned(), c.as_bytes().to_vec()));
    }
    for (k, v) in &props.user {
        let name = if header::reserved(k) {
            format!("{}{k}", header::USER_PREFIX)
        } else {
            k.clone()
        };
        headers.push((name, v.clone().into_bytes()));
    }
    let event = Event {
        key: Some(key.into_bytes()),
        value: Some(payload.to_vec()),
        timestamp: None,
        headers,
    };
    (log_topic, AppendRecord::from(event))
}

/// A stored record as an MQTT subscriber sees it.
#[derive(Debug)]
pub struct Delivery {
    /// MQTT topic.
    pub topic: String,
    /// QoS it was published with (1 for records from other protocols).
    pub qos: u8,
    /// v5 properties.
    pub props: MsgProps,
    /// The v5 client that published it, when it asked for no-local.
    pub publisher: Option<String>,
}

/// What a stored record looks like to an MQTT subscriber; `None` when its
/// message expiry has passed.
pub fn delivery_of(log_topic: &str, r: &Record, now: i64) -> Option<Delivery> {
    let find = |name: &str| {
        r.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_slice())
    };
    let topic = record_topic(log_topic, r.key.as_deref(), find(header::TOPIC));
    let qos = match find(header::QOS) {
        Some(b"0") => 0,
        Some(b"2") => 2,
        _ => 1,
    };
    let text = |v: &[u8]| String::from_utf8_lossy(v).into_owned();
    let mut props = MsgProps::default();
    let mut publisher = None;
    for (k, v) in &r.headers {
        match k.as_str() {
            header::TOPIC | header::QOS | header::RETAIN => {}
            header::CLIENT => publisher = Some(text(v)),
            header::PAYLOAD_FORMAT => props.payload_format = text(v).parse().ok(),
            header::EXPIRY => {
                if let Ok(e) = text(v).parse::<u32>() {
                    let elapsed = now.saturating_sub(r.timestamp).max(0) / 1000;
                    let left = i64::from(e).saturating_sub(elapsed);
                    if left <= 0 {
                        return None;
                    }
                    props.expiry = Some(left as u32);
                }
            }
            header::CONTENT_TYPE => props.content_type = Some(text(v)),
            header::RESPONSE_TOPIC => props.response_topic = Some(text(v)),
            header::CORRELATION => props.correlation = Some(Bytes::from(v.clone())),
            other => {
                let name = other.strip_prefix(header::USER_PREFIX).unwrap_or(other);
                props.user.push((name.to_owned(), text(v)));
            }
        }
    }
    Some(Delivery {
        topic,
        qos,
        props,
        publisher,
    })
}
