//! Validated settings: what the runtime is built from. Every problem in a raw
//! config is reported with its key path, all at once.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use reqwest::header::{HeaderName, HeaderValue};
use sha2::{Digest, Sha256};

use super::Problem;
use super::raw::{LogFormat, RawApp, RawConfig, RawWebhook, SchemeName};
use super::raw::{RawPluginRef, RawWasm};
use crate::app::{App, Apps, Batching, Endpoint, OrderBy, PluginRef, Scheme, Secret};
use crate::breaker::BreakerSettings;
use crate::delivery::retry::RetryPolicy;
use crate::delivery::{Egress, ProxySettings};
use crate::event::valid_name;
use crate::metrics::scrape::{MAX_ENDPOINTS, MetricsSettings};
use crate::netguard::NetGuard;
use crate::pipeline::route::ChannelFilter;
use crate::plugin::{ComponentCaps, EngineSettings, Limits, PluginSpec};
use crate::queue::{EndpointTenancy, Keys, QueueOptions, Tenancy};
use crate::ratelimit::RateLimit;

/// Redis credentials from the config, the environment or a file.
#[derive(Debug, Clone, Default)]
pub struct RedisAuth {
    pub username: Option<String>,
    pub password: Option<Secret>,
    /// PEM of the CA for rediss:// (None: the system's trust store).
    pub ca: Option<Vec<u8>>,
    /// rediss:// without certificate checks (tests only).
    pub tls_insecure: bool,
}

fn redis_auth(
    c: &mut Check,
    raw: &super::raw::RawRedis,
    base_dir: Option<&std::path::Path>,
) -> RedisAuth {
    let username = (!raw.username.is_empty()).then(|| raw.username.clone());
    let mut password = (!raw.password.is_empty()).then(|| Secret::new(raw.password.as_str()));
    if !raw.password_file.is_empty() {
        if password.is_some() {
            c.fail(
                "redis.password_file",
                "set either redis.password or redis.password_file, not both",
            );
        }
        let file = std::path::Path::new(&raw.password_file);
        let file = match base_dir {
            Some(dir) if file.is_relative() => dir.join(file),
            _ => file.to_path_buf(),
        };
        match std::fs::read_to_string(&file) {
            Ok(text) => {
                let line = text.trim_end_matches(['\r', '\n']);
                if line.is_empty() || line.contains(['\r', '\n']) {
                    c.fail("redis.password_file", "must hold the password on one line");
                } else {
                    password = Some(Secret::new(line));
                }
            }
            Err(e) => c.fail(
                "redis.password_file",
                format!("cannot read {}: {}", file.display(), e.kind()),
            ),
        }
    }
    let mut ca = None;
    if !raw.ca_file.is_empty() {
        let file = std::path::Path::new(&raw.ca_file);
        let file = match base_dir {
            Some(dir) if file.is_relative() => dir.join(file),
            _ => file.to_path_buf(),
        };
        match std::fs::read(&file) {
            Ok(pem) if pem.starts_with(b"-----BEGIN") => ca = Some(pem),
            Ok(_) => c.fail("redis.ca_file", "must be a PEM certificate"),
            Err(e) => c.fail(
                "redis.ca_file",
                format!("cannot read {}: {}", file.display(), e.kind()),
            ),
        }
    }
    let tls = raw
        .url
        .as_deref()
        .is_some_and(|u| u.starts_with("rediss://"));
    if (ca.is_some() || raw.tls_insecure) && !tls {
        c.fail(
            "redis.url",
            "redis.ca_file and redis.tls_insecure need a rediss:// URL",
        );
    }
    if (username.is_some() || password.is_some()) && raw.url.is_none() {
        c.fail(
            "redis.url",
            "required with redis.username / redis.password: the embedded queue has no login",
        );
    }
    RedisAuth {
        username,
        password,
        ca,
        tls_insecure: raw.tls_insecure,
    }
}

/// Most shards a queue may be spread over (each costs a take call per idle
/// poll and a pipeline per metrics scrape).
const MAX_SHARDS: u32 = 1024;
/// Longest `redis.wait_timeout`: the ingest waits 5 s for the queue in all.
const MAX_WAIT: Duration = Duration::from_secs(3);

/// Cluster seeds and durability. URLs are checked without being quoted (they
/// may hold a password).
fn redis_topology(c: &mut Check, raw: &super::raw::RawRedis) {
    for (i, url) in raw.urls.iter().enumerate() {
        if redis::Client::open(url.as_str()).is_err() {
            c.fail(
                format!("redis.urls.{i}"),
                "not a Redis URL: expected redis://host:port or rediss://host:port",
            );
        }
    }
    let all: Vec<&str> = raw
        .url
        .iter()
        .chain(&raw.urls)
        .map(String::as_str)
        .collect();
    if raw.cluster && raw.url.is_none() {
        c.fail(
            "redis.cluster",
            "needs redis.url (a seed node of the cluster)",
        );
    }
    if !raw.cluster && !raw.urls.is_empty() {
        c.fail(
            "redis.urls",
            "more seed nodes are for a cluster: set redis.cluster = true",
        );
    }
    if raw.cluster {
        if all
            .iter()
            .any(|u| u.starts_with("unix:") || u.starts_with("redis+unix:"))
        {
            c.fail(
                "redis.url",
                "a cluster is reached over TCP: use redis:// or rediss://",
            );
        }
        let tls = all.iter().filter(|u| u.starts_with("rediss://")).count();
        if tls != 0 && tls != all.len() {
            c.fail(
                "redis.urls",
                "use rediss:// for every seed node or for none",
            );
        }
        let db = |u: &&str| {
            use redis::IntoConnectionInfo;
            u.into_connection_info()
                .is_ok_and(|i| i.redis_settings().db() != 0)
        };
        if all.iter().any(db) {
            c.fail(
                "redis.url",
                "a cluster has database 0 only: drop the /db part",
            );
        }
    }
    if raw.shards == 0 || raw.shards > MAX_SHARDS {
        c.fail("redis.shards", format!("must be 1 to {MAX_SHARDS}"));
    }
    if raw.wait_replicas > 0 {
        if raw.url.is_none() {
            c.fail(
                "redis.wait_replicas",
                "needs redis.url: the embedded queue has no replicas",
            );
        }
        if raw.wait_replicas > 100 {
            c.fail("redis.wait_replicas", "must be at most 100");
        }
        if raw.wait_timeout.is_zero() || raw.wait_timeout > MAX_WAIT {
            c.fail(
                "redis.wait_timeout",
                format!(
                    "must be more than 0 and at most {}",
                    humantime::format_duration(MAX_WAIT)
                ),
            );
        }
    }
}

/// Largest count of jobs, slots or turns a config may set: far above what
/// one process can use, and small enough that sizes derived from it (channel
/// capacities, sums) cannot overflow.
const MAX_COUNT: usize = 1_000_000;
/// Largest `wasm.max_instances` and `wasm.warm_instances`.
const MAX_INSTANCES: u32 = 10_000;
/// Largest per-plugin cap on core instances, memories or tables.
const MAX_PER_PLUGIN: u32 = 1_000;
use crate::signing::{self, standard::StandardKey};

#[derive(Debug, Clone)]
pub struct Settings {
    /// None: the embedded in-memory queue.
    pub redis_url: Option<String>,
    /// A Redis Cluster, `redis_url` and these its seed nodes.
    pub redis_cluster: bool,
    pub redis_urls: Vec<String>,
    /// Replicas an accepted event must reach before 202, and how long to
    /// wait for them.
    pub redis_wait_replicas: u32,
    pub redis_wait_timeout: Duration,
    pub redis_shards: u32,
    /// Credentials that win over the URL's, and the TLS trust.
    pub redis_auth: RedisAuth,
    pub keys: Keys,
    pub server: ServerSettings,
    pub queues: QueueSettings,
    pub retry: RetryPolicy,
    pub delivery: DeliverySettings,
    pub log: LogSettings,
    pub wasm: EngineSettings,
    pub metrics: MetricsSettings,
    /// How often plugin files are checked for replacement.
    pub watch_interval: Duration,
    pub plugins: Vec<PluginSpec>,
    pub apps: Apps,
    /// Not errors, but likely mistakes (`config check` prints them, `serve`
    /// logs them): endpoints the network guard will refuse.
    pub warnings: Vec<Problem>,
}

#[derive(Debug, Clone)]
pub struct ServerSettings {
    pub listen: SocketAddr,
    pub max_body_bytes: usize,
    pub max_batch: usize,
    pub idempotency_ttl: Duration,
    pub echo: bool,
    /// Pusher webhooks whose `time_ms` is further from now are refused.
    pub pusher_max_age: Duration,
}

#[derive(Debug, Clone)]
pub struct QueueSettings {
    /// Jobs in flight on one worker process, all apps together.
    pub concurrency: usize,
    /// Jobs an app gets per turn, times its weight.
    pub quantum: usize,
    /// One app's jobs in flight on one worker, unless the app sets its own.
    pub app_max_in_flight: usize,
    pub visibility_timeout: Duration,
    pub reclaim_interval: Duration,
    pub idle_poll: Duration,
}

impl Settings {
    /// The apps' and endpoints' scheduling parameters, as the queue keeps them.
    pub fn tenancy(&self) -> Tenancy {
        tenancy(&self.queues, &self.delivery, &self.apps)
    }

    /// Where and how to reach Redis: the URL with the configured username and
    /// password applied. Ok(None) for the embedded queue; an error (which
    /// never holds the URL) when the URL does not parse.
    pub fn redis_connection(&self) -> Result<Option<redis::ConnectionInfo>, redis::RedisError> {
        self.redis_url
            .as_deref()
            .map(|url| self.node_connection(url, "redis.url"))
            .transpose()
    }

    fn node_connection(
        &self,
        url: &str,
        key: &'static str,
    ) -> Result<redis::ConnectionInfo, redis::RedisError> {
        use redis::IntoConnectionInfo;
        let info = if self.redis_auth.tls_insecure && !url.contains('#') {
            format!("{url}#insecure").into_connection_info()
        } else {
            url.into_connection_info()
        }
        .map_err(|e| redis::RedisError::from((e.kind(), key, "not a Redis URL".to_string())))?;
        let mut redis = info.redis_settings().clone();
        if let Some(user) = &self.redis_auth.username {
            redis = redis.set_username(user);
        }
        if let Some(password) = &self.redis_auth.password {
            redis = redis.set_password(password.expose());
        }
        Ok(info.set_redis_settings(redis))
    }

    /// The Redis the queue lives in: the server, or the cluster's seed
    /// nodes, with credentials, TLS trust and durability. Ok(None) for the
    /// embedded queue.
    pub fn redis_target(&self) -> Result<Option<crate::queue::RedisTarget>, redis::RedisError> {
        let Some(first) = self.redis_connection()? else {
            return Ok(None);
        };
        let mut nodes = vec![first];
        for url in &self.redis_urls {
            nodes.push(self.node_connection(url, "redis.urls")?);
        }
        Ok(Some(crate::queue::RedisTarget {
            nodes,
            cluster: self.redis_cluster,
            ca: self.redis_auth.ca.clone(),
            wait_replicas: self.redis_wait_replicas,
            wait_timeout: self.redis_wait_timeout,
            shards: self.redis_shards,
        }))
    }

    /// What the queue needs to know for its whole life.
    pub fn queue_options(&self) -> QueueOptions {
        QueueOptions {
            lease: self.queues.visibility_timeout,
            breaker: self.delivery.breaker.clone(),
            max_hold: self.retry.max_retry_after(),
        }
    }
}

pub fn tenancy(queues: &QueueSettings, delivery: &DeliverySettings, apps: &Apps) -> Tenancy {
    let mut t = Tenancy {
        quantum: queues.quantum,
        app_weight: 1,
        app_max_in_flight: queues.app_max_in_flight,
        endpoint_max_in_flight: delivery.max_in_flight,
        apps: Vec::new(),
        endpoints: Vec::new(),
    };
    for app in apps.iter() {
        if app.weight != 1 || app.max_in_flight != queues.app_max_in_flight {
            t.apps.push((app.id.clone(), app.weight, app.max_in_flight));
        }
        for e in &app.endpoints {
            if e.max_in_flight != delivery.max_in_flight
                || e.rate_limit.is_some()
                || e.ordered
                || e.batch.is_some()
            {
                t.endpoints.push(EndpointTenancy {
                    app: app.id.clone(),
                    endpoint: e.id.clone(),
                    max_in_flight: e.max_in_flight,
                    rate_limit: e.rate_limit,
                    ordered: e.ordered,
                    keyed: e.order_by.is_some(),
                    batch: e.batch,
                });
            }
        }
    }
    t.apps.sort_by(|a, b| a.0.cmp(&b.0));
    t.endpoints
        .sort_by(|a, b| (&a.app, &a.endpoint).cmp(&(&b.app, &b.endpoint)));
    t
}

#[derive(Debug, Clone)]
pub struct DeliverySettings {
    pub timeout: Duration,
    pub max_response_bytes: usize,
    /// Jobs for one endpoint in flight on one worker, unless it sets its own.
    pub max_in_flight: usize,
    pub breaker: BreakerSettings,
    /// The network guard and the outbound proxy.
    pub egress: Egress,
}

#[derive(Debug, Clone)]
pub struct LogSettings {
    pub format: LogFormat,
    pub level: String,
}

struct Check(Vec<Problem>);

impl Check {
    fn fail(&mut self, path: impl Into<String>, reason: impl Into<String>) {
        self.0.push(Problem {
            path: path.into(),
            reason: reason.into(),
        });
    }

    fn name(&mut self, path: impl Into<String>, value: &str) {
        if !valid_name(value) {
            self.fail(path, "must be 1 to 200 characters of A-Z a-z 0-9 _ - . :");
        }
    }
}

pub(super) fn build(
    raw: RawConfig,
    base_dir: Option<&std::path::Path>,
) -> Result<Settings, Vec<Problem>> {
    let mut c = Check(Vec::new());
    let (wasm, plugins) = build_plugins(&mut c, &raw.wasm, &raw.plugins, base_dir);

    if let Some(url) = &raw.redis.url
        && redis::Client::open(url.as_str()).is_err()
    {
        // The URL may hold a password, and the parser's detail may quote it.
        c.fail(
            "redis.url",
            "not a Redis URL: expected redis://[user:password@]host[:port][/db], rediss://... or unix:///path",
        );
    }
    let redis_auth = redis_auth(&mut c, &raw.redis, base_dir);
    redis_topology(&mut c, &raw.redis);
    if raw.redis.prefix.is_empty() || raw.redis.prefix.contains(['{', '}']) {
        c.fail(
            "redis.prefix",
            "must be non-empty and contain no `{` or `}`",
        );
    }

    if raw.server.pusher_max_age.is_zero() {
        c.fail("server.pusher_max_age", "must be more than 0");
    }
    let listen = raw.server.listen.parse::<SocketAddr>().unwrap_or_else(|_| {
        c.fail(
            "server.listen",
            "must be an address and port, e.g. 127.0.0.1:8080",
        );
        SocketAddr::from(([127, 0, 0, 1], 0))
    });
    if raw.server.max_body_bytes == 0 {
        c.fail("server.max_body_bytes", "must be at least 1");
    }
    if raw.server.max_batch == 0 {
        c.fail("server.max_batch", "must be at least 1");
    }

    for (key, n) in [
        ("queues.concurrency", raw.queues.concurrency),
        ("queues.quantum", raw.queues.quantum),
        ("queues.app_max_in_flight", raw.queues.app_max_in_flight),
        ("delivery.max_in_flight", raw.delivery.max_in_flight),
    ] {
        if n == 0 {
            c.fail(key, "must be at least 1");
        } else if n > MAX_COUNT {
            c.fail(key, format!("must be at most {MAX_COUNT}"));
        }
    }
    for (key, d) in [
        ("queues.reclaim_interval", raw.queues.reclaim_interval),
        ("queues.idle_poll", raw.queues.idle_poll),
    ] {
        if d.is_zero() {
            c.fail(key, "must be longer than zero");
        }
    }
    let b = &raw.delivery.breaker;
    if !(0.0..=1.0).contains(&b.failure_rate) {
        c.fail(
            "delivery.breaker.failure_rate",
            "must be between 0 (off) and 1",
        );
    }
    if b.window < Duration::from_millis(10) {
        c.fail("delivery.breaker.window", "must be at least 10ms");
    }
    if b.cool_down.is_zero() {
        c.fail("delivery.breaker.cool_down", "must be longer than zero");
    }
    if b.max_cool_down < b.cool_down {
        c.fail(
            "delivery.breaker.max_cool_down",
            "must be at least delivery.breaker.cool_down",
        );
    }
    let breaker = BreakerSettings {
        failure_rate: b.failure_rate,
        min_requests: b.min_requests,
        window: b.window,
        consecutive_failures: b.consecutive_failures,
        cool_down: b.cool_down,
        max_cool_down: b.max_cool_down,
        disable_after: b.disable_after,
    };

    if raw.retry.schedule.is_empty() {
        c.fail(
            "retry.schedule",
            "needs at least one entry (the first attempt, normally \"0s\")",
        );
    }
    if !(0.0..1.0).contains(&raw.retry.jitter) {
        c.fail("retry.jitter", "must be at least 0 and below 1");
    }
    let schedule: Vec<Duration> = raw.retry.schedule.iter().map(|d| **d).collect();
    let retry = RetryPolicy::new(
        if schedule.is_empty() {
            vec![Duration::ZERO]
        } else {
            schedule
        },
        raw.retry.jitter,
        raw.retry.max_retry_after,
    );

    if raw.delivery.timeout.is_zero() {
        c.fail("delivery.timeout", "must be longer than zero");
    }
    let egress = build_egress(&mut c, &raw.delivery);
    if tracing_subscriber::EnvFilter::try_new(&raw.log.level).is_err() {
        c.fail(
            "log.level",
            "not a log filter (e.g. \"info\" or \"wasmhook=debug,info\")",
        );
    }

    let mut apps = Vec::new();
    let mut app_ids = HashSet::new();
    let mut app_keys = HashSet::new();
    let mut longest_timeout = raw.delivery.timeout;
    for (i, a) in raw.apps.iter().enumerate() {
        let path = format!("apps[{i}]");
        c.name(format!("{path}.id"), &a.id);
        if !app_ids.insert(a.id.clone()) {
            c.fail(
                format!("{path}.id"),
                "the same id as an earlier app: each app needs its own",
            );
        }
        if !a.key.is_empty() && !app_keys.insert(a.key.clone()) {
            c.fail(
                format!("{path}.key"),
                "the same key as an earlier app: a key names one app (X-Pusher-Key)",
            );
        }
        let app = build_app(&mut c, &path, a, &raw, &retry, &plugins);
        for e in &app.endpoints {
            longest_timeout = longest_timeout.max(e.timeout);
        }
        apps.push(app);
    }
    if raw.queues.visibility_timeout <= longest_timeout.saturating_add(Duration::from_secs(1)) {
        c.fail(
            "queues.visibility_timeout",
            format!("must be more than the longest endpoint timeout ({longest_timeout:?}) plus 1s, or a slow delivery would be handed to a second worker"),
        );
    }

    let metrics = build_metrics(&mut c, &raw.metrics, &apps);

    if !c.0.is_empty() {
        return Err(c.0);
    }
    let warnings = blocked_endpoints(&raw, &egress.guard);
    Ok(Settings {
        redis_url: raw.redis.url,
        redis_cluster: raw.redis.cluster,
        redis_urls: raw.redis.urls,
        redis_wait_replicas: raw.redis.wait_replicas,
        redis_wait_timeout: raw.redis.wait_timeout,
        redis_shards: raw.redis.shards,
        redis_auth,
        keys: Keys::new(raw.redis.prefix),
        server: ServerSettings {
            listen,
            max_body_bytes: raw.server.max_body_bytes,
            max_batch: raw.server.max_batch,
            idempotency_ttl: raw.server.idempotency_ttl,
            echo: raw.server.echo,
            pusher_max_age: raw.server.pusher_max_age,
        },
        queues: QueueSettings {
            concurrency: raw.queues.concurrency,
            quantum: raw.queues.quantum,
            app_max_in_flight: raw.queues.app_max_in_flight,
            visibility_timeout: raw.queues.visibility_timeout,
            reclaim_interval: raw.queues.reclaim_interval,
            idle_poll: raw.queues.idle_poll,
        },
        retry,
        delivery: DeliverySettings {
            timeout: raw.delivery.timeout,
            max_response_bytes: raw.delivery.max_response_bytes,
            max_in_flight: raw.delivery.max_in_flight,
            breaker,
            egress,
        },
        log: LogSettings {
            format: raw.log.format,
            level: raw.log.level,
        },
        wasm,
        metrics,
        watch_interval: raw.wasm.watch_interval,
        plugins,
        apps: Apps::new(apps),
        warnings,
    })
}

fn build_metrics(c: &mut Check, raw: &super::raw::RawMetrics, apps: &[App]) -> MetricsSettings {
    let listen = if raw.listen.is_empty() {
        None
    } else {
        raw.listen
            .parse::<SocketAddr>()
            .map(Some)
            .unwrap_or_else(|_| {
                c.fail(
                    "metrics.listen",
                    "must be an address and port, e.g. 127.0.0.1:9090, or \"\" for none",
                );
                None
            })
    };
    if raw.endpoints.len() > MAX_ENDPOINTS {
        c.fail(
            "metrics.endpoints",
            format!("at most {MAX_ENDPOINTS} endpoints: each has series of its own"),
        );
    }
    let mut endpoints = Vec::new();
    for (i, pair) in raw.endpoints.iter().enumerate() {
        let found = pair.split_once('/').filter(|(app, ep)| {
            apps.iter()
                .any(|a| a.id == *app && a.endpoints.iter().any(|e| e.id == *ep))
        });
        match found {
            Some((app, ep)) => endpoints.push((app.to_string(), ep.to_string())),
            None => c.fail(
                format!("metrics.endpoints[{i}]"),
                "must be \"<app id>/<endpoint id>\" naming an endpoint in [[apps]]",
            ),
        }
    }
    MetricsSettings {
        on_ingest: raw.enabled,
        listen,
        token: (!raw.token.is_empty()).then(|| Secret::new(raw.token.as_str())),
        endpoints,
    }
}

/// Endpoints the network guard will refuse, judged from their URLs alone
/// (IP literals, `localhost`; no lookups). Not errors, since the operator may
/// mean it, but every delivery to them will be dead-lettered.
fn blocked_endpoints(raw: &RawConfig, guard: &NetGuard) -> Vec<Problem> {
    let mut out = Vec::new();
    for (i, a) in raw.apps.iter().enumerate() {
        for (j, w) in a.webhooks.iter().enumerate() {
            let Some(Ok(url)) = w.url.as_deref().map(reqwest::Url::parse) else {
                continue;
            };
            if let Err(blocked) = guard.check_url(&url) {
                out.push(Problem {
                    path: format!("apps[{i}].webhooks[{j}].url"),
                    reason: format!(
                        "{blocked}: deliveries to it will be refused (delivery.allow_networks lets a network through)"
                    ),
                });
            }
        }
    }
    out
}

fn build_egress(c: &mut Check, raw: &super::raw::RawDelivery) -> Egress {
    let mut allow = Vec::new();
    for (i, text) in raw.allow_networks.iter().enumerate() {
        match NetGuard::parse_network(text) {
            Ok(net) => allow.push(net),
            Err(reason) => c.fail(format!("delivery.allow_networks[{i}]"), reason),
        }
    }
    let proxy = match raw.proxy.trim() {
        "" => {
            if !raw.no_proxy.is_empty() {
                c.fail("delivery.no_proxy", "only with a delivery.proxy");
            }
            None
        }
        // The URL may hold credentials: it is never repeated in a message.
        text => match reqwest::Url::parse(text) {
            Err(e) => {
                c.fail("delivery.proxy", format!("not a URL: {e}"));
                None
            }
            Ok(url) if !matches!(url.scheme(), "http" | "https") || url.host().is_none() => {
                c.fail(
                    "delivery.proxy",
                    "must be an http:// or https:// URL with a host",
                );
                None
            }
            Ok(url) => Some(ProxySettings {
                url,
                no_proxy: raw.no_proxy.clone(),
            }),
        },
    };
    for (i, entry) in raw.no_proxy.iter().enumerate() {
        if entry.trim().is_empty() || entry.contains(',') {
            c.fail(
                format!("delivery.no_proxy[{i}]"),
                "one host, domain, IP or CIDR per entry",
            );
        }
    }
    Egress {
        guard: NetGuard::new(allow),
        proxy,
    }
}

fn build_plugins(
    c: &mut Check,
    wasm: &RawWasm,
    raw: &BTreeMap<String, super::raw::RawPlugin>,
    base_dir: Option<&std::path::Path>,
) -> (EngineSettings, Vec<PluginSpec>) {
    if wasm.max_instances == 0 {
        c.fail("wasm.max_instances", "must be at least 1");
    }
    if wasm.app_max_instances == 0 {
        c.fail("wasm.app_max_instances", "must be at least 1");
    }
    for (key, value) in [
        (
            "wasm.plugin_max_core_instances",
            wasm.plugin_max_core_instances,
        ),
        ("wasm.plugin_max_memories", wasm.plugin_max_memories),
        ("wasm.plugin_max_tables", wasm.plugin_max_tables),
    ] {
        if value == 0 {
            c.fail(key, "must be at least 1");
        } else if value > MAX_PER_PLUGIN {
            c.fail(key, format!("must be at most {MAX_PER_PLUGIN}"));
        }
    }
    // The instance pool is sized from these (instances × per-plugin caps).
    for (key, value) in [
        ("wasm.max_instances", wasm.max_instances),
        ("wasm.warm_instances", wasm.warm_instances),
    ] {
        if value > MAX_INSTANCES {
            c.fail(key, format!("must be at most {MAX_INSTANCES}"));
        }
    }
    if wasm.deadline.is_zero() {
        c.fail("wasm.deadline", "must be longer than zero");
    }
    if wasm.max_reuse == 0 {
        c.fail(
            "wasm.max_reuse",
            "must be at least 1 (1: a fresh instance per call)",
        );
    }
    if wasm.watch_interval.is_zero() {
        c.fail("wasm.watch_interval", "must be longer than zero");
    }
    let mut specs = Vec::new();
    for (name, p) in raw {
        let path = format!("plugins.{name}");
        c.name(&path, name);
        if p.path.is_empty() {
            c.fail(
                format!("{path}.path"),
                "required: the plugin's .wasm component",
            );
        }
        let file = std::path::Path::new(&p.path);
        let file = match base_dir {
            Some(dir) if file.is_relative() => dir.join(file),
            _ => file.to_path_buf(),
        };
        let deadline = p.deadline.unwrap_or(wasm.deadline);
        if deadline.is_zero() {
            c.fail(format!("{path}.deadline"), "must be longer than zero");
        }
        if p.max_reuse == Some(0) {
            c.fail(
                format!("{path}.max_reuse"),
                "must be at least 1 (1: a fresh instance per call)",
            );
        }
        let fuel = p.fuel.unwrap_or(wasm.fuel);
        if p.fuel.is_some_and(|f| f > 0) && wasm.fuel == 0 {
            c.fail(
                format!("{path}.fuel"),
                "fuel metering is off: set wasm.fuel to a budget first",
            );
        }
        specs.push(PluginSpec {
            name: name.clone(),
            path: file,
            limits: Limits {
                deadline,
                fuel: (fuel > 0).then_some(fuel),
                max_memory: p.max_memory.unwrap_or(wasm.max_memory),
                max_output: p.max_output.unwrap_or(wasm.max_output),
                max_reuse: p.max_reuse.unwrap_or(wasm.max_reuse),
            },
            policy: p.on_failure.unwrap_or(wasm.on_failure),
        });
    }
    let cache_dir = match wasm.cache_dir.as_str() {
        "" => None,
        "auto" => user_cache_dir(|var| std::env::var_os(var)),
        dir => Some(std::path::PathBuf::from(dir)),
    };
    let engine = EngineSettings {
        cache_dir,
        max_instances: wasm.max_instances,
        app_max_instances: wasm.app_max_instances,
        warm_instances: wasm.warm_instances,
        component: ComponentCaps {
            core_instances: wasm.plugin_max_core_instances,
            memories: wasm.plugin_max_memories,
            tables: wasm.plugin_max_tables,
        },
        max_memory: specs
            .iter()
            .map(|s| s.limits.max_memory)
            .chain([wasm.max_memory])
            .max()
            .unwrap_or(wasm.max_memory),
        fuel: wasm.fuel > 0,
    };
    (engine, specs)
}

/// `$XDG_CACHE_HOME/wasmhook`, else `$HOME/.cache/wasmhook` (absolute paths
/// only); never a directory other users share, such as the temp directory.
pub(super) fn user_cache_dir(
    env: impl Fn(&str) -> Option<std::ffi::OsString>,
) -> Option<std::path::PathBuf> {
    let absolute = |var: &str| {
        env(var)
            .map(std::path::PathBuf::from)
            .filter(|p| p.is_absolute())
    };
    let dir = absolute("XDG_CACHE_HOME")
        .or_else(|| absolute("HOME").map(|h| h.join(".cache")))
        .map(|d| d.join("wasmhook"));
    if dir.is_none() {
        tracing::debug!(
            "wasm.cache_dir = \"auto\" and neither XDG_CACHE_HOME nor HOME is set: plugins are compiled on every start"
        );
    }
    dir
}

fn build_chain(
    c: &mut Check,
    path: &str,
    refs: &[RawPluginRef],
    plugins: &[PluginSpec],
) -> Vec<PluginRef> {
    let mut chain = Vec::new();
    for (i, r) in refs.iter().enumerate() {
        if !plugins.iter().any(|p| p.name == r.plugin) {
            c.fail(
                format!("{path}[{i}].plugin"),
                "names no plugin defined under [plugins]",
            );
            continue;
        }
        let config = r
            .config
            .iter()
            .map(|(k, v)| {
                let v = match v {
                    toml::Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                (k.clone(), v)
            })
            .collect();
        chain.push(PluginRef {
            plugin: r.plugin.clone(),
            config,
        });
    }
    chain
}

fn build_app(
    c: &mut Check,
    path: &str,
    a: &RawApp,
    raw: &RawConfig,
    retry: &RetryPolicy,
    plugins: &[PluginSpec],
) -> App {
    if a.key.is_empty() {
        c.fail(format!("{path}.key"), "must not be empty");
    }
    if a.ingest_token.is_empty() {
        c.fail(format!("{path}.ingest_token"), "must not be empty");
    }
    let secrets: Vec<Secret> = a
        .secret
        .iter()
        .chain(&a.secrets)
        .map(|s| Secret::new(s.as_str()))
        .collect();
    if secrets.iter().any(|s| s.expose().is_empty()) {
        c.fail(format!("{path}.secrets"), "a secret must not be empty");
    }
    let mut endpoints = Vec::new();
    let mut ids = HashSet::new();
    for (j, w) in a.webhooks.iter().enumerate() {
        let wpath = format!("{path}.webhooks[{j}]");
        if let Some(e) = build_endpoint(c, &wpath, w, raw, retry, plugins) {
            if matches!(e.scheme, Scheme::Pusher) && secrets.is_empty() {
                c.fail(
                    format!("{path}.secret"),
                    "required: `pusher` endpoints are signed with the app's secret",
                );
            }
            if !ids.insert(e.id.clone()) {
                c.fail(
                    format!("{wpath}.id"),
                    "the same endpoint id as an earlier endpoint of this app; give each an explicit `id`",
                );
            }
            endpoints.push(Arc::new(e));
        }
    }
    let weight = a.weight.unwrap_or(1);
    if !(1..=1000).contains(&weight) {
        c.fail(format!("{path}.weight"), "must be 1 to 1000");
    }
    let max_in_flight = a.max_in_flight.unwrap_or(raw.queues.app_max_in_flight);
    if max_in_flight == 0 {
        c.fail(format!("{path}.max_in_flight"), "must be at least 1");
    }
    App {
        id: a.id.clone(),
        key: a.key.clone(),
        secrets,
        ingest_token: Secret::new(a.ingest_token.as_str()),
        weight,
        max_in_flight,
        endpoints,
        plugins: build_chain(c, &format!("{path}.plugins"), &a.plugins, plugins),
    }
}

fn build_endpoint(
    c: &mut Check,
    path: &str,
    w: &RawWebhook,
    raw: &RawConfig,
    retry: &RetryPolicy,
    plugins: &[PluginSpec],
) -> Option<Endpoint> {
    let before = c.0.len();
    if w.lambda_function.is_some() || w.lambda.is_some() {
        let key = if w.lambda_function.is_some() {
            "lambda_function"
        } else {
            "lambda"
        };
        c.fail(
            format!("{path}.{key}"),
            "AWS Lambda webhooks are not supported; give this endpoint an HTTP(S) `url`",
        );
        return None;
    }
    let url = match w.url.as_deref().map(reqwest::Url::parse) {
        None => {
            c.fail(format!("{path}.url"), "required");
            None
        }
        Some(Err(e)) => {
            c.fail(format!("{path}.url"), format!("not a URL: {e}"));
            None
        }
        Some(Ok(u)) if !matches!(u.scheme(), "http" | "https") || u.host().is_none() => {
            c.fail(
                format!("{path}.url"),
                "must be an http:// or https:// URL with a host",
            );
            None
        }
        Some(Ok(u)) => Some(u),
    };
    let scheme = match w.scheme {
        SchemeName::Pusher => {
            if !w.secrets.is_empty() {
                c.fail(format!("{path}.secrets"), "only `standard` and `raw` endpoints take secrets; `pusher` endpoints are signed with the app's secret");
            }
            Scheme::Pusher
        }
        SchemeName::Standard | SchemeName::Raw => {
            if w.secrets.is_empty() && w.scheme == SchemeName::Standard {
                c.fail(
                    format!("{path}.secrets"),
                    "a `standard` endpoint needs at least one whsec_ secret",
                );
            }
            let mut keys = Vec::new();
            for (k, s) in w.secrets.iter().enumerate() {
                match StandardKey::parse(s) {
                    Ok(key) => keys.push(key),
                    Err(e) => c.fail(format!("{path}.secrets[{k}]"), e.to_string()),
                }
            }
            if w.scheme == SchemeName::Raw {
                Scheme::Raw { keys }
            } else {
                Scheme::Standard { keys }
            }
        }
    };
    for (k, t) in w.event_types.iter().enumerate() {
        c.name(format!("{path}.event_types[{k}]"), t);
    }
    let mut headers = Vec::new();
    for (name, value) in &w.headers {
        let hpath = format!("{path}.headers.{name}");
        if signing::is_reserved(name) {
            c.fail(hpath, "this header is set by wasmhook (signature, content or transport) and cannot be overridden");
            continue;
        }
        match (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            (Ok(n), Ok(v)) => headers.push((n, v)),
            (Err(_), _) => c.fail(hpath, "not a valid header name"),
            (_, Err(_)) => c.fail(hpath, "not a valid header value"),
        }
    }
    let timeout = w.timeout.unwrap_or(raw.delivery.timeout);
    if timeout.is_zero() {
        c.fail(format!("{path}.timeout"), "must be longer than zero");
    }
    let retry = match &w.retry {
        Some(o) if o.schedule.is_empty() => {
            c.fail(format!("{path}.retry.schedule"), "needs at least one entry");
            retry.clone()
        }
        Some(o) => retry.with_schedule(o.schedule.iter().map(|d| **d).collect()),
        None => retry.clone(),
    };
    let id = match &w.id {
        Some(id) => {
            c.name(format!("{path}.id"), id);
            id.clone()
        }
        None => derived_endpoint_id(w),
    };
    let max_in_flight = w.max_in_flight.unwrap_or(raw.delivery.max_in_flight);
    if max_in_flight == 0 {
        c.fail(format!("{path}.max_in_flight"), "must be at least 1");
    }
    let rate_limit = match &w.rate_limit {
        None => None,
        Some(text) => match RateLimit::parse(text) {
            Ok(mut r) => {
                if let Some(burst) = w.rate_limit_burst {
                    if burst == 0 {
                        c.fail(format!("{path}.rate_limit_burst"), "must be at least 1");
                    }
                    r.burst = burst.max(1);
                }
                Some(r)
            }
            Err(e) => {
                c.fail(format!("{path}.rate_limit"), e.to_string());
                None
            }
        },
    };
    if w.rate_limit.is_none() && w.rate_limit_burst.is_some() {
        c.fail(
            format!("{path}.rate_limit_burst"),
            "only with a `rate_limit`",
        );
    }
    let batch = batching(c, path, w);
    let order_by = match &w.order_by {
        None => None,
        Some(_) if !w.ordered => {
            c.fail(format!("{path}.order_by"), "only with `ordered = true`");
            None
        }
        Some(text) => {
            let parsed = OrderBy::parse(text);
            if parsed.is_none() {
                c.fail(
                    format!("{path}.order_by"),
                    "expected \"channel\", \"event.<field>\" or \"metadata.<name>\"",
                );
            }
            parsed
        }
    };
    let filter = w.filter.clone().unwrap_or_default();
    let chain = build_chain(c, &format!("{path}.plugins"), &w.plugins, plugins);
    if c.0.len() > before {
        return None;
    }
    Some(Endpoint {
        id,
        url: url?,
        scheme,
        event_types: w.event_types.clone(),
        filter: ChannelFilter {
            starts_with: filter.channel_name_starts_with,
            ends_with: filter.channel_name_ends_with,
        },
        headers,
        timeout,
        retry,
        max_in_flight,
        rate_limit,
        ordered: w.ordered,
        order_by,
        batch,
        plugins: chain,
    })
}

/// An endpoint's `batch` and `max_batch_bytes`.
fn batching(c: &mut Check, path: &str, w: &RawWebhook) -> Option<Batching> {
    let Some(b) = &w.batch else {
        if w.max_batch_bytes.is_some() {
            c.fail(format!("{path}.max_batch_bytes"), "only with a `batch`");
        }
        return None;
    };
    if b.max_events == 0 || b.max_events > Batching::MAX_EVENTS {
        c.fail(
            format!("{path}.batch.max_events"),
            format!("must be 1 to {}", Batching::MAX_EVENTS),
        );
    }
    let max_wait = b.max_wait.unwrap_or(Batching::DEFAULT_MAX_WAIT);
    if max_wait > Batching::MAX_WAIT {
        c.fail(format!("{path}.batch.max_wait"), "must be at most 1h");
    }
    let max_bytes = w.max_batch_bytes.unwrap_or(Batching::DEFAULT_MAX_BYTES);
    let (lo, hi) = Batching::BYTES_RANGE;
    if !(lo..=hi).contains(&max_bytes) {
        c.fail(
            format!("{path}.max_batch_bytes"),
            format!("must be {lo} to {hi} bytes"),
        );
    }
    if w.ordered {
        c.fail(
            format!("{path}.batch"),
            "an endpoint is either `ordered` or batched, not both",
        );
    }
    Some(Batching {
        max_events: b.max_events,
        max_wait,
        max_bytes,
    })
}

/// Stable while the endpoint's scheme and url stay the same.
fn derived_endpoint_id(w: &RawWebhook) -> String {
    let scheme = match w.scheme {
        SchemeName::Pusher => "pusher",
        SchemeName::Standard => "standard",
        SchemeName::Raw => "raw",
    };
    let digest = Sha256::digest(format!("{scheme} {}", w.url.as_deref().unwrap_or("")).as_bytes());
    format!("ep_{}", &hex::encode(digest)[..12])
}
