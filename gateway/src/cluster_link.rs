//! `GET /v1/cluster`: the cluster as this node sees it (roles, term, each
//! node's replication lag on the leader); 404 `not_a_cluster` on a single
//! node.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Json;
use tributary_cluster::Cluster;
use tributary_http::{ApiError, Router};

/// The cluster routes (served by every node; answered on a cluster's nodes).
pub fn routes(cluster: Option<Arc<Cluster>>) -> Router {
    Router::new()
        .route("/v1/cluster", get(status))
        .with_state(cluster)
}

async fn status(State(cluster): State<Option<Arc<Cluster>>>) -> Response {
    match cluster {
        Some(c) => Json(c.status()).into_response(),
        None => ApiError::new(
            StatusCode::NOT_FOUND,
            "not_a_cluster",
            "this node is a single core: set [cluster] to run it as one of a cluster",
        )
        .into_response(),
    }
}
