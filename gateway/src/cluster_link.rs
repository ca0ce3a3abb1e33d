//! `GET /v1/cluster`: the cluster as this node sees it (roles, term, each
//! node's replication lag on the leader); 404 `not_a_cluster` on a single
//! node. `POST /v1/cluster/nodes` (`{"id", "address"}`) adds a voter and
//! `DELETE /v1/cluster/nodes/{id}` removes one, on any node (admin with
//! device auth). And the cluster's metrics.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use axum::Json;
use serde::Deserialize;
use tributary_cluster::{Cluster, MembershipChange};
use tributary_http::{ApiError, Router};
use tributary_telemetry::{Kind, MetricsSource, Text};

/// The cluster routes (served by every node; answered on a cluster's nodes).
pub fn routes(cluster: Option<Arc<Cluster>>) -> Router {
    Router::new()
        .route("/v1/cluster", get(status))
        .route("/v1/cluster/nodes", axum::routing::post(add))
        .route("/v1/cluster/nodes/{id}", delete(remove))
        .with_state(cluster)
}

fn not_a_cluster() -> Response {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_a_cluster",
        "this node is a single core: set [cluster] to run it as one of a cluster",
    )
    .into_response()
}

async fn status(State(cluster): State<Option<Arc<Cluster>>>) -> Response {
    match cluster {
        Some(c) => Json(c.status()).into_response(),
        None => not_a_cluster(),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewNode {
    id: u64,
    address: String,
}

async fn add(
    State(cluster): State<Option<Arc<Cluster>>>,
    body: Result<Json<NewNode>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Some(c) = cluster else {
        return not_a_cluster();
    };
    let Json(n) = match body {
        Ok(b) => b,
        Err(e) => {
            return ApiError::new(StatusCode::BAD_REQUEST, "bad_request", e.body_text())
                .into_response()
        }
    };
    if n.id == 0 || n.address.is_empty() {
        return ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "a node needs an id ≥ 1 and its node-to-node address",
        )
        .into_response();
    }
    changed(
        &c,
        MembershipChange::Add {
            id: n.id,
            address: n.address,
        },
    )
    .await
}

async fn remove(State(cluster): State<Option<Arc<Cluster>>>, Path(id): Path<u64>) -> Response {
    match cluster {
        Some(c) => changed(&c, MembershipChange::Remove { id }).await,
        None => not_a_cluster(),
    }
}

/// Makes the change; answers the status after it, or 409 with why not.
async fn changed(c: &Cluster, change: MembershipChange) -> Response {
    match c.change(change).await {
        Ok(()) => Json(c.status()).into_response(),
        Err(why) => ApiError::new(StatusCode::CONFLICT, "membership_refused", why).into_response(),
    }
}

/// The cluster's Prometheus metrics, from its status.
pub struct ClusterMetrics(pub Arc<Cluster>);

impl MetricsSource for ClusterMetrics {
    fn render(&self, out: &mut Text) {
        let s = self.0.status();
        out.gauge(
            "tributary_cluster_leader",
            "1 while this node is the cluster's leader",
            u8::from(s.role == "leader"),
        );
        out.gauge("tributary_cluster_term", "the current Raft term", s.term);
        out.counter(
            "tributary_cluster_leader_changes_total",
            "leader changes this node saw since it started",
            s.leader_changes,
        );
        out.counter(
            "tributary_cluster_proposed_entries_total",
            "Raft entries this node proposed (or forwarded to the leader) since it started",
            s.proposed_entries,
        );
        out.counter(
            "tributary_cluster_proposed_writes_total",
            "writes in those entries: more than entries where small writes were merged",
            s.proposed_writes,
        );
        out.gauge(
            "tributary_cluster_last_log_index",
            "the last index of this node's Raft log",
            s.last_log_index.unwrap_or(0),
        );
        out.gauge(
            "tributary_cluster_applied_index",
            "the last index applied to this node's log",
            s.applied_index.unwrap_or(0),
        );
        self.0.write_latency().render(
            out,
            "tributary_cluster_write_seconds",
            "writes acknowledged on this node: from being handed to the cluster to a majority having them on disk and this node having applied them",
        );
        let lags: Vec<(u64, u64)> = s
            .nodes
            .iter()
            .filter_map(|n| n.lag.map(|l| (n.id, l)))
            .collect();
        if !lags.is_empty() {
            let mut f = out.family(
                "tributary_cluster_replication_lag_entries",
                Kind::Gauge,
                "on the leader: entries each node is behind its log",
            );
            for (id, lag) in lags {
                f.sample(&[("node", &id)], lag);
            }
        }
    }
}
