//! Telemetry every crate of the node shares, so each metric is written one
//! way and each refusal is counted and logged by one call:
//!
//! - [`Text`]: the one Prometheus text writer. Every `/metrics` sample of the
//!   node is written through it: `# HELP`/`# TYPE` once per family, label
//!   values escaped, histograms cumulative.
//! - [`MetricsSource`] and [`MetricsHub`]: the one registry. Front ends, the
//!   device registry, TLS and the sync link register a source; `/metrics`
//!   renders the log's figures and then every source.
//! - [`Reason`] and [`Reasons`]: an enum per area (MQTT, AMQP, WebSockets, the
//!   sync link) names why something was refused or lost; [`Reasons::record`]
//!   counts it under its bounded label and logs it at the reason's level in
//!   the same call, so the counter and the log cannot drift apart.
//! - [`Histogram`]: fixed buckets, counted without a lock.
//!
//! Why not the `prometheus-client` crate: our figures are read at scrape time
//! from counters the parts already keep (the log's stats, connection gauges,
//! session counts), so what is needed is an encoder, not a second set of
//! registered metric objects; this writer is ~200 lines with no dependency.

mod reason;
mod text;

pub use reason::{Reason, Reasons};
pub use text::{Family, Histogram, Kind, Text};

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};

/// Something that writes its own metrics.
pub trait MetricsSource: Send + Sync {
    /// Writes its families to `out`.
    fn render(&self, out: &mut Text);
}

/// The node's one metrics registry: every part registers its source here and
/// `/metrics` renders them all, in registration order.
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
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(source);
    }

    /// Renders every source.
    pub fn render(&self, out: &mut Text) {
        let sources = self
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        for s in sources {
            s.render(out);
        }
    }
}
