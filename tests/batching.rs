//! Batched delivery: an endpoint with `batch = { max_events, max_wait }` gets
//! one app's events together in one request, signed as one webhook, each
//! event exactly once; a failed batch is retried whole, a refused one
//! dead-letters each of its events, and a batch whose worker dies is sent
//! again by another.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};
use wasmhook::service::Mode;

const WAIT: Duration = Duration::from_secs(30);

/// The endpoint text with a `batch` line.
fn batched(endpoint: String, max_events: usize, max_wait: &str) -> String {
    endpoint + &format!("batch = {{ max_events = {max_events}, max_wait = \"{max_wait}\" }}\n")
}

/// An app with a secret of its own (the harness's `app` shares one).
fn app_with_secret(id: &str, secret: &str, webhooks: &str) -> String {
    format!(
        "\n[[apps]]\nid = \"{id}\"\nkey = \"{id}-key\"\nsecret = \"{secret}\"\ningest_token = \"{id}-token\"\n{webhooks}\n"
    )
}

/// `n` events numbered from `from` in a `seq` field, with `extra` fields.
fn numbered(from: u64, n: u64, extra: Value) -> Vec<Value> {
    (from..from + n)
        .map(|i| {
            let mut e = json!({"name": "client_event", "channel": "c", "seq": i});
            for (k, v) in extra.as_object().unwrap() {
                e[k] = v.clone();
            }
            e
        })
        .collect()
}

/// Posts `events` to the ingest in one request; the ids it answered.
async fn post(ingest: &str, app_id: &str, events: Vec<Value>) -> Vec<String> {
    let (status, body) = post_events(
        ingest,
        app_id,
        Some(&format!("{app_id}-token")),
        json!({ "events": events }).to_string(),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    let ids = body["ids"].as_array().unwrap();
    ids.iter()
        .map(|id| id.as_str().unwrap().to_string())
        .collect()
}

/// The events one batched request carries, each as the producer sent it:
/// `pusher` `{"time_ms", "events": [...]}`, `standard` `{"type": "batch",
/// "data": [{"id", "type", "timestamp", "data": event}, ...]}`, `raw` `[...]`.
fn events_of(r: &Received) -> Vec<Value> {
    match r.json() {
        Value::Array(events) => events,
        Value::Object(mut body) if body.get("type") == Some(&json!("batch")) => {
            let Some(Value::Array(members)) = body.remove("data") else {
                panic!("a standard batch's `data` is an array")
            };
            members.into_iter().map(|mut m| m["data"].take()).collect()
        }
        Value::Object(mut body) => match body.remove("events") {
            Some(Value::Array(events)) => events,
            _ => panic!("not a batch: {}", String::from_utf8_lossy(&r.body)),
        },
        other => panic!("not a batch: {other}"),
    }
}

fn seq(event: &Value) -> u64 {
    event["seq"].as_u64().expect("every event carries its seq")
}

/// Every `seq` in these requests, sorted (a repeat shows twice).
fn seqs<'a>(got: impl IntoIterator<Item = &'a Received>) -> Vec<u64> {
    let mut all: Vec<u64> = got
        .into_iter()
        .flat_map(events_of)
        .map(|e| seq(&e))
        .collect();
    all.sort();
    all
}

fn upto(n: u64) -> Vec<u64> {
    (0..n).collect()
}

/// Config of `app-1` with these endpoints, on `redis`.
fn app_config(redis: &RedisServer, name: &str, endpoints: &str) -> String {
    config(
        Some(&redis.url),
        &prefix(name),
        "127.0.0.1:0",
        &app("app-1", endpoints),
    )
}

/// A standard batch's member ids (`msg_...`), in order.
fn member_ids(r: &Received) -> Vec<String> {
    let body = r.json();
    let members = body["data"].as_array().expect("a standard batch");
    members
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect()
}

/// Waits until `n` events have arrived at `path`, then a while past
/// `max_wait` so that a late repeat would show; every request.
async fn settled(rx: &Receiver, path: &str, n: usize) -> Vec<Received> {
    eventually(&format!("{n} events at {path}"), WAIT, async || {
        let got = rx.received(path);
        (got.iter().map(|r| events_of(r).len()).sum::<usize>() >= n).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    rx.received(path)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_events_arrive_in_about_ten_batches_each_exactly_once() {
    let redis = RedisServer::start();
    let rx = Receiver::start().await;
    let endpoint = batched(pusher_endpoint(&rx.url("hook")), 100, "1s");
    let text = app_config(&redis, "batch-1000", &endpoint);
    let wh = Running::start(&text, Mode::All).await;
    for chunk in 0..10 {
        post(&wh.ingest, "app-1", numbered(chunk * 100, 100, json!({}))).await;
    }

    let got = settled(&rx, "hook", 1000).await;
    assert!(got.len() <= 15, "1,000 events in {} requests", got.len());
    for r in &got {
        verify_pusher(r, "app-1-key", APP_SECRET);
        assert!(r.json()["time_ms"].as_u64().unwrap() > 1_700_000_000_000);
        let n = events_of(r).len();
        assert!((1..=100).contains(&n), "{n} events in one request");
    }
    assert_eq!(seqs(&got), upto(1000), "each event exactly once");
    // Nothing of the batches is left: no job bodies, no forming deadline.
    let p = prefix("batch-1000");
    let mut conn = redis.conn();
    eventually("the batches' outcomes recorded", WAIT, async || {
        let bodies: usize = redis::cmd("HLEN")
            .arg(format!("{p}:{{0}}:jobs"))
            .query(&mut conn)
            .unwrap();
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{p}:{{0}}:ep:*"))
            .query(&mut conn)
            .unwrap();
        let mut forming = 0;
        for k in &keys {
            let due: Option<String> = redis::cmd("HGET")
                .arg(k)
                .arg("bdue")
                .query(&mut conn)
                .unwrap();
            forming += usize::from(due.is_some());
        }
        (bodies == 0 && forming == 0).then_some(())
    })
    .await;
    wh.shutdown().await;
}

/// Two apps whose batched endpoints are the same URL (so the same endpoint
/// id): each request is one app's, signed with that app's secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_apps_never_share_a_batch() {
    let redis = RedisServer::start();
    let rx = Receiver::start().await;
    let secrets = [("app-a", "secret-of-a"), ("app-b", "secret-of-b")];
    let apps: String = secrets
        .iter()
        .map(|(id, secret)| {
            app_with_secret(
                id,
                secret,
                &batched(pusher_endpoint(&rx.url("shared")), 100, "1s"),
            )
        })
        .collect();
    let text = config(
        Some(&redis.url),
        &prefix("batch-apps"),
        "127.0.0.1:0",
        &apps,
    );
    let wh = Running::start(&text, Mode::All).await;
    // Interleaved: 20 of one app, 20 of the other, five times over.
    for chunk in 0..5 {
        for (id, _) in secrets {
            post(
                &wh.ingest,
                id,
                numbered(chunk * 20, 20, json!({ "app": id })),
            )
            .await;
        }
    }

    let got = settled(&rx, "shared", 200).await;
    assert!(
        got.len() <= 20,
        "batched: {} requests for 200 events",
        got.len()
    );
    let mut seen: Vec<(String, u64)> = Vec::new();
    for r in &got {
        let key = r.header("x-pusher-key");
        let (id, secret) = secrets
            .iter()
            .find(|(id, _)| key == format!("{id}-key"))
            .unwrap_or_else(|| panic!("X-Pusher-Key {key:?} names no app"));
        verify_pusher(r, key, secret);
        for e in events_of(r) {
            assert_eq!(e["app"], *id, "an event of another app in {id}'s batch");
            seen.push((id.to_string(), seq(&e)));
        }
    }
    seen.sort();
    let want: Vec<(String, u64)> = secrets
        .iter()
        .flat_map(|(id, _)| (0..100).map(move |i| (id.to_string(), i)))
        .collect();
    assert_eq!(seen, want, "every event of both apps exactly once");
    wh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_batch_is_redelivered_whole_once() {
    let redis = RedisServer::start();
    let rx = Receiver::start().await;
    rx.script("flaky", &[500], 200);
    // The 50 events make a full batch at once; max_wait is only a backstop.
    let endpoint = batched(standard_endpoint(&rx.url("flaky")), 50, "2s")
        + "retry = { schedule = [\"0ms\", \"100ms\", \"100ms\"] }\n";
    let text = app_config(&redis, "batch-retry", &endpoint);
    let wh = Running::start(&text, Mode::All).await;
    let ids = post(&wh.ingest, "app-1", numbered(0, 50, json!({}))).await;

    rx.wait_for("flaky", 2, WAIT).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let got = rx.received("flaky");
    assert_eq!(got.len(), 2, "one failure, one retry, nothing after");
    assert_eq!((got[0].status, got[1].status), (500, 200));
    for r in &got {
        verify_standard_id(r, WHSEC, "batch_");
        assert_eq!(r.json()["type"], "batch");
    }
    assert_eq!(
        got[0].header("webhook-id"),
        got[1].header("webhook-id"),
        "the retry keeps the batch's id"
    );
    assert_eq!(
        member_ids(&got[0]),
        member_ids(&got[1]),
        "the same members, in the same order"
    );
    assert_eq!(got[0].json()["data"], got[1].json()["data"]);
    assert_eq!(got[0].body, got[1].body, "the retry sends the same bytes");
    let members: HashSet<String> = member_ids(&got[1]).into_iter().collect();
    assert_eq!(
        members,
        ids.into_iter().collect::<HashSet<String>>(),
        "the 50 events, by their webhook ids"
    );
    assert_eq!(seqs([&got[1]]), upto(50));
    for m in got[1].json()["data"].as_array().unwrap() {
        assert_eq!(m["type"], "client_event");
        assert!(m["timestamp"].as_str().unwrap().ends_with('Z'));
    }
    wh.shutdown().await;
}

/// A 400 for a batch: each of its events is dead-lettered on its own, at
/// once, saying it went in a batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_batch_dead_letters_each_of_its_events() {
    let redis = RedisServer::start();
    let rx = Receiver::start().await;
    rx.script("strict", &[], 400);
    let endpoint = batched(pusher_endpoint(&rx.url("strict")), 10, "1s");
    let text = app_config(&redis, "batch-400", &endpoint);
    let wh = Running::start(&text, Mode::All).await;
    let ids = post(&wh.ingest, "app-1", numbered(0, 10, json!({}))).await;

    let q = queue(&text);
    dead_letters(&q, 10).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let letters = q.dead_letters(100).await.unwrap();
    assert_eq!(letters.len(), 10, "one dead letter per event");
    let mut lettered = HashSet::new();
    for (_, letter) in &letters {
        assert!(letter.reason.contains("batch"), "{}", letter.reason);
        assert_eq!(letter.status, Some(400));
        assert_eq!(letter.attempts, 1, "a permanent failure is not retried");
        lettered.insert(letter.job.as_ref().unwrap().id.clone());
    }
    assert_eq!(lettered, ids.into_iter().collect::<HashSet<String>>());
    assert_eq!(
        seqs(&rx.received("strict")),
        upto(10),
        "each event sent once"
    );
    wh.shutdown().await;
}

/// The first worker process is SIGKILLed while its batch is held by the
/// receiver: nothing was acknowledged, so after the visibility timeout the
/// restarted worker sends every event, those of the killed batch included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_in_flight_when_its_worker_is_killed_is_delivered_again() {
    let redis = RedisServer::start();
    let rx = Receiver::start().await;
    // Far longer than it takes to kill the worker: it never gets an answer.
    rx.delay("slow", Duration::from_secs(20));
    let p = prefix("batch-kill");
    let endpoint = batched(
        pusher_endpoint(&rx.url("slow")) + "timeout = \"3s\"\n",
        50,
        "1s",
    );
    let text = app_config(&redis, "batch-kill", &endpoint)
        .replace("visibility_timeout = \"3s\"", "visibility_timeout = \"5s\"");
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(&dir, &text);
    let producer = wasmhook::producer::Producer::connect(&redis.url, &p).unwrap();
    let ids = producer
        .send_many("app-1", numbered(0, 100, json!({})))
        .await
        .unwrap();
    assert_eq!(ids.len(), 100);

    let mut first = spawn_serve(&path, "worker");
    eventually("a batch on the wire", WAIT, async || {
        (rx.arrived("slow") >= 1).then_some(())
    })
    .await;
    signal(&first, libc::SIGKILL);
    first.wait().await.unwrap();
    assert!(
        rx.received("slow").is_empty(),
        "the killed worker had no answer"
    );
    // Whatever the dead worker had on the wire has reached the receiver.
    tokio::time::sleep(Duration::from_millis(300)).await;
    rx.delay("slow", Duration::ZERO);
    let restarted = Instant::now();

    let mut second = spawn_serve(&path, "worker");
    let after = eventually("every event sent again", WAIT, async || {
        let got = rx.received("slow").into_iter();
        let after: Vec<Received> = got
            .filter(|r| r.at > restarted && r.status == 200)
            .collect();
        let seen: HashSet<u64> = seqs(&after).into_iter().collect();
        (seen.len() == 100).then_some(after)
    })
    .await;
    for r in &after {
        verify_pusher(r, "app-1-key", APP_SECRET);
        assert!(events_of(r).len() <= 50);
    }
    let mut seen = seqs(&after);
    seen.dedup();
    assert_eq!(seen, upto(100), "every event, the killed batch's too");
    signal(&second, libc::SIGTERM);
    assert!(second.wait().await.unwrap().success());
}

/// A worker SIGKILLed while a batch is forming (its events routed and
/// waiting for `max_wait`) loses nothing: the batch is only events in the
/// queue, and the next worker sends it, each event once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_while_a_batch_forms_loses_nothing() {
    let redis = RedisServer::start();
    let rx = Receiver::start().await;
    let p = prefix("batch-forming");
    let endpoint = batched(pusher_endpoint(&rx.url("forming")), 100, "3s");
    let text = app_config(&redis, "batch-forming", &endpoint);
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(&dir, &text);
    let producer = wasmhook::producer::Producer::connect(&redis.url, &p).unwrap();
    producer
        .send_many("app-1", numbered(0, 30, json!({})))
        .await
        .unwrap();

    let mut first = spawn_serve(&path, "worker");
    let q = queue(&text);
    eventually("30 events routed to the forming batch", WAIT, async || {
        let parked = q.stats().await.unwrap().get("parked").copied();
        (parked == Some(30)).then_some(())
    })
    .await;
    signal(&first, libc::SIGKILL);
    first.wait().await.unwrap();
    assert_eq!(rx.arrived("forming"), 0, "the batch had not gone yet");

    let mut second = spawn_serve(&path, "worker");
    let got = settled(&rx, "forming", 30).await;
    assert_eq!(got.len(), 1, "one batch");
    verify_pusher(&got[0], "app-1-key", APP_SECRET);
    assert_eq!(seqs(&got), upto(30), "each event once");
    signal(&second, libc::SIGTERM);
    assert!(second.wait().await.unwrap().success());
}

/// Events of about 1 KiB with `max_batch_bytes = 8192`: several requests,
/// none over the limit, each event once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_never_exceeds_max_batch_bytes() {
    let redis = RedisServer::start();
    let rx = Receiver::start().await;
    let endpoint =
        batched(pusher_endpoint(&rx.url("hook")), 100, "1s") + "max_batch_bytes = 8192\n";
    let text = app_config(&redis, "batch-bytes", &endpoint);
    let wh = Running::start(&text, Mode::All).await;
    post(
        &wh.ingest,
        "app-1",
        numbered(0, 100, json!({ "pad": "x".repeat(1000) })),
    )
    .await;

    let got = settled(&rx, "hook", 100).await;
    assert!(
        got.len() > 1,
        "100 KiB of events do not fit one 8 KiB batch"
    );
    // Batched all the same: several events per request on average.
    assert!(got.len() <= 34, "{} requests for 100 events", got.len());
    for r in &got {
        verify_pusher(r, "app-1-key", APP_SECRET);
        assert!(r.body.len() <= 8192, "a request of {} bytes", r.body.len());
        assert!(events_of(r).len() <= 100);
    }
    assert_eq!(seqs(&got), upto(100), "each event exactly once");
    wh.shutdown().await;
}

/// Without Redis: a `pusher` and a `raw` endpoint, both batched, each get
/// every event once in a handful of requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batching_works_on_the_embedded_queue() {
    let rx = Receiver::start().await;
    let raw = format!(
        "\n[[apps.webhooks]]\nurl = \"{}\"\nscheme = \"raw\"\n",
        rx.url("raw")
    );
    let endpoints = batched(pusher_endpoint(&rx.url("pusher")), 50, "1s") + &batched(raw, 50, "1s");
    let text = config(None, "unused", "127.0.0.1:0", &app("app-1", &endpoints));
    let wh = Running::start(&text, Mode::All).await;
    for chunk in 0..4 {
        post(&wh.ingest, "app-1", numbered(chunk * 50, 50, json!({}))).await;
    }

    for path in ["pusher", "raw"] {
        let got = settled(&rx, path, 200).await;
        assert!(
            got.len() <= 7,
            "{path}: 200 events in {} requests",
            got.len()
        );
        for r in &got {
            assert!(events_of(r).len() <= 50);
            if path == "pusher" {
                verify_pusher(r, "app-1-key", APP_SECRET);
            } else {
                assert!(r.json().is_array(), "a raw batch is an array of events");
            }
        }
        assert_eq!(seqs(&got), upto(200), "{path}: each event exactly once");
    }
    wh.shutdown().await;
}
