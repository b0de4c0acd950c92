//! `GET /metrics`: reads the queue's gauges (a fixed number of Redis
//! commands, whatever the number of apps: one pipeline and one `HGETALL` of
//! the outcome counters, plus one status script for the opted-in endpoints),
//! then renders every series.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tracing::debug;

use super::{EndpointGauges, QueueGauges};
use crate::queue::{Queue, QueueError};

/// Most endpoints `metrics.endpoints` may name: their series are per endpoint.
pub const MAX_ENDPOINTS: usize = 100;

/// How long a scrape waits for the queue before it answers without it.
const QUEUE_TIMEOUT: Duration = Duration::from_secs(2);

/// Where and how `/metrics` is served.
#[derive(Debug, Clone, Default)]
pub struct MetricsSettings {
    /// Serve `/metrics` on the ingest listener.
    pub on_ingest: bool,
    /// A listener of its own (any mode; the only one a worker-only process has).
    pub listen: Option<SocketAddr>,
    /// When set, a scrape must send `Authorization: Bearer <token>`.
    pub token: Option<crate::app::Secret>,
    /// Endpoints (app, endpoint) with per-endpoint series.
    pub endpoints: Vec<(String, String)>,
}

struct Scrape {
    queue: Queue,
    settings: MetricsSettings,
}

/// The `/metrics` route, with its own state.
pub fn router(queue: Queue, settings: MetricsSettings) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .with_state(Arc::new(Scrape { queue, settings }))
}

async fn metrics(State(scrape): State<Arc<Scrape>>, headers: HeaderMap) -> Response {
    if let Some(token) = &scrape.settings.token
        && !authorized(&headers, token)
    {
        return (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            "a bearer token is required\n",
        )
            .into_response();
    }
    let queue = match tokio::time::timeout(QUEUE_TIMEOUT, read_queue(&scrape.queue)).await {
        Ok(Ok(q)) => Some(q),
        Ok(Err(e)) => {
            debug!(error = %e, "metrics: cannot read the queue");
            None
        }
        Err(_) => {
            super::redis_error();
            None
        }
    };
    let mut endpoints = None;
    if !scrape.settings.endpoints.is_empty() {
        let read = tokio::time::timeout(
            QUEUE_TIMEOUT,
            scrape.queue.endpoints(&scrape.settings.endpoints),
        )
        .await;
        if let Ok(Ok(states)) = read {
            endpoints = Some(
                states
                    .into_iter()
                    .map(|s| EndpointGauges {
                        app: s.app,
                        endpoint: s.endpoint,
                        state: s.state.name(),
                        held: s.held_until_ms.is_some(),
                        waiting: s.waiting,
                        rate_limited: s.rate_limited_waits,
                    })
                    .collect::<Vec<_>>(),
            );
        }
    }
    let text = super::render(queue.as_ref(), endpoints.as_deref());
    ([(header::CONTENT_TYPE, super::CONTENT_TYPE)], text).into_response()
}

fn authorized(headers: &HeaderMap, token: &crate::app::Secret) -> bool {
    let Some(given) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return false;
    };
    token.matches(given)
}

async fn read_queue(queue: &Queue) -> Result<QueueGauges, QueueError> {
    let depth = queue.depth().await?;
    let stats = queue.stats().await?;
    Ok(QueueGauges {
        ready: depth.ready,
        in_flight: depth.in_flight,
        delayed: depth.delayed,
        dead: depth.dead,
        held: depth.held,
        active_apps: depth.active_apps,
        oldest_ready_age: Duration::from_millis(depth.oldest_ready_ms),
        rate_limited: stats.get("rate_limited").copied().unwrap_or(0),
    })
}
