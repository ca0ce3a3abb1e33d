//! The HTTP API (`docs/contract.md`, section 3): topics, produce, fetch with
//! long-poll, consumer-group offsets, health, Prometheus metrics, `/v1/stats`,
//! the dashboard, the device admin API ([`ROUTES`] lists every route) and an
//! OpenAPI document. Handlers only translate JSON to and from the log.
//!
//! - `topics`: the topic routes (list, create, describe, change, delete,
//!   produce, fetch);
//!   `groups`: consumer-group offsets; `status`: the dashboard, health, stats,
//!   metrics and the OpenAPI document; `body`: reading bodies (held from the
//!   memory budget), JSON and parameters; `auth`: who is calling; `devices`:
//!   the device admin API.
//! - [`records`]: the JSON shapes of produced and fetched records.
//! - [`ws`]: the WebSocket endpoints (publish and live tail).
//! - [`serve`](mod@serve): HTTP/1.1 connections with connection hygiene (head
//!   and idle timeouts, idle connections closed first at the connection limit).

mod auth;
mod body;
mod devices;
mod error;
mod groups;
mod metrics;
pub mod records;
pub mod serve;
mod status;
mod topics;
pub mod ws;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::http::{Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::get;

/// The router type other front ends hand to [`serve()`] (MQTT over WebSockets).
pub use axum::Router;
use groups::{commit_offsets, describe_group, group_offsets, list_groups};
use status::{health, index, metrics_text, openapi, stats};
use topics::{create_topic, describe_topic, fetch, list_topics, produce};

pub use error::{ApiError, ApiResult};
pub use metrics::HttpMetrics;

use tributary_frontend::listener::{ConnectionStats, LimitedListener};
use tributary_frontend::tls::TlsListener;
use tributary_frontend::FrontendContext;

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
    ("PATCH", "/v1/topics/{topic}"),
    ("DELETE", "/v1/topics/{topic}"),
    ("POST", "/v1/topics/{topic}/records"),
    ("GET", "/v1/topics/{topic}/publish"),
    ("GET", "/v1/topics/{topic}/live"),
    ("GET", "/v1/stats"),
    ("GET", "/v1/topics/{topic}/partitions/{partition}/records"),
    ("GET", "/v1/groups"),
    ("GET", "/v1/groups/{group}"),
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
    ("GET", "/v1/connectors"),
    ("POST", "/v1/connectors"),
    ("GET", "/v1/connectors/{name}"),
    ("DELETE", "/v1/connectors/{name}"),
    ("POST", "/v1/connectors/{name}/pause"),
    ("POST", "/v1/connectors/{name}/resume"),
    ("POST", "/v1/connectors/{name}/restart"),
    ("GET", "/v1/pipelines"),
    ("POST", "/v1/pipelines"),
    ("GET", "/v1/pipelines/{name}"),
    ("DELETE", "/v1/pipelines/{name}"),
    ("POST", "/v1/pipelines/{name}/pause"),
    ("POST", "/v1/pipelines/{name}/resume"),
    ("GET", "/v1/cluster"),
    ("POST", "/v1/cluster/nodes"),
    ("DELETE", "/v1/cluster/nodes/{id}"),
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
    router_with(cx, config, connections, Router::new())
}

/// [`router`] with other parts' routes (`protected`, the connectors' API)
/// behind the same authentication and request counting.
pub fn router_with(
    cx: FrontendContext,
    config: HttpConfig,
    connections: Arc<ConnectionStats>,
    protected: Router,
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
        .route(
            "/v1/topics/{topic}",
            get(describe_topic)
                .patch(topics::alter_topic)
                .delete(topics::delete_topic),
        )
        .route("/v1/topics/{topic}/records", axum::routing::post(produce))
        .route("/v1/topics/{topic}/publish", get(ws::publish))
        .route("/v1/topics/{topic}/live", get(ws::live))
        .route("/v1/stats", get(stats))
        .route(
            "/v1/topics/{topic}/partitions/{partition}/records",
            get(fetch),
        )
        .route("/v1/groups", get(list_groups))
        .route("/v1/groups/{group}", get(describe_group))
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
        .merge(protected.with_state(()))
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
/// port (MQTT over WebSockets at `/mqtt`); `protected` other parts' routes
/// that go through the API's authentication (see [`router_with`]).
///
/// `tls` is the HTTPS listener (WSS and the sync link too), serving the
/// same routes; its connections count with the plain ones.
pub async fn serve(
    listener: LimitedListener,
    tls: Option<TlsListener>,
    cx: FrontendContext,
    config: HttpConfig,
    extra: Router,
    protected: Router,
) -> std::io::Result<()> {
    let shutdown = cx.shutdown.clone();
    let budget = cx.budget.clone();
    let app = extra.merge(router_with(cx, config.clone(), listener.stats(), protected));
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
