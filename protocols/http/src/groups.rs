//! Consumer groups: who is in them (the coordinator's members and their
//! assignments), where they are (committed offsets and lag per partition),
//! and plain offset commits for consumers outside the group protocol.

use axum::body::Body;
use axum::extract::{Extension, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use serde::Deserialize;
use serde_json::json;
use tributary_devices::auth::Action;
use tributary_groups::{consumer_assignment, GroupError, GroupView};
use tributary_storage::GroupOffset;

use crate::auth::{self, Caller};
use crate::body::{parse_json, path_param, read_body, require_json};
use crate::error::{ApiError, ApiResult};
use crate::AppState;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CommitBody {
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

pub(crate) async fn commit_offsets(
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
    match state.cx.groups.commit_plain(&group, offsets).await {
        Ok(written) => written?,
        // Kafka refuses this too: it would move the members' positions
        // under them.
        Err(GroupError::UnknownMemberId) => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "group_has_members",
                format!("group {group:?} has members: they commit their own positions"),
            ))
        }
        Err(GroupError::InvalidGroupId) => {
            return Err(ApiError::bad_request(format!("invalid group id {group:?}")))
        }
        // On a cluster: the leader changed meanwhile.
        Err(e) => {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                format!("group {group:?}: {e}; try again"),
            ))
        }
    }
    let mut all = state.cx.log.group_offsets(&group)?;
    all.retain(|o| state.cx.auth.may_see(who, &o.topic));
    Ok(Json(offsets_json(&group, &all)))
}

pub(crate) async fn group_offsets(
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

/// Committed offsets with the partition's end and the lag behind it.
fn offsets_with_lag(state: &AppState, offsets: &[GroupOffset]) -> (Vec<serde_json::Value>, u64) {
    let mut total = 0u64;
    let list = offsets
        .iter()
        .map(|o| {
            let end = state
                .cx
                .log
                .offsets(&o.topic, o.partition)
                .map_or(o.offset, |(_, end)| end);
            let lag = end.saturating_sub(o.offset);
            total += lag;
            json!({"topic": o.topic, "partition": o.partition, "offset": o.offset,
                   "end": end, "lag": lag})
        })
        .collect();
    (list, total)
}

fn group_json(
    state: &AppState,
    who: &tributary_devices::auth::Identity,
    g: &GroupView,
) -> serde_json::Value {
    let mut offsets = state.cx.log.group_offsets(&g.name).unwrap_or_default();
    offsets.retain(|o| state.cx.auth.may_see(who, &o.topic));
    let (offsets, lag) = offsets_with_lag(state, &offsets);
    let members: Vec<_> = g
        .members
        .iter()
        .map(|m| {
            let assignment = if g.protocol_type == "consumer" {
                consumer_assignment(&m.assignment).map(|ts| {
                    ts.into_iter()
                        .map(
                            |(topic, partitions)| json!({"topic": topic, "partitions": partitions}),
                        )
                        .collect::<Vec<_>>()
                })
            } else {
                None
            };
            json!({
                "member_id": m.member_id,
                "instance_id": m.instance_id,
                "client_id": m.client_id,
                "client_host": m.client_host,
                "assignment": assignment,
            })
        })
        .collect();
    json!({
        "group": g.name,
        "state": g.state.name(),
        "protocol_type": g.protocol_type,
        "protocol": g.protocol,
        "generation": g.generation,
        "leader": g.leader,
        "members": members,
        "offsets": offsets,
        "lag": lag,
    })
}

/// `GET /v1/groups`: every group the caller may use, with members and lag.
pub(crate) async fn list_groups(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> ApiResult<Json<serde_json::Value>> {
    let who = caller.identity()?;
    let groups: Vec<_> = state
        .cx
        .groups
        .list()
        .iter()
        .filter(|g| {
            state
                .cx
                .auth
                .authorize(who, Action::Subscribe, &auth::group_subject(&g.name))
                .allowed()
        })
        .map(|g| {
            let full = group_json(&state, who, g);
            json!({
                "group": g.name,
                "state": g.state.name(),
                "protocol_type": g.protocol_type,
                "members": g.members.len(),
                "lag": full["lag"],
            })
        })
        .collect();
    Ok(Json(json!({ "groups": groups })))
}

/// `GET /v1/groups/{group}`: members, assignments, offsets and lag.
pub(crate) async fn describe_group(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    group: Result<Path<String>, axum::extract::rejection::PathRejection>,
) -> ApiResult<Json<serde_json::Value>> {
    let group = path_param(group)?;
    let who = caller.identity()?;
    auth::allow(&state, who, Action::Subscribe, &auth::group_subject(&group))?;
    let Some(g) = state.cx.groups.describe(&group) else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_group",
            format!("no group {group:?}: no members and no committed offsets"),
        ));
    };
    Ok(Json(group_json(&state, who, &g)))
}
