//! Turning a routed event into the exact request an endpoint receives: the
//! body in the endpoint's envelope, then its signature over those very bytes.

pub mod pusher;
pub mod standard;

use bytes::Bytes;
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue, USER_AGENT};
use serde::Serialize;

use crate::app::{App, Endpoint, Scheme};
use crate::event::{Event, Job};

/// Headers the signer owns: config and plugins may not set them.
pub const RESERVED_HEADERS: &[&str] = &[
    pusher::KEY_HEADER,
    pusher::SIGNATURE_HEADER,
    standard::ID_HEADER,
    standard::TIMESTAMP_HEADER,
    standard::SIGNATURE_HEADER,
    "content-type",
    "content-length",
    "host",
    "user-agent",
    "transfer-encoding",
];

/// Name prefixes the signing schemes own (`x-pusher-*`, `webhook-*`), and
/// connection-level headers no plugin or endpoint may set.
pub const RESERVED_PREFIXES: &[&str] = &["x-pusher-", "webhook-", "proxy-"];
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "te",
    "trailer",
    "upgrade",
    "expect",
];

pub fn is_reserved(name: &str) -> bool {
    let starts = |prefix: &str| {
        name.len() >= prefix.len()
            && name.as_bytes()[..prefix.len()].eq_ignore_ascii_case(prefix.as_bytes())
    };
    RESERVED_HEADERS
        .iter()
        .chain(HOP_BY_HOP)
        .any(|r| r.eq_ignore_ascii_case(name))
        || RESERVED_PREFIXES.iter().any(|p| starts(p))
}

pub const USER_AGENT_VALUE: &str = concat!("wasmhook/", env!("CARGO_PKG_VERSION"));

/// A request ready to send: nothing about it changes after signing.
#[derive(Debug, Clone)]
pub struct SignedRequest {
    pub url: reqwest::Url,
    pub headers: HeaderMap,
    pub body: Bytes,
}

#[derive(Serialize)]
struct PusherBody<'a> {
    time_ms: u64,
    events: [&'a Event; 1],
}

#[derive(Serialize)]
struct StandardBody<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    timestamp: String,
    data: &'a Event,
}

/// The body an endpoint receives for a job: the same bytes on every attempt.
pub fn body(endpoint: &Endpoint, job: &Job) -> Bytes {
    let bytes = match endpoint.scheme {
        Scheme::Pusher => serde_json::to_vec(&PusherBody {
            time_ms: job.created_ms,
            events: [&job.event],
        }),
        Scheme::Standard { .. } => serde_json::to_vec(&StandardBody {
            kind: &job.event.name,
            timestamp: rfc3339_ms(job.created_ms),
            data: &job.event,
        }),
        Scheme::Raw { .. } => serde_json::to_vec(&job.event),
    };
    Bytes::from(bytes.expect("events always serialize"))
}

#[derive(Serialize)]
struct PusherBatch<'a> {
    time_ms: u64,
    events: Vec<&'a Event>,
}

#[derive(Serialize)]
struct StandardBatch<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    timestamp: String,
    data: Vec<StandardItem<'a>>,
}

#[derive(Serialize)]
struct StandardItem<'a> {
    id: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    timestamp: String,
    data: &'a Event,
}

/// The body of a batch: `pusher`, one `{"time_ms", "events": [...]}` as
/// Pusher batches; `standard`, an envelope of type `batch` whose `data` lists
/// each event in its own envelope (with its webhook id); `raw`, a JSON array
/// of the events. `created_ms` is the batch's, the same on every attempt.
pub fn batch_body(endpoint: &Endpoint, created_ms: u64, members: &[Job]) -> Bytes {
    let bytes = match endpoint.scheme {
        Scheme::Pusher => serde_json::to_vec(&PusherBatch {
            time_ms: created_ms,
            events: members.iter().map(|j| &j.event).collect(),
        }),
        Scheme::Standard { .. } => serde_json::to_vec(&StandardBatch {
            kind: crate::event::BATCH_EVENT,
            timestamp: rfc3339_ms(created_ms),
            data: members
                .iter()
                .map(|j| StandardItem {
                    id: &j.id,
                    kind: &j.event.name,
                    timestamp: rfc3339_ms(j.created_ms),
                    data: &j.event,
                })
                .collect(),
        }),
        Scheme::Raw { .. } => {
            serde_json::to_vec(&members.iter().map(|j| &j.event).collect::<Vec<_>>())
        }
    };
    Bytes::from(bytes.expect("events always serialize"))
}

/// Builds and signs the request for one attempt. `now_s` (unix seconds) is
/// the attempt's `webhook-timestamp`.
pub fn sign(app: &App, endpoint: &Endpoint, job: &Job, now_s: i64) -> SignedRequest {
    signed(
        app,
        endpoint,
        &job.id,
        &job.headers,
        body(endpoint, job),
        now_s,
    )
}

/// Builds and signs the request for one attempt of a batch (`batch.id` is
/// its webhook id) carrying `members` as the endpoint's chain left them.
/// Headers plugins added to single events are not sent: one request carries
/// many events.
pub fn sign_batch(
    app: &App,
    endpoint: &Endpoint,
    batch: &Job,
    members: &[Job],
    now_s: i64,
) -> SignedRequest {
    let body = batch_body(endpoint, batch.created_ms, members);
    signed(app, endpoint, &batch.id, &[], body, now_s)
}

fn signed(
    app: &App,
    endpoint: &Endpoint,
    id: &str,
    extra: &[(String, String)],
    body: Bytes,
    now_s: i64,
) -> SignedRequest {
    let mut headers = HeaderMap::with_capacity(endpoint.headers.len() + 5);
    for (name, value) in &endpoint.headers {
        headers.insert(name.clone(), value.clone());
    }
    // Headers plugins added. The ones the signer owns are never taken from
    // them, and the endpoint's configured headers win over theirs.
    for (name, value) in extra {
        if is_reserved(name) {
            continue;
        }
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) && !headers.contains_key(&n)
        {
            headers.insert(n, v);
        }
    }
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(USER_AGENT, HeaderValue::from_static(USER_AGENT_VALUE));
    match &endpoint.scheme {
        Scheme::Pusher => {
            let signature = pusher::signature(app.signing_secret().expose().as_bytes(), &body);
            insert(&mut headers, pusher::KEY_HEADER, &app.key);
            insert(&mut headers, pusher::SIGNATURE_HEADER, &signature);
        }
        Scheme::Raw { keys } if keys.is_empty() => {}
        Scheme::Standard { keys } | Scheme::Raw { keys } => {
            insert(&mut headers, standard::ID_HEADER, id);
            insert(&mut headers, standard::TIMESTAMP_HEADER, &now_s.to_string());
            insert(
                &mut headers,
                standard::SIGNATURE_HEADER,
                &standard::signature_header(keys, id, now_s, &body),
            );
        }
    }
    SignedRequest {
        url: endpoint.url.clone(),
        headers,
        body,
    }
}

/// Values here are validated at config time or made by us (hex, base64,
/// digits, ids checked at ingest); a value that still is not a valid header is
/// left out rather than sent mangled.
fn insert(headers: &mut HeaderMap, name: &'static str, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        headers.insert(HeaderName::from_static(name), v);
    }
}

fn rfc3339_ms(ms: u64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms);
    humantime::format_rfc3339_millis(t).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::app::Secret;
    use crate::delivery::retry::RetryPolicy;
    use crate::pipeline::route::ChannelFilter;
    use std::time::Duration;

    fn app() -> App {
        App {
            id: "app-1".into(),
            key: "app-key".into(),
            secrets: vec![Secret::new("app-secret")],
            ingest_token: Secret::new("t"),
            weight: 1,
            max_in_flight: 128,
            endpoints: vec![],
            plugins: vec![],
        }
    }

    fn endpoint(scheme: Scheme) -> Endpoint {
        Endpoint {
            id: "ep".into(),
            url: "http://127.0.0.1:9/hook".parse().unwrap(),
            scheme,
            event_types: vec![],
            filter: ChannelFilter::default(),
            headers: vec![(
                HeaderName::from_static("x-env"),
                HeaderValue::from_static("prod"),
            )],
            timeout: Duration::from_secs(1),
            retry: RetryPolicy::new(vec![Duration::ZERO], 0.0, Duration::ZERO),
            max_in_flight: 16,
            rate_limit: None,
            ordered: false,
            order_by: None,
            batch: None,
            plugins: vec![],
        }
    }

    fn job() -> Job {
        let event = Event::from_json(
            serde_json::json!({"name": "channel_occupied", "channel": "private-orders"}),
        )
        .unwrap();
        Job {
            created_ms: 1764201600000,
            ..Job::new("app-1", event, 0)
        }
    }

    #[test]
    fn a_batch_is_one_body_in_each_schemes_shape_signed_under_the_batchs_id() {
        let mut second = job();
        second.id = "msg_2".into();
        second.created_ms += 1;
        let members = vec![job(), second];
        let batch = Job::batch_of("batch_x".into(), "ep", members.clone(), 1764201600500);
        let req = sign_batch(&app(), &endpoint(Scheme::Pusher), &batch, &members, 1);
        assert_eq!(
            &req.body[..],
            br#"{"time_ms":1764201600500,"events":[{"name":"channel_occupied","channel":"private-orders"},{"name":"channel_occupied","channel":"private-orders"}]}"#
        );
        assert_eq!(
            req.headers["x-pusher-signature"],
            pusher::signature(b"app-secret", &req.body).as_str()
        );
        let keys =
            vec![standard::StandardKey::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap()];
        let req = sign_batch(
            &app(),
            &endpoint(Scheme::Standard { keys: keys.clone() }),
            &batch,
            &members,
            7,
        );
        assert_eq!(req.headers["webhook-id"], "batch_x");
        let body: serde_json::Value = serde_json::from_slice(&req.body).unwrap();
        assert_eq!(body["type"], "batch");
        assert_eq!(body["timestamp"], "2025-11-27T00:00:00.500Z");
        assert_eq!(body["data"][1]["id"], "msg_2");
        assert_eq!(body["data"][1]["type"], "channel_occupied");
        assert_eq!(body["data"][1]["timestamp"], "2025-11-27T00:00:00.001Z");
        assert_eq!(body["data"][0]["data"]["channel"], "private-orders");
        assert_eq!(
            req.headers["webhook-signature"],
            standard::signature_header(&keys, "batch_x", 7, &req.body).as_str()
        );
        let req = sign_batch(
            &app(),
            &endpoint(Scheme::Raw { keys: vec![] }),
            &batch,
            &members,
            7,
        );
        let body: serde_json::Value = serde_json::from_slice(&req.body).unwrap();
        assert_eq!(body.as_array().map(Vec::len), Some(2));
    }

    #[test]
    fn pusher_requests_carry_soketis_body_and_a_signature_over_it() {
        let req = sign(&app(), &endpoint(Scheme::Pusher), &job(), 1);
        assert_eq!(
            &req.body[..],
            br#"{"time_ms":1764201600000,"events":[{"name":"channel_occupied","channel":"private-orders"}]}"#
        );
        assert_eq!(req.headers["x-pusher-key"], "app-key");
        assert_eq!(
            req.headers["x-pusher-signature"],
            pusher::signature(b"app-secret", &req.body).as_str()
        );
        assert_eq!(req.headers["content-type"], "application/json");
        assert_eq!(req.headers["x-env"], "prod");
        assert!(
            req.headers["user-agent"]
                .to_str()
                .unwrap()
                .starts_with("wasmhook/")
        );
    }

    #[test]
    fn standard_requests_sign_id_timestamp_and_body() {
        let key = standard::StandardKey::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let job = job();
        let req = sign(
            &app(),
            &endpoint(Scheme::Standard {
                keys: vec![key.clone()],
            }),
            &job,
            1614265330,
        );
        let body: serde_json::Value = serde_json::from_slice(&req.body).unwrap();
        assert_eq!(body["type"], "channel_occupied");
        assert_eq!(body["timestamp"], "2025-11-27T00:00:00.000Z");
        assert_eq!(body["data"]["channel"], "private-orders");
        assert_eq!(req.headers["webhook-id"], job.id.as_str());
        assert_eq!(req.headers["webhook-timestamp"], "1614265330");
        assert_eq!(
            req.headers["webhook-signature"],
            key.sign(&job.id, 1614265330, &req.body).as_str()
        );
    }

    #[test]
    fn the_body_does_not_change_between_attempts() {
        let (a, e, j) = (app(), endpoint(Scheme::Pusher), job());
        assert_eq!(sign(&a, &e, &j, 1).body, sign(&a, &e, &j, 999).body);
    }

    #[test]
    fn plugin_headers_never_replace_the_operators_or_the_signers() {
        let mut job = job();
        job.headers = vec![
            ("x-env".into(), "plugin".into()),
            ("x-pusher-key".into(), "forged".into()),
            ("x-pusher-extra".into(), "forged".into()),
            ("webhook-anything".into(), "forged".into()),
            ("connection".into(), "close".into()),
            ("x-tag".into(), "kept".into()),
        ];
        let req = sign(&app(), &endpoint(Scheme::Pusher), &job, 1);
        assert_eq!(req.headers["x-env"], "prod");
        assert_eq!(req.headers["x-pusher-key"], "app-key");
        assert!(!req.headers.contains_key("x-pusher-extra"));
        assert!(!req.headers.contains_key("webhook-anything"));
        assert!(!req.headers.contains_key("connection"));
        assert_eq!(req.headers["x-tag"], "kept");
    }

    #[test]
    fn signature_headers_are_reserved_in_any_case() {
        assert!(is_reserved("X-Pusher-Signature"));
        assert!(is_reserved("Webhook-Id"));
        assert!(!is_reserved("X-Env"));
        // Whole prefixes, not only the names signing uses today.
        assert!(is_reserved("x-pusher-anything"));
        assert!(is_reserved("WEBHOOK-Future"));
        assert!(is_reserved("Connection"));
        assert!(is_reserved("proxy-authorization"));
        assert!(!is_reserved("x-pusher"));
        assert!(!is_reserved("webhooks-x"));
    }
}
