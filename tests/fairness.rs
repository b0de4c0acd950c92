//! Many tenants on shared workers: a slow endpoint or a backlog of one app
//! does not hold up another; the cost does not grow with the number of
//! apps; breakers and rate limits are held by the whole fleet.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::*;
use serde_json::json;
use wasmhook::breaker::State;
use wasmhook::producer::Producer;
use wasmhook::service::Mode;

const WAIT: Duration = Duration::from_secs(30);

/// These tests load the machine and some count requests over time: one at a
/// time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn events(n: usize, channel: &str) -> Vec<serde_json::Value> {
    (0..n)
        .map(|i| json!({"name": "client_event", "channel": format!("{channel}-{i}")}))
        .collect()
}

async fn send_all(producer: &Producer, app: &str, events: Vec<serde_json::Value>) -> Vec<String> {
    let mut ids = Vec::new();
    for chunk in events.chunks(1000) {
        ids.extend(producer.send_many(app, chunk.to_vec()).await.unwrap());
    }
    ids
}

/// One app with `endpoint` on a private Redis, its config written to a file
/// for worker processes, and a producer.
struct OneApp {
    text: String,
    path: std::path::PathBuf,
    producer: Producer,
    _dir: tempfile::TempDir,
}

fn one_app(redis: &RedisServer, name: &str, endpoint: &str, extra: &str) -> OneApp {
    let p = prefix(name);
    let text = config(Some(&redis.url), &p, "127.0.0.1:0", &app("app-1", endpoint)) + extra;
    let dir = tempfile::tempdir().unwrap();
    OneApp {
        path: write_config(&dir, &text),
        producer: Producer::connect(&redis.url, &p).unwrap(),
        text,
        _dir: dir,
    }
}

impl OneApp {
    /// Queues `n` events for the app; their webhook ids.
    async fn queue_events(&self, n: usize) -> HashSet<String> {
        send_all(&self.producer, "app-1", events(n, "c"))
            .await
            .into_iter()
            .collect()
    }

    fn two_workers(&self) -> Vec<tokio::process::Child> {
        vec![
            spawn_serve(&self.path, "worker"),
            spawn_serve(&self.path, "worker"),
        ]
    }
}

/// Waits until `path` has answered 200 to each of `ids`.
async fn all_delivered(rx: &Receiver, path: &str, ids: &HashSet<String>) {
    eventually("every event delivered", WAIT, async || {
        (webhook_ids(rx, path) == *ids).then_some(())
    })
    .await;
}

/// SIGTERM to each worker; each exits 0.
async fn stop_all(workers: Vec<tokio::process::Child>) {
    for mut w in workers {
        signal(&w, libc::SIGTERM);
        assert!(w.wait().await.unwrap().success());
    }
}

fn webhook_ids(rx: &Receiver, path: &str) -> HashSet<String> {
    rx.received(path)
        .iter()
        .filter(|r| r.status == 200)
        .map(|r| r.header("webhook-id").to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_endpoint_holds_only_its_own_slots_and_another_app_flows_past() {
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start();
    let rx = Receiver::start().await;
    rx.delay("slow", Duration::from_secs(3));
    let p = prefix("slow");
    let apps = app("noisy", &standard_endpoint(&rx.url("slow")))
        + &app("quiet", &standard_endpoint(&rx.url("fast")));
    let text = config(Some(&redis.url), &p, "127.0.0.1:0", &apps)
        .replace("timeout = \"1s\"", "timeout = \"5s\"")
        .replace(
            "visibility_timeout = \"3s\"",
            "visibility_timeout = \"10s\"",
        );
    let producer = Producer::connect(&redis.url, &p).unwrap();
    send_all(&producer, "noisy", events(500, "n")).await;
    let wh = Running::start(&text, Mode::Worker).await;
    // The noisy app's slow requests are under way before the quiet app sends.
    eventually("the slow endpoint busy", WAIT, async || {
        (rx.arrived("slow") >= 16).then_some(())
    })
    .await;
    let quiet = send_all(&producer, "quiet", events(20, "q")).await;

    let mut most_in_flight = 0;
    eventually("the quiet app's 20 events", WAIT, async || {
        most_in_flight = most_in_flight.max(rx.arrived("slow") - rx.received("slow").len());
        (webhook_ids(&rx, "fast").len() == 20).then_some(())
    })
    .await;
    assert_eq!(webhook_ids(&rx, "fast"), quiet.into_iter().collect());
    let slow_done = rx.received("slow").len();
    assert!(
        slow_done <= 64,
        "the quiet app was served while the noisy backlog drained ({slow_done} of 500 done)"
    );
    assert!(
        most_in_flight <= 16,
        "the slow endpoint never holds more than its max_in_flight: {most_in_flight}"
    );
    assert!(rx.arrived("slow") <= 32, "{}", rx.arrived("slow"));
    // The rest of the noisy backlog waits in the queue, not in the worker.
    let q = queue(&text);
    let d = q.depth().await.unwrap();
    assert!(d.ready >= 400, "{d:?}");
    wh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_apps_backlog_does_not_delay_another_apps_fresh_event() {
    backlog_and_fresh_event(1).await;
}

/// The same with the queue in 4 shards: the two apps in different ones
/// (takes visit the shards in turn).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_apps_backlog_does_not_delay_another_apps_fresh_event_in_another_shard() {
    use wasmhook::queue::keys::shard_of;
    assert_ne!(shard_of("bulk", 4), shard_of("fresh", 4));
    backlog_and_fresh_event(4).await;
}

async fn backlog_and_fresh_event(shards: usize) {
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start();
    let rx = Receiver::start().await;
    let p = prefix("backlog");
    let apps = app("bulk", &standard_endpoint(&rx.url("bulk")))
        + &app("fresh", &standard_endpoint(&rx.url("fresh")));
    let text = config_with(
        &format!("url = \"{}\"\nshards = {shards}\n", redis.url),
        &p,
        "127.0.0.1:0",
        &apps,
    );
    let producer = Producer::from_settings(&settings(&text)).unwrap();
    send_all(&producer, "bulk", events(20_000, "b")).await;
    let id = producer
        .send("fresh", json!({"name": "client_event", "channel": "f"}))
        .await
        .unwrap();
    let wh = Running::start(&text, Mode::Worker).await;
    let got = rx.wait_for("fresh", 1, WAIT).await;
    let bulk_done = rx.received("bulk").len();
    assert_eq!(got[0].header("webhook-id"), id);
    assert!(
        bulk_done < 10_000,
        "the fresh event came before half the backlog: {bulk_done} of 20000 were delivered before it"
    );
    wh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_thousand_apps_cost_the_same_connections_and_nothing_at_rest() {
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start();
    let rx = Receiver::start().await;
    let p = prefix("many");
    let dir = tempfile::tempdir().unwrap();
    let producer = Producer::connect(&redis.url, &p).unwrap();
    let apps = |n: usize| -> String {
        (0..n)
            .map(|i| app(&format!("app-{i}"), &standard_endpoint(&rx.url("many"))))
            .collect()
    };
    let with_apps = |n: usize| {
        config(Some(&redis.url), &p, "127.0.0.1:0", &apps(n))
            .replace("idle_poll = \"200ms\"", "idle_poll = \"2s\"")
    };
    // One app.
    let one = write_config(&dir, &with_apps(1));
    let mut worker = spawn_serve(&one, "worker");
    producer
        .send("app-0", json!({"name": "client_event", "channel": "c"}))
        .await
        .unwrap();
    rx.wait_for("many", 1, WAIT).await;
    let rest_one = at_rest(&redis).await;
    let running = redis_clients(&redis);
    signal(&worker, libc::SIGTERM);
    assert!(worker.wait().await.unwrap().success());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let base = redis_clients(&redis);
    let with_one = running - base;

    // 5,000 apps, one event each.
    let many = dir.path().join("many.toml");
    std::fs::write(&many, with_apps(5000)).unwrap();
    // One info line per delivery would be 5,000 lines of test output.
    let mut worker = spawn_serve_logging(&many, "worker", "warn");
    let mut ids: HashSet<String> = webhook_ids(&rx, "many");
    for i in 0..5000 {
        let app = format!("app-{i}");
        ids.insert(
            producer
                .send(&app, json!({"name": "client_event", "channel": "c"}))
                .await
                .unwrap(),
        );
    }
    eventually("5,001 deliveries", Duration::from_secs(120), async || {
        (webhook_ids(&rx, "many") == ids).then_some(())
    })
    .await;
    let with_many = redis_clients(&redis) - base;
    assert_eq!(
        with_many, with_one,
        "a worker's Redis connections do not depend on the number of apps"
    );
    assert!(with_one <= 4, "a small constant: {with_one}");

    // At rest, 5,000 idle apps cost what one does: the worker waits on the
    // doorbell and looks for work every idle_poll (2 s); a look is one script
    // of about ten commands, whatever the number of apps.
    let rest_many = at_rest(&redis).await;
    assert!(
        rest_many <= rest_one + 15 && rest_many <= 45,
        "commands in 4 s at rest: {rest_many} with 5,000 apps, {rest_one} with one"
    );
    signal(&worker, libc::SIGTERM);
    assert!(worker.wait().await.unwrap().success());
}

/// Commands Redis runs in 4 s (those inside scripts included), after things
/// settle.
async fn at_rest(redis: &RedisServer) -> u64 {
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = commands_processed(redis);
    tokio::time::sleep(Duration::from_secs(4)).await;
    commands_processed(redis) - before - 1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_breaker_stops_every_worker_until_a_probe_succeeds() {
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start();
    let rx = Receiver::start().await;
    rx.script("down", &[], 500);
    let endpoint = standard_endpoint(&rx.url("down"))
        + "retry = { schedule = [\"0ms\", \"100ms\", \"100ms\", \"100ms\", \"100ms\", \"100ms\", \"100ms\", \"100ms\", \"100ms\", \"100ms\", \"100ms\", \"100ms\"] }\n";
    let breaker = "\n[delivery.breaker]\nfailure_rate = 0.5\nmin_requests = 6\nwindow = \"30s\"\ncool_down = \"3s\"\n";
    let one = one_app(&redis, "breaker", &endpoint, breaker);
    let workers = one.two_workers();
    let ids = one.queue_events(8).await;

    let q = queue(&one.text);
    let settings = settings(&one.text);
    let ep = settings.apps.get("app-1").unwrap().endpoints[0].id.clone();
    let which = [("app-1".to_string(), ep.clone())];
    eventually("the breaker open", WAIT, async || {
        let s = q.endpoints(&which).await.unwrap();
        (s[0].state == State::Open).then_some(())
    })
    .await;
    // Requests already on the wire may still land; then nothing, from either
    // worker, for the rest of the cool-down.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let at_open = rx.arrived("down");
    let (ok, out, err) = run_cli(&one.path, &["endpoints"]).await;
    assert!(ok, "{err}");
    assert!(out.contains("open"), "{out}");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(
        rx.arrived("down"),
        at_open,
        "no request reaches an open endpoint"
    );
    let status = q.endpoints(&which).await.unwrap().remove(0);
    assert_eq!(status.state, State::Open);
    assert!(status.failures >= 3, "{status:?}");
    assert_eq!(q.depth().await.unwrap().dead, 0, "nothing dead-lettered");

    // The receiver recovers: the probe after the cool-down closes the breaker
    // and every event arrives.
    rx.script("down", &[], 200);
    all_delivered(&rx, "down", &ids).await;
    assert_eq!(q.endpoints(&which).await.unwrap()[0].state, State::Closed);
    let attempts = rx.arrived("down");
    assert!(
        attempts < 8 * 12,
        "the open breaker did not use up the retry schedules: {attempts} requests"
    );
    assert_eq!(q.depth().await.unwrap().dead, 0);
    stop_all(workers).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limit_holds_across_two_workers_and_loses_nothing() {
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start();
    let rx = Receiver::start().await;
    let endpoint = standard_endpoint(&rx.url("limited")) + "rate_limit = \"20/s\"\n";
    let one = one_app(&redis, "rate", &endpoint, "");
    let ids = one.queue_events(100).await;
    let workers = one.two_workers();
    all_delivered(&rx, "limited", &ids).await;
    let mut at: Vec<_> = rx.received("limited").iter().map(|r| r.at).collect();
    at.sort();
    // 20/s with a burst of 2: in any two seconds at most 2 + 40 requests are
    // let go; +10% for the time between letting one go and its arrival.
    let most = at
        .iter()
        .enumerate()
        .map(|(i, t)| {
            at[i..]
                .iter()
                .take_while(|u| **u - *t < Duration::from_secs(2))
                .count()
        })
        .max()
        .unwrap();
    assert!(most <= 48, "{most} requests within 2 s");
    let span = *at.last().unwrap() - at[0];
    assert!(
        span >= Duration::from_millis(4400),
        "100 requests at 20/s take at least ~4.9 s: {span:?}"
    );
    let q = queue(&one.text);
    assert_eq!(q.depth().await.unwrap().dead, 0);
    assert_eq!(rx.received("limited").len(), 100, "each exactly once");
    stop_all(workers).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_slows_an_endpoint_down_for_every_worker() {
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start();
    let rx = Receiver::start().await;
    rx.script("busy", &[429], 200);
    rx.retry_after("busy", "2");
    let endpoint = standard_endpoint(&rx.url("busy")) + "max_in_flight = 1\n";
    let one = one_app(&redis, "slowdown", &endpoint, "");
    let ids = one.queue_events(10).await;
    let workers = one.two_workers();
    all_delivered(&rx, "busy", &ids).await;
    let got = rx.received("busy");
    let first = got.iter().find(|r| r.status == 429).unwrap();
    // Requests answered before the 429 was recorded may land right after it;
    // the worker that did not get it waits too.
    let after: Vec<_> = got
        .iter()
        .filter(|r| r.at > first.at + Duration::from_millis(300))
        .collect();
    assert!(!after.is_empty());
    assert!(
        after
            .iter()
            .all(|r| r.at >= first.at + Duration::from_millis(1900)),
        "nothing went to the endpoint while it asked to wait"
    );
    stop_all(workers).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_a_fair_share_run_loses_nothing() {
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start();
    let rx = Receiver::start().await;
    rx.delay("a", Duration::from_millis(5));
    rx.delay("b", Duration::from_millis(5));
    let p = prefix("fairkill");
    let apps = app("app-a", &standard_endpoint(&rx.url("a")))
        + &app("app-b", &standard_endpoint(&rx.url("b")))
        + &app(
            "app-c",
            &(standard_endpoint(&rx.url("a")) + &standard_endpoint(&rx.url("b"))),
        );
    let text = config(Some(&redis.url), &p, "127.0.0.1:0", &apps);
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(&dir, &text);
    let producer = Producer::connect(&redis.url, &p).unwrap();
    let mut want_a: HashSet<String> = HashSet::new();
    let mut want_b: HashSet<String> = HashSet::new();
    want_a.extend(send_all(&producer, "app-a", events(400, "a")).await);
    want_b.extend(send_all(&producer, "app-b", events(400, "b")).await);
    let fanned = send_all(&producer, "app-c", events(200, "c")).await;
    want_a.extend(fanned.iter().cloned());
    want_b.extend(fanned);

    let mut worker = spawn_serve(&path, "worker");
    eventually("deliveries under way", WAIT, async || {
        (rx.received("a").len() + rx.received("b").len() >= 200).then_some(())
    })
    .await;
    signal(&worker, libc::SIGKILL);
    worker.wait().await.unwrap();
    assert!(rx.received("a").len() + rx.received("b").len() < 1200);

    let mut worker = spawn_serve(&path, "worker");
    eventually("every event at every endpoint", WAIT, async || {
        (webhook_ids(&rx, "a") == want_a && webhook_ids(&rx, "b") == want_b).then_some(())
    })
    .await;
    for r in rx.received("a").iter().take(10) {
        verify_standard(r, WHSEC);
    }
    let q = queue(&text);
    let d = q.depth().await.unwrap();
    assert_eq!((d.ready, d.delayed, d.dead), (0, 0, 0), "{d:?}");
    signal(&worker, libc::SIGTERM);
    assert!(worker.wait().await.unwrap().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_queue_is_fair_too() {
    let _serial = SERIAL.lock().await;
    let rx = Receiver::start().await;
    rx.delay("slow", Duration::from_secs(2));
    let apps = app("noisy", &standard_endpoint(&rx.url("slow")))
        + &app("quiet", &standard_endpoint(&rx.url("fast")));
    let text = config(None, "unused", "127.0.0.1:0", &apps)
        .replace("timeout = \"1s\"", "timeout = \"5s\"")
        .replace(
            "visibility_timeout = \"3s\"",
            "visibility_timeout = \"10s\"",
        );
    let wh = Running::start(&text, Mode::All).await;
    let body = json!({"events": events(100, "n")}).to_string();
    let (status, _) = post_events(&wh.ingest, "noisy", Some("noisy-token"), body).await;
    assert_eq!(status, 202);
    eventually("the slow endpoint busy", WAIT, async || {
        (rx.arrived("slow") >= 16).then_some(())
    })
    .await;
    let body = json!({"events": events(5, "q")}).to_string();
    let (status, _) = post_events(&wh.ingest, "quiet", Some("quiet-token"), body).await;
    assert_eq!(status, 202);
    rx.wait_for("fast", 5, WAIT).await;
    assert!(rx.received("slow").len() <= 32);
    assert!(rx.arrived("slow") <= 32, "{}", rx.arrived("slow"));
    wh.shutdown().await;
}
