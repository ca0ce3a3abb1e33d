//! The bridge between a RabbitMQ (or any AMQP 0-9-1 broker) and the log, on
//! lapin. One task per `[[amqp.bridges]]` entry:
//!
//! - `direction = "in"`: consume a queue into a topic. Deliveries ready
//!   together become one append; RabbitMQ gets `basic.ack` (multiple) only
//!   once the append is durable. A crash between the two redelivers: at least
//!   once.
//! - `direction = "out"`: forward a topic to an exchange with publisher
//!   confirms. The position is a consumer group (`amqp-bridge-<name>`),
//!   committed only after RabbitMQ confirmed everything before it: at least
//!   once, in partition order.
//!
//! Both reconnect with exponential backoff and full jitter, and put timeouts
//! around everything that waits on the broker (lapin's auto-recovery once left
//! a confirm unresolved, so it is not used).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tributary_storage::util::lock;

use tributary_frontend::metrics::Kind;
use tributary_frontend::{FrontendContext, MetricsSource, Text};

use crate::Error;

/// True when this build has the bridge (cargo feature `amqp-bridge`).
pub const AVAILABLE: bool = cfg!(feature = "amqp-bridge");

/// Checks a bridge URL (`amqp://user:pass@host:port/vhost`); an
/// [`Error::Url`] says what is wrong.
pub fn validate_url(url: &str) -> Result<(), Error> {
    if !(url.starts_with("amqp://") || url.starts_with("amqps://")) {
        return Err(Error::Url(format!(
            "must start with amqp:// or amqps://, got `{url}`"
        )));
    }
    url.parse::<amq_protocol::uri::AMQPUri>()
        .map(|_| ())
        .map_err(|e| Error::Url(format!("not a valid AMQP URI: {e}")))
}

/// Which way a bridge moves messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// RabbitMQ queue → topic.
    In,
    /// Topic → RabbitMQ exchange.
    Out,
}

impl Direction {
    /// `in` or `out`.
    pub fn label(self) -> &'static str {
        match self {
            Direction::In => "in",
            Direction::Out => "out",
        }
    }
}

/// One `[[amqp.bridges]]` entry.
#[derive(Debug, Clone)]
pub struct BridgeConfig {
    /// Name (metrics label, consumer group suffix).
    pub name: String,
    /// Which way.
    pub direction: Direction,
    /// `amqp://user:pass@host:port/vhost` (or `amqps://`).
    pub url: String,
    /// The log topic.
    pub topic: String,
    /// `in`: the queue to consume.
    pub queue: String,
    /// `out`: the exchange to publish to (`""`: the default exchange).
    pub exchange: String,
    /// `out`: a fixed routing key; otherwise the record's key, or the topic name.
    pub routing_key: Option<String>,
    /// Messages per append (`in`, also the prefetch) or per confirm round (`out`).
    pub batch: u16,
    /// How long a connect, a confirm round or an ack may take.
    pub timeout: Duration,
    /// First reconnect delay; doubles up to `max_backoff`, with full jitter.
    pub min_backoff: Duration,
    /// Longest reconnect delay.
    pub max_backoff: Duration,
    /// The consumer group an `out` bridge keeps its position in
    /// (`amqp-bridge-<name>` for `[[amqp.bridges]]`, `connector-<name>` for
    /// the connector kinds).
    pub group: String,
}

impl BridgeConfig {
    /// The consumer group an `out` bridge keeps its position in.
    pub fn group(&self) -> String {
        self.group.clone()
    }
}

/// Counters of one bridge.
#[derive(Debug, Default)]
pub struct BridgeStats {
    /// Messages moved (appended durably, or confirmed by the broker).
    pub messages: AtomicU64,
    /// Appends (in) or confirm rounds (out) that moved messages.
    pub batches: AtomicU64,
    /// Why the last connection ended (cleared when one is made).
    pub last_error: Mutex<Option<String>>,
    /// Connections made.
    pub connects: AtomicU64,
    /// Failures that ended a connection (broker gone, timeout, nack).
    pub errors: AtomicU64,
    /// Messages refused for good (larger than the topic allows).
    pub rejected: AtomicU64,
    /// Connected now.
    pub connected: AtomicBool,
}

/// Metrics of every bridge of a node.
#[derive(Debug, Default)]
pub struct BridgeMetrics {
    bridges: Mutex<Vec<(String, Direction, Arc<BridgeStats>)>>,
}

impl BridgeMetrics {
    fn add(&self, name: &str, direction: Direction) -> Arc<BridgeStats> {
        let stats = Arc::new(BridgeStats::default());
        lock(&self.bridges).push((name.to_owned(), direction, stats.clone()));
        stats
    }
}

impl MetricsSource for BridgeMetrics {
    fn render(&self, out: &mut Text) {
        let bridges = lock(&self.bridges);
        if bridges.is_empty() {
            return;
        }
        type Field = fn(&BridgeStats) -> u64;
        let series: [(&str, Kind, &str, Field); 5] = [
            (
                "messages_total",
                Kind::Counter,
                "Messages moved: appended durably (in) or confirmed by the broker (out).",
                |s| s.messages.load(Relaxed),
            ),
            (
                "connects_total",
                Kind::Counter,
                "Connections made to the broker.",
                |s| s.connects.load(Relaxed),
            ),
            (
                "errors_total",
                Kind::Counter,
                "Failures that ended a broker connection.",
                |s| s.errors.load(Relaxed),
            ),
            (
                "rejected_total",
                Kind::Counter,
                "Messages rejected for good (in: larger than the topic allows).",
                |s| s.rejected.load(Relaxed),
            ),
            (
                "connected",
                Kind::Gauge,
                "1 while connected to the broker.",
                |s| u64::from(s.connected.load(Relaxed)),
            ),
        ];
        for (name, kind, help, field) in series {
            let name = format!("tributary_amqp_bridge_{name}");
            let mut family = out.family(&name, kind, help);
            for (bridge, direction, stats) in bridges.iter() {
                family.sample(
                    &[("bridge", bridge), ("direction", &direction.label())],
                    field(stats),
                );
            }
        }
    }
}

/// Starts every bridge; they run until the node shuts down.
pub fn start(cx: &FrontendContext, bridges: Vec<BridgeConfig>) -> Vec<tokio::task::JoinHandle<()>> {
    if bridges.is_empty() {
        return Vec::new();
    }
    let metrics = Arc::new(BridgeMetrics::default());
    cx.metrics.register(metrics.clone());
    bridges
        .into_iter()
        .map(|config| {
            let stats = metrics.add(&config.name, config.direction);
            tokio::spawn(run(cx.log.clone(), config, stats, cx.shutdown.clone()))
        })
        .collect()
}

/// Runs one bridge until `cancel` (the connectors' `amqp_sink` and
/// `amqp_source` run it too).
#[cfg(feature = "amqp-bridge")]
pub async fn run(
    log: tributary_storage::Log,
    config: BridgeConfig,
    stats: Arc<BridgeStats>,
    cancel: tokio_util::sync::CancellationToken,
) {
    super::bridge_worker::run(log, config, stats, cancel).await;
}

/// Connects to the bridge's broker and closes again: it is there and takes
/// the credentials.
#[cfg(feature = "amqp-bridge")]
pub async fn probe(config: &BridgeConfig) -> Result<(), String> {
    super::bridge_worker::probe(config).await
}

/// Connects to the bridge's broker: in this build, never.
#[cfg(not(feature = "amqp-bridge"))]
pub async fn probe(_: &BridgeConfig) -> Result<(), String> {
    Err("this build has no AMQP bridge (feature `amqp-bridge`)".into())
}

/// Runs one bridge: in this build, none (feature `amqp-bridge`).
#[cfg(not(feature = "amqp-bridge"))]
pub async fn run(
    _: tributary_storage::Log,
    config: BridgeConfig,
    _: Arc<BridgeStats>,
    _: tokio_util::sync::CancellationToken,
) {
    // Config validation refuses bridges in such a build; this is the backstop.
    tracing::error!(bridge = %config.name, "this build has no AMQP bridge (feature `amqp-bridge`)");
}
