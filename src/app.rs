//! Apps (tenants) and their endpoints, as the runtime uses them: built from the
//! config once, validated, then shared read-only by ingest and workers.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::delivery::retry::RetryPolicy;
use crate::pipeline::route::ChannelFilter;
use crate::ratelimit::RateLimit;
use crate::signing::standard::StandardKey;

/// A secret value: compared and used, never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Compares the SHA-256 digests of both in constant time, so timing tells
    /// neither how much matched nor how long the secret is.
    pub fn matches(&self, candidate: &str) -> bool {
        use sha2::{Digest, Sha256};
        use subtle::ConstantTimeEq;
        let (a, b) = (
            Sha256::digest(self.0.as_bytes()),
            Sha256::digest(candidate.as_bytes()),
        );
        a.as_slice().ct_eq(b.as_slice()).into()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// How requests to an endpoint are shaped and signed.
#[derive(Debug, Clone)]
pub enum Scheme {
    /// Pusher / soketi: `{"time_ms", "events": [..]}`, `X-Pusher-Key`,
    /// `X-Pusher-Signature` (hex HMAC-SHA256 with the app secret).
    Pusher,
    /// Standard Webhooks: `{"type", "timestamp", "data"}`, `webhook-id`,
    /// `webhook-timestamp`, `webhook-signature` (one `v1,` entry per key).
    Standard { keys: Vec<StandardKey> },
    /// The event object as the chain left it, with no envelope (e.g. a Slack
    /// message built by a plugin); signed the Standard Webhooks way when it
    /// has keys.
    Raw { keys: Vec<StandardKey> },
}

impl Scheme {
    pub fn name(&self) -> &'static str {
        match self {
            Scheme::Pusher => "pusher",
            Scheme::Standard { .. } => "standard",
            Scheme::Raw { .. } => "raw",
        }
    }
}

#[derive(Debug)]
pub struct Endpoint {
    /// Stable across restarts: retries and dead letters refer to it.
    pub id: String,
    pub url: reqwest::Url,
    pub scheme: Scheme,
    /// Empty: every event type.
    pub event_types: Vec<String>,
    pub filter: ChannelFilter,
    /// Extra headers; validated never to name a header the signer sets.
    pub headers: Vec<(reqwest::header::HeaderName, reqwest::header::HeaderValue)>,
    pub timeout: Duration,
    pub retry: RetryPolicy,
    /// Jobs for it in flight on one worker.
    pub max_in_flight: usize,
    /// Held by every worker together.
    pub rate_limit: Option<RateLimit>,
    /// One event in flight fleet-wide, in the order the app sent them; a
    /// failing event holds back the later ones until it is delivered or
    /// dead-lettered.
    pub ordered: bool,
    /// With `ordered`: one order per key (one job of a key in flight at a
    /// time); keys do not wait for each other.
    pub order_by: Option<OrderBy>,
    /// Its events are delivered in batches.
    pub batch: Option<Batching>,
    /// The endpoint's chain: runs on every attempt, after routing.
    pub plugins: Vec<PluginRef>,
}

/// Where an ordered endpoint finds an event's ordering key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OrderBy {
    /// The event's channel.
    Channel,
    /// A top-level field of the event (a string, number or boolean).
    Field(String),
    /// A metadata pair a plugin of the app chain set.
    Metadata(String),
}

impl OrderBy {
    /// Longest key kept as it is; longer ones are replaced by their SHA-256.
    pub const MAX_KEY: usize = 200;

    pub fn parse(text: &str) -> Option<OrderBy> {
        match text.split_once('.') {
            None if text == "channel" => Some(OrderBy::Channel),
            Some(("event", f)) if !f.is_empty() => Some(OrderBy::Field(f.to_string())),
            Some(("metadata", m)) if !m.is_empty() => Some(OrderBy::Metadata(m.to_string())),
            _ => None,
        }
    }

    /// The job's key: events without one share the empty key.
    pub fn key_of(&self, job: &crate::event::Job) -> String {
        use serde_json::Value;
        let key = match self {
            OrderBy::Channel => job.event.channel.clone().unwrap_or_default(),
            OrderBy::Field(f) => match job.event.fields.get(f) {
                Some(Value::String(s)) => s.clone(),
                Some(v @ (Value::Number(_) | Value::Bool(_))) => v.to_string(),
                _ => String::new(),
            },
            OrderBy::Metadata(m) => job
                .metadata
                .iter()
                .rev()
                .find(|(k, _)| k == m)
                .map(|(_, v)| v.clone())
                .unwrap_or_default(),
        };
        if key.len() <= Self::MAX_KEY {
            return key;
        }
        use sha2::Digest;
        format!(
            "sha256:{}",
            hex::encode(sha2::Sha256::digest(key.as_bytes()))
        )
    }
}

/// How an endpoint's events are batched: the events of one app for one
/// endpoint go in one request once `max_events` wait, or `max_wait` after a
/// worker first saw them waiting; never more than `max_bytes` of events (as
/// stored) in one batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Batching {
    pub max_events: usize,
    pub max_wait: Duration,
    pub max_bytes: usize,
}

impl Batching {
    pub const DEFAULT_MAX_WAIT: Duration = Duration::from_secs(1);
    pub const DEFAULT_MAX_BYTES: usize = 1 << 20;
    /// Most events in one batch.
    pub const MAX_EVENTS: usize = 1000;
    /// Longest a batch may wait to fill.
    pub const MAX_WAIT: Duration = Duration::from_secs(3600);
    /// Smallest and largest `max_batch_bytes`.
    pub const BYTES_RANGE: (usize, usize) = (1024, 64 << 20);
}

/// A plugin in a chain, with this app's configuration for it.
#[derive(Debug, Clone, PartialEq)]
pub struct PluginRef {
    /// A name defined under `[plugins]`.
    pub plugin: String,
    pub config: Vec<(String, String)>,
}

impl Endpoint {
    /// Whether this endpoint subscribes to an event of this type and channel
    /// (soketi's `event_types` and `filter`).
    pub fn accepts(&self, event_type: &str, channel: Option<&str>) -> bool {
        (self.event_types.is_empty() || self.event_types.iter().any(|t| t == event_type))
            && self.filter.matches(channel)
    }
}

#[derive(Debug)]
pub struct App {
    pub id: String,
    pub key: String,
    /// The first signs `pusher` endpoints; more than one during rotation.
    pub secrets: Vec<Secret>,
    pub ingest_token: Secret,
    /// Its share of turns relative to other apps.
    pub weight: u32,
    /// Its jobs in flight on one worker.
    pub max_in_flight: usize,
    pub endpoints: Vec<Arc<Endpoint>>,
    /// The app's chain: runs once per event, before fan-out.
    pub plugins: Vec<PluginRef>,
}

impl App {
    pub fn endpoint(&self, id: &str) -> Option<&Arc<Endpoint>> {
        self.endpoints.iter().find(|e| e.id == id)
    }

    /// The secret that signs `pusher` requests.
    pub fn signing_secret(&self) -> &Secret {
        &self.secrets[0]
    }
}

/// Every app, by id and by key (both unique: the config checks).
#[derive(Debug, Default, Clone)]
pub struct Apps {
    by_id: HashMap<String, Arc<App>>,
    by_key: HashMap<String, Arc<App>>,
}

impl Apps {
    pub fn new(apps: impl IntoIterator<Item = App>) -> Self {
        let by_id: HashMap<String, Arc<App>> = apps
            .into_iter()
            .map(|a| (a.id.clone(), Arc::new(a)))
            .collect();
        let by_key = by_id.values().map(|a| (a.key.clone(), a.clone())).collect();
        Apps { by_id, by_key }
    }

    pub fn get(&self, id: &str) -> Option<&Arc<App>> {
        self.by_id.get(id)
    }

    /// The app with this Pusher key.
    pub fn by_key(&self, key: &str) -> Option<&Arc<App>> {
        self.by_key.get(key)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<App>> {
        self.by_id.values()
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::Secret;

    #[test]
    fn a_secret_matches_only_itself() {
        let s = Secret::new("token-1");
        assert!(s.matches("token-1"));
        for other in ["", "token-", "token-2", "token-10", "TOKEN-1"] {
            assert!(!s.matches(other), "{other}");
        }
        assert_eq!(format!("{s:?}"), "Secret(***)");
    }

    #[test]
    fn an_ordering_key_comes_from_the_channel_a_field_or_metadata() {
        use super::OrderBy;
        use crate::event::{Event, Job};
        let event = Event::from_json(serde_json::json!({
            "name": "x", "channel": "room-1", "user": "u-7", "n": 12, "o": {"a": 1},
            "long": "k".repeat(300),
        }))
        .unwrap();
        let mut job = Job::new("a", event, 0);
        job.metadata = vec![
            ("tenant".into(), "t-1".into()),
            ("tenant".into(), "t-2".into()),
        ];
        let key = |o: OrderBy| o.key_of(&job);
        assert_eq!(key(OrderBy::Channel), "room-1");
        assert_eq!(key(OrderBy::Field("user".into())), "u-7");
        assert_eq!(key(OrderBy::Field("n".into())), "12");
        assert_eq!(key(OrderBy::Field("o".into())), "", "objects are no key");
        assert_eq!(key(OrderBy::Field("missing".into())), "");
        assert_eq!(
            key(OrderBy::Metadata("tenant".into())),
            "t-2",
            "the last value set"
        );
        let long = key(OrderBy::Field("long".into()));
        assert!(
            long.starts_with("sha256:") && long.len() == 7 + 64,
            "{long}"
        );
        job.event.channel = None;
        assert_eq!(OrderBy::Channel.key_of(&job), "");
    }
}
