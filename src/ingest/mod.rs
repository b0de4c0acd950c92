//! The HTTP ingest: producers post events; they are answered 202 only once
//! the events are stored in the queue.
//!
//! - `POST /v1/apps/{app_id}/events` (Bearer ingest token): one event, or
//!   `{"events": [...]}`. `Idempotency-Key` makes a retry of the same request
//!   enqueue nothing new and get the first answer; the same key with another
//!   body gets 422. An unknown app gets the same 401 as a wrong token.
//! - `POST /v1/pusher/webhooks`: what soketi or Pusher Channels send for an
//!   app's webhook (`pusher`).
//! - `GET /healthz`: the process is up. `GET /readyz`: the queue answers.
//! - `POST /v1/echo` (when enabled): a receiver that logs what it gets.

mod echo;
mod error;
mod pusher;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tracing::{info, warn};

pub use self::error::IngestError;
use crate::app::{Apps, Secret};
use crate::config::ServerSettings;
use crate::event::{Event, Job, now_ms};
use crate::queue::{Idempotency, Queue};

/// How long the ingest waits for the queue before answering 503.
const QUEUE_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest accepted Idempotency-Key.
const MAX_IDEMPOTENCY_KEY: usize = 255;

pub struct Ingest {
    pub queue: Queue,
    /// Replaced whole on a config reload.
    pub apps: std::sync::RwLock<Apps>,
    pub server: ServerSettings,
}

pub fn router(state: Arc<Ingest>) -> Router {
    let mut router = Router::new()
        .route("/v1/apps/{app_id}/events", post(post_events))
        .route("/v1/pusher/webhooks", post(pusher::receive))
        .route(
            "/healthz",
            get(|| async { axum::Json(json!({"status": "ok"})) }),
        )
        .route("/readyz", get(ready));
    if state.server.echo {
        router = router.route("/v1/echo", post(echo::receive));
    }
    router
        .layer(axum::middleware::from_fn(count_status))
        .with_state(state)
}

/// Counts every ingest answer by status, for the metrics.
async fn count_status(request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let response = next.run(request).await;
    crate::metrics::ingest_request(response.status().as_u16());
    response
}

async fn ready(State(state): State<Arc<Ingest>>) -> Response {
    match tokio::time::timeout(Duration::from_secs(2), state.queue.ping()).await {
        Ok(Ok(())) => axum::Json(json!({"status": "ready"})).into_response(),
        Ok(Err(e)) => IngestError::Unavailable(e.to_string()).into_response(),
        Err(_) => IngestError::Unavailable("the queue did not answer".into()).into_response(),
    }
}

async fn post_events(
    State(state): State<Arc<Ingest>>,
    Path(app_id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    match accept(&state, &app_id, &headers, body).await {
        Ok(response) => response,
        Err(e) => {
            if matches!(e, IngestError::Unavailable(_)) {
                warn!(app = app_id, error = %e, "events refused: queue unavailable");
            }
            e.into_response()
        }
    }
}

async fn accept(
    state: &Ingest,
    app_id: &str,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, IngestError> {
    let app = state
        .apps
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .get(app_id)
        .cloned();
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .ok_or(IngestError::Unauthorized)?;
    // An unknown app is answered as a wrong token, after the same work, so
    // neither the answer nor its timing tells which app ids exist.
    let authorized = match &app {
        Some(app) => app.ingest_token.matches(token),
        None => {
            let _ = Secret::new("").matches(token);
            false
        }
    };
    if !authorized {
        return Err(IngestError::Unauthorized);
    }
    let bytes = read_body(state, headers, body).await?;
    let events = parse_events(&bytes, state.server.max_batch)?;

    let idempotency_key = match headers.get("idempotency-key") {
        None => None,
        Some(v) => {
            let key = v.to_str().ok().filter(|k| !k.is_empty() && k.len() <= MAX_IDEMPOTENCY_KEY).ok_or_else(|| {
                IngestError::BadRequest(format!("Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} visible ASCII characters"))
            })?;
            Some(key.to_string())
        }
    };
    // A key answers only the request it was first used with: this app, these bytes.
    let once = idempotency_key.map(|key| Once {
        fingerprint: fingerprint(app_id, &bytes),
        key,
        ttl: state.server.idempotency_ttl,
    });
    let created_ms = now_ms();
    let jobs: Vec<Job> = events
        .into_iter()
        .map(|event| Job::new(app_id, event, created_ms))
        .collect();
    store(state, app_id, once, &jobs).await
}

/// The request body, up to `server.max_body_bytes` (413 past it).
async fn read_body(
    state: &Ingest,
    headers: &HeaderMap,
    body: Body,
) -> Result<axum::body::Bytes, IngestError> {
    let limit = state.server.max_body_bytes;
    if let Some(len) = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
        && len > limit
    {
        return Err(IngestError::TooLarge(limit));
    }
    axum::body::to_bytes(body, limit).await.map_err(|e| {
        if is_length_limit(&e) {
            IngestError::TooLarge(limit)
        } else {
            IngestError::BadRequest(format!("cannot read the body: {e}"))
        }
    })
}

/// A request that must be stored once: its key, the fingerprint of what it
/// carried, and how long the answer is kept.
struct Once {
    key: String,
    fingerprint: String,
    ttl: Duration,
}

/// SHA-256 of the app and the body: what an idempotency key answers for.
fn fingerprint(app_id: &str, bytes: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(app_id.as_bytes());
    h.update([0]);
    h.update(bytes);
    hex::encode(h.finalize())
}

/// Stores `jobs` and answers 202 with their ids, once the queue has them.
/// With `once`, a request seen before gets its first answer and stores
/// nothing.
async fn store(
    state: &Ingest,
    app_id: &str,
    once: Option<Once>,
    jobs: &[Job],
) -> Result<Response, IngestError> {
    if let Some(o) = &once {
        match timed(
            state
                .queue
                .idempotency_begin(app_id, &o.key, &o.fingerprint, o.ttl),
        )
        .await?
        {
            Idempotency::New => {}
            Idempotency::InProgress => return Err(IngestError::Conflict),
            Idempotency::Mismatch => return Err(IngestError::IdempotencyMismatch),
            Idempotency::Done(answer) => {
                let mut response = (
                    StatusCode::ACCEPTED,
                    [(header::CONTENT_TYPE, "application/json")],
                    answer,
                )
                    .into_response();
                response.headers_mut().insert(
                    "idempotent-replayed",
                    header::HeaderValue::from_static("true"),
                );
                return Ok(response);
            }
        }
    }
    if let Err(e) = timed(state.queue.enqueue(app_id, jobs)).await {
        if let Some(o) = &once {
            // Best effort: if this fails too, the claim expires on its own.
            let _ = timed(state.queue.idempotency_abort(app_id, &o.key)).await;
        }
        return Err(e);
    }
    let ids: Vec<&str> = jobs.iter().map(|j| j.id.as_str()).collect();
    let answer = json!({ "ids": ids }).to_string();
    if let Some(o) = &once
        && let Err(e) =
            timed(
                state
                    .queue
                    .idempotency_finish(app_id, &o.key, &o.fingerprint, &answer, o.ttl),
            )
            .await
    {
        // The events are stored: answer 202; a retry with this key within the
        // claim window gets 409, after it the events are enqueued again.
        warn!(app = app_id, error = %e, "could not store the idempotent answer");
    }
    info!(app = app_id, count = ids.len(), "events accepted");
    Ok((
        StatusCode::ACCEPTED,
        [(header::CONTENT_TYPE, "application/json")],
        answer,
    )
        .into_response())
}

async fn timed<T>(
    f: impl std::future::Future<Output = Result<T, crate::queue::QueueError>>,
) -> Result<T, IngestError> {
    match tokio::time::timeout(QUEUE_TIMEOUT, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(IngestError::Unavailable(e.to_string())),
        Err(_) => Err(IngestError::Unavailable(
            "the queue did not answer in time".into(),
        )),
    }
}

fn is_length_limit(e: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if s.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = s.source();
    }
    false
}

/// One event object, or `{"events": [...]}`.
pub fn parse_events(bytes: &[u8], max_batch: usize) -> Result<Vec<Event>, IngestError> {
    let value: Value = serde_json::from_slice(bytes)
        .map_err(|e| IngestError::BadRequest(format!("malformed JSON: {e}")))?;
    match value {
        Value::Object(mut map) if map.contains_key("events") && !map.contains_key("name") => {
            let Some(Value::Array(items)) = map.remove("events") else {
                return Err(IngestError::BadRequest(
                    "`events` must be an array of events".into(),
                ));
            };
            if items.is_empty() {
                return Err(IngestError::BadRequest("`events` is empty".into()));
            }
            if items.len() > max_batch {
                return Err(IngestError::BadRequest(format!(
                    "{} events in one request; at most {max_batch}",
                    items.len()
                )));
            }
            items
                .into_iter()
                .enumerate()
                .map(|(i, v)| {
                    Event::from_json(v)
                        .map_err(|e| IngestError::BadRequest(format!("events[{i}]: {e}")))
                })
                .collect()
        }
        other => Ok(vec![
            Event::from_json(other).map_err(|e| IngestError::BadRequest(e.to_string()))?,
        ]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_one_event_or_a_batch() {
        assert_eq!(
            parse_events(br#"{"name":"client_event","channel":"c"}"#, 10)
                .unwrap()
                .len(),
            1
        );
        assert_eq!(
            parse_events(br#"{"events":[{"name":"a"},{"name":"b"}]}"#, 10)
                .unwrap()
                .len(),
            2
        );
    }

    #[test]
    fn says_what_is_wrong() {
        let msg = |b: &[u8]| parse_events(b, 2).unwrap_err().to_string();
        assert!(msg(b"{").contains("malformed JSON"));
        assert!(msg(br#"{"channel":"c"}"#).contains("name"));
        assert!(msg(br#"{"events":[{"name":"a"},{"nam":"b"}]}"#).contains("events[1]"));
        assert!(msg(br#"{"events":[]}"#).contains("empty"));
        assert!(
            msg(br#"{"events":[{"name":"a"},{"name":"a"},{"name":"a"}]}"#).contains("at most 2")
        );
        assert!(msg(br#"{"events":{}}"#).contains("array"));
    }

    /// Found by the `ingest_body` fuzz target: a number past f64's precision
    /// read back as a different number once the event was written out, so
    /// every JSON hop (queue, worker, body) could change it.
    #[test]
    fn numbers_read_back_as_the_same_number() {
        let body =
            br#"{"name":"x","channel":"\ud83d\ude00","big":123456789012345678904653100000004}"#;
        let events = parse_events(body, 10).unwrap();
        let again = serde_json::to_vec(&events[0]).unwrap();
        assert_eq!(parse_events(&again, 10).unwrap(), events);
    }
}
