//! The node's own pages: the dashboard, `/health`, `/v1/stats`, `/metrics` and the
//! OpenAPI document.

use axum::extract::{Extension, State};
use axum::http::header;
use axum::response::{Html, IntoResponse};
use axum::Json;
use serde_json::json;

use crate::auth::Caller;
use crate::error::ApiResult;
use crate::{metrics, AppState, OPENAPI};

/// The dashboard: one page, embedded in the binary, no outside assets.
const DASHBOARD: &str = include_str!("dashboard.html");

pub(crate) async fn index() -> Html<&'static str> {
    Html(DASHBOARD)
}

/// `GET /v1/stats`: what the dashboard shows, in one JSON document.
pub(crate) async fn stats(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> ApiResult<Json<serde_json::Value>> {
    let who = caller.identity()?;
    let log = &state.cx.log;
    let topics: Vec<serde_json::Value> = log
        .topics()
        .into_iter()
        .filter(|t| state.cx.auth.may_see(who, &t.config.name))
        .map(|t| {
            let events: u64 = t.partitions.iter().map(|p| p.end_offset - p.start_offset).sum();
            let ends: u64 = t.partitions.iter().map(|p| p.end_offset).sum();
            let parts: Vec<serde_json::Value> = t
                .partitions
                .iter()
                .map(|p| json!({"partition": p.partition, "start_offset": p.start_offset, "end_offset": p.end_offset}))
                .collect();
            json!({
                "name": t.config.name,
                "partitions": parts,
                "events": events,
                "end_offset_total": ends,
                "retention_ms": t.config.retention_ms,
                "retention_bytes": t.config.retention_bytes,
                "cleanup_policy": t.config.cleanup_policy,
                "compaction": t.compaction.as_ref().map(crate::topics::compaction_json),
            })
        })
        .collect();
    let mut connections = serde_json::Map::new();
    for (protocol, open) in state.cx.connections.read() {
        connections.insert(protocol.to_owned(), json!(open));
    }
    let durability = match log.config().durability {
        tributary_storage::Durability::Fsync => "fsync",
        tributary_storage::Durability::Interval(_) => "interval",
    };
    let mut stats = json!({
        "mode": state.cx.mode,
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_seconds": state.started.elapsed().as_secs_f64(),
        "durability": durability,
        "disk_bytes": log.disk_bytes(),
        "quota": {
            "max_bytes": log.config().max_disk_bytes,
            "stored_bytes": log.stored_bytes(),
            "dropped_events": log.stats().quota_dropped_events,
            "dropped_unforwarded_events": log.stats().quota_dropped_unforwarded_events,
            "rejected_appends": log.stats().quota_rejected_appends,
            "disk_free_bytes": log.free_disk_bytes(),
            "min_free_bytes": log.config().min_free_bytes,
            "disk_full_rejected_appends": log.stats().disk_full_rejected_appends,
        },
        "connections": connections,
        "memory": {
            "max_buffered_bytes": state.cx.budget.total(),
            "buffered_bytes": state.cx.budget.total() - state.cx.budget.available(),
            "refused": state.cx.budget.refused(),
        },
        "topics": topics,
        "transactions": {
            "open": log.stats().transactions_open,
            "committed": log.stats().transactions_committed,
            "aborted": log.stats().transactions_aborted,
            "timed_out": log.stats().transactions_timed_out,
            "fenced_requests": log.stats().transactions_fenced,
        },
        "websocket": {
            "published_total": state.ws.published.load(std::sync::atomic::Ordering::Relaxed),
            "delivered_total": state.ws.delivered.load(std::sync::atomic::Ordering::Relaxed),
        },
    });
    if let Some(obj) = stats.as_object_mut() {
        for (name, section) in state.cx.stats.read() {
            obj.insert(name.to_owned(), section);
        }
    }
    Ok(Json(stats))
}

pub(crate) async fn health(State(state): State<AppState>) -> ApiResult<Json<serde_json::Value>> {
    state.cx.log.health()?;
    Ok(Json(json!({"status": "ok", "mode": state.cx.mode})))
}

pub(crate) async fn openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI)
}

pub(crate) async fn metrics_text(State(state): State<AppState>) -> impl IntoResponse {
    let mut text = metrics::render(
        &state.cx.log,
        &state.metrics,
        &state.connections,
        state.started.elapsed(),
    );
    let b = &state.cx.budget;
    text.gauge(
        "tributary_buffered_bytes",
        "Bytes of unfinished requests, messages and packets held from limits.max_buffered_bytes.",
        b.total() - b.available(),
    );
    text.counter(
        "tributary_memory_budget_refusals_total",
        "Reads refused because limits.max_buffered_bytes was spent.",
        b.refused(),
    );
    state.cx.metrics.render(&mut text);
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        text.finish(),
    )
}
