//! `kind = "http_sink"`: webhooks (see [`crate::config::HttpSink`]).

use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use reqwest::StatusCode;
use tributary_http::records::{Format, RecordOut};
use tributary_storage::Record;

use crate::config::{resolve, HttpSink};
use crate::sink::{Deliver, Outcome};

/// Longest piece of an error answer's body kept in the error.
const ERROR_BODY_CHARS: usize = 200;

/// One webhook (clones share the client and its connections).
#[derive(Debug, Clone)]
pub struct Webhook {
    client: reqwest::Client,
    url: reqwest::Url,
    headers: HeaderMap,
    one_per_request: bool,
}

impl Webhook {
    /// The client for `config`, its secrets resolved; an error names the
    /// setting.
    pub fn new(config: &HttpSink) -> Result<Webhook, String> {
        let url = reqwest::Url::parse(&config.url).map_err(|e| format!("`url`: {e}"))?;
        let mut headers = HeaderMap::new();
        for (k, v) in &config.headers {
            let name = HeaderName::from_bytes(k.as_bytes())
                .map_err(|_| format!("`headers`: `{k}` is not a header name"))?;
            let value = resolve(v).map_err(|e| format!("`headers.{k}`: {e}"))?;
            let mut value = HeaderValue::from_str(&value)
                .map_err(|_| format!("`headers.{k}`: not a valid header value"))?;
            value.set_sensitive(true);
            headers.insert(name, value);
        }
        let tls = tributary_sync::tls_client_config(config.ca_file.as_deref(), None)
            .map_err(|e| format!("`ca_file`: {e}"))?;
        let client = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .timeout(Duration::from_millis(config.timeout_ms))
            .connect_timeout(Duration::from_millis(config.timeout_ms.min(10_000)))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
        Ok(Webhook {
            client,
            url,
            headers,
            one_per_request: config.delivery.batch_size == Some(1),
        })
    }
}

/// A record as the webhook gets it: as `GET .../records` renders it, with
/// its topic.
fn record_json(topic: &str, r: &Record) -> serde_json::Value {
    let mut v = serde_json::to_value(RecordOut::new(r.clone(), Format::Json))
        .unwrap_or(serde_json::Value::Null);
    if let Some(o) = v.as_object_mut() {
        o.insert("topic".into(), topic.into());
    }
    v
}

/// An error with its causes (reqwest's own text is only "error sending
/// request").
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

/// `Retry-After` in seconds (the HTTP-date form is not honoured: backoff).
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let secs: u64 = headers
        .get(RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(Duration::from_secs(secs))
}

impl Deliver for Webhook {
    async fn deliver(&mut self, topic: &str, records: &[Record], _next: u64) -> Outcome {
        let (Some(first), Some(last)) = (records.first(), records.last()) else {
            return Outcome::Delivered;
        };
        let body = if self.one_per_request {
            record_json(topic, first)
        } else {
            serde_json::json!({
                "records": records.iter().map(|r| record_json(topic, r)).collect::<Vec<_>>()
            })
        };
        let body = match serde_json::to_vec(&body) {
            Ok(b) => b,
            Err(e) => return Outcome::Refused(format!("cannot encode the records: {e}")),
        };
        let key = format!(
            "{topic}/{}/{}-{}",
            first.partition, first.offset, last.offset
        );
        let sent = self
            .client
            .post(self.url.clone())
            .headers(self.headers.clone())
            .header(CONTENT_TYPE, "application/json")
            .header("Idempotency-Key", key)
            .body(body)
            .send()
            .await;
        let resp = match sent {
            // Without the URL: it may carry credentials.
            Err(e) => {
                return Outcome::Retry {
                    after: None,
                    error: chain(&e.without_url()),
                }
            }
            Ok(r) => r,
        };
        let status = resp.status();
        if status.is_success() {
            return Outcome::Delivered;
        }
        let after = retry_after(resp.headers());
        let text = resp.text().await.unwrap_or_default();
        let excerpt: String = text.chars().take(ERROR_BODY_CHARS).collect();
        let error = format!("HTTP {status}: {excerpt}");
        if status.is_server_error()
            || status == StatusCode::TOO_MANY_REQUESTS
            || status == StatusCode::REQUEST_TIMEOUT
        {
            Outcome::Retry { after, error }
        } else {
            Outcome::Refused(error)
        }
    }
}
