//! `POST /v1/pusher/webhooks`: soketi or Pusher Channels in front. An app's
//! webhook URL points here, and what it sends is taken as it is:
//! `{"time_ms": ..., "events": [...]}` with `X-Pusher-Key` (names the app)
//! and `X-Pusher-Signature` (hex HMAC-SHA256 of the raw body with the app
//! secret).
//!
//! The signature is checked in constant time over the raw bytes before
//! anything is parsed; an unknown key and a wrong signature get the same
//! 401 after the same work. A `time_ms` further than `server.pusher_max_age`
//! from now is refused, and a body seen before within that window (same
//! signature) stores nothing new and gets the first answer: a captured
//! request cannot be replayed. Each event becomes one job of the app; the
//! answer (202) comes once the queue has them, since soketi retries nothing.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use hmac::{Hmac, Mac};
use serde::Deserialize;
use serde_json::Value;
use sha2::Sha256;
use tracing::warn;

use super::{Ingest, IngestError, Once, fingerprint, read_body, store};
use crate::event::{Event, Job, now_ms};
use crate::signing::pusher::{KEY_HEADER, SIGNATURE_HEADER};

/// What soketi and Pusher send. Other top-level fields are ignored.
#[derive(Deserialize)]
struct Webhook {
    time_ms: u64,
    events: Vec<Value>,
}

pub(super) async fn receive(
    State(state): State<Arc<Ingest>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    match accept(&state, &headers, body).await {
        Ok(response) => response,
        Err(e) => {
            if matches!(e, IngestError::Unavailable(_)) {
                warn!(error = %e, "pusher webhook refused: queue unavailable");
            }
            e.into_response()
        }
    }
}

async fn accept(state: &Ingest, headers: &HeaderMap, body: Body) -> Result<Response, IngestError> {
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let (Some(key), Some(signature)) = (text(KEY_HEADER), text(SIGNATURE_HEADER)) else {
        return Err(IngestError::BadSignature);
    };
    let bytes = read_body(state, headers, body).await?;
    let app = state
        .apps
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .by_key(key)
        .cloned();
    // Every secret of the app is tried (the old one still signs during a
    // rotation); an unknown key costs one HMAC too.
    let signature = hex::decode(signature.trim()).unwrap_or_default();
    let signed = match &app {
        Some(app) => app
            .secrets
            .iter()
            .fold(false, |ok, s| verify(s.expose(), &bytes, &signature) | ok),
        None => {
            let _ = verify("", &bytes, &signature);
            false
        }
    };
    let Some(app) = app.filter(|_| signed) else {
        return Err(IngestError::BadSignature);
    };

    let webhook: Webhook = serde_json::from_slice(&bytes).map_err(|e| {
        IngestError::BadRequest(format!(
            "not a Pusher webhook (expected {{\"time_ms\": ..., \"events\": [...]}}): {e}"
        ))
    })?;
    let max_age = state.server.pusher_max_age;
    let now = now_ms();
    if now.abs_diff(webhook.time_ms) > max_age.as_millis() as u64 {
        return Err(IngestError::Stale(
            humantime::format_duration(max_age).to_string(),
        ));
    }
    if webhook.events.is_empty() {
        return Err(IngestError::BadRequest("`events` is empty".into()));
    }
    let max_batch = state.server.max_batch;
    if webhook.events.len() > max_batch {
        return Err(IngestError::BadRequest(format!(
            "{} events in one webhook; at most {max_batch}",
            webhook.events.len()
        )));
    }
    let jobs = webhook
        .events
        .into_iter()
        .enumerate()
        .map(|(i, v)| {
            let event = Event::from_json(v)
                .map_err(|e| IngestError::BadRequest(format!("events[{i}]: {e}")))?;
            // The webhook's own time: receivers see the time_ms soketi set.
            Ok(Job::new(&app.id, event, webhook.time_ms))
        })
        .collect::<Result<Vec<Job>, IngestError>>()?;
    // The signature names the body: the same body again within the window
    // (a replay, or a client retrying) is answered, not stored again.
    let once = Once {
        key: format!("pusher-webhook:{}", hex::encode(&signature)),
        fingerprint: fingerprint(&app.id, &bytes),
        ttl: max_age * 2,
    };
    store(state, &app.id, Some(once), &jobs).await
}

/// Constant-time check of a raw HMAC-SHA256 tag.
fn verify(secret: &str, body: &[u8], tag: &[u8]) -> bool {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes keys of any length");
    mac.update(body);
    mac.verify_slice(tag).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signing::pusher::signature;

    #[test]
    fn a_tag_verifies_only_for_its_secret_and_body() {
        let body = br#"{"time_ms":1,"events":[]}"#;
        let tag = hex::decode(signature(b"app-secret", body)).unwrap();
        assert!(verify("app-secret", body, &tag));
        assert!(!verify("app-secreT", body, &tag));
        assert!(!verify("app-secret", b"{}", &tag));
        assert!(!verify("app-secret", body, &tag[..31]));
        assert!(!verify("app-secret", body, &[]));
    }
}
