//! `/metrics` end to end: wasmhook in this process against a real Redis and a
//! real receiver; the scrape is parsed with a Prometheus text parser and its
//! counters and gauges are checked as jobs are delivered, retried and
//! dead-lettered.
//!
//! The registry is per process: this file holds the only test that moves the
//! delivery counters, and it compares scrapes taken before and after.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;
use wasmhook::queue::TakeRequest;
use wasmhook::service::Mode;

const WAIT: Duration = Duration::from_secs(15);
const TOKEN: &str = "scrape-token";

/// A parsed scrape: series (name and sorted labels) → value.
struct Parsed {
    values: BTreeMap<String, f64>,
    samples: Vec<prometheus_parse::Sample>,
    /// Families as `# TYPE` names them: (name, type).
    types: Vec<(String, String)>,
}

impl Parsed {
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.values
            .get(&key(name, labels))
            .copied()
            .unwrap_or_else(|| panic!("no series {}", key(name, labels)))
    }
}

fn key(name: &str, labels: &[(&str, &str)]) -> String {
    let mut l: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    l.sort();
    format!("{name}{{{}}}", l.join(","))
}

async fn scrape(url: &str, token: Option<&str>) -> (u16, String) {
    wasmhook::install_crypto_provider();
    let mut req = reqwest::Client::new().get(url);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap())
}

async fn parsed(url: &str) -> Parsed {
    let (status, text) = scrape(url, Some(TOKEN)).await;
    assert_eq!(status, 200, "{text}");
    assert!(
        text.ends_with("# EOF\n"),
        "a complete OpenMetrics exposition"
    );
    let lines = text.lines().map(|l| Ok(l.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("the scrape parses");
    let mut values = BTreeMap::new();
    for s in &scrape.samples {
        let labels: Vec<(&str, &str)> = s
            .labels
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let (name, value) = match &s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => (s.metric.clone(), *v),
            prometheus_parse::Value::Histogram(buckets) => {
                // The `+Inf` bucket: every observation.
                let all = buckets.iter().map(|b| b.count).fold(0.0, f64::max);
                (format!("{}_observations", s.metric), all)
            }
            prometheus_parse::Value::Summary(_) => continue,
        };
        values.insert(key(&name, &labels), value);
    }
    let types = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .map(|(n, t)| (n.to_string(), t.to_string()))
        .collect();
    assert_eq!(
        scrape.docs.len(),
        text.lines().filter(|l| l.starts_with("# HELP ")).count(),
        "every family has help text"
    );
    Parsed {
        values,
        samples: scrape.samples,
        types,
    }
}

/// Scrapes until `done` holds for a scrape (outcomes are counted when the
/// committer has recorded them, a little after the receiver got them).
async fn scrape_until(url: &str, done: impl Fn(&Parsed) -> bool) -> Parsed {
    let deadline = Instant::now() + WAIT;
    loop {
        let p = parsed(url).await;
        if done(&p) {
            return p;
        }
        assert!(Instant::now() < deadline, "the counters did not move");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn endpoint(id: &str, url: &str) -> String {
    format!("\n[[apps.webhooks]]\nid = \"{id}\"\nurl = \"{url}\"\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_and_gauges_move_as_jobs_are_delivered_retried_and_dead_lettered() {
    let redis = RedisServer::start();
    let rx = Receiver::start().await;
    rx.script("flaky", &[500], 200);
    rx.script("bad", &[400], 200);
    let endpoints = endpoint("ok", &rx.url("ok"))
        + &endpoint("flaky", &rx.url("flaky"))
        + &endpoint("bad", &rx.url("bad"));
    let own = free_port();
    // The app's chain has a plugin that traps, and whose policy passes the
    // event on.
    let text = config(
        Some(&redis.url),
        &prefix("metrics"),
        "127.0.0.1:0",
        &app_with_chain("app-1", "[{ plugin = \"trap-skip\" }]", &endpoints),
    ) + &wasm_section("")
        + &plugin_def("trap-skip", &plugin("trap"), "on_failure = \"skip\"")
        + &format!(
            "\n[metrics]\nlisten = \"127.0.0.1:{own}\"\ntoken = \"{TOKEN}\"\nendpoints = [\"app-1/bad\"]\n"
        );
    let wh = Running::start(&text, Mode::All).await;
    let on_ingest = format!("{}/metrics", wh.ingest);
    let separate = format!("http://127.0.0.1:{own}/metrics");

    // The token is required, and a wrong one is refused.
    assert_eq!(scrape(&on_ingest, None).await.0, 401);
    assert_eq!(scrape(&on_ingest, Some("wrong")).await.0, 401);

    let before = parsed(&on_ingest).await;
    let outcome = |p: &Parsed, o: &str| p.get("wasmhook_deliveries_total", &[("outcome", o)]);
    let class =
        |p: &Parsed, c: &str| p.get("wasmhook_delivery_attempts_total", &[("status_class", c)]);
    let ingest = |p: &Parsed, s: &str| p.get("wasmhook_ingest_requests_total", &[("status", s)]);

    let (status, _) = post_events(&wh.ingest, "app-1", Some("wrong-token"), "{}").await;
    assert_eq!(status, 401);
    let (status, body) = post_events(
        &wh.ingest,
        "app-1",
        Some("app-1-token"),
        json!({"name": "order.created"}).to_string(),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    rx.wait_for("ok", 1, WAIT).await;
    rx.wait_for("flaky", 2, WAIT).await;
    rx.wait_for("bad", 1, WAIT).await;

    let after = scrape_until(&on_ingest, |p| {
        outcome(p, "delivered") - outcome(&before, "delivered") >= 2.0
            && outcome(p, "dead") - outcome(&before, "dead") >= 1.0
            && p.get("wasmhook_queue_jobs", &[("state", "dead")]) >= 1.0
    })
    .await;
    let delta = |f: &dyn Fn(&Parsed) -> f64| f(&after) - f(&before);

    // Outcomes: ok and flaky delivered, flaky's 500 retried once, bad's 400
    // dead-lettered; the event was fanned out to its three endpoints.
    assert_eq!(delta(&|p| outcome(p, "delivered")), 2.0);
    assert_eq!(delta(&|p| outcome(p, "retry_scheduled")), 1.0);
    assert_eq!(delta(&|p| outcome(p, "dead")), 1.0);
    assert_eq!(delta(&|p| outcome(p, "dropped")), 0.0);
    assert_eq!(delta(&|p| outcome(p, "unrouted")), 0.0);
    assert_eq!(
        delta(&|p| p.get("wasmhook_job_events_total", &[("event", "fanned_out")])),
        1.0
    );

    // The plugin: one call, timed, failed by a trap, the event passed on
    // (its series appear with its first call).
    let trap = [("plugin", "trap-skip")];
    assert!(!before.values.contains_key(&key(
        "wasmhook_plugin_call_duration_seconds_observations",
        &trap
    )));
    assert_eq!(
        after.get("wasmhook_plugin_call_duration_seconds_observations", &trap),
        1.0
    );
    let failures = |kind: &str| {
        after.get(
            "wasmhook_plugin_failures_total",
            &[("plugin", "trap-skip"), ("kind", kind)],
        )
    };
    assert_eq!(failures("trapped"), 1.0);
    assert_eq!(failures("timed_out"), 0.0);
    assert_eq!(
        delta(&|p| p.get("wasmhook_job_events_total", &[("event", "plugin_skipped")])),
        1.0
    );

    // Attempts by status class, and one duration per attempt.
    assert_eq!(delta(&|p| class(p, "2xx")), 2.0);
    assert_eq!(delta(&|p| class(p, "4xx")), 1.0);
    assert_eq!(delta(&|p| class(p, "5xx")), 1.0);
    assert_eq!(delta(&|p| class(p, "none")), 0.0);
    assert_eq!(
        delta(&|p| p.get(
            "wasmhook_delivery_attempt_duration_seconds_observations",
            &[]
        )),
        4.0
    );
    assert_eq!(
        delta(&|p| p.get("wasmhook_delivery_latency_seconds_observations", &[])),
        2.0
    );

    // Ingest answers by status.
    assert_eq!(delta(&|p| ingest(p, "202")), 1.0);
    assert_eq!(delta(&|p| ingest(p, "401")), 1.0);

    // Queue gauges, read from Redis at the scrape: nothing left but the
    // dead letter.
    for (state, n) in [
        ("ready", 0.0),
        ("in_flight", 0.0),
        ("delayed", 0.0),
        ("dead", 1.0),
    ] {
        assert_eq!(
            after.get("wasmhook_queue_jobs", &[("state", state)]),
            n,
            "{state}"
        );
    }
    assert_eq!(after.get("wasmhook_queue_up", &[]), 1.0);
    assert_eq!(
        after.get("wasmhook_queue_oldest_ready_age_seconds", &[]),
        0.0
    );
    assert_eq!(after.get("wasmhook_queue_active_apps", &[]), 0.0);

    // The opted-in endpoint, and no other, has series of its own.
    let bad = [("app", "app-1"), ("endpoint", "bad")];
    let state = |s: &str| {
        let mut l = bad.to_vec();
        l.push(("state", s));
        after.get("wasmhook_endpoint_breaker_state", &l)
    };
    assert_eq!(state("closed"), 1.0);
    assert_eq!(state("open"), 0.0);
    assert_eq!(after.get("wasmhook_endpoint_held", &bad), 0.0);
    assert!(
        after
            .samples
            .iter()
            .filter(|s| s.labels.get("endpoint").is_some())
            .all(|s| s.labels.get("endpoint") == Some("bad")),
        "only listed endpoints are labelled"
    );

    // Naming: the prefix; counters' samples end in `_total`; histograms
    // are in seconds.
    assert!(after.types.len() >= 15, "{:?}", after.types);
    for s in &after.samples {
        assert!(s.metric.starts_with("wasmhook_"), "{}", s.metric);
    }
    for (name, kind) in &after.types {
        assert!(name.starts_with("wasmhook_"), "{name}");
        match kind.as_str() {
            "counter" => {
                let total = format!("{name}_total");
                assert!(
                    after.samples.iter().any(|s| s.metric == total),
                    "{name} has _total samples"
                );
                assert!(!after.samples.iter().any(|s| s.metric == *name), "{name}");
            }
            "histogram" => assert!(name.ends_with("_seconds"), "{name}"),
            "gauge" => {}
            other => panic!("unexpected type {other} of {name}"),
        }
    }

    // The listener of its own serves the same series.
    let other = parsed(&separate).await;
    assert!(outcome(&other, "delivered") >= outcome(&after, "delivered"));
    wh.shutdown().await;

    // A worker-only process has only `metrics.listen`.
    let own = free_port();
    let worker_text = config(
        Some(&redis.url),
        &prefix("metrics"),
        "127.0.0.1:0",
        &app("app-1", &endpoints),
    ) + &format!("\n[metrics]\nlisten = \"127.0.0.1:{own}\"\n");
    let worker = Running::start(&worker_text, Mode::Worker).await;
    let url = format!("http://127.0.0.1:{own}/metrics");
    let deadline = Instant::now() + WAIT;
    let text = loop {
        if let Ok(resp) = reqwest::get(&url).await {
            break resp.text().await.unwrap();
        }
        assert!(
            Instant::now() < deadline,
            "the metrics listener did not start"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        text.contains("wasmhook_queue_jobs{state=\"dead\"} 1"),
        "{text}"
    );
    worker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_oldest_ready_age_grows_while_an_app_waits_and_ends_with_its_turn() {
    let redis = RedisServer::start();
    let text = config(
        Some(&redis.url),
        &prefix("oldest"),
        "127.0.0.1:0",
        &app("app-1", &pusher_endpoint("http://127.0.0.1:9/x")),
    );
    // No worker: the queue alone.
    let q = queue(&text);
    assert_eq!(q.depth().await.unwrap().oldest_ready_ms, 0);
    let job = wasmhook::event::Job::new(
        "app-1",
        wasmhook::event::Event::from_json(json!({"name": "e"})).unwrap(),
        wasmhook::event::now_ms(),
    );
    q.enqueue("app-1", &[job.clone(), job]).await.unwrap();
    let first = q.depth().await.unwrap().oldest_ready_ms;
    tokio::time::sleep(Duration::from_millis(30)).await;
    let later = q.depth().await.unwrap();
    assert!(later.oldest_ready_ms > first, "{later:?}");
    assert_eq!(later.ready, 2);

    // A turn that takes one job: the app waits again from that turn.
    let taken = q
        .take(&TakeRequest {
            max: 1,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(taken.jobs.len(), 1);
    let after_turn = q.depth().await.unwrap();
    assert!(after_turn.oldest_ready_ms < later.oldest_ready_ms);
    // Its last job taken: nothing waits.
    let taken = q
        .take(&TakeRequest {
            max: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(taken.jobs.len(), 1);
    assert_eq!(q.depth().await.unwrap().oldest_ready_ms, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limited_waits_are_counted_fleet_wide_and_per_endpoint() {
    let redis = RedisServer::start();
    let text = config(
        Some(&redis.url),
        &prefix("ratelimited"),
        "127.0.0.1:0",
        &app(
            "app-1",
            "\n[[apps.webhooks]]\nid = \"slow\"\nurl = \"http://127.0.0.1:9/x\"\nrate_limit = \"1/h\"\n",
        ),
    );
    let q = queue(&text);
    q.configure(&settings(&text).tenancy()).await.unwrap();
    let job = wasmhook::event::Job::new(
        "app-1",
        wasmhook::event::Event::from_json(json!({"name": "e"})).unwrap(),
        wasmhook::event::now_ms(),
    )
    .for_endpoint("slow");
    q.enqueue("app-1", &[job.clone(), job.clone(), job])
        .await
        .unwrap();
    let status = |q: wasmhook::queue::Queue| async move {
        q.endpoints(&[("app-1".into(), "slow".into())])
            .await
            .unwrap()
            .remove(0)
    };
    assert_eq!(status(q.clone()).await.rate_limited_waits, 0);

    // One job goes; the limiter holds the rest.
    let taken = q
        .take(&TakeRequest {
            max: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(taken.jobs.len(), 1);
    let slow = status(q.clone()).await;
    assert_eq!(slow.rate_limited_waits, 1);
    assert!(slow.held_until_ms.is_some());
    assert_eq!(q.stats().await.unwrap().get("rate_limited"), Some(&1));
    // Held: a take finds nothing to do and counts nothing more.
    let taken = q
        .take(&TakeRequest {
            max: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(taken.jobs.is_empty());
    assert_eq!(status(q.clone()).await.rate_limited_waits, 1);
}
