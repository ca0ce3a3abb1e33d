//! The HTTP API (`docs/contract.md`, section 3): topics, produce, fetch with
//! long-poll, consumer-group offsets, health, Prometheus metrics, `/v1/stats`,
//! the dashboard, the device admin API ([`ROUTES`] lists every route) and an
//! OpenAPI document. Handlers only translate JSON to and from the log.
//!
//! - [`records`]: the JSON shapes of produced and fetched records.
//! - [`ws`]: the WebSocket endpoints (publish and live tail).
//! - [`serve`](mod@serve): HTTP/1.1 connections with connection hygiene (head
//!   and idle timeouts, idle connections closed first at the connection limit).

mod auth;
mod devices;
mod error;
mod metrics;
pub mod records;
pub mod serve;
pub mod ws;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{Extension, MatchedPath, Path, Query, Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::Json;
/// The router type other front ends hand to [`serve()`] (MQTT over WebSockets).
pub use axum::Router;
use serde::Deserialize;
use serde_json::json;
use tributary_storage::{
    AppendRecord, Event, GroupOffset, OnFull, Position, TopicConfig, TopicInfo,
};

pub use error::{ApiError, ApiResult};
pub use metrics::HttpMetrics;

use auth::Caller;
use records::{FetchOut, Format, ProduceBody, RecordOut};
use tributary_devices::auth::Action;
use tributary_frontend::listener::{ConnectionStats, LimitedListener};
use tributary_frontend::tls::TlsListener;
use tributary_frontend::FrontendContext;
use tributary_ingest as ingest;

/// HTTP front-end settings.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// Largest request body accepted (413 beyond).
    pub max_body_bytes: usize,
    /// Connections held open at most.
    pub max_connections: usize,
    /// Largest `limit` a fetch may ask for.
    pub max_fetch_records: usize,
    /// Largest `wait_ms` a fetch may ask for.
    pub max_wait_ms: u64,
    /// Largest WebSocket message (close 1009 beyond).
    pub ws_max_message_bytes: usize,
    /// A request head must be complete this long after its first byte.
    pub request_head_timeout: Duration,
    /// A request body must be complete this long after its head.
    pub request_timeout: Duration,
    /// A keep-alive connection with no request is closed after this long.
    pub idle_timeout: Duration,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            max_body_bytes: 8 * 1024 * 1024,
            max_connections: 1024,
            max_fetch_records: 10_000,
            max_wait_ms: 30_000,
            ws_max_message_bytes: 2 * 1024 * 1024,
            request_head_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
        }
    }
}

/// Every route the API serves, as (method, path template). The OpenAPI document
/// must list exactly these; a test holds both to it.
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/"),
    ("GET", "/health"),
    ("GET", "/metrics"),
    ("GET", "/openapi.json"),
    ("GET", "/v1/topics"),
    ("POST", "/v1/topics"),
    ("GET", "/v1/topics/{topic}"),
    ("POST", "/v1/topics/{topic}/records"),
    ("GET", "/v1/topics/{topic}/publish"),
    ("GET", "/v1/topics/{topic}/live"),
    ("GET", "/v1/stats"),
    ("GET", "/v1/topics/{topic}/partitions/{partition}/records"),
    ("GET", "/v1/groups/{group}/offsets"),
    ("POST", "/v1/groups/{group}/offsets"),
    ("GET", "/mqtt"),
    ("GET", "/v1/sync"),
    ("GET", "/v1/devices"),
    ("POST", "/v1/devices"),
    ("GET", "/v1/devices/{id}"),
    ("PATCH", "/v1/devices/{id}"),
    ("DELETE", "/v1/devices/{id}"),
    ("POST", "/v1/devices/{id}/rotate"),
];

/// The OpenAPI 3 document served at `/openapi.json`.
pub const OPENAPI: &str = include_str!("openapi.json");

#[derive(Clone)]
pub(crate) struct AppState {
    cx: FrontendContext,
    config: Arc<HttpConfig>,
    started: Instant,
    metrics: Arc<HttpMetrics>,
    connections: Arc<ConnectionStats>,
    ws: Arc<ws::WsCounters>,
    tails: Arc<ws::TailCache>,
}

/// Builds the router. `connections` is reported in metrics.
pub fn router(
    cx: FrontendContext,
    config: HttpConfig,
    connections: Arc<ConnectionStats>,
) -> Router {
    let ws_counters = Arc::new(ws::WsCounters::default());
    {
        let http = connections.clone();
        let open_ws = ws_counters.clone();
        // WebSocket connections arrive through the HTTP listener: count them once.
        cx.connections.register(
            "http",
            Arc::new(move || {
                http.open
                    .load(std::sync::atomic::Ordering::Relaxed)
                    .saturating_sub(open_ws.open.load(std::sync::atomic::Ordering::Relaxed))
            }),
        );
        let open_ws = ws_counters.clone();
        cx.connections.register(
            "ws",
            Arc::new(move || open_ws.open.load(std::sync::atomic::Ordering::Relaxed)),
        );
    }
    cx.metrics.register(ws_counters.clone());
    let state = AppState {
        cx,
        config: Arc::new(config),
        started: Instant::now(),
        metrics: Arc::new(HttpMetrics::default()),
        connections,
        ws: ws_counters,
        tails: Arc::new(ws::TailCache::default()),
    };
    Router::new()
        .route("/", get(index))
        .route("/health", get(health))
        .route("/metrics", get(metrics_text))
        .route("/openapi.json", get(openapi))
        .route("/v1/topics", get(list_topics).post(create_topic))
        .route("/v1/topics/{topic}", get(describe_topic))
        .route("/v1/topics/{topic}/records", axum::routing::post(produce))
        .route("/v1/topics/{topic}/publish", get(ws::publish))
        .route("/v1/topics/{topic}/live", get(ws::live))
        .route("/v1/stats", get(stats))
        .route(
            "/v1/topics/{topic}/partitions/{partition}/records",
            get(fetch),
        )
        .route(
            "/v1/groups/{group}/offsets",
            get(group_offsets).post(commit_offsets),
        )
        .route("/v1/devices", get(devices::list).post(devices::create))
        .route(
            "/v1/devices/{id}",
            get(devices::get)
                .patch(devices::update)
                .delete(devices::remove),
        )
        .route(
            "/v1/devices/{id}/rotate",
            axum::routing::post(devices::rotate),
        )
        .fallback(no_route)
        .method_not_allowed_fallback(wrong_method)
        .layer(middleware::from_fn_with_state(
            state.clone(),
            auth::authenticate,
        ))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            count_requests,
        ))
        .with_state(state)
}

/// Serves the API on `listener` until `cx.shutdown` is cancelled, then lets
/// in-flight requests finish. `extra` holds other front ends' routes on this
/// port (MQTT over WebSockets at `/mqtt`).
///
/// `tls` is the HTTPS listener (WSS and the sync link too), serving the
/// same routes; its connections count with the plain ones.
pub async fn serve(
    listener: LimitedListener,
    tls: Option<TlsListener>,
    cx: FrontendContext,
    config: HttpConfig,
    extra: Router,
) -> std::io::Result<()> {
    let shutdown = cx.shutdown.clone();
    let budget = cx.budget.clone();
    let app = extra.merge(router(cx, config.clone(), listener.stats()));
    let hygiene = serve::Hygiene {
        request_head_timeout: config.request_head_timeout,
        idle_timeout: config.idle_timeout,
    };
    let https = tls.map(|tls| {
        tokio::spawn(serve::serve(
            tls,
            app.clone(),
            hygiene,
            budget.clone(),
            shutdown.clone(),
        ))
    });
    let plain = serve::serve(listener, app, hygiene, budget, shutdown).await;
    if let Some(https) = https {
        match https.await {
            Ok(r) => r?,
            Err(e) => return Err(std::io::Error::other(e)),
        }
    }
    plain
}

async fn count_requests(State(state): State<AppState>, req: Request, next: Next) -> Response {
    // Debug builds only: a request can inject a bug, so the tests can show
    // that a panic closes only its own connection (see `tributary_frontend::panics`).
    #[cfg(debug_assertions)]
    if req
        .headers()
        .get("x-tributary-fault")
        .is_some_and(|v| v == "panic")
    {
        panic!("fault injected by x-tributary-fault");
    }
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_owned());
    let method = req.method().clone();
    let started = Instant::now();
    let response = next.run(req).await;
    state.metrics.observe(
        &method,
        route.as_deref(),
        response.status(),
        started.elapsed(),
    );
    response
}

async fn no_route(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("no route for {method} {}", uri.path()),
    )
}

async fn wrong_method(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{method} is not allowed on {}", uri.path()),
    )
}

/// The dashboard: one page, embedded in the binary, no outside assets.
const DASHBOARD: &str = include_str!("dashboard.html");

async fn index() -> Html<&'static str> {
    Html(DASHBOARD)
}

/// `GET /v1/stats`: what the dashboard shows, in one JSON document.
async fn stats(
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

async fn health(State(state): State<AppState>) -> ApiResult<Json<serde_json::Value>> {
    state.cx.log.health()?;
    Ok(Json(json!({"status": "ok", "mode": state.cx.mode})))
}

async fn openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI)
}

async fn metrics_text(State(state): State<AppState>) -> impl IntoResponse {
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

fn topic_json(t: TopicInfo) -> serde_json::Value {
    let c = t.config;
    json!({
        "name": c.name,
        "partition_count": c.partitions,
        "retention_ms": c.retention_ms,
        "retention_bytes": c.retention_bytes,
        "max_event_bytes": c.max_event_bytes,
        "on_full": c.on_full,
        "partitions": t.partitions.iter().map(|p| json!({
            "partition": p.partition,
            "start_offset": p.start_offset,
            "end_offset": p.end_offset,
            "bytes": p.bytes,
        })).collect::<Vec<_>>(),
        "events_appended": t.events_appended,
    })
}

async fn list_topics(
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

/// Reads the whole body up to the limit; a declared length over it is refused
/// before a byte is read.
/// A request body read whole, with its bytes held from the node's memory
/// budget until dropped.
pub(crate) struct HeldBody {
    bytes: Bytes,
    /// Given back to the budget when the request is done with the body.
    _reserved: tributary_frontend::budget::Reserved,
}

impl std::ops::Deref for HeldBody {
    type Target = Bytes;
    fn deref(&self) -> &Bytes {
        &self.bytes
    }
}

/// Reads a request body under `max_body_bytes`, the node's memory budget
/// (reserved before the bytes are read: the Content-Length up front, else in
/// steps as chunks arrive) and `request_timeout`.
pub(crate) async fn read_body(
    state: &AppState,
    headers: &HeaderMap,
    body: Body,
) -> ApiResult<HeldBody> {
    let limit = state.config.max_body_bytes;
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("request body exceeds the limit of {limit} bytes"),
        )
    };
    let mut declared = None;
    if let Some(len) = headers.get(header::CONTENT_LENGTH) {
        let len: u64 = len
            .to_str()
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| ApiError::bad_request("Content-Length is not a number"))?;
        if len > limit as u64 {
            return Err(too_large());
        }
        declared = Some(len as usize);
    }
    let budget = &state.cx.budget;
    let busy = || {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "memory_budget",
            "the node holds as many request bytes as limits.max_buffered_bytes allows; retry later",
        )
    };
    let read = async {
        let mut reserved = match declared {
            Some(n) => budget
                .reserve(n, tributary_frontend::budget::WAIT_FOR_ROOM)
                .await
                .ok_or_else(busy)?,
            None => tributary_frontend::budget::Reserved::none(),
        };
        // The declared length is reserved already: allocate it once (growing
        // by doubling would leave garbage of twice the body behind).
        let mut buf = bytes::BytesMut::with_capacity(declared.unwrap_or(64 * 1024));
        let mut body = body.into_data_stream();
        use futures_util::StreamExt as _;
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| {
                ApiError::bad_request(format!("could not read the request body: {e}"))
            })?;
            let needed = buf.len() + chunk.len();
            if needed > limit {
                return Err(too_large());
            }
            if needed > reserved.bytes() {
                // Chunked (or lying) bodies: reserve in steps of at least 64 KiB.
                let held = reserved.bytes();
                let step = (needed - held)
                    .max(64 * 1024)
                    .min(limit.saturating_sub(held));
                let more = budget
                    .reserve(step, tributary_frontend::budget::WAIT_FOR_ROOM)
                    .await
                    .ok_or_else(busy)?;
                reserved.merge(more);
            }
            buf.extend_from_slice(&chunk);
        }
        Ok(HeldBody {
            bytes: buf.freeze(),
            _reserved: reserved,
        })
    };
    match tokio::time::timeout(state.config.request_timeout, read).await {
        Ok(r) => r,
        Err(_) => Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "request_timeout",
            format!(
                "the request body did not arrive within {} ms",
                state.config.request_timeout.as_millis()
            ),
        )),
    }
}

fn content_type(headers: &HeaderMap) -> Option<String> {
    let ct = headers.get(header::CONTENT_TYPE)?.to_str().ok()?;
    Some(
        ct.split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase(),
    )
}

/// Parses JSON, naming the path and position of the first problem. Valid
/// bodies take the fast path; only a failed parse is repeated with path tracking.
pub(crate) fn parse_json<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> ApiResult<T> {
    serde_json::from_slice(bytes).map_err(|_| {
        let mut de = serde_json::Deserializer::from_slice(bytes);
        let failed = match serde_path_to_error::deserialize::<_, T>(&mut de) {
            Err(e) => {
                let path = e.path().to_string();
                let at = if path == "." {
                    String::new()
                } else {
                    format!(" at `{path}`")
                };
                format!("malformed JSON body{at}: {}", e.into_inner())
            }
            // Parsed with tracking but not without: the difference is trailing data.
            Ok(_) => match de.end() {
                Err(e) => format!("malformed JSON body: {e}"),
                Ok(()) => "malformed JSON body".to_owned(),
            },
        };
        ApiError::new(StatusCode::BAD_REQUEST, "malformed_body", failed)
    })
}

pub(crate) fn require_json(headers: &HeaderMap) -> ApiResult<()> {
    match content_type(headers).as_deref() {
        Some("application/json") => Ok(()),
        other => Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!(
                "expected Content-Type: application/json, got {}",
                other.unwrap_or("none")
            ),
        )),
    }
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
}

async fn create_topic(
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
    let config = TopicConfig {
        name: req.name,
        partitions: req.partitions.unwrap_or(d.partitions),
        retention_ms: req.retention_ms.or(d.retention_ms),
        retention_bytes: req.retention_bytes.or(d.retention_bytes),
        max_event_bytes: req.max_event_bytes.unwrap_or(d.max_event_bytes),
        on_full: req.on_full.unwrap_or(d.on_full),
    };
    let info = state.cx.log.create_topic(config).await?;
    Ok((StatusCode::CREATED, Json(topic_json(info))).into_response())
}

pub(crate) fn path_param<T>(
    p: Result<Path<T>, axum::extract::rejection::PathRejection>,
) -> ApiResult<T> {
    p.map(|Path(v)| v)
        .map_err(|e| ApiError::bad_request(format!("bad path parameter: {}", e.body_text())))
}

fn query_param<T>(q: Result<Query<T>, axum::extract::rejection::QueryRejection>) -> ApiResult<T> {
    q.map(|Query(v)| v)
        .map_err(|e| ApiError::bad_request(format!("bad query string: {}", e.body_text())))
}

async fn describe_topic(
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
struct RawProduceParams {
    key: Option<String>,
    partition: Option<u32>,
    timestamp: Option<i64>,
}

async fn produce(
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
                    value: bytes.to_vec(),
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
struct FetchParams {
    offset: Option<String>,
    limit: Option<usize>,
    max_bytes: Option<usize>,
    wait_ms: Option<u64>,
    #[serde(default)]
    format: Format,
}

async fn fetch(
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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CommitBody {
    offsets: Vec<OffsetIn>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OffsetIn {
    topic: String,
    partition: u32,
    offset: u64,
}

fn offsets_json(group: &str, offsets: &[GroupOffset]) -> serde_json::Value {
    let list: Vec<_> = offsets
        .iter()
        .map(|o| json!({"topic": o.topic, "partition": o.partition, "offset": o.offset}))
        .collect();
    json!({"group": group, "offsets": list})
}

async fn commit_offsets(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    group: Result<Path<String>, axum::extract::rejection::PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Json<serde_json::Value>> {
    let group = path_param(group)?;
    require_json(&headers)?;
    let bytes = read_body(&state, &headers, body).await?;
    let req: CommitBody = parse_json(&bytes)?;
    if req.offsets.is_empty() {
        return Err(ApiError::bad_request("`offsets` is empty"));
    }
    let who = caller.identity()?;
    auth::allow(&state, who, Action::Subscribe, &auth::group_subject(&group))?;
    for o in &req.offsets {
        auth::allow(&state, who, Action::Subscribe, &auth::whole_topic(&o.topic))?;
    }
    let offsets: Vec<GroupOffset> = req
        .offsets
        .into_iter()
        .map(|o| GroupOffset {
            topic: o.topic,
            partition: o.partition,
            offset: o.offset,
        })
        .collect();
    state.cx.log.commit_offsets(&group, offsets).await?;
    let mut all = state.cx.log.group_offsets(&group)?;
    all.retain(|o| state.cx.auth.may_see(who, &o.topic));
    Ok(Json(offsets_json(&group, &all)))
}

async fn group_offsets(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    group: Result<Path<String>, axum::extract::rejection::PathRejection>,
) -> ApiResult<Json<serde_json::Value>> {
    let group = path_param(group)?;
    let who = caller.identity()?;
    auth::allow(&state, who, Action::Subscribe, &auth::group_subject(&group))?;
    let mut all = state.cx.log.group_offsets(&group)?;
    all.retain(|o| state.cx.auth.may_see(who, &o.topic));
    Ok(Json(offsets_json(&group, &all)))
}
