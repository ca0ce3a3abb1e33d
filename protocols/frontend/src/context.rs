//! What every front end gets from the node: who is on the other end of a
//! connection ([`Peer`]), the shared [`FrontendContext`], and the registries
//! `/v1/stats` reads ([`StatsSections`], [`ConnectionGauges`]).

use std::fmt;
use std::sync::{Arc, Mutex};
use tributary_groups::{Coordinator, GroupsConfig};

use tokio_util::sync::CancellationToken;
use tributary_devices::auth;
use tributary_storage::util::lock;
use tributary_storage::Log;

use crate::budget;
use crate::metrics::MetricsHub;

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
    /// Consumer groups: membership and committed offsets.
    pub groups: Coordinator,
}

impl FrontendContext {
    /// A context with anonymous access and no extra metrics; its group
    /// coordinator runs on the current runtime.
    pub fn new(log: Log, shutdown: CancellationToken, mode: &'static str) -> Self {
        Self::with_groups(log, shutdown, mode, GroupsConfig::default())
    }

    /// [`Self::new`] with group coordinator settings.
    pub fn with_groups(
        log: Log,
        shutdown: CancellationToken,
        mode: &'static str,
        groups: GroupsConfig,
    ) -> Self {
        let groups = Coordinator::start(log.clone(), groups, shutdown.clone());
        FrontendContext {
            groups,
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
