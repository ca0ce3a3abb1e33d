//! AMQP messages ↔ log events (`docs/contract.md`, section 5).
//!
//! - `basic.publish(exchange E, routing key R)` → topic E, or R on the default
//!   exchange; key R (none when R is empty).
//! - `properties.headers` → headers by name. Field values become bytes: strings
//!   as they are, numbers and booleans as their text, tables and arrays as JSON.
//!   A header whose name we use ourselves is kept as `amqp.header.<name>`.
//! - `content-type` is the shared header name (MQTT 5 and HTTP use it too); the
//!   other properties become `amqp.<property>` headers; `timestamp` (seconds)
//!   becomes the event timestamp.
//!
//! The bridge forwards records back out with [`properties_for`], the inverse:
//! header values go out as long strings (the log keeps bytes, not AMQP types).

use amq_protocol::protocol::basic::AMQPProperties;
use amq_protocol::types::{AMQPValue, FieldTable, LongString};
use tributary_storage::Event;

use super::frame::short;

pub use tributary_ingest::mapping::amqp_header as header;

/// The log topic a publish goes to: the exchange, or the routing key on the
/// default exchange.
pub fn topic_of<'a>(exchange: &'a str, routing_key: &'a str) -> &'a str {
    if exchange.is_empty() {
        routing_key
    } else {
        exchange
    }
}

/// The event for a message published with `routing_key`.
pub fn event_from(routing_key: &str, props: &AMQPProperties, body: Vec<u8>) -> Event {
    let mut headers = Vec::new();
    if let Some(v) = props.content_type() {
        headers.push((
            header::CONTENT_TYPE.to_owned(),
            v.as_str().as_bytes().to_vec(),
        ));
    }
    let text = [
        (header::CONTENT_ENCODING, props.content_encoding()),
        (header::CORRELATION_ID, props.correlation_id()),
        (header::REPLY_TO, props.reply_to()),
        (header::EXPIRATION, props.expiration()),
        (header::MESSAGE_ID, props.message_id()),
        (header::TYPE, props.kind()),
        (header::USER_ID, props.user_id()),
        (header::APP_ID, props.app_id()),
    ];
    for (name, value) in text {
        if let Some(v) = value {
            headers.push((name.to_owned(), v.as_str().as_bytes().to_vec()));
        }
    }
    for (name, value) in [
        (header::DELIVERY_MODE, props.delivery_mode()),
        (header::PRIORITY, props.priority()),
    ] {
        if let Some(v) = value {
            headers.push((name.to_owned(), v.to_string().into_bytes()));
        }
    }
    if let Some(table) = props.headers() {
        for (name, value) in table {
            let name = name.as_str();
            let name = if header::reserved(name) {
                format!("{}{name}", header::USER_PREFIX)
            } else {
                name.to_owned()
            };
            headers.push((name, value_bytes(value)));
        }
    }
    let timestamp = props
        .timestamp()
        .and_then(|s| i64::try_from(s).ok())
        .and_then(|s| s.checked_mul(1000));
    Event {
        key: (!routing_key.is_empty()).then(|| routing_key.as_bytes().to_vec()),
        value: Some(body),
        timestamp,
        headers,
    }
}

/// A field value as header bytes.
fn value_bytes(v: &AMQPValue) -> Vec<u8> {
    match v {
        AMQPValue::LongString(s) => s.as_bytes().to_vec(),
        AMQPValue::ShortString(s) => s.as_str().as_bytes().to_vec(),
        AMQPValue::ByteArray(b) => b.as_slice().to_vec(),
        AMQPValue::Void => Vec::new(),
        other => match to_json(other) {
            serde_json::Value::String(s) => s.into_bytes(),
            json => json.to_string().into_bytes(),
        },
    }
}

/// A field value as JSON (tables become objects, arrays arrays).
fn to_json(v: &AMQPValue) -> serde_json::Value {
    use serde_json::Value as J;
    match v {
        AMQPValue::Boolean(b) => J::Bool(*b),
        AMQPValue::ShortShortInt(n) => J::from(*n),
        AMQPValue::ShortShortUInt(n) => J::from(*n),
        AMQPValue::ShortInt(n) => J::from(*n),
        AMQPValue::ShortUInt(n) => J::from(*n),
        AMQPValue::LongInt(n) => J::from(*n),
        AMQPValue::LongUInt(n) => J::from(*n),
        AMQPValue::LongLongInt(n) => J::from(*n),
        AMQPValue::Timestamp(n) => J::from(*n),
        AMQPValue::Float(f) => J::from(f64::from(*f)),
        AMQPValue::Double(f) => J::from(*f),
        AMQPValue::DecimalValue(d) => {
            // value × 10^-scale, as text so no precision is lost.
            let digits = d.value.to_string();
            let scale = usize::from(d.scale);
            if scale == 0 {
                J::String(digits)
            } else {
                let padded = format!("{digits:0>width$}", width = scale + 1);
                let (int, frac) = padded.split_at(padded.len() - scale);
                J::String(format!("{int}.{frac}"))
            }
        }
        AMQPValue::ShortString(s) => J::String(s.as_str().to_owned()),
        AMQPValue::LongString(s) => J::String(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ByteArray(b) => J::String(String::from_utf8_lossy(b.as_slice()).into_owned()),
        AMQPValue::FieldArray(a) => J::Array(a.as_slice().iter().map(to_json).collect()),
        AMQPValue::FieldTable(t) => J::Object(
            t.into_iter()
                .map(|(k, v)| (k.as_str().to_owned(), to_json(v)))
                .collect(),
        ),
        AMQPValue::Void => J::Null,
    }
}

/// The properties to send a stored record out with (the bridge to RabbitMQ).
pub fn properties_for(headers: &[(String, Vec<u8>)], timestamp_ms: i64) -> AMQPProperties {
    let mut props = AMQPProperties::default().with_delivery_mode(2);
    let mut table = FieldTable::default();
    let text = |v: &[u8]| short(&String::from_utf8_lossy(v));
    for (name, value) in headers {
        props = match name.as_str() {
            header::CONTENT_TYPE => props.with_content_type(text(value)),
            header::CONTENT_ENCODING => props.with_content_encoding(text(value)),
            header::CORRELATION_ID => props.with_correlation_id(text(value)),
            header::REPLY_TO => props.with_reply_to(text(value)),
            header::EXPIRATION => props.with_expiration(text(value)),
            header::MESSAGE_ID => props.with_message_id(text(value)),
            header::TYPE => props.with_type(text(value)),
            header::USER_ID => props.with_user_id(text(value)),
            header::APP_ID => props.with_app_id(text(value)),
            header::DELIVERY_MODE | header::PRIORITY => {
                let n = std::str::from_utf8(value)
                    .ok()
                    .and_then(|s| s.parse::<u8>().ok());
                match (name.as_str(), n) {
                    (header::DELIVERY_MODE, Some(n)) => props.with_delivery_mode(n),
                    (_, Some(n)) => props.with_priority(n),
                    _ => props,
                }
            }
            other => {
                let name = other.strip_prefix(header::USER_PREFIX).unwrap_or(other);
                table.insert(
                    short(name),
                    AMQPValue::LongString(LongString::from(value.clone())),
                );
                props
            }
        };
    }
    if !table.inner().is_empty() {
        props = props.with_headers(table);
    }
    if let Ok(secs) = u64::try_from(timestamp_ms / 1000) {
        props = props.with_timestamp(secs);
    }
    props
}

#[cfg(test)]
mod tests {
    use super::*;
    use amq_protocol::types::{DecimalValue, FieldArray};

    fn header<'a>(e: &'a Event, name: &str) -> Option<&'a [u8]> {
        e.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
    }

    #[test]
    fn properties_and_headers_become_event_headers() {
        let mut table = FieldTable::default();
        table.insert("n".into(), AMQPValue::LongInt(-7));
        table.insert("s".into(), AMQPValue::LongString("text".into()));
        table.insert("ok".into(), AMQPValue::Boolean(true));
        table.insert(
            "price".into(),
            AMQPValue::DecimalValue(DecimalValue {
                scale: 3,
                value: 1505,
            }),
        );
        table.insert(
            "list".into(),
            AMQPValue::FieldArray(FieldArray::from(vec![
                AMQPValue::ShortUInt(1),
                AMQPValue::LongString("x".into()),
            ])),
        );
        table.insert("content-type".into(), AMQPValue::LongString("spoof".into()));
        let props = AMQPProperties::default()
            .with_content_type("application/json".into())
            .with_message_id("m-1".into())
            .with_delivery_mode(2)
            .with_timestamp(1_700_000_000)
            .with_headers(table);
        let e = event_from("sensors.a", &props, b"{}".to_vec());
        assert_eq!(e.key.as_deref(), Some(&b"sensors.a"[..]));
        assert_eq!(e.timestamp, Some(1_700_000_000_000));
        assert_eq!(header(&e, "content-type"), Some(&b"application/json"[..]));
        assert_eq!(header(&e, "amqp.message_id"), Some(&b"m-1"[..]));
        assert_eq!(header(&e, "amqp.delivery_mode"), Some(&b"2"[..]));
        assert_eq!(header(&e, "n"), Some(&b"-7"[..]));
        assert_eq!(header(&e, "s"), Some(&b"text"[..]));
        assert_eq!(header(&e, "ok"), Some(&b"true"[..]));
        assert_eq!(header(&e, "price"), Some(&b"1.505"[..]));
        assert_eq!(header(&e, "list"), Some(&br#"[1,"x"]"#[..]));
        assert_eq!(header(&e, "amqp.header.content-type"), Some(&b"spoof"[..]));
    }

    #[test]
    fn amqp_headers_cannot_claim_or_repeat_a_reserved_name() {
        // The HTTP and WebSocket front ends refuse a record repeating a
        // reserved header; over AMQP no publisher can produce one: table
        // names are unique and reserved ones are renamed, even when the
        // renamed form is sent as well.
        let mut table = FieldTable::default();
        for name in ["mqtt.topic", "amqp.header.mqtt.topic", "content-type"] {
            table.insert(name.into(), AMQPValue::LongString("private/cmd".into()));
        }
        let props = AMQPProperties::default()
            .with_content_type("text/plain".into())
            .with_headers(table);
        let e = event_from("sensors.a", &props, Vec::new());
        assert_eq!(header(&e, "mqtt.topic"), None);
        let mut names: Vec<&str> = e.headers.iter().map(|(n, _)| n.as_str()).collect();
        let all = names.len();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), all, "{names:?}");
    }

    #[test]
    fn empty_routing_key_means_no_key() {
        let e = event_from("", &AMQPProperties::default(), Vec::new());
        assert_eq!(e.key, None);
        assert!(e.headers.is_empty());
        assert_eq!(topic_of("", "q"), "q");
        assert_eq!(topic_of("ex", "q"), "ex");
    }

    #[test]
    fn records_go_back_out_with_their_properties() {
        let props = AMQPProperties::default()
            .with_content_type("text/plain".into())
            .with_message_id("m-2".into())
            .with_priority(3)
            .with_timestamp(1_700_000_001);
        let mut table = FieldTable::default();
        table.insert("site".into(), AMQPValue::LongString("north".into()));
        table.insert("amqp.x".into(), AMQPValue::LongString("kept".into()));
        let props = props.with_headers(table);
        let e = event_from("k", &props, b"v".to_vec());
        let back = properties_for(&e.headers, e.timestamp.unwrap_or(0));
        assert_eq!(
            back.content_type().as_ref().map(|s| s.as_str()),
            Some("text/plain")
        );
        assert_eq!(back.message_id().as_ref().map(|s| s.as_str()), Some("m-2"));
        assert_eq!(*back.priority(), Some(3));
        assert_eq!(*back.timestamp(), Some(1_700_000_001));
        let h = back.headers().clone().unwrap_or_default();
        assert_eq!(
            h.inner().get("site"),
            Some(&AMQPValue::LongString("north".into()))
        );
        assert_eq!(
            h.inner().get("amqp.x"),
            Some(&AMQPValue::LongString("kept".into()))
        );
    }
}
