//! Ingest errors: each one status and one JSON body, `{"error", "message"}`.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("{0}")]
    BadRequest(String),
    /// Also the answer for an app that does not exist, so app ids cannot be probed.
    #[error("missing or wrong ingest token (Authorization: Bearer <token>)")]
    Unauthorized,
    /// A Pusher webhook whose key is unknown or whose signature is wrong:
    /// one answer for both.
    #[error("missing or wrong X-Pusher-Key / X-Pusher-Signature")]
    BadSignature,
    /// A signed Pusher webhook whose `time_ms` is too far from now.
    #[error("time_ms is more than {0} from now: refused as a possible replay")]
    Stale(String),
    #[error("another request with this Idempotency-Key is being handled; retry later")]
    Conflict,
    #[error(
        "this Idempotency-Key was used with a different request body; use a new key for a new request"
    )]
    IdempotencyMismatch,
    #[error("request body over the limit of {0} bytes")]
    TooLarge(usize),
    #[error("the queue is unavailable: {0}")]
    Unavailable(String),
}

impl IngestError {
    pub fn status(&self) -> StatusCode {
        match self {
            IngestError::BadRequest(_) => StatusCode::BAD_REQUEST,
            IngestError::Unauthorized | IngestError::BadSignature | IngestError::Stale(_) => {
                StatusCode::UNAUTHORIZED
            }
            IngestError::Conflict => StatusCode::CONFLICT,
            IngestError::IdempotencyMismatch => StatusCode::UNPROCESSABLE_ENTITY,
            IngestError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            IngestError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            IngestError::BadRequest(_) => "bad_request",
            IngestError::Unauthorized | IngestError::BadSignature => "unauthorized",
            IngestError::Stale(_) => "stale",
            IngestError::Conflict => "conflict",
            IngestError::IdempotencyMismatch => "idempotency_key_reused",
            IngestError::TooLarge(_) => "payload_too_large",
            IngestError::Unavailable(_) => "unavailable",
        }
    }
}

impl IntoResponse for IngestError {
    fn into_response(self) -> Response {
        let mut response = (
            self.status(),
            Json(json!({"error": self.code(), "message": self.to_string()})),
        )
            .into_response();
        if matches!(self, IngestError::Unavailable(_)) {
            response
                .headers_mut()
                .insert("retry-after", axum::http::HeaderValue::from_static("1"));
        }
        response
    }
}
