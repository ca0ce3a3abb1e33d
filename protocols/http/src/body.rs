//! Reading a request: bodies held from the node's memory budget, JSON with
//! typed errors, the content type, path and query parameters.

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query};
use axum::http::{header, HeaderMap, StatusCode};
use serde::Deserialize;

use crate::error::{ApiError, ApiResult};
use crate::AppState;

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

pub(crate) fn content_type(headers: &HeaderMap) -> Option<String> {
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

pub(crate) fn path_param<T>(
    p: Result<Path<T>, axum::extract::rejection::PathRejection>,
) -> ApiResult<T> {
    p.map(|Path(v)| v)
        .map_err(|e| ApiError::bad_request(format!("bad path parameter: {}", e.body_text())))
}

pub(crate) fn query_param<T>(
    q: Result<Query<T>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<T> {
    q.map(|Query(v)| v)
        .map_err(|e| ApiError::bad_request(format!("bad query string: {}", e.body_text())))
}
