//! A connector's configuration: the same JSON in `[[connectors]]` (config
//! file) and `POST /v1/connectors`. Secrets are references — `${env:NAME}`
//! or `${file:PATH}` — resolved when the connector starts and never stored,
//! shown or logged resolved.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// One connector.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConnectorConfig {
    /// Its name: letters, digits, `.`, `_`, `-` (1–100). Also the consumer
    /// group a sink reads as: `connector-<name>`.
    pub name: String,
    /// What it is, with its settings.
    #[serde(flatten)]
    pub kind: Kind,
}

/// The kinds of connector.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Kind {
    /// Webhooks: records POSTed as JSON.
    HttpSink(HttpSink),
}

impl Kind {
    /// The `kind` label.
    pub fn label(&self) -> &'static str {
        match self {
            Kind::HttpSink(_) => "http_sink",
        }
    }

    /// The topics a sink reads.
    pub fn topics(&self) -> &[String] {
        match self {
            Kind::HttpSink(h) => &h.topics,
        }
    }
}

/// Where a sink with no committed position starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Start {
    /// The partition's first record.
    #[default]
    Earliest,
    /// Records written from now on.
    Latest,
}

/// `kind = "http_sink"`: each batch of records is one POST of
/// `{"records": [...]}` (records as `GET .../records` renders them, with
/// `topic`), or with `batch_size = 1` the record object alone; header
/// `Idempotency-Key: <topic>/<partition>/<first offset>-<last offset>`.
/// 2xx delivers; 5xx, 408, 429 and transport errors are retried with
/// backoff (full jitter, `Retry-After` honoured) up to `max_attempts`, other
/// 4xx not at all; what is not delivered goes to the dead-letter topic.
/// At least once: the position is committed after delivery.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct HttpSink {
    /// The topics delivered.
    pub topics: Vec<String>,
    /// `http://` or `https://` URL.
    pub url: String,
    /// Extra request headers; values may be secret references.
    pub headers: BTreeMap<String, String>,
    /// Records per request (1..=10,000).
    pub batch_size: usize,
    /// A request's time limit (ms).
    pub timeout_ms: u64,
    /// Tries of one batch before it goes to the dead-letter topic.
    pub max_attempts: u32,
    /// First retry delay ceiling (ms).
    pub min_backoff_ms: u64,
    /// Largest retry delay (ms); a longer `Retry-After` is cut to it.
    pub max_backoff_ms: u64,
    /// Where undeliverable records go (with headers naming the error and
    /// where they came from); none: `<name>.dead-letter`.
    pub dead_letter_topic: Option<String>,
    /// PEM roots for `https://` (none: the system's).
    pub ca_file: Option<PathBuf>,
    /// Where a partition with no committed position starts.
    pub start: Start,
}

impl Default for HttpSink {
    fn default() -> Self {
        HttpSink {
            topics: Vec::new(),
            url: String::new(),
            headers: BTreeMap::new(),
            batch_size: 100,
            timeout_ms: 10_000,
            max_attempts: 10,
            min_backoff_ms: 200,
            max_backoff_ms: 30_000,
            dead_letter_topic: None,
            ca_file: None,
            start: Start::Earliest,
        }
    }
}

impl HttpSink {
    /// The dead-letter topic of connector `name`.
    pub fn dead_letters(&self, name: &str) -> String {
        self.dead_letter_topic
            .clone()
            .unwrap_or_else(|| format!("{name}.dead-letter"))
    }
}

impl ConnectorConfig {
    /// Parses a connector from JSON, refusing keys it does not know (each
    /// named) and invalid settings.
    pub fn from_json(v: serde_json::Value) -> Result<ConnectorConfig, String> {
        let given: Vec<String> = match &v {
            serde_json::Value::Object(m) => m.keys().cloned().collect(),
            _ => return Err("a connector is a JSON object".into()),
        };
        let config: ConnectorConfig = serde_json::from_value(v).map_err(|e| {
            let e = e.to_string();
            if e.contains("unknown variant") {
                format!("`kind`: {e} (known: http_sink)")
            } else if e.contains("missing field `kind`") {
                "`kind` is missing (known: http_sink)".to_owned()
            } else {
                e
            }
        })?;
        // Every field serializes (no skipping), so a key not in the output
        // is one no field took.
        let known = serde_json::to_value(&config).map_err(|e| e.to_string())?;
        if let Some(unknown) = given.iter().find(|k| known.get(k.as_str()).is_none()) {
            return Err(format!(
                "`{unknown}` is not a setting of a {} connector",
                config.kind.label()
            ));
        }
        config.validate()?;
        Ok(config)
    }

    /// Checks every setting; the message names the key.
    pub fn validate(&self) -> Result<(), String> {
        validate_name(&self.name)?;
        match &self.kind {
            Kind::HttpSink(h) => {
                if h.topics.is_empty() {
                    return Err("`topics`: name at least one topic".into());
                }
                for t in &h.topics {
                    tributary_storage::topic::validate_name(t)
                        .map_err(|e| format!("`topics`: {e}"))?;
                }
                let url = reqwest::Url::parse(&h.url)
                    .map_err(|e| format!("`url`: `{}` is not a URL: {e}", h.url))?;
                if !matches!(url.scheme(), "http" | "https") {
                    return Err(format!("`url`: `{}` is not http:// or https://", h.url));
                }
                if !(1..=10_000).contains(&h.batch_size) {
                    return Err("`batch_size`: 1 to 10000".into());
                }
                if h.timeout_ms == 0 || h.max_attempts == 0 || h.min_backoff_ms == 0 {
                    return Err(
                        "`timeout_ms`, `max_attempts` and `min_backoff_ms` must be positive".into(),
                    );
                }
                for (k, v) in &h.headers {
                    reqwest::header::HeaderName::from_bytes(k.as_bytes())
                        .map_err(|_| format!("`headers`: `{k}` is not a header name"))?;
                    check_reference(v).map_err(|e| format!("`headers.{k}`: {e}"))?;
                }
                let dead = h.dead_letters(&self.name);
                tributary_storage::topic::validate_name(&dead)
                    .map_err(|e| format!("`dead_letter_topic`: {e}"))?;
                if h.topics.contains(&dead) {
                    return Err("`dead_letter_topic` is one of the topics it reads".into());
                }
                Ok(())
            }
        }
    }
}

fn validate_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 100
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`name`: `{name}` must be 1–100 letters, digits, `.`, `_` or `-`"
        ))
    }
}

/// A secret reference's parts: `${env:NAME}` or `${file:PATH}`.
fn reference(v: &str) -> Option<(&str, &str)> {
    let inner = v.strip_prefix("${")?.strip_suffix('}')?;
    inner.split_once(':')
}

fn check_reference(v: &str) -> Result<(), String> {
    match reference(v) {
        None if v.starts_with("${") => Err("a reference is `${env:NAME}` or `${file:PATH}`".into()),
        None => Ok(()),
        Some(("env" | "file", rest)) if !rest.is_empty() => Ok(()),
        Some(_) => Err("a reference is `${env:NAME}` or `${file:PATH}`".into()),
    }
}

/// A setting's value with its secret reference resolved; an error names
/// the reference, never a value.
pub fn resolve(v: &str) -> Result<String, String> {
    match reference(v) {
        Some(("env", name)) => {
            std::env::var(name).map_err(|_| format!("environment variable {name} is not set"))
        }
        Some(("file", path)) => std::fs::read_to_string(path)
            .map(|s| s.trim_end_matches(['\n', '\r']).to_owned())
            .map_err(|e| format!("cannot read {path}: {e}")),
        _ => Ok(v.to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_connector_parses_with_defaults_and_bad_settings_are_named() {
        let c = ConnectorConfig::from_json(json!({
            "name": "hooks", "kind": "http_sink", "topics": ["t"], "url": "http://h/x",
            "headers": {"Authorization": "${env:HOOK_TOKEN}"}
        }))
        .expect("valid");
        let Kind::HttpSink(h) = &c.kind;
        assert_eq!(h.batch_size, 100);
        assert_eq!(h.dead_letters("hooks"), "hooks.dead-letter");
        let bad = |v: serde_json::Value, names: &str| {
            let e = ConnectorConfig::from_json(v).expect_err("invalid");
            assert!(e.contains(names), "{e} should name {names}");
        };
        bad(json!({"name": "h", "kind": "nope"}), "`kind`");
        bad(json!({"name": "h"}), "`kind`");
        bad(
            json!({"name": "h", "kind": "http_sink", "topics": ["t"], "url": "http://h", "urll": 1}),
            "`urll`",
        );
        bad(
            json!({"name": "h", "kind": "http_sink", "topics": ["t"], "url": "ftp://h"}),
            "`url`",
        );
        bad(
            json!({"name": "h", "kind": "http_sink", "url": "http://h"}),
            "`topics`",
        );
        bad(
            json!({"name": "h w", "kind": "http_sink", "topics": ["t"], "url": "http://h"}),
            "`name`",
        );
        bad(
            json!({"name": "h", "kind": "http_sink", "topics": ["t"], "url": "http://h", "batch_size": 0}),
            "`batch_size`",
        );
        bad(
            json!({"name": "h", "kind": "http_sink", "topics": ["t"], "url": "http://h", "headers": {"A": "${vault:x}"}}),
            "`headers.A`",
        );
        bad(
            json!({"name": "h", "kind": "http_sink", "topics": ["t"], "url": "http://h", "dead_letter_topic": "t"}),
            "`dead_letter_topic`",
        );
    }

    #[test]
    fn secret_references_resolve_from_files_and_name_only_the_reference() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("token");
        std::fs::write(&path, "s3cret\n").expect("write");
        let r = format!("${{file:{}}}", path.display());
        assert_eq!(resolve(&r).expect("file"), "s3cret");
        assert_eq!(resolve("plain").expect("literal"), "plain");
        let e = resolve("${env:TRIBUTARY_SURELY_UNSET_VARIABLE}").expect_err("unset");
        assert!(e.contains("TRIBUTARY_SURELY_UNSET_VARIABLE"), "{e}");
    }
}
