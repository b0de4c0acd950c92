//! Sending a signed request and saying what came of it.
//!
//! One shared HTTP client (connection pooling, keep-alive), no redirects,
//! a timeout per request, at most `max_response_bytes` of a response read.
//! Every destination passes the network guard ([`crate::netguard`]): IP
//! literals and special names before the request, resolved addresses when
//! connecting; a refused one is a permanent failure.

pub mod retry;

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use reqwest::StatusCode;

use crate::netguard::{Blocked, GuardedResolver, NetGuard};
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

    /// A destination the network guard refused: permanent, with the
    /// guard's reason; nothing was sent.
    pub fn blocked(blocked: &Blocked) -> Failure {
        Failure {
            kind: FailureKind::Permanent,
            message: blocked.to_string(),
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
    /// Any other 4xx: the receiver refuses this request; retrying will not
    /// help. Also a destination the network guard refuses (no status).
    Permanent,
    /// 410: the endpoint is gone; deliveries to it stop.
    Gone,
}

/// Where deliveries may go, and how they leave.
#[derive(Debug, Clone, Default)]
pub struct Egress {
    pub guard: NetGuard,
    /// None: connect directly (proxy environment variables are not read).
    pub proxy: Option<ProxySettings>,
}

/// An outbound proxy for every delivery.
#[derive(Clone)]
pub struct ProxySettings {
    /// http:// or https://; may hold credentials (`user:password@`).
    pub url: reqwest::Url,
    /// Hosts reached directly (reqwest's `NoProxy` entries).
    pub no_proxy: Vec<String>,
}

impl fmt::Debug for ProxySettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProxySettings")
            .field("host", &self.url.host_str())
            .field("port", &self.url.port_or_known_default())
            .field("no_proxy", &self.no_proxy)
            .finish_non_exhaustive()
    }
}

/// The shared HTTP client.
#[derive(Clone)]
pub struct Deliverer {
    client: reqwest::Client,
    guard: Arc<NetGuard>,
    max_response_bytes: usize,
}

impl Deliverer {
    pub fn new(max_response_bytes: usize, egress: &Egress) -> anyhow::Result<Self> {
        crate::install_crypto_provider();
        let guard = Arc::new(egress.guard.clone());
        // The proxy's own name is the operator's, not a tenant's: not judged.
        let proxy_host = egress
            .proxy
            .as_ref()
            .and_then(|p| p.url.host_str().map(str::to_string));
        let builder = reqwest::Client::builder()
            .user_agent(USER_AGENT_VALUE)
            .redirect(reqwest::redirect::Policy::none())
            .pool_max_idle_per_host(1024)
            .pool_idle_timeout(Duration::from_secs(90))
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(10))
            .dns_resolver(GuardedResolver::new(guard.clone(), proxy_host));
        let builder = match &egress.proxy {
            None => builder.no_proxy(),
            Some(p) => {
                let no_proxy = reqwest::NoProxy::from_string(&p.no_proxy.join(","));
                // The error would repeat the URL, credentials and all.
                let proxy = reqwest::Proxy::all(p.url.clone())
                    .map_err(|_| anyhow::anyhow!("delivery.proxy: not a usable proxy URL"))?
                    .no_proxy(no_proxy);
                builder.proxy(proxy)
            }
        };
        Ok(Deliverer {
            client: builder.build()?,
            guard,
            max_response_bytes,
        })
    }

    pub async fn send(&self, request: SignedRequest, timeout: Duration) -> AttemptResult {
        // The resolver never sees IP literals, and through a proxy it sees
        // no destination at all: what can be judged from the URL is judged
        // here.
        if let Err(blocked) = self.guard.check_url(&request.url) {
            return AttemptResult::Failed(Failure::blocked(&blocked));
        }
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
    if let Some(blocked) = blocked_cause(e) {
        return Failure::blocked(blocked);
    }
    let message = if e.is_timeout() {
        format!("timed out after {timeout:?}")
    } else if e.is_connect() {
        format!("connection failed: {}", chain(e))
    } else {
        format!("request failed: {}", chain(e))
    };
    Failure::retryable(message)
}

/// The guard's refusal, when the resolver gave one: reqwest and hyper wrap
/// it, so it is found in the source chain.
fn blocked_cause(e: &reqwest::Error) -> Option<&Blocked> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(blocked) = s.downcast_ref::<Blocked>() {
            return Some(blocked);
        }
        source = s.source();
    }
    None
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

    #[tokio::test]
    async fn a_name_that_resolves_to_a_blocked_address_is_a_permanent_failure() {
        let deliverer = Deliverer::new(1024, &Egress::default()).unwrap();
        // Straight to the client, past the URL check: the resolver decides.
        let err = deliverer
            .client
            .post("http://localhost:9/")
            .send()
            .await
            .unwrap_err();
        let failure = transport_failure(&err, Duration::from_secs(1));
        assert_eq!(failure.kind, FailureKind::Permanent);
        assert!(
            failure.message.starts_with("blocked: localhost (")
                && failure.message.contains("loopback"),
            "{}",
            failure.message
        );
        assert_eq!(failure.status, None);
    }
}
