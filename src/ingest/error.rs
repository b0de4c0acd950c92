//! Ingest errors: each one status and one JSON body, `{"error", "message"}`.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("{0}")]
    BadRequest(String),
    #[error("missing or wrong ingest token (Authorization: Bearer <token>)")]
    Unauthorized,
    #[error("no such app")]
    UnknownApp,
    #[error("another request with this Idempotency-Key is being handled; retry later")]
    Conflict,
    #[error("request body over the limit of {0} bytes")]
    TooLarge(usize),
    #[error("the queue is unavailable: {0}")]
    Unavailable(String),
}

impl IngestError {
    pub fn status(&self) -> StatusCode {
        match self {
            IngestError::BadRequest(_) => StatusCode::BAD_REQUEST,
            IngestError::Unauthorized => StatusCode::UNAUTHORIZED,
            IngestError::UnknownApp => StatusCode::NOT_FOUND,
            IngestError::Conflict => StatusCode::CONFLICT,
            IngestError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            IngestError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            IngestError::BadRequest(_) => "bad_request",
            IngestError::Unauthorized => "unauthorized",
            IngestError::UnknownApp => "unknown_app",
            IngestError::Conflict => "conflict",
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
