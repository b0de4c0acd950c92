//! Prometheus metrics: the process's counters and histograms, and the text
//! a scrape gets (`scrape` reads the queue's gauges and serves `/metrics`).
//!
//! One registry per process (the exposition is per process; several
//! services started in one process, as tests do, share it). Every series is
//! created when the process starts, except those labelled by plugin name (one
//! set per configured plugin, made on its first call) and the opt-in
//! per-endpoint gauges: no label takes a value from tenant input, so the
//! number of series does not grow with apps, endpoints or events.
//!
//! The hot path is atomics only: counters are `prometheus-client` counters
//! (one atomic add), histograms are [`Timer`]s (two atomic adds; the
//! crate's own histogram takes a lock per observation).

pub mod scrape;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, RwLock};
use std::time::Duration;

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::{Registry, Unit};

/// Labels of one series: (name, value) pairs.
type Labels = Vec<(&'static str, String)>;

/// What a job's outcome counts as (`wasmhook_deliveries_total{outcome}`).
pub const OUTCOMES: [&str; 5] = [
    "delivered",
    "retry_scheduled",
    "dead",
    "dropped",
    "unrouted",
];

/// Other things that happen to a job (`wasmhook_job_events_total{event}`).
pub const JOB_EVENTS: [&str; 3] = ["fanned_out", "parked", "plugin_skipped"];

/// How a delivery attempt ended (`wasmhook_delivery_attempts_total{status_class}`):
/// the class of the HTTP status, or `none` when no response came back.
const STATUS_CLASSES: [&str; 6] = ["1xx", "2xx", "3xx", "4xx", "5xx", "none"];

/// Why a plugin call failed (`wasmhook_plugin_failures_total{kind}`).
pub const PLUGIN_FAILURES: [&str; 9] = [
    "rejected",
    "trapped",
    "timed_out",
    "out_of_fuel",
    "out_of_memory",
    "output_too_large",
    "bad_output",
    "instantiate",
    "not_loaded",
];

/// Breaker states (`wasmhook_breaker_transitions_total{state}`).
pub const BREAKER_STATES: [&str; 4] = ["closed", "open", "half_open", "disabled"];

/// Statuses the ingest answers with; any other is counted as `other`.
const INGEST_STATUSES: [u16; 12] = [200, 202, 400, 401, 404, 405, 409, 413, 415, 422, 429, 503];

/// Seconds: 1 ms to 60 s, for HTTP attempts and end-to-end latency.
const DELIVERY_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0,
];

/// Seconds: enqueue to delivery spans retries, so it reaches into hours.
const LATENCY_BUCKETS: [f64; 16] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0,
    7200.0,
];

/// Seconds: 10 µs to 1 s, for plugin calls (deadlines are milliseconds).
const PLUGIN_BUCKETS: [f64; 12] = [
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.1, 1.0,
];

/// A histogram of durations with fixed buckets, lock-free: an observation
/// is one atomic add to its bucket and one to the sum (in nanoseconds).
#[derive(Debug, Clone)]
pub struct Timer(Arc<TimerInner>);

#[derive(Debug)]
struct TimerInner {
    bounds: &'static [f64],
    /// Per bucket, not cumulative; the last is above every bound.
    counts: Box<[AtomicU64]>,
    sum_ns: AtomicU64,
}

impl Timer {
    fn new(bounds: &'static [f64]) -> Timer {
        Timer(Arc::new(TimerInner {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_ns: AtomicU64::new(0),
        }))
    }

    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = self.0.bounds.partition_point(|b| *b < secs);
        self.0.counts[i].fetch_add(1, Ordering::Relaxed);
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.0.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.0
            .counts
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum()
    }
}

impl TypedMetric for Timer {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for Timer {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        // Bucket counts are read one by one while others may add: the count
        // is their sum, so `_count` and the `+Inf` bucket always agree.
        let mut buckets = Vec::with_capacity(self.0.counts.len());
        let mut count = 0;
        for (i, c) in self.0.counts.iter().enumerate() {
            let n = c.load(Ordering::Relaxed);
            count += n;
            let bound = self.0.bounds.get(i).copied().unwrap_or(f64::INFINITY);
            buckets.push((bound, n));
        }
        let sum = self.0.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// A plugin's series, made on its first call.
struct PluginSeries {
    duration: Timer,
    /// By [`PLUGIN_FAILURES`] index.
    failures: Vec<Counter>,
}

/// The queue as one scrape saw it (fleet-wide: every process reports the
/// same numbers).
#[derive(Debug, Clone, Default)]
pub struct QueueGauges {
    pub ready: u64,
    pub in_flight: u64,
    pub delayed: u64,
    pub dead: u64,
    pub held: u64,
    pub active_apps: u64,
    /// See README "Metrics": how long the app that has waited longest for a
    /// turn has waited.
    pub oldest_ready_age: Duration,
    pub rate_limited: u64,
}

/// One opted-in endpoint as a scrape saw it.
#[derive(Debug, Clone)]
pub struct EndpointGauges {
    pub app: String,
    pub endpoint: String,
    /// One of [`BREAKER_STATES`].
    pub state: &'static str,
    pub held: bool,
    pub waiting: u64,
    pub rate_limited: u64,
}

pub struct Metrics {
    registry: Registry,
    outcomes: Vec<Counter>,
    job_events: Vec<Counter>,
    status_classes: Vec<Counter>,
    attempt_duration: Timer,
    delivery_latency: Timer,
    plugin_duration: Family<Labels, Timer, fn() -> Timer>,
    plugin_failures: Family<Labels, Counter>,
    plugins: RwLock<HashMap<String, Arc<PluginSeries>>>,
    /// Held while a scrape sets the gauges and renders, so that concurrent
    /// scrapes each see a complete set.
    scrape: Mutex<()>,
    breaker_transitions: Vec<Counter>,
    ingest: Vec<Counter>,
    ingest_other: Counter,
    redis_errors: Counter,
    redis_reconnects: Counter,
    queue_jobs: Vec<Gauge>,
    queue_held: Gauge,
    queue_active_apps: Gauge,
    queue_oldest_ready: Gauge<f64, AtomicU64>,
    queue_rate_limited: Gauge,
    queue_up: Gauge,
    endpoint_state: Family<Labels, Gauge>,
    endpoint_held: Family<Labels, Gauge>,
    endpoint_waiting: Family<Labels, Gauge>,
    endpoint_rate_limited: Family<Labels, Gauge>,
}

const QUEUE_STATES: [&str; 4] = ["ready", "in_flight", "delayed", "dead"];

fn labelled<M: Clone>(family: &Family<Labels, M>, name: &'static str, values: &[&str]) -> Vec<M> {
    values
        .iter()
        .map(|v| family.get_or_create_owned(&vec![(name, v.to_string())]))
        .collect()
}

fn plugin_timer() -> Timer {
    Timer::new(&PLUGIN_BUCKETS)
}

impl Metrics {
    fn new() -> Metrics {
        let mut r = Registry::with_prefix("wasmhook");

        let outcomes_f = Family::<Labels, Counter>::default();
        r.register(
            "deliveries",
            "Jobs by outcome, counted when the outcome is committed",
            outcomes_f.clone(),
        );
        let job_events_f = Family::<Labels, Counter>::default();
        r.register(
            "job_events",
            "Jobs fanned out, parked for a busy endpoint, or passed on by a failed plugin",
            job_events_f.clone(),
        );
        let classes_f = Family::<Labels, Counter>::default();
        r.register(
            "delivery_attempts",
            "HTTP delivery attempts by status class (none: no response)",
            classes_f.clone(),
        );
        let attempt_duration = Timer::new(&DELIVERY_BUCKETS);
        r.register_with_unit(
            "delivery_attempt_duration",
            "Time of one HTTP delivery attempt",
            Unit::Seconds,
            attempt_duration.clone(),
        );
        let delivery_latency = Timer::new(&LATENCY_BUCKETS);
        r.register_with_unit(
            "delivery_latency",
            "From the event's acceptance to its delivery, retries included",
            Unit::Seconds,
            delivery_latency.clone(),
        );
        let plugin_duration: Family<Labels, Timer, fn() -> Timer> =
            Family::new_with_constructor(plugin_timer);
        r.register_with_unit(
            "plugin_call_duration",
            "Time of one plugin call, by plugin",
            Unit::Seconds,
            plugin_duration.clone(),
        );
        let plugin_failures = Family::<Labels, Counter>::default();
        r.register(
            "plugin_failures",
            "Plugin calls that failed, by plugin and kind",
            plugin_failures.clone(),
        );
        let breaker_f = Family::<Labels, Counter>::default();
        r.register(
            "breaker_transitions",
            "Endpoint breakers that changed state in this process's commits, by new state",
            breaker_f.clone(),
        );
        let ingest_f = Family::<Labels, Counter>::default();
        r.register(
            "ingest_requests",
            "Ingest HTTP requests by response status",
            ingest_f.clone(),
        );
        let redis_errors = Counter::default();
        r.register(
            "redis_errors",
            "Queue operations that failed with a Redis error or timeout",
            redis_errors.clone(),
        );
        let redis_reconnects = Counter::default();
        r.register(
            "redis_reconnects",
            "Times the queue's Redis connection was lost and reopened",
            redis_reconnects.clone(),
        );

        let queue_jobs_f = Family::<Labels, Gauge>::default();
        r.register(
            "queue_jobs",
            "Jobs in the queue by state (fleet-wide, read at scrape)",
            queue_jobs_f.clone(),
        );
        let queue_held = Gauge::default();
        r.register(
            "queue_held_partitions",
            "Endpoint partitions held by a rate limit, Retry-After or open breaker",
            queue_held.clone(),
        );
        let queue_active_apps = Gauge::default();
        r.register(
            "queue_active_apps",
            "Apps with jobs ready to take",
            queue_active_apps.clone(),
        );
        let queue_oldest_ready = Gauge::<f64, AtomicU64>::default();
        r.register_with_unit(
            "queue_oldest_ready_age",
            "How long the app that has waited longest for a turn has waited, since its work became ready or since its last turn",
            Unit::Seconds,
            queue_oldest_ready.clone(),
        );
        let queue_rate_limited = Gauge::default();
        r.register(
            "queue_rate_limited_waits",
            "Times a take found an endpoint out of rate-limit tokens and held it (fleet-wide total since the queue was created)",
            queue_rate_limited.clone(),
        );
        let queue_up = Gauge::default();
        r.register(
            "queue_up",
            "1 when this scrape could read the queue, else 0 (queue gauges keep their last values)",
            queue_up.clone(),
        );

        let endpoint_state = Family::<Labels, Gauge>::default();
        r.register(
            "endpoint_breaker_state",
            "Opted-in endpoints (metrics.endpoints): 1 for the breaker's current state",
            endpoint_state.clone(),
        );
        let endpoint_held = Family::<Labels, Gauge>::default();
        r.register(
            "endpoint_held",
            "Opted-in endpoints: 1 while held (rate limit, Retry-After, open breaker)",
            endpoint_held.clone(),
        );
        let endpoint_waiting = Family::<Labels, Gauge>::default();
        r.register(
            "endpoint_waiting_jobs",
            "Opted-in endpoints: jobs waiting in the endpoint's partition",
            endpoint_waiting.clone(),
        );
        let endpoint_rate_limited = Family::<Labels, Gauge>::default();
        r.register(
            "endpoint_rate_limited_waits",
            "Opted-in endpoints: times a take held the endpoint for its rate limit",
            endpoint_rate_limited.clone(),
        );

        Metrics {
            outcomes: labelled(&outcomes_f, "outcome", &OUTCOMES),
            job_events: labelled(&job_events_f, "event", &JOB_EVENTS),
            status_classes: labelled(&classes_f, "status_class", &STATUS_CLASSES),
            attempt_duration,
            delivery_latency,
            plugin_duration,
            plugin_failures,
            plugins: RwLock::default(),
            scrape: Mutex::new(()),
            breaker_transitions: labelled(&breaker_f, "state", &BREAKER_STATES),
            ingest: INGEST_STATUSES
                .iter()
                .map(|s| ingest_f.get_or_create_owned(&vec![("status", s.to_string())]))
                .collect(),
            ingest_other: ingest_f.get_or_create_owned(&vec![("status", "other".to_string())]),
            redis_errors,
            redis_reconnects,
            queue_jobs: labelled(&queue_jobs_f, "state", &QUEUE_STATES),
            queue_held,
            queue_active_apps,
            queue_oldest_ready,
            queue_rate_limited,
            queue_up,
            endpoint_state,
            endpoint_held,
            endpoint_waiting,
            endpoint_rate_limited,
            registry: r,
        }
    }

    fn plugin(&self, name: &str) -> Arc<PluginSeries> {
        if let Some(s) = self
            .plugins
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
        {
            return s.clone();
        }
        let series = Arc::new(PluginSeries {
            duration: self
                .plugin_duration
                .get_or_create_owned(&vec![("plugin", name.to_string())]),
            failures: PLUGIN_FAILURES
                .iter()
                .map(|kind| {
                    self.plugin_failures.get_or_create_owned(&vec![
                        ("plugin", name.to_string()),
                        ("kind", kind.to_string()),
                    ])
                })
                .collect(),
        });
        self.plugins
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .entry(name.to_string())
            .or_insert(series)
            .clone()
    }
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

fn m() -> &'static Metrics {
    &METRICS
}

/// A committed job outcome; `name` is one of [`OUTCOMES`] or [`JOB_EVENTS`].
pub fn job_outcome(name: &str) {
    let m = m();
    if let Some(i) = OUTCOMES.iter().position(|o| *o == name) {
        m.outcomes[i].inc();
    } else if let Some(i) = JOB_EVENTS.iter().position(|o| *o == name) {
        m.job_events[i].inc();
    }
}

/// One HTTP delivery attempt: how long it took and its status (None: no
/// response).
pub fn delivery_attempt(elapsed: Duration, status: Option<u16>) {
    let m = m();
    m.attempt_duration.observe(elapsed);
    let class = match status {
        Some(s @ 100..=599) => usize::from(s / 100 - 1),
        _ => STATUS_CLASSES.len() - 1,
    };
    m.status_classes[class].inc();
}

/// A delivery succeeded `since` the event was accepted.
pub fn delivered_after(since: Duration) {
    m().delivery_latency.observe(since);
}

/// One plugin call; `failure` is one of [`PLUGIN_FAILURES`] when it failed.
/// `plugin` is a configured plugin's name: the series per plugin are bounded
/// by the config.
pub fn plugin_call(plugin: &str, elapsed: Option<Duration>, failure: Option<&str>) {
    let series = m().plugin(plugin);
    if let Some(elapsed) = elapsed {
        series.duration.observe(elapsed);
    }
    if let Some(kind) = failure {
        let i = PLUGIN_FAILURES
            .iter()
            .position(|k| *k == kind)
            .unwrap_or(PLUGIN_FAILURES.len() - 1);
        series.failures[i].inc();
    }
}

/// A breaker changed to `state`, one of [`BREAKER_STATES`].
pub fn breaker_transition(state: &str) {
    if let Some(i) = BREAKER_STATES.iter().position(|s| *s == state) {
        m().breaker_transitions[i].inc();
    }
}

/// An ingest request answered with `status`.
pub fn ingest_request(status: u16) {
    let m = m();
    match INGEST_STATUSES.iter().position(|s| *s == status) {
        Some(i) => m.ingest[i].inc(),
        None => m.ingest_other.inc(),
    };
}

pub fn redis_error() {
    m().redis_errors.inc();
}

pub fn redis_reconnect() {
    m().redis_reconnects.inc();
}

fn gauge(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Sets the queue gauges from a scrape's read (None: the read failed).
fn set_queue(m: &Metrics, q: Option<&QueueGauges>) {
    let Some(q) = q else {
        m.queue_up.set(0);
        return;
    };
    m.queue_up.set(1);
    for (g, v) in m
        .queue_jobs
        .iter()
        .zip([q.ready, q.in_flight, q.delayed, q.dead])
    {
        g.set(gauge(v));
    }
    m.queue_held.set(gauge(q.held));
    m.queue_active_apps.set(gauge(q.active_apps));
    m.queue_oldest_ready.set(q.oldest_ready_age.as_secs_f64());
    m.queue_rate_limited.set(gauge(q.rate_limited));
}

/// Replaces the opted-in endpoints' gauges.
fn set_endpoints(m: &Metrics, endpoints: &[EndpointGauges]) {
    m.endpoint_state.clear();
    m.endpoint_held.clear();
    m.endpoint_waiting.clear();
    m.endpoint_rate_limited.clear();
    for e in endpoints {
        let base: Labels = vec![("app", e.app.clone()), ("endpoint", e.endpoint.clone())];
        for state in BREAKER_STATES {
            let mut labels = base.clone();
            labels.push(("state", state.to_string()));
            m.endpoint_state
                .get_or_create(&labels)
                .set(i64::from(state == e.state));
        }
        m.endpoint_held.get_or_create(&base).set(i64::from(e.held));
        m.endpoint_waiting
            .get_or_create(&base)
            .set(gauge(e.waiting));
        m.endpoint_rate_limited
            .get_or_create(&base)
            .set(gauge(e.rate_limited));
    }
}

/// The content type of [`render`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Every series, in the OpenMetrics text format, after setting the queue
/// gauges from a scrape's read (`queue` None: the read failed) and, when
/// read, the listed endpoints' gauges.
pub fn render(queue: Option<&QueueGauges>, endpoints: Option<&[EndpointGauges]>) -> String {
    let m = m();
    let _one_at_a_time = m.scrape.lock().unwrap_or_else(|p| p.into_inner());
    set_queue(m, queue);
    if let Some(endpoints) = endpoints {
        set_endpoints(m, endpoints);
    }
    let mut out = String::with_capacity(16 * 1024);
    // Writing to a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, &m.registry);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timer_buckets_hold_each_observation_once() {
        let t = Timer::new(&DELIVERY_BUCKETS);
        t.observe(Duration::from_micros(500));
        t.observe(Duration::from_millis(1));
        t.observe(Duration::from_secs(100));
        assert_eq!(t.count(), 3);
        assert_eq!(t.0.counts[0].load(Ordering::Relaxed), 2);
        assert_eq!(
            t.0.counts[DELIVERY_BUCKETS.len()].load(Ordering::Relaxed),
            1
        );
    }

    #[test]
    fn renders_openmetrics_with_the_prefix() {
        job_outcome("delivered");
        delivery_attempt(Duration::from_millis(3), Some(503));
        let text = render(None, None);
        assert!(text.ends_with("# EOF\n"));
        assert!(text.contains("wasmhook_deliveries_total{outcome=\"delivered\"}"));
        assert!(text.contains("wasmhook_delivery_attempts_total{status_class=\"5xx\"}"));
        assert!(text.contains("wasmhook_delivery_attempt_duration_seconds_bucket{le=\"+Inf\"}"));
    }
}
