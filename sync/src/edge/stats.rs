//! What the edge reports: its counters, the lag of each forwarded topic
//! (events, estimated bytes, oldest age, drain rate, ETA), `/v1/stats`'s
//! `sync` section and the Prometheus metrics.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::Instant;

use serde_json::json;
use tributary_telemetry::{MetricsSource, Text};

use super::{lock, now_ms, Uploader};

/// Counters of the edge side.
#[derive(Debug, Default)]
pub(super) struct EdgeMetrics {
    pub(super) connects: AtomicU64,
    pub(super) disconnects: AtomicU64,
    pub(super) batches: AtomicU64,
    pub(super) sent_events: AtomicU64,
    pub(super) acked_events: AtomicU64,
    pub(super) skipped_events: AtomicU64,
    /// Offsets compaction removed before they were forwarded (each key's
    /// latest record is still sent).
    pub(super) compacted_offsets: AtomicU64,
    pub(super) raw_bytes: AtomicU64,
    pub(super) wire_bytes: AtomicU64,
    pub(super) errors: Mutex<BTreeMap<&'static str, u64>>,
}

impl Uploader {
    /// Per forwarded topic: lag (events, estimated bytes, age of the oldest
    /// unforwarded event), drain rate and ETA.
    pub fn topic_lag(&self) -> Vec<TopicLag> {
        let c = &self.inner.config;
        let log = &self.inner.log;
        let known = lock(&self.inner.known).clone();
        let rates = self.rates();
        let now = now_ms();
        let mut out = Vec::new();
        for t in log.topics() {
            if c.priority(&t.config.name).is_none() {
                continue;
            }
            let mut lag = TopicLag {
                topic: t.config.name.clone(),
                ..TopicLag::default()
            };
            for p in &t.partitions {
                let held = known
                    .get(&(t.config.name.clone(), p.partition))
                    .map(|k| k.held.clone())
                    .unwrap_or_default();
                // Offsets below the start that the core lacks are lost, not lag.
                let missing = held.missing(p.start_offset, p.end_offset);
                let events: u64 = missing.iter().map(|(a, b)| b - a).sum();
                lag.events += events;
                let stored = p.end_offset - p.start_offset;
                if stored > 0 {
                    lag.bytes += (p.bytes as f64 * events as f64 / stored as f64) as u64;
                }
                if let Some(&(first, _)) = missing.first() {
                    if let Ok(r) = log.read(&t.config.name, p.partition, first, 1, 1) {
                        if let Some(rec) = r.records.first() {
                            let age = u64::try_from(now - rec.timestamp).unwrap_or(0);
                            lag.oldest_age_ms = lag.oldest_age_ms.max(age);
                        }
                    }
                }
                lag.forwarded_events += held.count_below(p.end_offset);
            }
            lag.rate = rates.get(&lag.topic).copied().unwrap_or(0.0);
            lag.eta_seconds = (lag.rate > 0.0).then(|| lag.events as f64 / lag.rate);
            out.push(lag);
        }
        out
    }

    fn rates(&self) -> HashMap<String, f64> {
        let s = lock(&self.inner.samples);
        let (Some((t0, a0)), Some((t1, a1))) = (s.front(), s.back()) else {
            return HashMap::new();
        };
        let secs = t1.duration_since(*t0).as_secs_f64();
        if secs <= 0.0 {
            return HashMap::new();
        }
        a1.iter()
            .map(|(t, n)| {
                (
                    t.clone(),
                    (n - a0.get(t).copied().unwrap_or(0)) as f64 / secs,
                )
            })
            .collect()
    }

    /// `/v1/stats`'s `sync` section on an edge.
    pub fn stats(&self) -> serde_json::Value {
        let m = &self.inner.metrics;
        let topics: Vec<serde_json::Value> = self
            .topic_lag()
            .into_iter()
            .map(|l| {
                json!({
                    "topic": l.topic,
                    "lag_events": l.events,
                    "lag_bytes": l.bytes,
                    "oldest_unforwarded_age_ms": l.oldest_age_ms,
                    "forwarded_events": l.forwarded_events,
                    "drain_rate_events_per_second": l.rate,
                    "eta_seconds": l.eta_seconds,
                })
            })
            .collect();
        json!({
            "role": "edge",
            "upstream": self.url(),
            "upstreams": self.inner.config.urls,
            "edge_id": self.inner.config.edge_id,
            "connected": self.is_connected(),
            "last_error": lock(&self.inner.last_error).clone(),
            "blocked": lock(&self.inner.blocked)
                .iter()
                .map(|((t, p), (o, until, why))| json!({
                    "topic": t,
                    "partition": p,
                    "offset": o,
                    "reason": why,
                    "retry_in_seconds": until.saturating_duration_since(Instant::now()).as_secs(),
                }))
                .collect::<Vec<_>>(),
            "sent_events": m.sent_events.load(Relaxed),
            "acked_events": m.acked_events.load(Relaxed),
            "skipped_events": m.skipped_events.load(Relaxed),
            "compacted_offsets": m.compacted_offsets.load(Relaxed),
            "raw_bytes": m.raw_bytes.load(Relaxed),
            "wire_bytes": m.wire_bytes.load(Relaxed),
            "topics": topics,
        })
    }
}

/// The lag of one forwarded topic.
#[derive(Debug, Clone, Default)]
pub struct TopicLag {
    /// Topic.
    pub topic: String,
    /// Events the core does not hold yet.
    pub events: u64,
    /// Their stored bytes (estimated).
    pub bytes: u64,
    /// Age of the oldest of them (ms).
    pub oldest_age_ms: u64,
    /// Events the core holds.
    pub forwarded_events: u64,
    /// Acknowledged events per second lately.
    pub rate: f64,
    /// `events / rate`, when draining.
    pub eta_seconds: Option<f64>,
}

impl MetricsSource for Uploader {
    /// Appends the edge's Prometheus metrics (labelled by topic name, never
    /// by key or device).
    fn render(&self, out: &mut Text) {
        use tributary_telemetry::Kind::{Counter, Gauge};
        let m = &self.inner.metrics;
        crate::metrics::render(
            out,
            &[
                (Gauge, "tributary_sync_connected", "1 while the link to the core is up.", u64::from(self.is_connected())),
                (Counter, "tributary_sync_connects_total", "Links to the core established (TCP, TLS, WebSocket).", m.connects.load(Relaxed)),
                (Counter, "tributary_sync_disconnects_total", "Links to the core lost or closed.", m.disconnects.load(Relaxed)),
                (Counter, "tributary_sync_sent_batches_total", "Batches sent to the core.", m.batches.load(Relaxed)),
                (Counter, "tributary_sync_sent_events_total", "Events sent to the core (resends after a reconnect included).", m.sent_events.load(Relaxed)),
                (Counter, "tributary_sync_acked_events_total", "Events the core acknowledged as durable.", m.acked_events.load(Relaxed)),
                (Counter, "tributary_sync_skipped_events_total", "Events lost before forwarding (evicted by the disk quota) and reported to the core as a gap.", m.skipped_events.load(Relaxed)),
                (Counter, "tributary_sync_compacted_offsets_total", "Offsets compaction removed before forwarding (each key's latest record is still sent).", m.compacted_offsets.load(Relaxed)),
                (Counter, "tributary_sync_raw_bytes_total", "Record bytes sent, before compression.", m.raw_bytes.load(Relaxed)),
                (Counter, "tributary_sync_wire_bytes_total", "Bytes of sync frames sent, after compression.", m.wire_bytes.load(Relaxed)),
            ],
        );
        crate::metrics::render_by_code(
            out,
            "tributary_sync_errors_total",
            "Errors the core reported, by code.",
            &lock(&m.errors),
        );
        let lags = self.topic_lag();
        let family = |out: &mut Text, name: &str, help: &str, f: &dyn Fn(&TopicLag) -> String| {
            let mut family = out.family(name, Gauge, help);
            for l in &lags {
                family.sample(&[("topic", &l.topic)], f(l));
            }
        };
        family(
            out,
            "tributary_sync_lag_events",
            "Events of the topic the core does not hold yet.",
            &|l| l.events.to_string(),
        );
        family(
            out,
            "tributary_sync_lag_bytes",
            "Stored bytes of those events (estimated from the partitions' average).",
            &|l| l.bytes.to_string(),
        );
        family(
            out,
            "tributary_sync_oldest_unforwarded_age_seconds",
            "Age of the oldest event the core does not hold yet.",
            &|l| format!("{:.3}", l.oldest_age_ms as f64 / 1000.0),
        );
        family(
            out,
            "tributary_sync_drain_rate_events_per_second",
            "Events acknowledged per second over the last 10 s.",
            &|l| format!("{:.1}", l.rate),
        );
        family(
            out,
            "tributary_sync_eta_seconds",
            "Lag divided by the drain rate (-1: not draining).",
            &|l| format!("{:.1}", l.eta_seconds.unwrap_or(-1.0)),
        );
    }
}
