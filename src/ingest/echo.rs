//! `POST /v1/echo`: a receiver built in for trying wasmhook out. It logs each
//! webhook it gets and whether its Pusher signature checks out against an
//! app's secret, and answers 200.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use tracing::info;

use super::Ingest;
use crate::signing::pusher;

pub(super) async fn receive(
    State(state): State<Arc<Ingest>>,
    headers: HeaderMap,
    body: Bytes,
) -> &'static str {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let verified = match (header(pusher::KEY_HEADER), header(pusher::SIGNATURE_HEADER)) {
        (Some(key), Some(signature)) => state
            .apps
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|a| a.key == key)
            .any(|a| {
                a.secrets
                    .iter()
                    .any(|s| pusher::signature(s.expose().as_bytes(), &body) == signature)
            }),
        _ => false,
    };
    let shown = String::from_utf8_lossy(&body[..body.len().min(2048)]).into_owned();
    info!(
        signature_valid = verified,
        bytes = body.len(),
        body = shown,
        "echo: webhook received"
    );
    "ok"
}
