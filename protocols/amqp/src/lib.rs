//! AMQP 0-9-1 front end: a publish-only broker on amq-protocol's frame codec
//! ([`frame`]): the [`Server`] holds what every connection shares and is
//! served by the one accept loop ([`tributary_frontend::serve()`]); a `conn::Connection`
//! per client runs it.
//!
//! - `basic.publish(E, R)` appends to topic E (or R on the default exchange)
//!   with key R ([`mapping`]). Messages completed by one socket read join one
//!   append per topic, and appends from every connection share the log's group
//!   commit.
//! - Publisher confirms: `basic.ack` only after the log says durable
//!   (`multiple` when it covers several), `basic.nack` when a message is
//!   refused. A `mandatory` publish with no topic gets `basic.return` 312 first.
//! - What a consumer would need (consume, get, transactions) answers
//!   connection.close 540 naming the method: consumers read over HTTP,
//!   WebSockets or MQTT, or through the [`bridge`] from RabbitMQ.
//! - The [`bridge`] moves messages between a RabbitMQ and the log with lapin.
//! - What goes wrong, from a frame that does not parse to a bridge that
//!   lost its broker, is one [`Error`].

pub mod bridge;
#[cfg(feature = "amqp-bridge")]
mod bridge_worker;
mod conn;
pub mod error;
pub mod frame;
pub mod mapping;
mod refusal;

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

pub use error::{Error, Result};
pub use refusal::Refusal;
use tributary_frontend::listener::{ConnectionStats, ListenerSet};
use tributary_frontend::tls::MaybeTls;
use tributary_frontend::Frontend;
use tributary_frontend::{AckHistogram, FrontendContext, MetricsSource, Peer, Reasons, Text};

/// AMQP front-end settings (`[amqp]`).
#[derive(Debug, Clone)]
pub struct AmqpConfig {
    /// Connections held open at most.
    pub max_connections: usize,
    /// Highest channel number a client may open (offered in connection.tune).
    pub max_channels: u16,
    /// Largest frame, overhead included (offered in connection.tune).
    pub frame_max: u32,
    /// Heartbeat interval offered, seconds (0: none unless the client asks).
    pub heartbeat_secs: u16,
    /// Time a new connection has to finish the handshake.
    pub handshake_timeout: Duration,
    /// Largest message body accepted.
    pub max_message_bytes: u64,
    /// Content bytes one connection may hold across channels while bodies arrive.
    pub max_content_bytes: u64,
    /// Appends one connection may have waiting for the disk before it stops reading.
    pub max_pending_appends: usize,
}

impl Default for AmqpConfig {
    fn default() -> Self {
        AmqpConfig {
            max_connections: 10_000,
            max_channels: 256,
            frame_max: 131_072,
            heartbeat_secs: 60,
            handshake_timeout: Duration::from_secs(10),
            max_message_bytes: 1024 * 1024,
            max_content_bytes: 16 * 1024 * 1024,
            max_pending_appends: 8,
        }
    }
}

/// AMQP counters for `/metrics`.
#[derive(Debug, Default)]
pub struct AmqpMetrics {
    logins: AtomicU64,
    publishes: AtomicU64,
    acks: AtomicU64,
    nacks: AtomicU64,
    returns: AtomicU64,
    blocked: AtomicU64,
    ack_latency: AckHistogram,
    rejections: Reasons<Refusal>,
    connections: ListenerSet,
}

impl AmqpMetrics {
    /// Counts a refused or closed thing and logs it, in one call.
    pub fn refuse(&self, why: Refusal) {
        self.rejections.record(why);
    }

    /// [`Self::refuse`], logging what went wrong too.
    pub fn refuse_with(&self, why: Refusal, detail: &dyn std::fmt::Display) {
        self.rejections.record_with(why, detail);
    }

    /// Rejections so far for `reason` (tests read this).
    pub fn rejections(&self, reason: &str) -> u64 {
        self.rejections.get(reason)
    }

    fn confirmed(&self, took: Duration, n: u64) {
        self.ack_latency.observe(took, n);
    }

    /// AMQP connections open now.
    pub fn open_connections(&self) -> u64 {
        self.connections.open()
    }
}

impl MetricsSource for AmqpMetrics {
    fn render(&self, out: &mut Text) {
        let accepted = self.connections.accepted();
        let counters = [
            (
                "connections_accepted_total",
                "AMQP TCP connections accepted.",
                accepted,
            ),
            (
                "logins_total",
                "AMQP connections that passed the handshake.",
                self.logins.load(Relaxed),
            ),
            (
                "publishes_total",
                "Messages published (whole: method, header and body).",
                self.publishes.load(Relaxed),
            ),
            (
                "acks_total",
                "Publishes confirmed with basic.ack (after durable).",
                self.acks.load(Relaxed),
            ),
            (
                "nacks_total",
                "Publishes refused with basic.nack.",
                self.nacks.load(Relaxed),
            ),
            (
                "returns_total",
                "Mandatory publishes returned with basic.return 312.",
                self.returns.load(Relaxed),
            ),
            (
                "blocked_total",
                "connection.blocked sent because appends waited on the disk.",
                self.blocked.load(Relaxed),
            ),
        ];
        out.gauge(
            "tributary_amqp_connections",
            "Open AMQP connections.",
            self.open_connections(),
        );
        for (name, help, v) in counters {
            out.counter(&format!("tributary_amqp_{name}"), help, v);
        }
        self.ack_latency.render(
            out,
            "tributary_amqp_ack_seconds",
            "Time from a publish batch's append to its durable confirm.",
        );
        self.rejections.render(
            out,
            "tributary_amqp_rejections_total",
            "Refused connections, frames and publishes, by reason.",
        );
    }
}

/// State shared by every AMQP connection of a node.
#[derive(Debug)]
pub struct Server {
    cx: FrontendContext,
    config: AmqpConfig,
    metrics: Arc<AmqpMetrics>,
}

impl Server {
    /// Builds the server and registers its metrics and connection gauge.
    pub fn new(cx: FrontendContext, config: AmqpConfig) -> Arc<Self> {
        let metrics = Arc::new(AmqpMetrics::default());
        cx.metrics.register(metrics.clone());
        let gauge = metrics.clone();
        cx.connections
            .register("amqp", Arc::new(move || gauge.open_connections()));
        Arc::new(Server {
            cx,
            config,
            metrics,
        })
    }

    /// Counters (tests and `/metrics`).
    pub fn metrics(&self) -> &Arc<AmqpMetrics> {
        &self.metrics
    }
}

/// Served on TCP listeners by [`tributary_frontend::serve()`]. Each connection
/// runs in its own task; at shutdown it confirms what is durable, then closes
/// with connection.close 320. On a TLS listener (AMQPS, 5671) a verified
/// client certificate names the device.
impl Frontend for Server {
    fn context(&self) -> &FrontendContext {
        &self.cx
    }

    fn listening(&self, stats: Arc<ConnectionStats>) {
        self.metrics.connections.add(stats);
    }

    async fn connection(self: Arc<Self>, stream: MaybeTls, peer: Peer) {
        conn::run(self, stream, peer).await;
    }
}
