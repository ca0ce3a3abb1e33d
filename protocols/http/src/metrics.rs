//! Prometheus text for `/metrics`: the log's counters, per-topic and
//! per-partition figures (topics are operator-named and bounded), and HTTP
//! request counts by route template. Nothing is labelled by key or device.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Mutex;
use std::time::Duration;
use tributary_storage::util::lock;

use axum::http::{Method, StatusCode};
use tributary_storage::{CompactionInfo, Log, PartitionInfo, COMMIT_BUCKETS};

use tributary_frontend::listener::ConnectionStats;
use tributary_frontend::metrics::{Kind, Text};

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

/// Renders the log's figures, the HTTP listener's and its requests.
pub fn render(log: &Log, http: &HttpMetrics, conns: &ConnectionStats, uptime: Duration) -> Text {
    let s = log.stats();
    let mut out = Text::new();
    out.gauge(
        "tributary_uptime_seconds",
        "Seconds since the node started.",
        format_args!("{:.3}", uptime.as_secs_f64()),
    );
    out.counter(
        "tributary_panics_total",
        "Panics caught: each closed only the connection or task it hit.",
        tributary_frontend::panics::count(),
    );
    out.gauge(
        "tributary_log_writable",
        "1 when the log accepts writes.",
        u8::from(log.health().is_ok()),
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
        (
            "tributary_compaction_passes_total",
            "Compaction passes over partitions of compacted topics.",
            s.compaction_passes,
        ),
        (
            "tributary_compaction_records_removed_total",
            "Records compaction removed (superseded by a later record of their key, or tombstones past their horizon).",
            s.compaction_records_removed,
        ),
        (
            "tributary_compaction_bytes_reclaimed_total",
            "Bytes of stored batches compaction gave back.",
            s.compaction_bytes_reclaimed,
        ),
        (
            "tributary_transactions_committed_total",
            "Kafka transactions committed (their commit markers durable).",
            s.transactions_committed,
        ),
        (
            "tributary_transactions_aborted_total",
            "Kafka transactions aborted (by their producer, by a fence or by their timeout).",
            s.transactions_aborted,
        ),
        (
            "tributary_transactions_timed_out_total",
            "Kafka transactions aborted because they ran past transaction.timeout.ms.",
            s.transactions_timed_out,
        ),
        (
            "tributary_transactions_fenced_requests_total",
            "Transactional requests refused because a newer epoch of their transactional id fenced the producer.",
            s.transactions_fenced,
        ),
    ] {
        out.counter(name, help, v);
    }
    // The log keeps cumulative counts; the writer takes them per bucket.
    let mut below = 0;
    let per_bucket: Vec<u64> = s
        .commit_buckets
        .iter()
        .map(|&c| {
            let n = c.saturating_sub(below);
            below = c;
            n
        })
        .collect();
    out.histogram(
        "tributary_commit_duration_seconds",
        "Commit cycle time: write + flush + fsync.",
        &COMMIT_BUCKETS,
        &per_bucket,
        s.commit_seconds_sum,
        s.commit_cycles,
    );
    out.gauge(
        "tributary_transactions_open",
        "Kafka transactions begun and not yet committed or aborted.",
        s.transactions_open,
    );
    out.gauge(
        "tributary_disk_bytes",
        "Bytes the log occupies on disk.",
        log.disk_bytes(),
    );

    let topics = log.topics();
    let mut family = out.family(
        "tributary_topic_events_appended_total",
        Kind::Counter,
        "Events appended per topic since start.",
    );
    for t in &topics {
        family.sample(&[("topic", &t.config.name)], t.events_appended);
    }
    type Compaction = fn(&CompactionInfo) -> f64;
    let compaction_figures: [(&str, Kind, &str, Compaction); 4] = [
        (
            "tributary_compaction_dirty_ratio",
            Kind::Gauge,
            "Per compacted topic, the largest share of a partition's bytes written since its last pass.",
            |c| c.dirty_ratio,
        ),
        (
            "tributary_compaction_last_pass_timestamp_seconds",
            Kind::Gauge,
            "Per compacted topic, when its last pass ended (0: none since start).",
            |c| c.last_pass_ms.unwrap_or(0) as f64 / 1e3,
        ),
        (
            "tributary_compaction_topic_bytes_reclaimed_total",
            Kind::Counter,
            "Per compacted topic, bytes its passes gave back since start.",
            |c| c.bytes_reclaimed as f64,
        ),
        (
            "tributary_compaction_topic_records_removed_total",
            Kind::Counter,
            "Per compacted topic, records its passes removed since start.",
            |c| c.records_removed as f64,
        ),
    ];
    for (name, kind, help, field) in compaction_figures {
        let mut family = out.family(name, kind, help);
        for t in &topics {
            if let Some(c) = &t.compaction {
                family.sample(&[("topic", &t.config.name)], field(c));
            }
        }
    }
    type Field = fn(&PartitionInfo) -> u64;
    let partition_figures: [(&str, &str, Field); 3] = [
        (
            "tributary_partition_start_offset",
            "First offset kept per partition.",
            |p| p.start_offset,
        ),
        (
            "tributary_partition_end_offset",
            "Next offset per partition.",
            |p| p.end_offset,
        ),
        (
            "tributary_partition_bytes",
            "Bytes stored per partition.",
            |p| p.bytes,
        ),
    ];
    for (name, help, field) in partition_figures {
        let mut family = out.family(name, Kind::Gauge, help);
        for t in &topics {
            for p in &t.partitions {
                family.sample(
                    &[("topic", &t.config.name), ("partition", &p.partition)],
                    field(p),
                );
            }
        }
    }

    out.gauge(
        "tributary_http_connections_open",
        "HTTP connections open.",
        conns.open.load(Relaxed),
    );
    out.counter(
        "tributary_http_connections_accepted_total",
        "HTTP connections accepted.",
        conns.accepted.load(Relaxed),
    );
    let requests = lock(&http.requests).clone();
    let mut family = out.family(
        "tributary_http_requests_total",
        Kind::Counter,
        "HTTP requests by method, route and status class.",
    );
    for ((method, route, class), (count, _)) in &requests {
        let status = format!("{class}xx");
        family.sample(
            &[("method", method), ("route", route), ("status", &status)],
            count,
        );
    }
    let mut family = out.family(
        "tributary_http_request_seconds_sum",
        Kind::Counter,
        "Total time spent serving HTTP requests.",
    );
    for ((method, route, class), (_, secs)) in &requests {
        let status = format!("{class}xx");
        family.sample(
            &[("method", method), ("route", route), ("status", &status)],
            format_args!("{secs:.6}"),
        );
    }
    out
}
