//! Prometheus text for `/metrics`: the log's counters, per-topic and
//! per-partition figures (topics are operator-named and bounded), and HTTP
//! request counts by route template. Nothing is labelled by key or device.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Mutex;
use std::time::Duration;
use tributary_storage::util::lock;

use axum::http::{Method, StatusCode};
use tributary_storage::{Log, COMMIT_BUCKETS};

use tributary_frontend::listener::ConnectionStats;

/// (method, route template, status class) → (requests, seconds spent).
type RequestCounts = BTreeMap<(String, String, u16), (u64, f64)>;

/// HTTP request counters.
#[derive(Debug, Default)]
pub struct HttpMetrics {
    requests: Mutex<RequestCounts>,
}

impl HttpMetrics {
    /// Counts one request. Unmatched paths count under `unmatched`, so the
    /// label set stays bounded whatever clients send.
    pub fn observe(
        &self,
        method: &Method,
        route: Option<&str>,
        status: StatusCode,
        took: Duration,
    ) {
        let key = (
            method.as_str().to_owned(),
            route.unwrap_or("unmatched").to_owned(),
            status.as_u16() / 100,
        );
        let mut m = lock(&self.requests);
        let e = m.entry(key).or_insert((0, 0.0));
        e.0 += 1;
        e.1 += took.as_secs_f64();
    }
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// Renders every metric.
pub fn render(log: &Log, http: &HttpMetrics, conns: &ConnectionStats, uptime: Duration) -> String {
    let s = log.stats();
    let mut out = String::with_capacity(4096);
    header(
        &mut out,
        "tributary_uptime_seconds",
        "gauge",
        "Seconds since the node started.",
    );
    let _ = writeln!(out, "tributary_uptime_seconds {:.3}", uptime.as_secs_f64());
    header(
        &mut out,
        "tributary_panics_total",
        "counter",
        "Panics caught: each closed only the connection or task it hit.",
    );
    let _ = writeln!(
        out,
        "tributary_panics_total {}",
        tributary_frontend::panics::count()
    );
    header(
        &mut out,
        "tributary_log_writable",
        "gauge",
        "1 when the log accepts writes.",
    );
    let _ = writeln!(
        out,
        "tributary_log_writable {}",
        u8::from(log.health().is_ok())
    );
    for (name, help, v) in [
        (
            "tributary_append_requests_total",
            "Append calls acknowledged.",
            s.append_requests,
        ),
        (
            "tributary_append_events_total",
            "Events appended and acknowledged.",
            s.append_events,
        ),
        (
            "tributary_append_bytes_total",
            "Encoded bytes appended.",
            s.append_bytes,
        ),
        (
            "tributary_append_errors_total",
            "Append calls that failed.",
            s.append_errors,
        ),
        (
            "tributary_retention_removed_batches_total",
            "Batches removed by retention.",
            s.retention_removed_batches,
        ),
        (
            "tributary_retention_removed_events_total",
            "Events removed by retention.",
            s.retention_removed_events,
        ),
        (
            "tributary_quota_dropped_batches_total",
            "Batches evicted to stay within storage.max_disk_bytes (on_full = drop_oldest).",
            s.quota_dropped_batches,
        ),
        (
            "tributary_quota_dropped_events_total",
            "Events evicted to stay within storage.max_disk_bytes (on_full = drop_oldest).",
            s.quota_dropped_events,
        ),
        (
            "tributary_quota_dropped_unforwarded_events_total",
            "Of the evicted events, those not yet forwarded upstream (the core never gets them; the edge tells it).",
            s.quota_dropped_unforwarded_events,
        ),
        (
            "tributary_quota_rejected_appends_total",
            "Appends refused at storage.max_disk_bytes (nothing evictable made room).",
            s.quota_rejected_appends,
        ),
        (
            "tributary_disk_full_rejected_appends_total",
            "Appends refused because the disk had less free space than storage.min_free_bytes.",
            s.disk_full_rejected_appends,
        ),
    ] {
        header(&mut out, name, "counter", help);
        let _ = writeln!(out, "{name} {v}");
    }
    header(
        &mut out,
        "tributary_commit_duration_seconds",
        "histogram",
        "Commit cycle time: write + flush + fsync.",
    );
    for (bound, count) in COMMIT_BUCKETS.iter().zip(&s.commit_buckets) {
        let _ = writeln!(
            out,
            "tributary_commit_duration_seconds_bucket{{le=\"{bound}\"}} {count}"
        );
    }
    let _ = writeln!(
        out,
        "tributary_commit_duration_seconds_bucket{{le=\"+Inf\"}} {}",
        s.commit_cycles
    );
    let _ = writeln!(
        out,
        "tributary_commit_duration_seconds_sum {}",
        s.commit_seconds_sum
    );
    let _ = writeln!(
        out,
        "tributary_commit_duration_seconds_count {}",
        s.commit_cycles
    );
    header(
        &mut out,
        "tributary_disk_bytes",
        "gauge",
        "Bytes the log occupies on disk.",
    );
    let _ = writeln!(out, "tributary_disk_bytes {}", log.disk_bytes());

    let topics = log.topics();
    header(
        &mut out,
        "tributary_topic_events_appended_total",
        "counter",
        "Events appended per topic since start.",
    );
    for t in &topics {
        let _ = writeln!(
            out,
            "tributary_topic_events_appended_total{{topic=\"{}\"}} {}",
            t.config.name, t.events_appended
        );
    }
    for (name, help) in [
        (
            "tributary_partition_start_offset",
            "First offset kept per partition.",
        ),
        (
            "tributary_partition_end_offset",
            "Next offset per partition.",
        ),
        ("tributary_partition_bytes", "Bytes stored per partition."),
    ] {
        header(&mut out, name, "gauge", help);
        for t in &topics {
            for p in &t.partitions {
                let v = match name {
                    "tributary_partition_start_offset" => p.start_offset,
                    "tributary_partition_end_offset" => p.end_offset,
                    _ => p.bytes,
                };
                let _ = writeln!(
                    out,
                    "{name}{{topic=\"{}\",partition=\"{}\"}} {v}",
                    t.config.name, p.partition
                );
            }
        }
    }

    header(
        &mut out,
        "tributary_http_connections_open",
        "gauge",
        "HTTP connections open.",
    );
    let _ = writeln!(
        out,
        "tributary_http_connections_open {}",
        conns.open.load(Relaxed)
    );
    header(
        &mut out,
        "tributary_http_connections_accepted_total",
        "counter",
        "HTTP connections accepted.",
    );
    let _ = writeln!(
        out,
        "tributary_http_connections_accepted_total {}",
        conns.accepted.load(Relaxed)
    );
    header(
        &mut out,
        "tributary_http_requests_total",
        "counter",
        "HTTP requests by method, route and status class.",
    );
    let requests = lock(&http.requests).clone();
    for ((method, route, class), (count, _)) in &requests {
        let _ = writeln!(
            out,
            "tributary_http_requests_total{{method=\"{method}\",route=\"{route}\",status=\"{class}xx\"}} {count}"
        );
    }
    header(
        &mut out,
        "tributary_http_request_seconds_sum",
        "counter",
        "Total time spent serving HTTP requests.",
    );
    for ((method, route, class), (_, secs)) in &requests {
        let _ = writeln!(
            out,
            "tributary_http_request_seconds_sum{{method=\"{method}\",route=\"{route}\",status=\"{class}xx\"}} {secs:.6}"
        );
    }
    out
}
