//! The node's configuration: TOML file, then `TRIBUTARY_<SECTION>__<KEY>`
//! environment overrides, parsed once and validated in one pass that reports
//! every problem, naming the key (and the environment variable it came from).

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use tributary_protocols::amqp::bridge::{BridgeConfig, Direction};
use tributary_protocols::amqp::AmqpConfig;
use tributary_protocols::http::HttpConfig;
use tributary_protocols::mqtt::{MqttConfig, Route};
use tributary_storage::{
    Durability, Forwarded, LogConfig, OnFull, SledOptions, TopicConfig, TopicDefaults,
};

/// Which role the node plays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// A field gateway: auto-creates topics, forwards upstream (when configured).
    Edge,
    /// A central node receiving edges' streams.
    Core,
}

impl Mode {
    /// `edge` or `core`.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Edge => "edge",
            Mode::Core => "core",
        }
    }
}

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct Config {
    /// Where the node keeps its data.
    pub data_dir: PathBuf,
    /// Grace period for in-flight requests at shutdown.
    pub shutdown_grace_ms: u64,
    /// The log.
    pub storage: StorageSection,
    /// The HTTP API.
    pub http: HttpSection,
    /// The MQTT front end.
    pub mqtt: MqttSection,
    /// The AMQP 0-9-1 front end and its bridges.
    pub amqp: AmqpSection,
    /// Topics declared up front (created at start if missing).
    pub topics: Vec<TopicSection>,
    /// Who may connect: anonymous access or device credentials.
    pub auth: AuthSection,
    /// Certificates for the TLS listeners (MQTT 8883, AMQP 5671, HTTPS 8443).
    pub tls: TlsSection,
    /// Edge: where to forward topics (store and forward).
    pub upstream: UpstreamSection,
    /// Core: how edges' streams are received at `/v1/sync`.
    pub sync: SyncSection,
    /// Node-wide limits across every front end.
    pub limits: LimitsSection,
}

/// `[limits]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct LimitsSection {
    /// Bytes held in partially received requests, messages and frames across
    /// every connection and protocol; past it readers wait, then the newest
    /// request is refused with its protocol's code.
    pub max_buffered_bytes: usize,
}

impl Default for LimitsSection {
    fn default() -> Self {
        LimitsSection {
            max_buffered_bytes: tributary_protocols::budget::DEFAULT_MAX_BUFFERED_BYTES,
        }
    }
}

/// `[upstream]` (edge).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct UpstreamSection {
    /// `ws://core:8080/v1/sync` or `wss://core:8443/v1/sync`; empty: no upstream.
    pub url: String,
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

/// `auth.mode` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// Anyone may connect, publish and read (a warning when not on loopback).
    #[default]
    Anonymous,
    /// Device credentials and ACLs from the registry.
    Devices,
}

/// `[auth]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct AuthSection {
    /// `anonymous` or `devices`.
    pub mode: AuthMode,
    /// Bearer token of the device admin API (`/v1/devices`); none: the API is off.
    pub admin_token: Option<String>,
    /// Key of the device token hashes; none: a random key kept in the data directory.
    pub token_key: Option<String>,
}

/// `[tls]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct TlsSection {
    /// Server certificate chain (PEM). With `key`, turns the TLS listeners on.
    pub cert: Option<PathBuf>,
    /// Private key (PEM).
    pub key: Option<PathBuf>,
    /// CA (PEM) that client certificates must chain to (mTLS).
    pub client_ca: Option<PathBuf>,
    /// Refuse TLS clients without a certificate (needs `client_ca`).
    pub require_client_cert: bool,
    /// How often the files are checked for changes (they are also reloaded on SIGHUP).
    pub reload_check_ms: u64,
}

impl Default for TlsSection {
    fn default() -> Self {
        TlsSection {
            cert: None,
            key: None,
            client_ca: None,
            require_client_cert: false,
            reload_check_ms: 2_000,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("./tributary-data"),
            shutdown_grace_ms: 10_000,
            storage: StorageSection::default(),
            http: HttpSection::default(),
            mqtt: MqttSection::default(),
            amqp: AmqpSection::default(),
            topics: Vec::new(),
            auth: AuthSection::default(),
            tls: TlsSection::default(),
            upstream: UpstreamSection::default(),
            sync: SyncSection::default(),
            limits: LimitsSection::default(),
        }
    }
}

/// `durability` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DurabilityMode {
    /// Ack after fsync.
    Fsync,
    /// Ack before a periodic flush.
    Interval,
}

/// `[storage]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct StorageSection {
    /// `fsync` (ack means on disk) or `interval`.
    pub durability: DurabilityMode,
    /// Flush period with `durability = "interval"`.
    pub flush_interval_ms: u64,
    /// sled page cache.
    pub cache_capacity_bytes: u64,
    /// sled segment size (power of two).
    pub segment_size_bytes: usize,
    /// Appends waiting for the committer, in bytes; producers beyond it wait.
    pub max_pending_bytes: usize,
    /// Retention pass period.
    pub retention_check_ms: u64,
    /// Create topics on first write (default: true on edge, false on core).
    pub auto_create_topics: Option<bool>,
    /// Partitions of auto-created topics.
    pub default_partitions: u32,
    /// Age retention of auto-created topics.
    pub default_retention_ms: Option<u64>,
    /// Size retention (per partition) of auto-created topics.
    pub default_retention_bytes: Option<u64>,
    /// Largest event of auto-created topics.
    pub max_event_bytes: usize,
    /// Disk quota: event bytes the log holds at most (0: none).
    pub max_disk_bytes: u64,
    /// Free space left on the data directory's file system: appends that would
    /// eat into it are refused (disk full) and resume once space is back (0: off).
    pub min_free_bytes: u64,
    /// `on_full` of auto-created topics: `reject` or `drop_oldest`.
    pub default_on_full: OnFull,
}

impl Default for StorageSection {
    fn default() -> Self {
        let sled = SledOptions::default();
        let log = LogConfig::default();
        StorageSection {
            durability: DurabilityMode::Fsync,
            flush_interval_ms: 5,
            cache_capacity_bytes: sled.cache_capacity,
            segment_size_bytes: sled.segment_size,
            max_pending_bytes: log.max_pending_bytes,
            retention_check_ms: log.retention_interval.as_millis() as u64,
            auto_create_topics: None,
            default_partitions: log.topic_defaults.partitions,
            default_retention_ms: None,
            default_retention_bytes: None,
            max_event_bytes: log.topic_defaults.max_event_bytes,
            max_disk_bytes: 0,
            min_free_bytes: log.min_free_bytes,
            default_on_full: OnFull::Reject,
        }
    }
}

/// `[http]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct HttpSection {
    /// Address to listen on.
    pub listen: String,
    /// HTTPS (and WSS) address, used when `[tls]` has a certificate; empty: none.
    pub tls_listen: String,
    /// Largest request body.
    pub max_body_bytes: usize,
    /// Connections held open at most.
    pub max_connections: usize,
    /// Largest fetch `limit`.
    pub max_fetch_records: usize,
    /// Longest fetch `wait_ms`.
    pub max_wait_ms: u64,
    /// Largest WebSocket message.
    pub ws_max_message_bytes: usize,
    /// A request head must be complete this long after its first byte.
    pub request_head_timeout_ms: u64,
    /// A request body must be complete this long after its head.
    pub request_timeout_ms: u64,
    /// A keep-alive connection with no request is closed after this long.
    pub idle_timeout_ms: u64,
}

impl Default for HttpSection {
    fn default() -> Self {
        let d = HttpConfig::default();
        HttpSection {
            listen: "0.0.0.0:8080".into(),
            tls_listen: "0.0.0.0:8443".into(),
            max_body_bytes: d.max_body_bytes,
            max_connections: d.max_connections,
            max_fetch_records: d.max_fetch_records,
            max_wait_ms: d.max_wait_ms,
            ws_max_message_bytes: d.ws_max_message_bytes,
            request_head_timeout_ms: d.request_head_timeout.as_millis() as u64,
            request_timeout_ms: d.request_timeout.as_millis() as u64,
            idle_timeout_ms: d.idle_timeout.as_millis() as u64,
        }
    }
}

/// `[mqtt]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct MqttSection {
    /// Serve MQTT at all (TCP listener and `/mqtt` WebSocket).
    pub enabled: bool,
    /// TCP address.
    pub listen: String,
    /// MQTT over TLS address, used when `[tls]` has a certificate; empty: none.
    pub tls_listen: String,
    /// Largest packet accepted.
    pub max_packet_bytes: usize,
    /// Connections held open at most.
    pub max_connections: usize,
    /// Time to send CONNECT.
    pub connect_timeout_ms: u64,
    /// Unacknowledged QoS 1/2 publishes per connection, each way.
    pub max_inflight: u16,
    /// Topic aliases a v5 client may use.
    pub topic_alias_max: u16,
    /// Longest session expiry granted (4294967295: never).
    pub max_session_expiry_secs: u32,
    /// Sessions kept at most.
    pub max_sessions: usize,
    /// Retained messages kept at most.
    pub max_retained: usize,
    /// Subscriptions one session may hold.
    pub max_subscriptions: usize,
    /// Filter → log topic/key routes.
    pub routes: Vec<RouteSection>,
}

impl Default for MqttSection {
    fn default() -> Self {
        let d = MqttConfig::default();
        MqttSection {
            enabled: true,
            listen: "0.0.0.0:1883".into(),
            tls_listen: "0.0.0.0:8883".into(),
            max_packet_bytes: d.max_packet_bytes,
            max_connections: d.max_connections,
            connect_timeout_ms: d.connect_timeout.as_millis() as u64,
            max_inflight: d.max_inflight,
            topic_alias_max: d.topic_alias_max,
            max_session_expiry_secs: d.max_session_expiry_secs,
            max_sessions: d.max_sessions,
            max_retained: d.max_retained,
            max_subscriptions: d.max_subscriptions,
            routes: Vec::new(),
        }
    }
}

/// `[amqp]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct AmqpSection {
    /// Serve AMQP at all.
    pub enabled: bool,
    /// TCP address.
    pub listen: String,
    /// AMQPS address, used when `[tls]` has a certificate; empty: none.
    pub tls_listen: String,
    /// Connections held open at most.
    pub max_connections: usize,
    /// Highest channel number a client may open.
    pub max_channels: u16,
    /// Largest frame offered in connection.tune (4096..=1048576).
    pub frame_max: u32,
    /// Heartbeat interval offered, seconds (0: only if the client asks).
    pub heartbeat_secs: u16,
    /// Time to finish the handshake.
    pub handshake_timeout_ms: u64,
    /// Largest message body.
    pub max_message_bytes: u64,
    /// Bytes of unfinished message bodies one connection may hold.
    pub max_content_bytes: u64,
    /// Appends one connection may have waiting for the disk.
    pub max_pending_appends: usize,
    /// Bridges to and from RabbitMQ.
    pub bridges: Vec<BridgeSection>,
}

impl Default for AmqpSection {
    fn default() -> Self {
        let d = AmqpConfig::default();
        AmqpSection {
            enabled: true,
            listen: "0.0.0.0:5672".into(),
            tls_listen: "0.0.0.0:5671".into(),
            max_connections: d.max_connections,
            max_channels: d.max_channels,
            frame_max: d.frame_max,
            heartbeat_secs: d.heartbeat_secs,
            handshake_timeout_ms: d.handshake_timeout.as_millis() as u64,
            max_message_bytes: d.max_message_bytes,
            max_content_bytes: d.max_content_bytes,
            max_pending_appends: d.max_pending_appends,
            bridges: Vec::new(),
        }
    }
}

/// `[[amqp.bridges]]`.
#[derive(Debug, Clone, Deserialize)]
pub struct BridgeSection {
    /// Name (metrics label; `out` keeps its position in group `amqp-bridge-<name>`).
    pub name: String,
    /// `in` (RabbitMQ queue → topic) or `out` (topic → RabbitMQ exchange).
    pub direction: String,
    /// `amqp://user:pass@host:port/vhost`.
    pub url: String,
    /// The log topic.
    pub topic: String,
    /// `in`: the queue to consume.
    #[serde(default)]
    pub queue: Option<String>,
    /// `out`: the exchange (default: the default exchange).
    #[serde(default)]
    pub exchange: Option<String>,
    /// `out`: a fixed routing key (default: the record's key, else the topic).
    #[serde(default)]
    pub routing_key: Option<String>,
    /// Messages per append / per confirm round (default 256).
    #[serde(default)]
    pub batch: Option<u16>,
    /// Timeout for connect, confirms and acks, ms (default 10000).
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// First reconnect delay, ms (default 500; doubles, full jitter).
    #[serde(default)]
    pub min_backoff_ms: Option<u64>,
    /// Longest reconnect delay, ms (default 30000).
    #[serde(default)]
    pub max_backoff_ms: Option<u64>,
}

/// `[[mqtt.routes]]`.
#[derive(Debug, Clone, Deserialize)]
pub struct RouteSection {
    /// MQTT topic filter.
    pub filter: String,
    /// Log topic.
    pub topic: String,
    /// Key template (`{topic}`, `{0}`, `{1}`, ...); default `{topic}`.
    #[serde(default = "default_route_key")]
    pub key: String,
}

fn default_route_key() -> String {
    "{topic}".into()
}

/// `[[topics]]`.
#[derive(Debug, Clone, Deserialize)]
pub struct TopicSection {
    /// Name.
    pub name: String,
    /// Partitions (default: storage.default_partitions).
    pub partitions: Option<u32>,
    /// Age retention.
    pub retention_ms: Option<u64>,
    /// Size retention per partition.
    pub retention_bytes: Option<u64>,
    /// Largest event.
    pub max_event_bytes: Option<usize>,
    /// Policy at the disk quota.
    pub on_full: Option<OnFull>,
}

/// Every problem found in a configuration.
#[derive(Debug)]
pub struct ConfigErrors(pub Vec<String>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "invalid configuration ({} problem{}):",
            self.0.len(),
            if self.0.len() == 1 { "" } else { "s" }
        )?;
        for e in &self.0 {
            writeln!(f, "  - {e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Prefix of configuration environment variables.
pub const ENV_PREFIX: &str = "TRIBUTARY_";

/// Maps an environment variable to a config key path, if it is one:
/// `TRIBUTARY_HTTP__LISTEN` → `http.listen`, `TRIBUTARY_DATA_DIR` → `data_dir`.
fn env_key(name: &str) -> Option<Vec<String>> {
    let rest = name.strip_prefix(ENV_PREFIX)?;
    if rest.contains("__") {
        Some(rest.split("__").map(str::to_ascii_lowercase).collect())
    } else if matches!(rest, "DATA_DIR" | "SHUTDOWN_GRACE_MS") {
        Some(vec![rest.to_ascii_lowercase()])
    } else {
        None
    }
}

/// An environment value as TOML: numbers, booleans and arrays keep their type,
/// anything else is a string.
fn env_value(raw: &str) -> toml::Value {
    match toml::from_str::<toml::Table>(&format!("v = {raw}")) {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or_else(|| toml::Value::String(raw.to_owned())),
        Err(_) => toml::Value::String(raw.to_owned()),
    }
}

impl Config {
    /// Reads the file (if any), applies overrides from `env`, and validates.
    pub fn load(
        profile: Profile,
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigErrors> {
        let text = match file {
            Some(path) => std::fs::read_to_string(path).map_err(|e| {
                ConfigErrors(vec![format!(
                    "cannot read config file {}: {e}",
                    path.display()
                )])
            })?,
            None => String::new(),
        };
        Self::from_profile_parts(profile, &text, env)
    }

    /// Parses TOML text plus environment overrides over the default profile.
    pub fn from_parts(
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigErrors> {
        Self::from_profile_parts(Profile::Default, text, env)
    }

    /// Parses TOML text plus environment overrides, then validates.
    /// Parses a profile preset, then TOML text over it, then environment
    /// overrides over both, and validates the result.
    pub fn from_profile_parts(
        profile: Profile,
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigErrors> {
        let mut errors = Vec::new();
        let file: toml::Table = text
            .parse()
            .map_err(|e| ConfigErrors(vec![format!("config file: {e}")]))?;
        let mut table: toml::Table = profile
            .preset()
            .parse()
            .map_err(|e| ConfigErrors(vec![format!("built-in profile: {e}")]))?;
        merge(&mut table, file);
        let mut from_env: BTreeMap<String, String> = BTreeMap::new();
        for (name, raw) in env {
            let Some(path) = env_key(&name) else { continue };
            if path.iter().any(String::is_empty) {
                errors.push(format!(
                    "{name}: malformed variable name (empty key between `__`)"
                ));
                continue;
            }
            let joined = path.join(".");
            if let Err(e) = set_path(&mut table, &path, env_value(&raw)) {
                errors.push(format!("{name}: {e}"));
            }
            from_env.insert(joined, name);
        }
        let mut unknown = Vec::new();
        let parsed: Result<Config, _> = {
            let mut on_unknown = |path: serde_ignored::Path<'_>| unknown.push(path.to_string());
            let de = serde_ignored::Deserializer::new(toml::Value::Table(table), &mut on_unknown);
            serde_path_to_error::deserialize(de)
        };
        for key in unknown {
            match from_env.get(&key) {
                Some(var) => errors.push(format!("unknown key `{key}` (from {var})")),
                None => errors.push(format!("unknown key `{key}`")),
            }
        }
        let config = match parsed {
            Ok(c) => Some(c),
            Err(e) => {
                let key = e.path().to_string();
                let via = from_env
                    .get(&key)
                    .map(|v| format!(" (from {v})"))
                    .unwrap_or_default();
                errors.push(format!("`{key}`{via}: {}", e.into_inner()));
                None
            }
        };
        if let Some(c) = &config {
            c.validate(&mut errors);
        }
        match config {
            Some(c) if errors.is_empty() => Ok(c),
            _ => Err(ConfigErrors(errors)),
        }
    }

    fn validate(&self, errors: &mut Vec<String>) {
        let s = &self.storage;
        if self.data_dir.as_os_str().is_empty() {
            errors.push("`data_dir` must not be empty".into());
        }
        if s.durability == DurabilityMode::Interval && s.flush_interval_ms == 0 {
            errors.push("`storage.flush_interval_ms` must be positive".into());
        }
        if !s.segment_size_bytes.is_power_of_two() || s.segment_size_bytes < 65536 {
            errors.push(format!(
                "`storage.segment_size_bytes` must be a power of two ≥ 65536, got {}",
                s.segment_size_bytes
            ));
        }
        if s.cache_capacity_bytes < 1024 * 1024 {
            errors.push(format!(
                "`storage.cache_capacity_bytes` must be at least 1048576, got {}",
                s.cache_capacity_bytes
            ));
        }
        if s.max_pending_bytes < 65536 || s.max_pending_bytes > u32::MAX as usize {
            errors.push(format!(
                "`storage.max_pending_bytes` must be 65536..=4294967295, got {}",
                s.max_pending_bytes
            ));
        }
        if s.retention_check_ms == 0 {
            errors.push("`storage.retention_check_ms` must be positive".into());
        }
        if let Err(e) = self.topic_defaults().config("defaults").validate() {
            errors.push(format!("`storage` topic defaults: {e}"));
        }
        let h = &self.http;
        let mut listeners: Vec<(&str, SocketAddr)> = Vec::new();
        match h.listen.parse::<SocketAddr>() {
            Ok(a) => listeners.push(("http.listen", a)),
            Err(_) => errors.push(format!(
                "`http.listen`: `{}` is not an address like 0.0.0.0:8080",
                h.listen
            )),
        }
        let m = &self.mqtt;
        if m.enabled {
            match m.listen.parse::<SocketAddr>() {
                Ok(a) => listeners.push(("mqtt.listen", a)),
                Err(_) => errors.push(format!(
                    "`mqtt.listen`: `{}` is not an address like 0.0.0.0:1883",
                    m.listen
                )),
            }
        }
        if m.max_packet_bytes < 1024 || m.max_packet_bytes > 256 * 1024 * 1024 {
            errors.push(format!(
                "`mqtt.max_packet_bytes` must be 1024..=268435456, got {}",
                m.max_packet_bytes
            ));
        }
        for (key, v) in [
            ("mqtt.max_connections", m.max_connections),
            ("mqtt.max_inflight", usize::from(m.max_inflight)),
            ("mqtt.max_sessions", m.max_sessions),
            ("mqtt.connect_timeout_ms", m.connect_timeout_ms as usize),
        ] {
            if v == 0 {
                errors.push(format!("`{key}` must be positive"));
            }
        }
        let a = &self.amqp;
        if a.enabled {
            match a.listen.parse::<SocketAddr>() {
                Ok(addr) => listeners.push(("amqp.listen", addr)),
                Err(_) => errors.push(format!(
                    "`amqp.listen`: `{}` is not an address like 0.0.0.0:5672",
                    a.listen
                )),
            }
        }
        if !(4096..=1024 * 1024).contains(&a.frame_max) {
            errors.push(format!(
                "`amqp.frame_max` must be 4096..=1048576, got {}",
                a.frame_max
            ));
        }
        for (key, v) in [
            ("amqp.max_connections", a.max_connections as u64),
            ("amqp.max_channels", u64::from(a.max_channels)),
            ("amqp.handshake_timeout_ms", a.handshake_timeout_ms),
            ("amqp.max_message_bytes", a.max_message_bytes),
            ("amqp.max_pending_appends", a.max_pending_appends as u64),
        ] {
            if v == 0 {
                errors.push(format!("`{key}` must be positive"));
            }
        }
        if a.max_content_bytes < a.max_message_bytes {
            errors.push(format!(
                "`amqp.max_content_bytes` ({}) must be at least `amqp.max_message_bytes` ({})",
                a.max_content_bytes, a.max_message_bytes
            ));
        }
        let mut bridge_names = std::collections::HashSet::new();
        for (i, b) in a.bridges.iter().enumerate() {
            if let Err(e) = bridge_config(b) {
                errors.push(format!("`amqp.bridges[{i}]`: {e}"));
            }
            if !bridge_names.insert(b.name.as_str()) {
                errors.push(format!(
                    "`amqp.bridges[{i}]`: the name `{}` is used twice",
                    b.name
                ));
            }
        }
        for (i, r) in self.mqtt_routes().iter().enumerate() {
            if let Err(e) = r.validate() {
                errors.push(format!("`mqtt.routes[{i}]`: {e}"));
            }
        }
        let t = &self.tls;
        if t.cert.is_some() != t.key.is_some() {
            errors.push("`tls.cert` and `tls.key` go together: set both or neither".into());
        }
        if t.require_client_cert && t.client_ca.is_none() {
            errors.push("`tls.require_client_cert` needs `tls.client_ca`".into());
        }
        if t.reload_check_ms == 0 {
            errors.push("`tls.reload_check_ms` must be positive".into());
        }
        if self.tls_enabled() {
            let tls_listeners = [
                ("http.tls_listen", &self.http.tls_listen, true),
                ("mqtt.tls_listen", &self.mqtt.tls_listen, self.mqtt.enabled),
                ("amqp.tls_listen", &self.amqp.tls_listen, self.amqp.enabled),
            ];
            for (key, value, on) in tls_listeners {
                if !on || value.is_empty() {
                    continue;
                }
                match value.parse::<SocketAddr>() {
                    Ok(a) => listeners.push((key, a)),
                    Err(_) => errors.push(format!("`{key}`: `{value}` is not an address")),
                }
            }
        }
        if self
            .auth
            .admin_token
            .as_deref()
            .is_some_and(|t| t.len() < 16)
        {
            errors.push("`auth.admin_token` must be at least 16 characters".into());
        }
        if s.max_disk_bytes > 0 && s.max_disk_bytes < 4 * s.max_event_bytes as u64 {
            errors.push(format!(
                "`storage.max_disk_bytes` ({}) must be 0 (no quota) or at least 4 × `storage.max_event_bytes` ({})",
                s.max_disk_bytes,
                4 * s.max_event_bytes
            ));
        }
        if self.auth.token_key.as_deref().is_some_and(|k| k.len() < 16) {
            errors.push("`auth.token_key` must be at least 16 characters (changing it invalidates every device token)".into());
        }
        for (i, (ka, a)) in listeners.iter().enumerate() {
            for (kb, b) in &listeners[i + 1..] {
                if a.port() != 0
                    && a.port() == b.port()
                    && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
                {
                    errors.push(format!("`{ka}` and `{kb}` both use port {}", a.port()));
                }
            }
        }
        if h.max_connections == 0 {
            errors.push("`http.max_connections` must be positive".into());
        }
        if h.max_fetch_records == 0 {
            errors.push("`http.max_fetch_records` must be positive".into());
        }
        for (key, v) in [
            ("http.request_head_timeout_ms", h.request_head_timeout_ms),
            ("http.request_timeout_ms", h.request_timeout_ms),
            ("http.idle_timeout_ms", h.idle_timeout_ms),
        ] {
            if v == 0 {
                errors.push(format!("`{key}` must be positive"));
            }
        }
        for (key, largest) in [
            ("http.max_body_bytes", h.max_body_bytes as u64),
            ("http.ws_max_message_bytes", h.ws_max_message_bytes as u64),
            ("mqtt.max_packet_bytes", self.mqtt.max_packet_bytes as u64),
            ("amqp.max_message_bytes", self.amqp.max_message_bytes),
        ] {
            if (self.limits.max_buffered_bytes as u64) < largest {
                errors.push(format!(
                    "`limits.max_buffered_bytes` ({}) must be at least `{key}` ({largest}), or the largest of those can never be read",
                    self.limits.max_buffered_bytes
                ));
            }
        }
        if h.max_body_bytes < s.max_event_bytes {
            errors.push(format!(
                "`http.max_body_bytes` ({}) must be at least `storage.max_event_bytes` ({}), or the largest events cannot be sent",
                h.max_body_bytes, s.max_event_bytes
            ));
        }
        if self.forwards() {
            errors.extend(self.upstream_config().validate());
            if s.durability == DurabilityMode::Interval {
                // Interval mode shows events before they are fsynced: a power
                // loss could give offsets the core already holds to new events.
                errors.push("`upstream.url` needs `storage.durability = \"fsync\"`: an edge forwards only what is on its disk".into());
            }
        } else if !self.upstream.edge_id.is_empty() || !self.upstream.topics.is_empty() {
            errors.push(
                "`upstream.url` is empty: set it to forward to a core (ws://HOST:PORT/v1/sync)"
                    .into(),
            );
        }
        if self.sync.heartbeat_ms == 0 {
            errors.push("`sync.heartbeat_ms` must be positive".into());
        }
        if self.sync.max_batch_bytes < 64 * 1024 {
            errors.push("`sync.max_batch_bytes` must be at least 65536".into());
        }
        let mut seen = std::collections::HashSet::new();
        for (i, t) in self.topics.iter().enumerate() {
            if !seen.insert(t.name.as_str()) {
                errors.push(format!(
                    "`topics[{i}]`: topic `{}` is declared twice",
                    t.name
                ));
            }
            if let Err(e) = self.topic_config(t).validate() {
                errors.push(format!("`topics[{i}]` ({}): {e}", t.name));
            }
        }
    }

    /// Is an upstream configured (this node forwards when it runs as an edge)?
    pub fn forwards(&self) -> bool {
        !self.upstream.url.is_empty()
    }

    /// The uploader's settings.
    pub fn upstream_config(&self) -> tributary_sync::UpstreamConfig {
        let u = &self.upstream;
        tributary_sync::UpstreamConfig {
            url: u.url.clone(),
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

    /// Are the TLS listeners on (a certificate and key configured)?
    pub fn tls_enabled(&self) -> bool {
        self.tls.cert.is_some() && self.tls.key.is_some()
    }

    /// Defaults for topics created implicitly.
    pub fn topic_defaults(&self) -> TopicDefaults {
        let s = &self.storage;
        TopicDefaults {
            partitions: s.default_partitions,
            retention_ms: s.default_retention_ms,
            retention_bytes: s.default_retention_bytes,
            max_event_bytes: s.max_event_bytes,
            on_full: s.default_on_full,
        }
    }

    /// A declared topic's full config.
    pub fn topic_config(&self, t: &TopicSection) -> TopicConfig {
        let d = self.topic_defaults();
        TopicConfig {
            name: t.name.clone(),
            partitions: t.partitions.unwrap_or(d.partitions),
            retention_ms: t.retention_ms.or(d.retention_ms),
            retention_bytes: t.retention_bytes.or(d.retention_bytes),
            max_event_bytes: t.max_event_bytes.unwrap_or(d.max_event_bytes),
            on_full: t.on_full.unwrap_or(d.on_full),
        }
    }

    /// The log's settings.
    pub fn log_config(&self, mode: Mode) -> LogConfig {
        let s = &self.storage;
        LogConfig {
            durability: match s.durability {
                DurabilityMode::Fsync => Durability::Fsync,
                DurabilityMode::Interval => {
                    Durability::Interval(Duration::from_millis(s.flush_interval_ms))
                }
            },
            max_pending_bytes: s.max_pending_bytes,
            retention_interval: Duration::from_millis(s.retention_check_ms),
            auto_create_topics: s.auto_create_topics.unwrap_or(mode == Mode::Edge),
            topic_defaults: self.topic_defaults(),
            max_disk_bytes: (s.max_disk_bytes > 0).then_some(s.max_disk_bytes),
            min_free_bytes: s.min_free_bytes,
            forwarded: match mode {
                Mode::Edge if self.forwards() && self.upstream.topics.is_empty() => Forwarded::All,
                Mode::Edge if self.forwards() => Forwarded::Topics(
                    self.upstream
                        .topics
                        .iter()
                        .map(|t| t.name.clone())
                        .collect(),
                ),
                _ => Forwarded::None,
            },
            ..LogConfig::default()
        }
    }

    /// sled's settings.
    pub fn sled_options(&self) -> SledOptions {
        SledOptions {
            cache_capacity: self.storage.cache_capacity_bytes,
            segment_size: self.storage.segment_size_bytes,
        }
    }

    fn mqtt_routes(&self) -> Vec<Route> {
        self.mqtt
            .routes
            .iter()
            .map(|r| Route {
                filter: r.filter.clone(),
                topic: r.topic.clone(),
                key: r.key.clone(),
            })
            .collect()
    }

    /// The MQTT front end's settings.
    pub fn mqtt_config(&self) -> MqttConfig {
        let m = &self.mqtt;
        MqttConfig {
            max_packet_bytes: m.max_packet_bytes,
            max_connections: m.max_connections,
            connect_timeout: Duration::from_millis(m.connect_timeout_ms),
            max_inflight: m.max_inflight,
            topic_alias_max: m.topic_alias_max,
            max_session_expiry_secs: m.max_session_expiry_secs,
            max_sessions: m.max_sessions,
            max_retained: m.max_retained,
            max_subscriptions: m.max_subscriptions,
            routes: self.mqtt_routes(),
        }
    }

    /// The AMQP front end's settings.
    pub fn amqp_config(&self) -> AmqpConfig {
        let a = &self.amqp;
        AmqpConfig {
            max_connections: a.max_connections,
            max_channels: a.max_channels,
            frame_max: a.frame_max,
            heartbeat_secs: a.heartbeat_secs,
            handshake_timeout: Duration::from_millis(a.handshake_timeout_ms),
            max_message_bytes: a.max_message_bytes,
            max_content_bytes: a.max_content_bytes,
            max_pending_appends: a.max_pending_appends,
        }
    }

    /// The AMQP bridges (validated by [`Config::validate`]).
    pub fn amqp_bridges(&self) -> Vec<BridgeConfig> {
        self.amqp
            .bridges
            .iter()
            .filter_map(|b| bridge_config(b).ok())
            .collect()
    }

    /// The HTTP front end's settings.
    pub fn http_config(&self) -> HttpConfig {
        HttpConfig {
            max_body_bytes: self.http.max_body_bytes,
            max_connections: self.http.max_connections,
            max_fetch_records: self.http.max_fetch_records,
            max_wait_ms: self.http.max_wait_ms,
            ws_max_message_bytes: self.http.ws_max_message_bytes,
            request_head_timeout: Duration::from_millis(self.http.request_head_timeout_ms),
            request_timeout: Duration::from_millis(self.http.request_timeout_ms),
            idle_timeout: Duration::from_millis(self.http.idle_timeout_ms),
        }
    }
}

fn bridge_config(b: &BridgeSection) -> Result<BridgeConfig, String> {
    let direction = match b.direction.as_str() {
        "in" => Direction::In,
        "out" => Direction::Out,
        other => {
            return Err(format!(
                "`direction` must be \"in\" or \"out\", got `{other}`"
            ))
        }
    };
    tributary_storage::topic::validate_name(&b.name).map_err(|e| format!("`name`: {e}"))?;
    tributary_storage::log::validate_group(&format!("amqp-bridge-{}", b.name))
        .map_err(|e| format!("`name` makes the consumer group name invalid: {e}"))?;
    tributary_storage::topic::validate_name(&b.topic).map_err(|e| format!("`topic`: {e}"))?;
    if !tributary_protocols::amqp::bridge::AVAILABLE {
        return Err("this build has no AMQP bridge (cargo feature `amqp-bridge`)".into());
    }
    tributary_protocols::amqp::bridge::validate_url(&b.url).map_err(|e| format!("`url` {e}"))?;
    let queue = match (direction, &b.queue) {
        (Direction::In, Some(q)) if !q.is_empty() => q.clone(),
        (Direction::In, _) => return Err("`queue` is required for direction = \"in\"".into()),
        (Direction::Out, Some(_)) => return Err("`queue` is only for direction = \"in\"".into()),
        (Direction::Out, None) => String::new(),
    };
    if direction == Direction::In && (b.exchange.is_some() || b.routing_key.is_some()) {
        return Err("`exchange` and `routing_key` are only for direction = \"out\"".into());
    }
    let batch = b.batch.unwrap_or(256);
    if batch == 0 {
        return Err("`batch` must be positive".into());
    }
    let min_backoff = Duration::from_millis(b.min_backoff_ms.unwrap_or(500).max(1));
    let max_backoff = Duration::from_millis(b.max_backoff_ms.unwrap_or(30_000));
    if max_backoff < min_backoff {
        return Err("`max_backoff_ms` must be at least `min_backoff_ms`".into());
    }
    Ok(BridgeConfig {
        name: b.name.clone(),
        direction,
        url: b.url.clone(),
        topic: b.topic.clone(),
        queue,
        exchange: b.exchange.clone().unwrap_or_default(),
        routing_key: b.routing_key.clone(),
        batch,
        timeout: Duration::from_millis(b.timeout_ms.unwrap_or(10_000).max(1)),
        min_backoff,
        max_backoff,
    })
}

/// Presets that sit under the config file and the environment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Profile {
    /// The defaults documented in the README.
    #[default]
    Default,
    /// Pi-class boards (1 GB of RAM or less): an 8 MiB sled cache, a smaller
    /// queue of pending appends, smaller bodies and events, fewer connections.
    Small,
}

impl Profile {
    /// The preset as TOML.
    pub fn preset(self) -> &'static str {
        match self {
            Profile::Default => "",
            Profile::Small => SMALL_PROFILE,
        }
    }
}

/// `--profile small`.
pub const SMALL_PROFILE: &str = r#"
[storage]
cache_capacity_bytes = 8388608
max_pending_bytes = 4194304
max_event_bytes = 262144

[http]
max_body_bytes = 2097152
max_connections = 128
max_fetch_records = 1000

[mqtt]
max_packet_bytes = 262144
max_connections = 1000
max_inflight = 256
max_sessions = 10000
max_retained = 10000

[amqp]
max_connections = 1000
max_channels = 64
max_message_bytes = 262144
max_content_bytes = 4194304
"#;

/// Deep-merges `over` into `base` (tables merge, everything else replaces).
fn merge(base: &mut toml::Table, over: toml::Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

fn set_path(table: &mut toml::Table, path: &[String], value: toml::Value) -> Result<(), String> {
    let (last, parents) = path.split_last().ok_or("empty key")?;
    let mut cur = table;
    for (i, p) in parents.iter().enumerate() {
        let entry = cur
            .entry(p.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        cur = match entry {
            toml::Value::Table(t) => t,
            _ => return Err(format!("`{}` is not a section", path[..=i].join("."))),
        };
    }
    cur.insert(last.clone(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn small_profile_sits_under_file_and_env() {
        let c = Config::from_profile_parts(
            Profile::Small,
            "[storage]\nmax_pending_bytes = 8388608\n",
            env(&[("TRIBUTARY_HTTP__MAX_CONNECTIONS", "64")]),
        )
        .expect("valid");
        assert_eq!(
            c.storage.cache_capacity_bytes,
            8 * 1024 * 1024,
            "from the profile"
        );
        assert_eq!(
            c.storage.max_pending_bytes,
            8 * 1024 * 1024,
            "the file wins"
        );
        assert_eq!(c.http.max_connections, 64, "the environment wins");
        assert_eq!(c.http.max_body_bytes, 2 * 1024 * 1024);
    }

    #[test]
    fn defaults_match_the_contract() {
        let c = Config::from_parts("", env(&[])).expect("defaults are valid");
        assert_eq!(c.data_dir, PathBuf::from("./tributary-data"));
        assert_eq!(c.http.listen, "0.0.0.0:8080");
        assert_eq!(c.storage.durability, DurabilityMode::Fsync);
        assert!(c.log_config(Mode::Edge).auto_create_topics);
        assert!(!c.log_config(Mode::Core).auto_create_topics);
    }

    #[test]
    fn env_overrides_file_and_keeps_types() {
        let text = "[http]\nlisten = \"127.0.0.1:1\"\n";
        let c = Config::from_parts(
            text,
            env(&[
                ("TRIBUTARY_HTTP__LISTEN", "127.0.0.1:0"),
                ("TRIBUTARY_STORAGE__DEFAULT_PARTITIONS", "4"),
                ("TRIBUTARY_STORAGE__DURABILITY", "interval"),
                ("TRIBUTARY_DATA_DIR", "/tmp/x"),
                ("TRIBUTARY_LOG", "debug"),
                ("PATH", "/bin"),
            ]),
        )
        .expect("valid");
        assert_eq!(c.http.listen, "127.0.0.1:0");
        assert_eq!(c.storage.default_partitions, 4);
        assert_eq!(c.storage.durability, DurabilityMode::Interval);
        assert_eq!(c.data_dir, PathBuf::from("/tmp/x"));
    }

    #[test]
    fn every_unknown_key_is_named_at_once() {
        let text = "colour = 1\n[storage]\ndurabilty = \"fsync\"\n[http]\nlisten = \"0.0.0.0:8080\"\nport = 1\n";
        let err =
            Config::from_parts(text, env(&[("TRIBUTARY_HTTP__LISTN", "x")])).expect_err("invalid");
        let all = err.to_string();
        for needle in [
            "`colour`",
            "`storage.durabilty`",
            "`http.port`",
            "`http.listn` (from TRIBUTARY_HTTP__LISTN)",
        ] {
            assert!(all.contains(needle), "missing {needle} in:\n{all}");
        }
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

    #[test]
    fn validation_collects_every_problem() {
        let text = r#"
            [storage]
            segment_size_bytes = 1000
            max_event_bytes = 20000000
            [http]
            listen = "nowhere"
            [[topics]]
            name = "bad name"
            [[topics]]
            name = "ok"
            [[topics]]
            name = "ok"
        "#;
        let err = Config::from_parts(text, env(&[])).expect_err("invalid");
        let all = err.to_string();
        for needle in [
            "segment_size_bytes",
            "http.listen",
            "max_body_bytes",
            "topics[0]",
            "declared twice",
        ] {
            assert!(all.contains(needle), "missing {needle} in:\n{all}");
        }
        assert!(err.0.len() >= 5, "{all}");
    }

    #[test]
    fn type_errors_name_the_key_and_variable() {
        let err = Config::from_parts("", env(&[("TRIBUTARY_STORAGE__DURABILITY", "sometimes")]))
            .expect_err("invalid");
        let all = err.to_string();
        assert!(
            all.contains("storage.durability") && all.contains("TRIBUTARY_STORAGE__DURABILITY"),
            "{all}"
        );
    }
}
