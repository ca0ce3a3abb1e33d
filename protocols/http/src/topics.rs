//! The topic routes: list, create, describe, change and delete topics,
//! produce records and fetch them.

use std::time::Duration;

use axum::body::Body;
use axum::extract::{Extension, Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::json;
use tributary_devices::auth::Action;
use tributary_ingest as ingest;
use tributary_storage::{
    AppendRecord, CleanupPolicy, CompactionInfo, Event, OnFull, Position, TopicChange, TopicInfo,
};

use crate::auth::{self, Caller};
use crate::body::{
    content_type, parse_json, path_param, query_param, read_body, require_json, HeldBody,
};
use crate::error::{ApiError, ApiResult};
use crate::records::{FetchOut, Format, ProduceBody, RecordOut};
use crate::AppState;

/// What a compacted topic's cleaner did, as `/v1/topics` and `/v1/stats` show it.
pub(crate) fn compaction_json(k: &CompactionInfo) -> serde_json::Value {
    json!({
        "dirty_ratio": k.dirty_ratio,
        "passes": k.passes,
        "records_removed": k.records_removed,
        "bytes_reclaimed": k.bytes_reclaimed,
        "pass_seconds": k.pass_seconds,
        "last_pass_ms": k.last_pass_ms,
    })
}

fn topic_json(t: TopicInfo) -> serde_json::Value {
    let c = t.config;
    json!({
        "name": c.name,
        "partition_count": c.partitions,
        "retention_ms": c.retention_ms,
        "retention_bytes": c.retention_bytes,
        "max_event_bytes": c.max_event_bytes,
        "on_full": c.on_full,
        "cleanup_policy": c.cleanup_policy,
        "delete_retention_ms": c.delete_retention_ms,
        "min_compaction_lag_ms": c.min_compaction_lag_ms,
        "max_compaction_lag_ms": c.max_compaction_lag_ms,
        "min_cleanable_dirty_ratio": c.min_cleanable_dirty_ratio,
        "compaction": t.compaction.as_ref().map(compaction_json),
        "partitions": t.partitions.iter().map(|p| json!({
            "partition": p.partition,
            "start_offset": p.start_offset,
            "end_offset": p.end_offset,
            "bytes": p.bytes,
        })).collect::<Vec<_>>(),
        "events_appended": t.events_appended,
    })
}

pub(crate) async fn list_topics(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> ApiResult<Json<serde_json::Value>> {
    let who = caller.identity()?;
    let topics: Vec<_> = state
        .cx
        .log
        .topics()
        .into_iter()
        .filter(|t| state.cx.auth.may_see(who, &t.config.name))
        .map(topic_json)
        .collect();
    Ok(Json(json!({ "topics": topics })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateTopic {
    name: String,
    partitions: Option<u32>,
    retention_ms: Option<u64>,
    retention_bytes: Option<u64>,
    max_event_bytes: Option<usize>,
    on_full: Option<OnFull>,
    cleanup_policy: Option<CleanupPolicy>,
    delete_retention_ms: Option<u64>,
    min_compaction_lag_ms: Option<u64>,
    max_compaction_lag_ms: Option<u64>,
    min_cleanable_dirty_ratio: Option<f64>,
}

pub(crate) async fn create_topic(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    require_json(&headers)?;
    let bytes = read_body(&state, &headers, body).await?;
    let req: CreateTopic = parse_json(&bytes)?;
    // Creating a topic takes the right to publish to it.
    auth::allow(&state, caller.identity()?, Action::Publish, &req.name)?;
    let d = &state.cx.log.config().topic_defaults;
    let mut config = d.config(&req.name);
    config.partitions = req.partitions.unwrap_or(d.partitions);
    config.retention_ms = req.retention_ms.or(d.retention_ms);
    config.retention_bytes = req.retention_bytes.or(d.retention_bytes);
    config.max_event_bytes = req.max_event_bytes.unwrap_or(d.max_event_bytes);
    config.on_full = req.on_full.unwrap_or(d.on_full);
    if let Some(v) = req.cleanup_policy {
        config.cleanup_policy = v;
    }
    if let Some(v) = req.delete_retention_ms {
        config.delete_retention_ms = v;
    }
    if let Some(v) = req.min_compaction_lag_ms {
        config.min_compaction_lag_ms = v;
    }
    config.max_compaction_lag_ms = req.max_compaction_lag_ms.or(config.max_compaction_lag_ms);
    if let Some(v) = req.min_cleanable_dirty_ratio {
        config.min_cleanable_dirty_ratio = v;
    }
    let info = state.cx.log.create_topic(config).await?;
    Ok((StatusCode::CREATED, Json(topic_json(info))).into_response())
}

/// Deleting or changing a topic takes the admin token under device auth.
fn require_admin(
    state: &AppState,
    who: &tributary_devices::auth::Identity,
    topic: &str,
) -> ApiResult<()> {
    if tributary_devices::auth::may_administer(&*state.cx.auth, who) {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!(
                "device `{}` may not delete or change topic `{topic}`: that takes the admin token",
                who.id
            ),
        ))
    }
}

/// `DELETE /v1/topics/{topic}`: the topic, its records, the groups'
/// positions in it; 204 once durable.
pub(crate) async fn delete_topic(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    topic: Result<Path<String>, axum::extract::rejection::PathRejection>,
) -> ApiResult<StatusCode> {
    let topic = path_param(topic)?;
    require_admin(&state, caller.identity()?, &topic)?;
    state.cx.log.delete_topic(&topic).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `PATCH /v1/topics/{topic}`: partitions (more), retention_ms,
/// retention_bytes (`null` removes a limit), max_event_bytes, on_full.
pub(crate) async fn alter_topic(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    topic: Result<Path<String>, axum::extract::rejection::PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Json<serde_json::Value>> {
    let topic = path_param(topic)?;
    require_admin(&state, caller.identity()?, &topic)?;
    require_json(&headers)?;
    let bytes = read_body(&state, &headers, body).await?;
    let change: TopicChange = parse_json(&bytes)?;
    Ok(Json(topic_json(
        state.cx.log.alter_topic(&topic, &change).await?,
    )))
}

pub(crate) async fn describe_topic(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    topic: Result<Path<String>, axum::extract::rejection::PathRejection>,
) -> ApiResult<Json<serde_json::Value>> {
    let topic = path_param(topic)?;
    let who = caller.identity()?;
    if !state.cx.auth.may_see(who, &topic) {
        return Err(auth::forbidden(who, Action::Subscribe, &topic));
    }
    Ok(Json(topic_json(state.cx.log.topic(&topic)?)))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawProduceParams {
    key: Option<String>,
    partition: Option<u32>,
    timestamp: Option<i64>,
}

pub(crate) async fn produce(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    topic: Result<Path<String>, axum::extract::rejection::PathRejection>,
    params: Result<Query<RawProduceParams>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let topic = path_param(topic)?;
    // The body's budget is held until the append is done: its records are
    // copies of the same bytes.
    let _held: HeldBody;
    let records: Vec<AppendRecord> = match content_type(&headers).as_deref() {
        Some("application/json") => {
            let bytes = read_body(&state, &headers, body).await?;
            let parsed: ProduceBody = parse_json(&bytes)?;
            if parsed.records.is_empty() {
                return Err(ApiError::bad_request(
                    "`records` is empty: send at least one record",
                ));
            }
            let records = parsed
                .records
                .into_iter()
                .enumerate()
                .map(|(i, r)| {
                    r.into_append()
                        .map_err(|e| e.prefixed(&format!("records[{i}]")))
                })
                .collect::<ApiResult<_>>()?;
            _held = bytes;
            records
        }
        Some("application/octet-stream") => {
            let raw = query_param(params)?;
            let bytes = read_body(&state, &headers, body).await?;
            let records = vec![AppendRecord {
                partition: raw.partition,
                event: Event {
                    key: raw.key.map(String::into_bytes),
                    // One copy: the held body stays (and counts) until the append is done.
                    value: Some(bytes.to_vec()),
                    timestamp: raw.timestamp,
                    headers: Vec::new(),
                },
            }];
            _held = bytes;
            records
        }
        other => {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                format!(
                    "expected Content-Type application/json or application/octet-stream, got {}",
                    other.unwrap_or("none")
                ),
            ))
        }
    };
    let who = caller.identity()?;
    for r in &records {
        if let Some(subject) = auth::refused_publish(&*state.cx.auth, who, &topic, &r.event) {
            return Err(auth::forbidden(who, Action::Publish, &subject));
        }
    }
    if let Some(limited) = auth::over_limit(&state, who, records.len()) {
        return Ok(limited);
    }
    let positions = ingest::append_topic(&state.cx.log, &topic, records).await?;
    Ok(offsets_response(&positions))
}

/// `{"offsets":[{"partition":P,"offset":O},…]}`, written directly: this answer
/// is on the hot path and a JSON map per record would cost more than the append.
fn offsets_response(positions: &[Position]) -> Response {
    use std::fmt::Write as _;
    let mut body = String::with_capacity(16 + positions.len() * 34);
    body.push_str("{\"offsets\":[");
    for (i, Position { partition, offset }) in positions.iter().enumerate() {
        let sep = if i == 0 { "" } else { "," };
        let _ = write!(
            body,
            "{sep}{{\"partition\":{partition},\"offset\":{offset}}}"
        );
    }
    body.push_str("]}");
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FetchParams {
    offset: Option<String>,
    limit: Option<usize>,
    max_bytes: Option<usize>,
    wait_ms: Option<u64>,
    #[serde(default)]
    format: Format,
}

pub(crate) async fn fetch(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    path: Result<Path<(String, u32)>, axum::extract::rejection::PathRejection>,
    params: Result<Query<FetchParams>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<FetchOut>> {
    let (topic, partition) = path_param(path)?;
    auth::allow(
        &state,
        caller.identity()?,
        Action::Subscribe,
        &auth::whole_topic(&topic),
    )?;
    let p = query_param(params)?;
    let log = &state.cx.log;
    let (start_offset, end_offset) = log.offsets(&topic, partition)?;
    let offset = match p.offset.as_deref() {
        None | Some("earliest") => start_offset,
        Some("latest") => end_offset,
        Some(n) => n.parse().map_err(|_| {
            ApiError::bad_request(format!(
                "offset must be a number, `earliest` or `latest`, got `{n}`"
            ))
        })?,
    };
    let limit = p.limit.unwrap_or(100);
    if limit == 0 || limit > state.config.max_fetch_records {
        return Err(ApiError::bad_request(format!(
            "limit must be 1..={}",
            state.config.max_fetch_records
        )));
    }
    let wait_ms = p.wait_ms.unwrap_or(0);
    if wait_ms > state.config.max_wait_ms {
        return Err(ApiError::bad_request(format!(
            "wait_ms must be at most {}",
            state.config.max_wait_ms
        )));
    }
    let max_bytes = p
        .max_bytes
        .unwrap_or(1024 * 1024)
        .clamp(1, state.config.max_body_bytes.max(1024 * 1024));
    let wait = Duration::from_millis(wait_ms);
    // A long poll ends early when the node shuts down.
    let result = tokio::select! {
        r = log.fetch(&topic, partition, offset, limit, max_bytes, wait) => r?,
        () = state.cx.shutdown.cancelled() => log.fetch(&topic, partition, offset, limit, max_bytes, Duration::ZERO).await?,
    };
    // Serialized straight from the typed records: a stored value is embedded
    // as its text, never re-parsed into a `Value` (whose recursion limit a
    // stored record could hit).
    Ok(Json(FetchOut {
        records: result
            .records
            .into_iter()
            .map(|r| RecordOut::new(r, p.format))
            .collect(),
        next_offset: result.next_offset,
        start_offset: result.start_offset,
        end_offset: result.end_offset,
    }))
}
