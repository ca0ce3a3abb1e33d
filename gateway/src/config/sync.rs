//! `[upstream]` (an edge forwarding to a core) and `[sync]` (a core receiving
//! edges' streams at `/v1/sync`), and their conversion into the sync crate's
//! [`UpstreamConfig`](tributary_sync::UpstreamConfig) and
//! [`CoreConfig`](tributary_sync::CoreConfig).

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::Config;

/// `[upstream]` (edge).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct UpstreamSection {
    /// `ws://core:8080/v1/sync` or `wss://core:8443/v1/sync`; empty: no upstream.
    pub url: String,
    /// More nodes of the core cluster, tried in turn after `url` when a link
    /// fails (a list, or one comma-separated string:
    /// `TRIBUTARY_UPSTREAM__URLS=ws://a/v1/sync,ws://b/v1/sync`).
    #[serde(deserialize_with = "super::list_or_commas")]
    pub urls: Vec<String>,
    /// This edge's id at the core (its device id when the core uses devices).
    pub edge_id: String,
    /// Device token at the core.
    pub token: Option<String>,
    /// CA (PEM) the core's certificate must chain to (default: system roots).
    pub ca: Option<PathBuf>,
    /// Client certificate (PEM) for mTLS at the core.
    pub cert: Option<PathBuf>,
    /// Its key (PEM).
    pub key: Option<PathBuf>,
    /// Topics to forward with their priority; none listed: every topic.
    pub topics: Vec<UpstreamTopic>,
    /// Priority of every topic when none are listed.
    pub default_priority: i32,
    /// Records per batch at most.
    pub batch_max_records: usize,
    /// Bytes of records per batch at most, before compression.
    pub batch_max_bytes: usize,
    /// How long a live batch waits to fill up.
    pub linger_ms: u64,
    /// Unacknowledged bytes in flight at most.
    pub window_bytes: usize,
    /// Unacknowledged batches in flight at most.
    pub window_batches: usize,
    /// `zstd` or `none`.
    pub compression: CompressionMode,
    /// zstd level (1 fastest … 19 smallest).
    pub compression_level: i32,
    /// Bandwidth cap on the wire, bytes per second (0: none).
    pub max_bytes_per_sec: u64,
    /// Ping period.
    pub heartbeat_ms: u64,
    /// Nothing heard (or nothing written) for this long: the link is dead.
    pub timeout_ms: u64,
    /// Reconnect backoff: ceiling of the first delay.
    pub min_backoff_ms: u64,
    /// Reconnect backoff: largest ceiling.
    pub max_backoff_ms: u64,
    /// Live events go ahead of the backlog.
    pub live_first: bool,
}

/// `upstream.compression` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum CompressionMode {
    /// zstd (the default).
    #[default]
    Zstd,
    /// As is.
    None,
}

/// `[[upstream.topics]]`.
#[derive(Debug, Clone, Deserialize)]
pub struct UpstreamTopic {
    /// Topic name.
    pub name: String,
    /// Higher goes first (default 0).
    #[serde(default)]
    pub priority: i32,
}

impl Default for UpstreamSection {
    fn default() -> Self {
        let d = tributary_sync::UpstreamConfig::default();
        UpstreamSection {
            url: String::new(),
            urls: Vec::new(),
            edge_id: String::new(),
            token: None,
            ca: None,
            cert: None,
            key: None,
            topics: Vec::new(),
            default_priority: 0,
            batch_max_records: d.batch_max_records,
            batch_max_bytes: d.batch_max_bytes,
            linger_ms: d.linger.as_millis() as u64,
            window_bytes: d.window_bytes,
            window_batches: d.window_batches,
            compression: CompressionMode::Zstd,
            compression_level: d.compression_level,
            max_bytes_per_sec: 0,
            heartbeat_ms: d.heartbeat.as_millis() as u64,
            timeout_ms: d.timeout.as_millis() as u64,
            min_backoff_ms: d.min_backoff.as_millis() as u64,
            max_backoff_ms: d.max_backoff.as_millis() as u64,
            live_first: d.live_first,
        }
    }
}

/// `[sync]` (core).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct SyncSection {
    /// Serve `/v1/sync`.
    pub enabled: bool,
    /// Create topics edges forward (with the edge's partition count).
    pub auto_create_topics: bool,
    /// Ping period; an edge silent for 3 periods is dropped.
    pub heartbeat_ms: u64,
    /// Largest batch (records block, uncompressed) an edge may send.
    pub max_batch_bytes: usize,
}

impl Default for SyncSection {
    fn default() -> Self {
        let d = tributary_sync::CoreConfig::default();
        SyncSection {
            enabled: true,
            auto_create_topics: d.auto_create_topics,
            heartbeat_ms: d.heartbeat.as_millis() as u64,
            max_batch_bytes: d.max_batch_bytes,
        }
    }
}

impl Config {
    /// Is an upstream configured (this node forwards when it runs as an edge)?
    pub fn forwards(&self) -> bool {
        !self.upstream.url.is_empty() || !self.upstream.urls.is_empty()
    }

    /// The core URLs an edge links to: `upstream.url`, then `upstream.urls`
    /// (each once).
    pub fn upstream_urls(&self) -> Vec<String> {
        let mut urls: Vec<String> = Vec::new();
        for u in std::iter::once(&self.upstream.url).chain(&self.upstream.urls) {
            if !u.is_empty() && !urls.contains(u) {
                urls.push(u.clone());
            }
        }
        urls
    }

    /// The uploader's settings.
    pub fn upstream_config(&self) -> tributary_sync::UpstreamConfig {
        let u = &self.upstream;
        tributary_sync::UpstreamConfig {
            urls: self.upstream_urls(),
            edge_id: u.edge_id.clone(),
            token: u.token.clone(),
            ca: u.ca.clone(),
            cert: u.cert.clone(),
            key: u.key.clone(),
            topics: u
                .topics
                .iter()
                .map(|t| tributary_sync::TopicRule {
                    name: t.name.clone(),
                    priority: t.priority,
                })
                .collect(),
            default_priority: u.default_priority,
            batch_max_records: u.batch_max_records,
            batch_max_bytes: u.batch_max_bytes,
            linger: Duration::from_millis(u.linger_ms),
            window_bytes: u.window_bytes,
            window_batches: u.window_batches,
            compression_level: match u.compression {
                CompressionMode::Zstd => u.compression_level,
                CompressionMode::None => 0,
            },
            max_bytes_per_sec: u.max_bytes_per_sec,
            heartbeat: Duration::from_millis(u.heartbeat_ms),
            timeout: Duration::from_millis(u.timeout_ms),
            min_backoff: Duration::from_millis(u.min_backoff_ms),
            max_backoff: Duration::from_millis(u.max_backoff_ms),
            live_first: u.live_first,
        }
    }

    /// The core receiver's settings.
    pub fn sync_config(&self) -> tributary_sync::CoreConfig {
        tributary_sync::CoreConfig {
            auto_create_topics: self.sync.auto_create_topics,
            heartbeat: Duration::from_millis(self.sync.heartbeat_ms),
            max_batch_bytes: self.sync.max_batch_bytes,
            ..tributary_sync::CoreConfig::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::env;
    use super::super::Mode;
    use super::*;
    use tributary_storage::Forwarded;

    #[test]
    fn an_edge_takes_several_core_urls_from_a_list_or_one_variable() {
        let from_env = Config::from_parts(
            "[upstream]\nedge_id = \"e\"\n",
            env(&[(
                "TRIBUTARY_UPSTREAM__URLS",
                "ws://a:1/v1/sync, ws://b:2/v1/sync,ws://a:1/v1/sync",
            )]),
        )
        .expect("valid");
        assert!(from_env.forwards());
        assert_eq!(
            from_env.upstream_config().urls,
            ["ws://a:1/v1/sync", "ws://b:2/v1/sync"]
        );
        let both = Config::from_parts(
            "[upstream]\nurl = \"ws://a:1/v1/sync\"\nurls = [\"ws://c:3/v1/sync\"]\nedge_id = \"e\"\n",
            env(&[]),
        )
        .expect("valid");
        assert_eq!(
            both.upstream_config().urls,
            ["ws://a:1/v1/sync", "ws://c:3/v1/sync"]
        );
        let err = Config::from_parts(
            "[upstream]\nurls = [\"ws://a/v1/sync\", \"http://b/v1/sync\"]\nedge_id = \"e\"\n",
            env(&[]),
        )
        .expect_err("a bad second url")
        .to_string();
        assert!(err.contains("http://b/v1/sync"), "{err}");
    }

    #[test]
    fn upstream_settings_are_validated_and_decide_what_is_forwarded() {
        let c = Config::from_parts(
            "[upstream]\nedge_id = \"pump-3\"\n[[upstream.topics]]\nname = \"alarms\"\npriority = 5\n",
            env(&[("TRIBUTARY_UPSTREAM__URL", "wss://core.example:8443/v1/sync"), ("TRIBUTARY_UPSTREAM__COMPRESSION", "none")]),
        )
        .expect("valid");
        let u = c.upstream_config();
        assert_eq!(u.priority("alarms"), Some(5));
        assert_eq!(u.priority("other"), None);
        assert_eq!(u.compression_level, 0);
        let only: std::collections::BTreeSet<String> = ["alarms".to_owned()].into();
        assert_eq!(c.log_config(Mode::Edge).forwarded, Forwarded::Topics(only));
        assert_eq!(c.log_config(Mode::Core).forwarded, Forwarded::None);
        let all = Config::from_parts(
            "[upstream]\nurl = \"ws://c:8080/v1/sync\"\nedge_id = \"e\"\n",
            env(&[]),
        )
        .expect("valid");
        assert_eq!(all.log_config(Mode::Edge).forwarded, Forwarded::All);
        assert_eq!(
            Config::default().log_config(Mode::Edge).forwarded,
            Forwarded::None
        );

        let text = "[upstream]\nurl = \"http://core/v1/sync\"\nedge_id = \"has space\"\nwindow_bytes = 10\nheartbeat_ms = 20000\ncert = \"c.pem\"\n";
        let err = Config::from_parts(text, env(&[]))
            .expect_err("invalid")
            .to_string();
        for needle in [
            "upstream.url",
            "upstream.edge_id",
            "upstream.window_bytes",
            "upstream.heartbeat_ms",
            "upstream.cert",
        ] {
            assert!(err.contains(needle), "missing {needle} in:\n{err}");
        }
        let err = Config::from_parts(
            "[upstream]\nedge_id = \"e\"\n[sync]\nmax_batch_bytes = 10\ncolour = 1\n",
            env(&[]),
        )
        .expect_err("invalid")
        .to_string();
        for needle in ["upstream.url", "sync.max_batch_bytes", "sync.colour"] {
            assert!(err.contains(needle), "missing {needle} in:\n{err}");
        }
        let err = Config::from_parts(
            "[storage]\ndurability = \"interval\"\n[upstream]\nurl = \"ws://c/v1/sync\"\nedge_id = \"e\"\n",
            env(&[]),
        )
        .expect_err("interval with an upstream")
        .to_string();
        assert!(err.contains("fsync"), "{err}");
    }
}
