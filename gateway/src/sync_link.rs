//! Wiring of the store-and-forward link: the core's `/v1/sync` route over
//! the HTTP and HTTPS listeners, and the metrics and `/v1/stats` sections of
//! both sides.

use std::sync::Arc;

use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{ConnectInfo, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Extension;
use tokio_util::sync::CancellationToken;
use tributary_frontend::listener::ReadHold;
use tributary_frontend::{FrontendContext, Peer};
use tributary_http::{ApiError, Router};
use tributary_sync::{OnMessage, SyncCore, SyncPeer, Uploader};

#[derive(Clone)]
struct RouteState {
    core: Option<SyncCore>,
    shutdown: CancellationToken,
    max_message: usize,
}

/// `/v1/sync`: served by `core` when there is one; an edge answers 404
/// `not_a_core` (the route exists, the role does not).
pub fn routes(
    core: Option<SyncCore>,
    shutdown: CancellationToken,
    max_batch_bytes: usize,
) -> Router {
    // A compressed batch is never larger than its block plus framing.
    let max_message = max_batch_bytes + 64 * 1024;
    Router::new()
        .route("/v1/sync", get(upgrade))
        .with_state(RouteState {
            core,
            shutdown,
            max_message,
        })
}

async fn upgrade(
    State(st): State<RouteState>,
    peer: Option<Extension<ConnectInfo<Peer>>>,
    hold: Option<Extension<ReadHold>>,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Response {
    let Some(core) = st.core else {
        return ApiError::new(
            StatusCode::NOT_FOUND,
            "not_a_core",
            "/v1/sync is served by nodes in core mode with [sync] enabled",
        )
        .into_response();
    };
    let ws = match ws {
        Ok(ws) => ws,
        Err(e) => {
            return ApiError::new(StatusCode::BAD_REQUEST, "not_a_websocket", e.to_string())
                .into_response()
        }
    };
    let peer = peer.map(|p| (p.0).0).unwrap_or_default();
    let peer = SyncPeer {
        addr: peer.addr,
        certificate: peer.certificate,
    };
    ws.max_message_size(st.max_message)
        .max_frame_size(st.max_message)
        .on_upgrade(move |socket| async move {
            let on_message =
                hold.map(|Extension(h)| -> OnMessage { Arc::new(move || h.release()) });
            core.serve(socket, peer, st.shutdown, on_message).await
        })
}

/// Shows the core's edges in `/metrics`, `/v1/stats` and the dashboard.
pub fn register_core(cx: &FrontendContext, core: &SyncCore) {
    cx.metrics.register(Arc::new(core.clone()));
    let c = core.clone();
    cx.stats.register("sync", Arc::new(move || c.stats()));
    let c = core.clone();
    cx.connections
        .register("sync", Arc::new(move || c.connected_edges()));
}

/// Shows the edge's forwarding lag in `/metrics`, `/v1/stats` and the dashboard.
pub fn register_edge(cx: &FrontendContext, up: &Uploader) {
    cx.metrics.register(Arc::new(up.clone()));
    let u = up.clone();
    cx.stats.register("sync", Arc::new(move || u.stats()));
}
