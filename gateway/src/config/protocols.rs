//! The front ends' sections: `[http]`, `[mqtt]` (and its routes), `[kafka]`, `[amqp]`
//! (and its bridges to RabbitMQ), `[tls]` and the node-wide `[limits]`, and
//! their conversion into [`HttpConfig`], [`MqttConfig`], [`AmqpConfig`] and
//! [`BridgeConfig`].

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use tributary_amqp::bridge::{BridgeConfig, Direction};
use tributary_amqp::AmqpConfig;
use tributary_groups::GroupsConfig;
use tributary_http::HttpConfig;
use tributary_kafka::KafkaConfig;
use tributary_mqtt::shared::Policy as SharedPolicy;
use tributary_mqtt::{MqttConfig, Route};

use super::Config;

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
    /// Log topic of MQTT topics whose first level is no log topic name.
    pub default_topic: String,
    /// Longest keep-alive granted, seconds (0: whatever the client asks).
    pub max_keep_alive_secs: u16,
    /// `$SYS/broker/...` statistics interval, seconds (0: off).
    pub sys_interval_secs: u32,
    /// Shared subscriptions: `round_robin` or `sticky` (by MQTT topic).
    pub shared_policy: String,
    /// Shared subscription groups kept at most.
    pub max_shared_groups: usize,
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
            default_topic: d.default_topic,
            max_keep_alive_secs: d.max_keep_alive_secs,
            sys_interval_secs: d.sys_interval_secs,
            shared_policy: "round_robin".into(),
            max_shared_groups: d.max_shared_groups,
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

/// `[kafka]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct KafkaSection {
    /// Serve the Kafka protocol at all.
    pub enabled: bool,
    /// TCP address.
    pub listen: String,
    /// Kafka over TLS, used when `[tls]` has a certificate; empty: none.
    pub tls_listen: String,
    /// Host named to clients in Metadata answers; empty: the address each
    /// client connected to.
    pub advertised_host: String,
    /// Connections held open at most.
    pub max_connections: usize,
    /// Largest request, bytes (checked from its size prefix, before buffering).
    pub max_request_bytes: usize,
    /// Requests one connection may have in progress.
    pub max_in_flight: usize,
    /// Longest a fetch waits for records, whatever the client asks.
    pub max_fetch_wait_ms: u64,
    /// Largest fetch answer, bytes (held from `limits.max_buffered_bytes`).
    pub max_fetch_bytes: usize,
    /// Transactional ids kept at most (a new one beyond is refused).
    pub max_transactional_ids: usize,
    /// An idle transactional id is forgotten after this long.
    pub transactional_id_expiration_ms: u64,
}

impl Default for KafkaSection {
    fn default() -> Self {
        let d = KafkaConfig::default();
        KafkaSection {
            enabled: true,
            listen: "0.0.0.0:9092".into(),
            tls_listen: "0.0.0.0:9093".into(),
            advertised_host: String::new(),
            max_connections: 10_000,
            max_request_bytes: d.max_request_bytes,
            max_in_flight: d.max_in_flight,
            max_fetch_wait_ms: d.max_fetch_wait_ms,
            max_fetch_bytes: d.max_fetch_bytes,
            max_transactional_ids: d.max_transactional_ids,
            transactional_id_expiration_ms: d.transactional_id_expiration_ms,
        }
    }
}

/// `[groups]`: the consumer-group coordinator (Kafka's group protocol).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct GroupsSection {
    /// An empty group's first rebalance waits this long for more members.
    pub initial_rebalance_delay_ms: u64,
    /// Shortest session timeout a member may ask for.
    pub min_session_timeout_ms: u64,
    /// Longest session timeout a member may ask for.
    pub max_session_timeout_ms: u64,
    /// Members across every group of the node.
    pub max_members: usize,
    /// Subscription and assignment bytes held for members, across the node.
    pub max_state_bytes: usize,
}

impl Default for GroupsSection {
    fn default() -> Self {
        let d = GroupsConfig::default();
        GroupsSection {
            initial_rebalance_delay_ms: d.initial_rebalance_delay.as_millis() as u64,
            min_session_timeout_ms: d.min_session_timeout.as_millis() as u64,
            max_session_timeout_ms: d.max_session_timeout.as_millis() as u64,
            max_members: d.max_members,
            max_state_bytes: d.max_state_bytes,
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

/// `[limits]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct LimitsSection {
    /// Bytes held in partially received requests, messages and frames across
    /// every connection and protocol; past it readers wait, then the newest
    /// request is refused with its protocol's code.
    pub max_buffered_bytes: usize,
    /// Pipelines the node runs at most (config file and API together).
    pub max_pipelines: usize,
    /// Every pipeline's state together (the checkpoints' sizes), in bytes;
    /// past it pipelines refuse events that need a new group.
    pub max_pipeline_state_bytes: u64,
}

impl Default for LimitsSection {
    fn default() -> Self {
        LimitsSection {
            max_buffered_bytes: tributary_frontend::budget::DEFAULT_MAX_BUFFERED_BYTES,
            max_pipelines: 32,
            max_pipeline_state_bytes: 256 << 20,
        }
    }
}

impl Config {
    /// Are the TLS listeners on (a certificate and key configured)?
    pub fn tls_enabled(&self) -> bool {
        self.tls.cert.is_some() && self.tls.key.is_some()
    }

    pub(super) fn mqtt_routes(&self) -> Vec<Route> {
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
            default_topic: m.default_topic.clone(),
            max_keep_alive_secs: m.max_keep_alive_secs,
            sys_interval_secs: m.sys_interval_secs,
            shared_policy: if m.shared_policy == "sticky" {
                SharedPolicy::Sticky
            } else {
                SharedPolicy::RoundRobin
            },
            max_shared_groups: m.max_shared_groups,
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

    /// The Kafka front end's settings.
    pub fn kafka_config(&self) -> KafkaConfig {
        let k = &self.kafka;
        KafkaConfig {
            max_request_bytes: k.max_request_bytes,
            advertised_host: (!k.advertised_host.is_empty()).then(|| k.advertised_host.clone()),
            max_in_flight: k.max_in_flight,
            max_fetch_wait_ms: k.max_fetch_wait_ms,
            max_fetch_bytes: k.max_fetch_bytes,
            max_transactional_ids: k.max_transactional_ids,
            transactional_id_expiration_ms: k.transactional_id_expiration_ms,
        }
    }

    /// The group coordinator's settings.
    pub fn groups_config(&self) -> GroupsConfig {
        let g = &self.groups;
        GroupsConfig {
            initial_rebalance_delay: Duration::from_millis(g.initial_rebalance_delay_ms),
            min_session_timeout: Duration::from_millis(g.min_session_timeout_ms),
            max_session_timeout: Duration::from_millis(g.max_session_timeout_ms),
            max_members: g.max_members,
            max_state_bytes: g.max_state_bytes,
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

pub(super) fn bridge_config(b: &BridgeSection) -> Result<BridgeConfig, String> {
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
    if !tributary_amqp::bridge::AVAILABLE {
        return Err("this build has no AMQP bridge (cargo feature `amqp-bridge`)".into());
    }
    tributary_amqp::bridge::validate_url(&b.url).map_err(|e| format!("`url` {e}"))?;
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
        group: format!("amqp-bridge-{}", b.name),
    })
}
