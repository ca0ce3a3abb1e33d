//! Metrics every front end keeps: sources of Prometheus text registered in
//! one [`MetricsHub`] that `/metrics` renders, an ack-latency histogram and
//! reason-labelled counters.

use std::collections::BTreeMap;
use std::fmt;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tributary_storage::util::lock;

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
