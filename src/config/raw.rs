//! The config file as written: serde types that mirror the TOML, nothing more.
//! `settings` turns them into the validated objects the runtime uses.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

/// A duration written as text: "0s", "250ms", "5m", "2h"; at most
/// [`MAX_DURATION`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl std::ops::Deref for HumanDuration {
    type Target = Duration;
    fn deref(&self) -> &Duration {
        &self.0
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        duration::deserialize(d).map(HumanDuration)
    }
}

/// The longest duration a key takes: past any real use, and far from where
/// arithmetic on it (a delay with jitter, a doubled cool-down, a time from
/// now in milliseconds) would overflow.
pub const MAX_DURATION: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// `#[serde(with = "duration")]`: a duration, or an optional one, written as
/// text, of at most [`MAX_DURATION`].
mod duration {
    use std::time::Duration;

    use serde::de::{Error, Unexpected};
    use serde::{Deserialize, Deserializer};

    pub trait Bounded {
        fn length(&self) -> Option<Duration>;
    }

    impl Bounded for Duration {
        fn length(&self) -> Option<Duration> {
            Some(*self)
        }
    }

    impl Bounded for Option<Duration> {
        fn length(&self) -> Option<Duration> {
            *self
        }
    }

    pub fn deserialize<'de, T, D>(d: D) -> Result<T, D::Error>
    where
        humantime_serde::Serde<T>: Deserialize<'de>,
        T: Bounded,
        D: Deserializer<'de>,
    {
        let value: T = humantime_serde::deserialize(d)?;
        if value.length().is_some_and(|l| l > super::MAX_DURATION) {
            return Err(D::Error::invalid_value(
                Unexpected::Other("a longer duration"),
                &"a duration of at most 100 years (\"36500d\")",
            ));
        }
        Ok(value)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub redis: RawRedis,
    pub server: RawServer,
    pub queues: RawQueues,
    pub retry: RawRetry,
    pub delivery: RawDelivery,
    pub log: RawLog,
    pub wasm: RawWasm,
    pub metrics: RawMetrics,
    /// Plugins by name.
    #[serde(default)]
    pub plugins: BTreeMap<String, RawPlugin>,
    #[serde(default)]
    pub apps: Vec<RawApp>,
}

/// Prometheus metrics at `/metrics`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMetrics {
    /// Serve `/metrics` on the ingest listener.
    pub enabled: bool,
    /// An address of its own for `/metrics`; "" = none.
    pub listen: String,
    /// "" = no token.
    pub token: String,
    /// "app/endpoint" pairs with per-endpoint series.
    #[serde(default)]
    pub endpoints: Vec<String>,
}

/// The plugin engine, and the limits every plugin gets unless it sets its own.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWasm {
    /// "auto": the user's cache directory; "": no cache; else a path.
    pub cache_dir: String,
    pub max_instances: u32,
    /// Instances (calls in flight and warm) one app may hold at once.
    pub app_max_instances: u32,
    pub warm_instances: u32,
    /// What one component may hold: core instances, linear memories, tables.
    pub plugin_max_core_instances: u32,
    pub plugin_max_memories: u32,
    pub plugin_max_tables: u32,
    #[serde(with = "duration")]
    pub deadline: Duration,
    /// Instruction budget per call; 0 turns fuel metering off.
    pub fuel: u64,
    pub max_memory: usize,
    pub max_output: usize,
    pub max_reuse: u32,
    pub on_failure: crate::plugin::FailurePolicy,
    /// How often plugin files are checked for replacement.
    #[serde(with = "duration")]
    pub watch_interval: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPlugin {
    /// The component file; relative paths are relative to the config file.
    pub path: String,
    #[serde(default, with = "duration")]
    pub deadline: Option<Duration>,
    pub fuel: Option<u64>,
    pub max_memory: Option<usize>,
    pub max_output: Option<usize>,
    pub max_reuse: Option<u32>,
    pub on_failure: Option<crate::plugin::FailurePolicy>,
}

/// A plugin in a chain.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPluginRef {
    pub plugin: String,
    #[serde(default)]
    pub config: BTreeMap<String, toml::Value>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRedis {
    pub url: Option<String>,
    /// A Redis Cluster: `url` and `urls` are seed nodes.
    pub cluster: bool,
    /// More seed nodes of the cluster.
    pub urls: Vec<String>,
    /// Replicas that must have accepted events before the ingest answers
    /// 202 (WAIT); 0 = the primary.
    pub wait_replicas: u32,
    #[serde(with = "duration")]
    pub wait_timeout: Duration,
    /// Hash slots (shards) the queue is spread over.
    pub shards: u32,
    pub prefix: String,
    /// ACL user; "" = the URL's, or none.
    pub username: String,
    /// "" = the URL's, or none. Best set from the environment
    /// (`WASMHOOK_REDIS__PASSWORD`) or `password_file`.
    pub password: String,
    /// A file holding the password (one line); "" = none.
    pub password_file: String,
    /// PEM file of the CA that signed the server's certificate (rediss://);
    /// "" = the system's trust store.
    pub ca_file: String,
    /// rediss:// without checking the server's certificate: tests only.
    pub tls_insecure: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    pub listen: String,
    pub max_body_bytes: usize,
    pub max_batch: usize,
    #[serde(with = "duration")]
    pub idempotency_ttl: Duration,
    pub echo: bool,
    #[serde(with = "duration")]
    pub pusher_max_age: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawQueues {
    pub concurrency: usize,
    pub quantum: usize,
    pub app_max_in_flight: usize,
    #[serde(with = "duration")]
    pub visibility_timeout: Duration,
    #[serde(with = "duration")]
    pub reclaim_interval: Duration,
    #[serde(with = "duration")]
    pub idle_poll: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRetry {
    pub schedule: Vec<HumanDuration>,
    pub jitter: f64,
    #[serde(with = "duration")]
    pub max_retry_after: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDelivery {
    #[serde(with = "duration")]
    pub timeout: Duration,
    pub max_response_bytes: usize,
    pub max_in_flight: usize,
    /// Networks (CIDR) deliveries may reach although the guard blocks them.
    pub allow_networks: Vec<String>,
    /// Outbound HTTP(S) proxy URL; "" = connect directly.
    pub proxy: String,
    /// Hosts, domains and networks reached directly, not through `proxy`.
    pub no_proxy: Vec<String>,
    pub breaker: RawBreaker,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBreaker {
    pub failure_rate: f64,
    pub min_requests: u32,
    #[serde(with = "duration")]
    pub window: Duration,
    pub consecutive_failures: u32,
    #[serde(with = "duration")]
    pub cool_down: Duration,
    #[serde(with = "duration")]
    pub max_cool_down: Duration,
    #[serde(with = "duration")]
    pub disable_after: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    Pretty,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLog {
    pub format: LogFormat,
    pub level: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawApp {
    pub id: String,
    pub key: String,
    /// Signs `pusher` endpoints.
    pub secret: Option<String>,
    /// Several during rotation: the first signs `pusher` endpoints.
    #[serde(default)]
    pub secrets: Vec<String>,
    pub ingest_token: String,
    /// Share of a worker's turns relative to other apps (default 1).
    pub weight: Option<u32>,
    /// This app's jobs in flight on one worker.
    pub max_in_flight: Option<usize>,
    #[serde(default)]
    pub webhooks: Vec<RawWebhook>,
    /// The app's chain: once per event, before fan-out.
    #[serde(default)]
    pub plugins: Vec<RawPluginRef>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum SchemeName {
    #[default]
    Pusher,
    Standard,
    Raw,
}

/// One endpoint. The soketi `webhooks` entry is a subset of this, so soketi
/// users can bring theirs over as they are.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWebhook {
    /// Stable id of the endpoint (used by retries and dead letters); derived
    /// from scheme and url when absent.
    pub id: Option<String>,
    pub url: Option<String>,
    #[serde(default)]
    pub scheme: SchemeName,
    #[serde(default)]
    pub event_types: Vec<String>,
    pub filter: Option<RawFilter>,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// `standard` endpoints: whsec_ secrets, each signs.
    #[serde(default)]
    pub secrets: Vec<String>,
    #[serde(default, with = "duration")]
    pub timeout: Option<Duration>,
    pub retry: Option<RawRetryOverride>,
    /// Jobs for this endpoint in flight on one worker.
    pub max_in_flight: Option<usize>,
    /// "50/s", "600/m", "10000/h": held by every worker together.
    pub rate_limit: Option<String>,
    /// Requests that may go at once after a quiet spell (default: a tenth of
    /// a second's worth, at least 1).
    pub rate_limit_burst: Option<u32>,
    /// Deliver its events one at a time, in the order the app sent them.
    #[serde(default)]
    pub ordered: bool,
    /// With `ordered`: one order per key instead of one for the endpoint:
    /// `"channel"`, `"event.<field>"` or `"metadata.<name>"`.
    pub order_by: Option<String>,
    /// Deliver its events in batches: `{ max_events = 100, max_wait = "1s" }`.
    pub batch: Option<RawBatch>,
    /// Largest batch, counted on the events as stored (only with `batch`).
    pub max_batch_bytes: Option<usize>,
    /// The endpoint's chain: on every attempt, after routing.
    #[serde(default)]
    pub plugins: Vec<RawPluginRef>,
    /// soketi's AWS Lambda target: recognised so it can be refused clearly.
    pub lambda_function: Option<toml::Value>,
    /// soketi's AWS Lambda options: recognised so they can be refused clearly.
    pub lambda: Option<toml::Value>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBatch {
    pub max_events: usize,
    #[serde(default, with = "duration")]
    pub max_wait: Option<Duration>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFilter {
    pub channel_name_starts_with: Option<String>,
    pub channel_name_ends_with: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRetryOverride {
    pub schedule: Vec<HumanDuration>,
}
