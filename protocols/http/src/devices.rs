//! `/v1/devices`: the device admin API (admin token only, see `auth`).
//! Tokens appear in exactly two answers: creating a device and rotating its
//! token. The registry keeps only their keyed hashes.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;
use tributary_devices::{DevicePatch, NewDevice, Registry};

use super::body::{parse_json, path_param, read_body, require_json};
use super::{ApiError, ApiResult, AppState};

impl From<tributary_devices::Error> for ApiError {
    fn from(e: tributary_devices::Error) -> Self {
        match e {
            tributary_devices::Error::NotFound(_) => {
                ApiError::new(StatusCode::NOT_FOUND, "unknown_device", e.to_string())
            }
            tributary_devices::Error::Exists(_) => {
                ApiError::new(StatusCode::CONFLICT, "device_exists", e.to_string())
            }
            tributary_devices::Error::Invalid(m) => ApiError::bad_request(m),
            tributary_devices::Error::Storage(s) => s.into(),
        }
    }
}

fn registry(state: &AppState) -> ApiResult<&Arc<Registry>> {
    state.cx.devices.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::FORBIDDEN,
            "admin_disabled",
            "this node has no device registry",
        )
    })
}

type IdPath = Result<Path<String>, axum::extract::rejection::PathRejection>;

pub(super) async fn create(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    require_json(&headers)?;
    let bytes = read_body(&state, &headers, body).await?;
    let new: NewDevice = parse_json(&bytes)?;
    let (device, token) = registry(&state)?.add(new).await?;
    tracing::info!(device = %device.id, "device added");
    Ok((
        StatusCode::CREATED,
        Json(json!({"device": device, "token": token})),
    )
        .into_response())
}

pub(super) async fn list(State(state): State<AppState>) -> ApiResult<Json<serde_json::Value>> {
    Ok(Json(json!({"devices": registry(&state)?.list()})))
}

pub(super) async fn get(
    State(state): State<AppState>,
    id: IdPath,
) -> ApiResult<Json<serde_json::Value>> {
    let id = path_param(id)?;
    Ok(Json(json!(registry(&state)?.get(&id)?)))
}

pub(super) async fn update(
    State(state): State<AppState>,
    id: IdPath,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Json<serde_json::Value>> {
    let id = path_param(id)?;
    require_json(&headers)?;
    let bytes = read_body(&state, &headers, body).await?;
    let patch: DevicePatch = parse_json(&bytes)?;
    let device = registry(&state)?.update(&id, patch).await?;
    tracing::info!(device = %device.id, enabled = device.enabled, "device changed");
    Ok(Json(json!(device)))
}

pub(super) async fn remove(State(state): State<AppState>, id: IdPath) -> ApiResult<StatusCode> {
    let id = path_param(id)?;
    registry(&state)?.remove(&id).await?;
    tracing::info!(device = %id, "device removed");
    Ok(StatusCode::NO_CONTENT)
}

pub(super) async fn rotate(
    State(state): State<AppState>,
    id: IdPath,
) -> ApiResult<Json<serde_json::Value>> {
    let id = path_param(id)?;
    let reg = registry(&state)?;
    let token = reg.rotate(&id).await?;
    tracing::info!(device = %id, "device token rotated");
    Ok(Json(json!({"device": reg.get(&id)?, "token": token})))
}
