//! What the core reports: its counters, `/v1/stats`'s `sync` section (every
//! edge, its streams and lag) and the Prometheus metrics.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use serde_json::json;
use tributary_telemetry::{MetricsSource, Text};

use super::{lock, EdgeSlot, Stream, SyncCore};
use crate::wire::code;

/// Counters of the core side.
#[derive(Debug, Default)]
pub(super) struct CoreMetrics {
    pub(super) connections: AtomicU64,
    pub(super) open: AtomicU64,
    pub(super) batches: AtomicU64,
    pub(super) events: AtomicU64,
    pub(super) duplicates: AtomicU64,
    pub(super) skipped: AtomicU64,
    /// Offsets edges' compaction removed before they were forwarded.
    pub(super) compacted: AtomicU64,
    pub(super) wire_bytes: AtomicU64,
    pub(super) rounds: AtomicU64,
    pub(super) errors: Mutex<std::collections::BTreeMap<&'static str, u64>>,
}

impl SyncCore {
    pub(super) fn count_error(&self, c: u16) {
        *lock(&self.inner.metrics.errors)
            .entry(code::name(c))
            .or_insert(0) += 1;
    }

    /// Sync connections open now (with or without a finished Hello).
    pub fn open_connections(&self) -> u64 {
        self.inner.metrics.open.load(Relaxed)
    }

    /// Edges connected now.
    pub fn connected_edges(&self) -> u64 {
        lock(&self.inner.edges)
            .values()
            .filter(|s| lock(&s.state).connected)
            .count() as u64
    }

    /// `/v1/stats`'s `sync` section on a core: every edge, its streams and lag.
    pub fn stats(&self) -> serde_json::Value {
        let edges: Vec<(String, Arc<EdgeSlot>)> = lock(&self.inner.edges)
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let mut list = Vec::new();
        for (id, slot) in edges {
            let st = lock(&slot.state);
            let mut topics: std::collections::BTreeMap<&str, (u64, u64)> = Default::default();
            for ((t, _), s) in &st.streams {
                let e = topics.entry(t).or_default();
                e.0 += s.lag();
                e.1 += s.received;
            }
            let topics: Vec<serde_json::Value> = topics
                .into_iter()
                .map(|(t, (lag, received))| json!({"topic": t, "lag_events": lag, "received_events": received}))
                .collect();
            list.push(json!({
                "edge": id,
                "connected": st.connected,
                "peer": st.peer.map(|p| p.to_string()),
                "connected_since_ms": st.since_ms,
                "last_seen_ms": st.last_seen_ms,
                "lag_events": st.streams.values().map(Stream::lag).sum::<u64>(),
                "topics": topics,
            }));
        }
        list.sort_by(|a, b| a["edge"].as_str().cmp(&b["edge"].as_str()));
        let m = &self.inner.metrics;
        json!({
            "role": "core",
            "edges_connected": self.connected_edges(),
            "received_events": m.events.load(Relaxed),
            "duplicate_events": m.duplicates.load(Relaxed),
            "skipped_events": m.skipped.load(Relaxed),
            "compacted_offsets": m.compacted.load(Relaxed),
            "edges": list,
        })
    }
}

impl MetricsSource for SyncCore {
    /// Appends the core's Prometheus metrics (never labelled by edge id).
    fn render(&self, out: &mut Text) {
        use tributary_telemetry::Kind::{Counter, Gauge};
        let m = &self.inner.metrics;
        let known = lock(&self.inner.edges).len() as u64;
        crate::metrics::render(
            out,
            &[
                (Gauge, "tributary_sync_edges_connected", "Edges connected now.", self.connected_edges()),
                (Gauge, "tributary_sync_edges_known", "Edges that ever connected.", known),
                (Gauge, "tributary_sync_core_connections_open", "Sync connections open now (before and after their Hello).", m.open.load(Relaxed)),
                (Counter, "tributary_sync_core_connections_total", "Sync connections accepted.", m.connections.load(Relaxed)),
                (Counter, "tributary_sync_received_batches_total", "Batches received from edges.", m.batches.load(Relaxed)),
                (Counter, "tributary_sync_received_events_total", "Events from edges appended (durable).", m.events.load(Relaxed)),
                (Counter, "tributary_sync_duplicate_events_total", "Events from edges the core already held (replays, dropped).", m.duplicates.load(Relaxed)),
                (Counter, "tributary_sync_skipped_events_total", "Events edges lost before forwarding them (their disk quota), recorded as gaps.", m.skipped.load(Relaxed)),
                (Counter, "tributary_sync_compacted_offsets_total", "Offsets edges' compaction removed before forwarding (each key's latest record still came), recorded as held.", m.compacted.load(Relaxed)),
                (Counter, "tributary_sync_core_wire_bytes_total", "Bytes of sync frames received.", m.wire_bytes.load(Relaxed)),
                (Counter, "tributary_sync_append_rounds_total", "Append rounds (each one log append per topic covering many batches).", m.rounds.load(Relaxed)),
            ],
        );
        crate::metrics::render_by_code(
            out,
            "tributary_sync_core_errors_total",
            "Sync errors sent to edges, by code.",
            &lock(&m.errors),
        );
    }
}
