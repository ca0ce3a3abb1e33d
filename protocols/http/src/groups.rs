//! Consumer-group offsets: commit and read them.

use axum::body::Body;
use axum::extract::{Extension, Path, State};
use axum::http::HeaderMap;
use axum::Json;
use serde::Deserialize;
use serde_json::json;
use tributary_devices::auth::Action;
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
    state.cx.log.commit_offsets(&group, offsets).await?;
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
