//! Sending a signed request and saying what came of it.
//!
//! One shared HTTP client (connection pooling, keep-alive), no redirects,
//! a timeout per request, at most `max_response_bytes` of a response read.

pub mod retry;

use std::time::{Duration, SystemTime};

use reqwest::StatusCode;

use crate::signing::{SignedRequest, USER_AGENT_VALUE};

/// What one attempt came to.
#[derive(Debug, Clone, PartialEq)]
pub enum AttemptResult {
    /// 2xx.
    Delivered {
        status: u16,
    },
    Failed(Failure),
}

/// Why an attempt failed, and whether trying again can help.
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    pub kind: FailureKind,
    /// What went wrong, for operators: never a secret, never the URL's query.
    pub message: String,
    pub status: Option<u16>,
    /// The start of the response body.
    pub body: Option<String>,
    /// From a `Retry-After` header.
    pub retry_after: Option<Duration>,
}

impl Failure {
    /// A failure with no response (a transport error, or a plugin stage
    /// that failed before sending): worth retrying on the schedule.
    pub fn retryable(message: String) -> Failure {
        Failure {
            kind: FailureKind::Retryable,
            message,
            status: None,
            body: None,
            retry_after: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// 408, 425, 429, 5xx, 3xx, timeouts, connection errors.
    Retryable,
    /// Any other 4xx: the receiver refuses this request; retrying will not help.
    Permanent,
    /// 410: the endpoint is gone; deliveries to it stop.
    Gone,
}

/// The shared HTTP client.
#[derive(Clone)]
pub struct Deliverer {
    client: reqwest::Client,
    max_response_bytes: usize,
}

impl Deliverer {
    pub fn new(max_response_bytes: usize) -> anyhow::Result<Self> {
        install_crypto_provider();
        let client = reqwest::Client::builder()
            .user_agent(USER_AGENT_VALUE)
            .redirect(reqwest::redirect::Policy::none())
            .pool_max_idle_per_host(1024)
            .pool_idle_timeout(Duration::from_secs(90))
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(10))
            .build()?;
        Ok(Deliverer {
            client,
            max_response_bytes,
        })
    }

    pub async fn send(&self, request: SignedRequest, timeout: Duration) -> AttemptResult {
        let sent = self
            .client
            .post(request.url)
            .headers(request.headers)
            .body(request.body)
            .timeout(timeout)
            .send()
            .await;
        let mut response = match sent {
            Ok(r) => r,
            Err(e) => return AttemptResult::Failed(transport_failure(&e, timeout)),
        };
        let status = response.status();
        if status.is_success() {
            // Drain a little so the connection can be reused; the body is not kept.
            let _ = read_capped(&mut response, self.max_response_bytes.min(4096)).await;
            return AttemptResult::Delivered {
                status: status.as_u16(),
            };
        }
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| retry::parse_retry_after(v, SystemTime::now()));
        let body = read_capped(&mut response, self.max_response_bytes).await;
        let kind = classify(status);
        AttemptResult::Failed(Failure {
            kind,
            message: format!("HTTP {}", status.as_u16()),
            status: Some(status.as_u16()),
            body: Some(String::from_utf8_lossy(&body).into_owned()),
            retry_after,
        })
    }
}

/// Which non-2xx statuses are worth retrying.
pub fn classify(status: StatusCode) -> FailureKind {
    match status.as_u16() {
        410 => FailureKind::Gone,
        408 | 425 | 429 => FailureKind::Retryable,
        400..=499 => FailureKind::Permanent,
        _ => FailureKind::Retryable,
    }
}

fn transport_failure(e: &reqwest::Error, timeout: Duration) -> Failure {
    let message = if e.is_timeout() {
        format!("timed out after {timeout:?}")
    } else if e.is_connect() {
        format!("connection failed: {}", chain(e))
    } else {
        format!("request failed: {}", chain(e))
    };
    Failure::retryable(message)
}

/// The error and its causes, without the URL (it may carry credentials).
fn chain(e: &reqwest::Error) -> String {
    let mut out = String::new();
    let mut source: Option<&dyn std::error::Error> = std::error::Error::source(e);
    while let Some(s) = source {
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&s.to_string());
        source = s.source();
    }
    if out.is_empty() {
        "unknown error".into()
    } else {
        out
    }
}

/// Reads at most `cap` bytes of the body and stops.
async fn read_capped(response: &mut reqwest::Response, cap: usize) -> Vec<u8> {
    let mut out = Vec::new();
    while out.len() < cap {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                let take = chunk.len().min(cap - out.len());
                out.extend_from_slice(&chunk[..take]);
            }
            _ => break,
        }
    }
    out
}

/// rustls needs one process-wide crypto provider; ring is the one built in.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_statuses_as_the_issue_of_retrying_demands() {
        let k = |s: u16| classify(StatusCode::from_u16(s).unwrap());
        for s in [408, 425, 429, 500, 502, 503, 504, 301, 302] {
            assert_eq!(k(s), FailureKind::Retryable, "{s}");
        }
        for s in [400, 401, 403, 404, 422] {
            assert_eq!(k(s), FailureKind::Permanent, "{s}");
        }
        assert_eq!(k(410), FailureKind::Gone);
    }
}
