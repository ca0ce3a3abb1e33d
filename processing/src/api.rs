//! `/v1/pipelines`: list, create, describe, delete, pause, resume. Mounted
//! behind the HTTP API's authentication; with device auth on, these routes
//! take the admin token (a pipeline reads and writes any topic).

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use tributary_http::ApiError;

use crate::manager::{Error, Manager};

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        let message = e.to_string();
        match e {
            Error::Invalid(_) => ApiError::bad_request(message),
            Error::Sql(_) => ApiError::new(StatusCode::BAD_REQUEST, "bad_sql", message),
            Error::NotFound(_) => ApiError::new(StatusCode::NOT_FOUND, "unknown_pipeline", message),
            Error::Exists(_) => ApiError::new(StatusCode::CONFLICT, "pipeline_exists", message),
            Error::FromFile(_) => ApiError::new(StatusCode::CONFLICT, "defined_in_config", message),
            Error::Full(_) => ApiError::new(StatusCode::CONFLICT, "too_many_pipelines", message),
            Error::Log(l) => l.into(),
        }
    }
}

type Answer = Result<Response, ApiError>;

async fn list(State(m): State<Arc<Manager>>) -> Answer {
    Ok(Json(serde_json::json!({ "pipelines": m.list() })).into_response())
}

async fn create(State(m): State<Arc<Manager>>, body: axum::body::Bytes) -> Answer {
    let v: serde_json::Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("the body is not JSON: {e}")))?;
    let info = m.create(v).await?;
    Ok((StatusCode::CREATED, Json(info)).into_response())
}

async fn describe(State(m): State<Arc<Manager>>, Path(name): Path<String>) -> Answer {
    Ok(Json(m.get(&name)?).into_response())
}

async fn delete(State(m): State<Arc<Manager>>, Path(name): Path<String>) -> Answer {
    m.delete(&name).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn pause(State(m): State<Arc<Manager>>, Path(name): Path<String>) -> Answer {
    Ok(Json(m.pause(&name, true).await?).into_response())
}

async fn resume(State(m): State<Arc<Manager>>, Path(name): Path<String>) -> Answer {
    Ok(Json(m.pause(&name, false).await?).into_response())
}

/// The routes, for the HTTP API's authenticated router.
pub fn routes(m: Arc<Manager>) -> Router {
    Router::new()
        .route("/v1/pipelines", get(list).post(create))
        .route("/v1/pipelines/{name}", get(describe).delete(delete))
        .route("/v1/pipelines/{name}/pause", post(pause))
        .route("/v1/pipelines/{name}/resume", post(resume))
        .with_state(m)
}
