//! `$SYS/broker/...`: the node's own statistics as MQTT topics, the way
//! mosquitto and most brokers publish them: version, uptime, clients
//! connected and total, messages received and sent, retained messages.
//!
//! They are not events, so they stay out of the log: every
//! `sys_interval_secs` the node takes a snapshot, and connections that hold a
//! subscription to `$SYS/...` send the values that changed since they last
//! sent them, at QoS 0. A new subscription gets every current value at once,
//! with the retain flag (they behave as retained messages). Clients cannot
//! publish under `$SYS/` (refused with 0x90).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tributary_storage::util::lock;

use super::Server;

/// The statistics at one moment, as (topic, value), sorted by topic.
pub type Snapshot = Arc<Vec<(String, String)>>;

/// A channel of snapshots (empty until the first one).
pub fn channel() -> (watch::Sender<Snapshot>, watch::Receiver<Snapshot>) {
    watch::channel(Arc::new(Vec::new()))
}

fn snapshot(broker: &Server, started: Instant) -> Vec<(String, String)> {
    let m = &broker.metrics;
    let sum = |c: &[AtomicU64; 3]| c.iter().map(|a| a.load(Relaxed)).sum::<u64>();
    let mut v = vec![
        (
            "$SYS/broker/version",
            format!("tributary {}", env!("CARGO_PKG_VERSION")),
        ),
        (
            "$SYS/broker/uptime",
            format!("{} seconds", started.elapsed().as_secs()),
        ),
        (
            "$SYS/broker/clients/connected",
            broker.open_connections().to_string(),
        ),
        (
            "$SYS/broker/clients/total",
            broker.sessions.len().to_string(),
        ),
        (
            "$SYS/broker/messages/received",
            sum(&m.publishes).to_string(),
        ),
        ("$SYS/broker/messages/sent", sum(&m.deliveries).to_string()),
        (
            "$SYS/broker/retained messages/count",
            lock(&broker.retained).len().to_string(),
        ),
        (
            "$SYS/broker/shared subscriptions/count",
            broker.shared.len().to_string(),
        ),
    ]
    .into_iter()
    .map(|(t, v)| (t.to_owned(), v))
    .collect::<Vec<_>>();
    v.sort();
    v
}

/// Takes a snapshot every `interval` until shutdown.
pub(super) async fn publisher(broker: Arc<Server>, interval: Duration) {
    let started = Instant::now();
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = broker.cx.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = snapshot(&broker, started);
        broker.sys.send_if_modified(|s| {
            if **s == now {
                return false;
            }
            *s = Arc::new(now);
            true
        });
    }
}
