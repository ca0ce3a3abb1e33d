//! The one error type of the HTTP API: `{"error": {"code", "message"}}` with a
//! fitting status. Internal failures are logged in full and answered briefly.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;
use tributary_storage::Error as LogError;

use tributary_ingest::Refused;

/// An error answer; its `Display` is the message. Every failure of the crate
/// is one: a request it refuses, a log error ([`From`] the storage error), a
/// registry error. An ACL or login refusal is decided first, then answered
/// as one (`403`, `401`).
#[derive(Debug, Clone)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable machine-readable code.
    pub code: &'static str,
    /// Human-readable explanation.
    pub message: String,
}

impl ApiError {
    /// Any status, code and message.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    /// 400 with code `bad_request`.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    /// The same answer, its message prefixed with `what: ` (which record of
    /// several, say).
    pub fn prefixed(mut self, what: &str) -> Self {
        self.message = format!("{what}: {}", self.message);
        self
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ApiError {}

impl From<LogError> for ApiError {
    fn from(e: LogError) -> Self {
        ApiError::from(&e)
    }
}

/// The log refused a produce: the status and code its error calls for.
impl From<Refused> for ApiError {
    fn from(r: Refused) -> Self {
        ApiError::from(&*r.error)
    }
}

impl From<&LogError> for ApiError {
    fn from(e: &LogError) -> Self {
        let msg = e.to_string();
        let (status, code) = match e {
            LogError::UnknownTopic(_) => (StatusCode::NOT_FOUND, "unknown_topic"),
            LogError::UnknownPartition { .. } => (StatusCode::NOT_FOUND, "unknown_partition"),
            LogError::TopicExists(_) => (StatusCode::CONFLICT, "topic_exists"),
            LogError::TopicDeleting(_) => (StatusCode::CONFLICT, "topic_being_deleted"),
            LogError::InvalidTopic(_) | LogError::InvalidName(_) => {
                (StatusCode::BAD_REQUEST, "invalid_topic")
            }
            LogError::EventTooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "event_too_large"),
            LogError::WriteTooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "write_too_large"),
            LogError::KeyRequired(_) => (StatusCode::UNPROCESSABLE_ENTITY, "key_required"),
            LogError::OffsetOutOfRange { .. } => (StatusCode::BAD_REQUEST, "offset_out_of_range"),
            LogError::Config(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            LogError::Corruption { .. } | LogError::BadBatch(_) => {
                (StatusCode::INTERNAL_SERVER_ERROR, "corruption")
            }
            LogError::Unwritable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unwritable"),
            LogError::QuotaExceeded { .. } => (StatusCode::INSUFFICIENT_STORAGE, "quota_exceeded"),
            LogError::DiskFull { .. } => (StatusCode::INSUFFICIENT_STORAGE, "disk_full"),
            LogError::Closed => (StatusCode::SERVICE_UNAVAILABLE, "shutting_down"),
            // Only Kafka's idempotent producers send sequences.
            LogError::OutOfOrderSequence { .. }
            | LogError::ProducerFenced { .. }
            | LogError::UnknownProducer { .. } => (StatusCode::CONFLICT, "producer_sequence"),
            LogError::Superseded(_) => (StatusCode::CONFLICT, "superseded"),
            LogError::Engine(_) | LogError::Io(_) => {
                tracing::error!(error = %e, "storage error while serving a request");
                return ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "internal storage error",
                );
            }
        };
        if status.is_server_error() {
            tracing::warn!(error = %e, "request failed");
        }
        ApiError::new(status, code, msg)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"code": self.code, "message": self.message}});
        (self.status, Json(body)).into_response()
    }
}

/// Result alias for handlers.
pub type ApiResult<T> = Result<T, ApiError>;
