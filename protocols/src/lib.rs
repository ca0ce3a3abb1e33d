//! Tributary's front ends. Each one only translates: wire frames become
//! [`tributary_storage::Event`]s, the log appends them, and the acknowledgement
//! goes out only after the log says durable (`docs/design.md`, section 3; the
//! interface each one offers is in `docs/contract.md`).
//!
//! What lives where:
//! - [`budget`]: the node-wide memory budget for bytes received but not yet
//!   whole (`limits.max_buffered_bytes`).
//! - [`ingest`]: the one append path every front end writes through, with a
//!   typed [`ingest::Rejection`] each protocol maps to its own code.
//! - [`frontend`]: the [`frontend::Frontend`] trait and the one accept loop
//!   that serves MQTT and AMQP on their TCP (and TLS) listeners.
//! - [`listener`]: a TCP listener with a connection limit, shared by every front end.
//! - [`http`]: the HTTP API (axum): topics, produce, fetch, consumer groups,
//!   health, metrics, stats, the dashboard, the device admin API, the OpenAPI
//!   document, the WebSocket endpoints ([`http::ws`]) and connection hygiene
//!   ([`http::serve`](mod@http::serve)).
//! - [`mqtt`]: MQTT 3.1.1 and 5 (TCP and WebSocket) over our own session layer.
//! - [`amqp`]: AMQP 0-9-1 (publish with confirms) and the lapin bridge to RabbitMQ.
//! - [`auth`]: the one authentication/authorization hook every protocol calls.
//! - [`panics`]: a panic closes only the connection it hit, and is counted.
//! - [`tls`]: TLS and mTLS for every listener, with certificate reload.
//! - [`wait`]: an optional deadline and the oldest of a task queue, for `select!`.
//!
//! Every front end has the same shape and names: a `Server` with what its
//! connections share, a `Connection` per client, one shutdown token.

pub mod amqp;
pub mod budget;
pub use tributary_devices::auth;
pub mod frontend;
pub mod http;
pub use tributary_ingest as ingest;
pub mod listener;
pub mod mqtt;
pub mod panics;
pub mod tls;
pub mod wait;

use std::collections::BTreeMap;
use std::fmt;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tributary_storage::util::lock;

use tokio_util::sync::CancellationToken;
use tributary_storage::Log;

/// Who is on the other end of a connection, as the transport knows it.
#[derive(Debug, Clone, Default)]
pub struct Peer {
    /// The remote address.
    pub addr: Option<std::net::SocketAddr>,
    /// The identity of a verified client certificate (mTLS): its subject CN.
    pub certificate: Option<String>,
}

/// What every front end gets from the gateway.
#[derive(Debug, Clone)]
pub struct FrontendContext {
    /// The one write path.
    pub log: Log,
    /// Cancelled when the node shuts down.
    pub shutdown: CancellationToken,
    /// `edge` or `core`, for health and stats.
    pub mode: &'static str,
    /// Who may connect, publish and subscribe.
    pub auth: Arc<dyn auth::Authenticator>,
    /// The device registry (admin API), when the gateway opened one.
    pub devices: Option<Arc<tributary_devices::Registry>>,
    /// Metrics of every front end, rendered by `/metrics`.
    pub metrics: MetricsHub,
    /// Open connections per protocol, for `/v1/stats` and the dashboard.
    pub connections: ConnectionGauges,
    /// Sections of `/v1/stats` other parts of the node fill (`sync`).
    pub stats: StatsSections,
    /// Bytes buffered from peers, across every connection and protocol.
    pub budget: budget::MemoryBudget,
}

impl FrontendContext {
    /// A context with anonymous access and no extra metrics.
    pub fn new(log: Log, shutdown: CancellationToken, mode: &'static str) -> Self {
        FrontendContext {
            log,
            shutdown,
            mode,
            auth: Arc::new(auth::Anonymous),
            devices: None,
            metrics: MetricsHub::default(),
            connections: ConnectionGauges::default(),
            stats: StatsSections::default(),
            budget: budget::MemoryBudget::default(),
        }
    }
}

/// Fills one section of `/v1/stats`.
pub type StatsSection = Arc<dyn Fn() -> serde_json::Value + Send + Sync>;

/// Named sections of `/v1/stats` (the sync link's, for one).
#[derive(Clone, Default)]
pub struct StatsSections(Arc<Mutex<Vec<(&'static str, StatsSection)>>>);

impl fmt::Debug for StatsSections {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StatsSections").finish_non_exhaustive()
    }
}

impl StatsSections {
    /// Adds a section under `name`.
    pub fn register(&self, name: &'static str, section: StatsSection) {
        lock(&self.0).push((name, section));
    }

    /// Every section, rendered now.
    pub fn read(&self) -> Vec<(&'static str, serde_json::Value)> {
        let sections = lock(&self.0).clone();
        sections.into_iter().map(|(n, f)| (n, f())).collect()
    }
}

/// Something that appends Prometheus text for its own metrics.
pub trait MetricsSource: Send + Sync {
    /// Appends `# HELP`/`# TYPE` blocks and samples to `out`.
    fn render(&self, out: &mut String);
}

impl MetricsSource for tributary_devices::Registry {
    fn render(&self, out: &mut String) {
        self.render_metrics(out);
    }
}

/// Front ends register their metrics here; `/metrics` renders them all.
#[derive(Clone, Default)]
pub struct MetricsHub(Arc<Mutex<Vec<Arc<dyn MetricsSource>>>>);

impl fmt::Debug for MetricsHub {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MetricsHub").finish_non_exhaustive()
    }
}

impl MetricsHub {
    /// Adds a source.
    pub fn register(&self, source: Arc<dyn MetricsSource>) {
        lock(&self.0).push(source);
    }

    /// Renders every source.
    pub fn render(&self, out: &mut String) {
        let sources = lock(&self.0).clone();
        for s in sources {
            s.render(out);
        }
    }
}

/// A source of "connections open now" for one protocol.
pub type Gauge = Arc<dyn Fn() -> u64 + Send + Sync>;

/// Front ends register how many connections they hold; `/v1/stats` reads them.
#[derive(Clone, Default)]
pub struct ConnectionGauges(Arc<Mutex<Vec<(&'static str, Gauge)>>>);

impl fmt::Debug for ConnectionGauges {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectionGauges").finish_non_exhaustive()
    }
}

impl ConnectionGauges {
    /// Adds a protocol's gauge.
    pub fn register(&self, protocol: &'static str, gauge: Gauge) {
        lock(&self.0).push((protocol, gauge));
    }

    /// Every protocol's open connections, in registration order.
    pub fn read(&self) -> Vec<(&'static str, u64)> {
        let gauges = lock(&self.0).clone();
        gauges.into_iter().map(|(p, g)| (p, g())).collect()
    }
}

/// Ack latency histogram bounds, seconds (every front end's `*_ack_seconds`).
pub const ACK_BUCKETS: [f64; 10] = [0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 2.0];

/// A Prometheus histogram of ack latencies over [`ACK_BUCKETS`].
#[derive(Debug, Default)]
pub struct AckHistogram {
    buckets: [AtomicU64; ACK_BUCKETS.len() + 1],
    micros: AtomicU64,
    count: AtomicU64,
}

impl AckHistogram {
    /// Records `n` acks that each took `took`.
    pub fn observe(&self, took: Duration, n: u64) {
        let s = took.as_secs_f64();
        let i = ACK_BUCKETS
            .iter()
            .position(|&b| s <= b)
            .unwrap_or(ACK_BUCKETS.len());
        self.buckets[i].fetch_add(n, Relaxed);
        self.micros.fetch_add(took.as_micros() as u64 * n, Relaxed);
        self.count.fetch_add(n, Relaxed);
    }

    /// Renders the histogram as metric `name` with `help`.
    pub fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (i, b) in self.buckets.iter().enumerate() {
            cumulative += b.load(Relaxed);
            let le = ACK_BUCKETS
                .get(i)
                .map_or("+Inf".to_owned(), |v| v.to_string());
            let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {cumulative}");
        }
        let _ = writeln!(
            out,
            "{name}_sum {:.6}\n{name}_count {}",
            self.micros.load(Relaxed) as f64 / 1e6,
            self.count.load(Relaxed)
        );
    }
}

/// Counts of refused or failed things under bounded reason labels.
#[derive(Debug, Default)]
pub struct Rejections(Mutex<BTreeMap<&'static str, u64>>);

impl Rejections {
    /// Counts one under `reason`.
    pub fn add(&self, reason: &'static str) {
        *lock(&self.0).entry(reason).or_insert(0) += 1;
    }

    /// The count for `reason`.
    pub fn get(&self, reason: &str) -> u64 {
        lock(&self.0).get(reason).copied().unwrap_or(0)
    }

    /// Renders the counter as metric `name{reason=...}` with `help`.
    pub fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        for (reason, n) in lock(&self.0).iter() {
            let _ = writeln!(out, "{name}{{reason=\"{reason}\"}} {n}");
        }
    }
}
