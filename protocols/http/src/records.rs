//! JSON shapes of records: what producers send and what fetch returns.
//!
//! Produce: `{"records": [{"key", "value", "headers", "timestamp", "partition",
//! "encoding"}]}`. `encoding` says how to read `value` (and `key` and header values):
//! - `"json"` (default): `value` is any JSON value, stored as its exact JSON text;
//! - `"string"`: `value` is a JSON string, stored as its UTF-8 bytes (no quotes);
//! - `"base64"`: `value`, `key` and header values are base64 of the raw bytes.
//!
//! `headers` is an object `{"name": "value"}` or an ordered array
//! `[{"key": "name", "value": "value"}]` (names may repeat, except the reserved
//! names the gateway reads: `mqtt.*`, `amqp.*`, `content-type`).
//!
//! Fetch with `format=json` gives `value` as JSON where the bytes are JSON, else as
//! a string where UTF-8, else base64 with `"encoding": "base64"` on that record
//! (which then applies to its key too). `format=binary` gives key and value
//! base64 always, with `"encoding": "base64"`.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tributary_storage::{AppendRecord, Event, Record};

use crate::error::ApiError;

/// How a produced record's fields are encoded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    /// Value is JSON, stored as its text.
    #[default]
    Json,
    /// Value is a JSON string, stored as its UTF-8 bytes.
    String,
    /// Key, value and header values are base64.
    Base64,
}

/// The produce request body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProduceBody<'a> {
    /// Records to append.
    #[serde(borrow)]
    pub records: Vec<ProduceRecord<'a>>,
}

/// One record of a produce request.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProduceRecord<'a> {
    key: Option<String>,
    /// Absent: an empty value; `null`: a null value (a tombstone).
    #[serde(default, borrow, deserialize_with = "present")]
    value: Option<Option<&'a RawValue>>,
    headers: Option<HeadersIn>,
    timestamp: Option<i64>,
    partition: Option<u32>,
    #[serde(default)]
    encoding: Encoding,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum HeadersIn {
    List(Vec<HeaderIn>),
    Map(serde_json::Map<String, serde_json::Value>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HeaderIn {
    key: String,
    value: String,
}

/// A field that is present: `Some(None)` when it is `null`.
fn present<'de, D>(d: D) -> Result<Option<Option<&'de RawValue>>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    let raw = <&'de RawValue as Deserialize>::deserialize(d)?;
    Ok(Some((raw.get() != "null").then_some(raw)))
}

fn decode_b64(what: &str, s: &str) -> Result<Vec<u8>, ApiError> {
    B64.decode(s)
        .map_err(|e| ApiError::bad_request(format!("{what} is not valid base64: {e}")))
}

impl ProduceRecord<'_> {
    /// Turns the JSON record into an event; an error is a 400 `bad_request`
    /// that says which field is wrong.
    pub fn into_append(self) -> Result<AppendRecord, ApiError> {
        let b64 = self.encoding == Encoding::Base64;
        let key = match self.key {
            Some(k) if b64 => Some(decode_b64("key", &k)?),
            Some(k) => Some(k.into_bytes()),
            None => None,
        };
        let value = match (self.value, self.encoding) {
            (None, _) => Some(Vec::new()),
            (Some(None), _) => None,
            (Some(Some(raw)), Encoding::Json) => Some(raw.get().as_bytes().to_vec()),
            (Some(Some(raw)), enc) => {
                let s: String = serde_json::from_str(raw.get()).map_err(|_| {
                    ApiError::bad_request(
                        format!("value must be a JSON string with encoding \"{enc:?}\"")
                            .to_lowercase(),
                    )
                })?;
                Some(if b64 {
                    decode_b64("value", &s)?
                } else {
                    s.into_bytes()
                })
            }
        };
        let mut headers = Vec::new();
        let header_value = |name: &str, v: String| -> Result<Vec<u8>, ApiError> {
            if b64 {
                decode_b64(&format!("header `{name}`"), &v)
            } else {
                Ok(v.into_bytes())
            }
        };
        match self.headers {
            None => {}
            Some(HeadersIn::List(list)) => {
                for h in list {
                    let v = header_value(&h.key, h.value)?;
                    headers.push((h.key, v));
                }
            }
            Some(HeadersIn::Map(map)) => {
                for (name, v) in map {
                    let serde_json::Value::String(v) = v else {
                        return Err(ApiError::bad_request(format!(
                            "header `{name}` must have a string value"
                        )));
                    };
                    let v = header_value(&name, v)?;
                    headers.push((name, v));
                }
            }
        }
        if let Some(name) = repeated_reserved(&headers) {
            return Err(ApiError::bad_request(format!(
                "header `{name}` is given more than once: names the gateway reads (`mqtt.*`, `amqp.*`, `content-type`) may appear once per record"
            )));
        }
        Ok(AppendRecord {
            partition: self.partition,
            event: Event {
                key,
                value,
                timestamp: self.timestamp,
                headers,
            },
        })
    }
}

/// The first header name the gateway gives a meaning to (the MQTT and AMQP
/// front ends' reserved names) that `headers` carry more than once.
///
/// Such a record is refused outright (400 over HTTP, an error answer for
/// that record over a WebSocket), rather than checked occurrence by
/// occurrence: a repeated reserved header has no single meaning (MQTT
/// delivery takes the first `mqtt.topic`, another reader may take the
/// last), so no answer to "which one counts" is safe, and the refusal
/// needs no ACL, so it tells the producer nothing about its rights. The
/// ACL check still looks at every `mqtt.topic` occurrence
/// ([`super::auth::refused_publish`]). AMQP producers cannot repeat a name: a
/// field table's names are unique, and reserved ones are renamed
/// `amqp.header.<name>` (see `amqp::mapping`).
fn repeated_reserved(headers: &[(String, Vec<u8>)]) -> Option<&str> {
    let mut seen = std::collections::HashSet::new();
    headers
        .iter()
        .map(|(name, _)| name.as_str())
        .filter(|name| tributary_ingest::mapping::amqp_header::reserved(name))
        .find(|name| !seen.insert(*name))
}

/// Output format of fetch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// Values as JSON / string / base64, whichever fits.
    #[default]
    Json,
    /// Keys and values always base64.
    Binary,
}

/// The fetch response.
#[derive(Debug, Serialize)]
pub struct FetchOut {
    /// The records read, in offset order.
    pub records: Vec<RecordOut>,
    /// Where the next fetch starts.
    pub next_offset: u64,
    /// The partition's first offset.
    pub start_offset: u64,
    /// The partition's end offset (next to be written).
    pub end_offset: u64,
}

/// A value in fetch output.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum ValueOut {
    /// The stored bytes are JSON: embedded as is.
    Json(Box<RawValue>),
    /// Text or base64 text.
    Text(String),
    /// A null value.
    Null,
}

/// A header in fetch output.
#[derive(Debug, Serialize)]
pub struct HeaderOut {
    key: String,
    value: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    encoding: Option<&'static str>,
}

/// One record in fetch output.
#[derive(Debug, Serialize)]
pub struct RecordOut {
    partition: u32,
    offset: u64,
    key: Option<String>,
    value: ValueOut,
    headers: Vec<HeaderOut>,
    timestamp: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    encoding: Option<&'static str>,
}

impl RecordOut {
    /// Renders a stored record in the chosen format.
    pub fn new(r: Record, format: Format) -> RecordOut {
        let headers = r
            .headers
            .into_iter()
            .map(|(key, v)| match (format, String::from_utf8(v)) {
                (Format::Json, Ok(value)) => HeaderOut {
                    key,
                    value,
                    encoding: None,
                },
                (_, Ok(s)) => HeaderOut {
                    key,
                    value: B64.encode(s),
                    encoding: Some("base64"),
                },
                (_, Err(e)) => HeaderOut {
                    key,
                    value: B64.encode(e.into_bytes()),
                    encoding: Some("base64"),
                },
            })
            .collect();
        let key_text = r
            .key
            .as_ref()
            .map(|k| std::str::from_utf8(k).is_ok())
            .unwrap_or(true);
        let as_json = match &r.value {
            None => Some(ValueOut::Null),
            Some(v) => (format == Format::Json && key_text)
                .then(|| json_or_text(v))
                .flatten(),
        };
        let (key, value, encoding) = match as_json {
            Some(ValueOut::Null) if format != Format::Json || !key_text => {
                (r.key.map(|k| B64.encode(k)), ValueOut::Null, Some("base64"))
            }
            Some(value) => (
                r.key.map(|k| String::from_utf8_lossy(&k).into_owned()),
                value,
                None,
            ),
            None => (
                r.key.map(|k| B64.encode(k)),
                ValueOut::Text(B64.encode(r.value.as_deref().unwrap_or_default())),
                Some("base64"),
            ),
        };
        RecordOut {
            partition: r.partition,
            offset: r.offset,
            key,
            value,
            headers,
            timestamp: r.timestamp,
            encoding,
        }
    }
}

/// Deepest nesting of arrays and objects a value is embedded as JSON with.
/// A response wraps the value in three more levels (object, `records` array,
/// record), so every client that parses with serde_json's default limit of
/// 128 (our own CLI among them), or a browser, can read it back. A deeper
/// value is valid JSON all the same: it is rendered as its text.
pub const MAX_JSON_DEPTH: usize = 100;

fn json_or_text(bytes: &[u8]) -> Option<ValueOut> {
    let text = std::str::from_utf8(bytes).ok()?;
    // Embedded only if a default parser reads it back: `RawValue` accepts
    // numbers no f64 holds (`1e999`), which serde_json's `Value` (and with it
    // many clients) refuses (found by fuzz/fuzz_targets/http_produce.rs).
    if json_depth(bytes) > MAX_JSON_DEPTH
        || serde_json::from_str::<serde_json::Value>(text).is_err()
    {
        return Some(ValueOut::Text(text.to_owned()));
    }
    match serde_json::from_str::<Box<RawValue>>(text) {
        Ok(raw) => Some(ValueOut::Json(raw)),
        Err(_) => Some(ValueOut::Text(text.to_owned())),
    }
}

/// The deepest nesting of `[`/`{` in `bytes`, brackets inside strings not
/// counted; a loop, not a recursion, so any input is safe. Unbalanced input
/// gives some number: the JSON parse after it decides validity.
fn json_depth(bytes: &[u8]) -> usize {
    let (mut depth, mut max, mut in_string, mut escaped) = (0usize, 0usize, false, false);
    for &b in bytes {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                max = max.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    max
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(key: Option<&[u8]>, value: &[u8]) -> Record {
        Record {
            partition: 0,
            offset: 7,
            key: key.map(<[u8]>::to_vec),
            value: Some(value.to_vec()),
            timestamp: 1,
            headers: vec![("h".into(), vec![0xff])],
        }
    }

    fn render(r: Record, f: Format) -> serde_json::Value {
        serde_json::to_value(RecordOut::new(r, f)).expect("serialize")
    }

    #[test]
    fn json_values_are_embedded_text_is_a_string_binary_is_base64() {
        let v = render(record(Some(b"k"), br#"{"t": 21.5}"#), Format::Json);
        assert_eq!(v["value"]["t"], 21.5);
        assert_eq!(v["key"], "k");
        assert!(v.get("encoding").is_none());
        assert_eq!(v["headers"][0]["encoding"], "base64");
        let v = render(record(None, b"plain text"), Format::Json);
        assert_eq!(v["value"], "plain text");
        let v = render(record(Some(b"k"), &[0, 159, 146, 150]), Format::Json);
        assert_eq!(v["encoding"], "base64");
        assert_eq!(v["value"], B64.encode([0, 159, 146, 150]));
        assert_eq!(v["key"], B64.encode("k"));
        let v = render(record(Some(b"k"), b"1"), Format::Binary);
        assert_eq!(v["value"], B64.encode("1"));
    }

    /// Arbitrary stored bytes, deep JSON among them: every format renders
    /// without a panic into JSON that serde_json (limit 128) parses again,
    /// with the bytes recoverable.
    #[test]
    fn any_stored_bytes_render_in_every_format() {
        let deep = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n)).into_bytes();
        let mut values: Vec<Vec<u8>> = vec![
            deep(MAX_JSON_DEPTH),
            deep(MAX_JSON_DEPTH + 1),
            deep(129),
            deep(100_000),
            format!("{}1{}", "{\"a\":".repeat(300), "}".repeat(300)).into_bytes(),
            b"\"[[[[\"".to_vec(),
            b"44e844".to_vec(),
            b"[-1e999, 2]".to_vec(),
            br#"{"s": "]]]]]]", "t": "\\\""}"#.to_vec(),
            Vec::new(),
            vec![0xff, 0xfe],
        ];
        let mut rng = fastrand::Rng::with_seed(23);
        let alphabet = b"[]{}\",:\\ 0123456789truefalsenull\x00\xff";
        for _ in 0..5_000 {
            let len = rng.usize(0..300);
            values.push(
                (0..len)
                    .map(|_| {
                        if rng.bool() {
                            alphabet[rng.usize(..alphabet.len())]
                        } else {
                            rng.u8(..)
                        }
                    })
                    .collect(),
            );
        }
        for value in values {
            for format in [Format::Json, Format::Binary] {
                let out = RecordOut::new(record(Some(b"k"), &value), format);
                let text = serde_json::to_string(&out).expect("renders");
                let v: serde_json::Value =
                    serde_json::from_str(&text).expect("a default serde_json parser reads it");
                let embedded = serde_json::from_slice::<serde_json::Value>(&value)
                    .ok()
                    .filter(|_| json_depth(&value) <= MAX_JSON_DEPTH);
                match (format, v.get("encoding"), embedded) {
                    (Format::Binary, _, _) | (_, Some(_), _) => {
                        let b64 = v["value"].as_str().expect("base64 text");
                        assert_eq!(B64.decode(b64).expect("base64"), value, "{text}");
                    }
                    // Valid JSON: the same value, whitespace aside.
                    (Format::Json, None, Some(stored)) => assert_eq!(v["value"], stored),
                    (Format::Json, None, None) => {
                        let s = v["value"].as_str().expect("text");
                        assert_eq!(s.as_bytes(), &value[..], "{text}");
                    }
                }
            }
        }
    }

    #[test]
    fn depth_ignores_brackets_in_strings() {
        assert_eq!(json_depth(br#"[{"a": "[[[[{{{"}]"#), 2);
        assert_eq!(json_depth(br#"["\"[[[", []]"#), 2);
        assert_eq!(json_depth(b"]]]][["), 2);
    }

    #[test]
    fn produce_encodings() {
        let body = r#"{"records":[
            {"value": {"a": [1, 2]}, "key": "k"},
            {"value": "text", "encoding": "string", "headers": {"x": "y"}},
            {"value": "AAEC", "key": "AQ==", "encoding": "base64", "headers": [{"key": "h", "value": "/w=="}]}
        ]}"#;
        let parsed: ProduceBody = serde_json::from_str(body).expect("parse");
        let recs: Vec<AppendRecord> = parsed
            .records
            .into_iter()
            .map(|r| r.into_append().expect("valid"))
            .collect();
        assert_eq!(recs[0].event.bytes(), br#"{"a": [1, 2]}"#);
        assert_eq!(recs[1].event.bytes(), b"text");
        assert_eq!(recs[1].event.headers, vec![("x".into(), b"y".to_vec())]);
        assert_eq!(recs[2].event.bytes(), [0, 1, 2]);
        assert_eq!(recs[2].event.key, Some(vec![1]));
        assert_eq!(recs[2].event.headers, vec![("h".into(), vec![0xff])]);
    }

    #[test]
    fn bad_produce_fields_are_named() {
        let bad = |json: &str| {
            let parsed: ProduceBody = serde_json::from_str(json).expect("parse");
            parsed
                .records
                .into_iter()
                .next()
                .expect("one")
                .into_append()
                .expect_err("must fail")
                .message
        };
        assert!(bad(r#"{"records":[{"value":"%%%","encoding":"base64"}]}"#).contains("value"));
        assert!(bad(r#"{"records":[{"value":1,"encoding":"string"}]}"#).contains("string"));
        assert!(bad(r#"{"records":[{"value":1,"headers":{"h":2}}]}"#).contains("header `h`"));
        // A reserved name given twice is refused, whatever the values;
        // other names may repeat.
        let twice = |name: &str| {
            format!(
                r#"{{"records":[{{"value":1,"headers":[{{"key":"{name}","value":"a"}},{{"key":"x","value":"b"}},{{"key":"{name}","value":"a"}}]}}]}}"#
            )
        };
        for name in ["mqtt.topic", "mqtt.qos", "content-type", "amqp.reply_to"] {
            assert!(
                bad(&twice(name)).contains(&format!("header `{name}`")),
                "{name}"
            );
        }
        let repeatable = twice("x-trace");
        let parsed: ProduceBody = serde_json::from_str(&repeatable).expect("parse");
        let ok = parsed
            .records
            .into_iter()
            .next()
            .expect("one")
            .into_append();
        assert_eq!(ok.expect("repeatable").event.headers.len(), 3);
    }
}
