//! Delivery end to end through a real Redis and a real receiver, with
//! wasmhook running in this process.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;
use wasmhook::event::{Event, Job, now_ms};
use wasmhook::service::Mode;

const WAIT: Duration = Duration::from_secs(15);

on_each_backend!(
    delivers_to_pusher_and_standard_endpoints_with_verifiable_signatures,
    a_500_is_retried_and_delivered_on_the_second_attempt,
    a_400_is_dead_lettered_at_once_and_replay_delivers_it_with_the_same_id,
    when_one_endpoint_fails_the_other_gets_the_event_exactly_once,
    a_malformed_inbox_entry_is_dead_lettered_and_the_next_job_still_flows,
);

/// Runs wasmhook on `text`: one event of `app-1` arrives at the receiver's
/// `hook`, signed with the app's secret.
async fn one_event_arrives(text: &str, rx: &Receiver) {
    let wh = Running::start(text, Mode::All).await;
    send(
        &wh.ingest,
        "app-1",
        json!({"name": "client_event", "channel": "c"}),
    )
    .await;
    let got = rx.wait_for("hook", 1, WAIT).await;
    verify_pusher(&got[0], "app-1-key", APP_SECRET);
    wh.shutdown().await;
}

async fn send(ingest: &str, app: &str, event: serde_json::Value) -> String {
    let (status, body) = post_events(
        ingest,
        app,
        Some(&format!("{app}-token")),
        event.to_string(),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    body["ids"][0].as_str().unwrap().to_string()
}

async fn delivers_to_pusher_and_standard_endpoints_with_verifiable_signatures(redis: Backend) {
    let rx = Receiver::start().await;
    let endpoints = pusher_endpoint(&rx.url("pusher")) + &standard_endpoint(&rx.url("std"));
    let text = redis.config(&prefix("both"), "127.0.0.1:0", &app("app-1", &endpoints));
    let wh = Running::start(&text, Mode::All).await;

    let event = json!({"name": "client_event", "channel": "private-orders", "event": "client-typing", "data": "{\"order\":17}", "socket_id": "123.456"});
    let id = send(&wh.ingest, "app-1", event.clone()).await;

    let pusher = rx.wait_for("pusher", 1, WAIT).await;
    verify_pusher(&pusher[0], "app-1-key", APP_SECRET);
    let body = pusher[0].json();
    assert_eq!(
        body["events"][0], event,
        "Pusher body carries the event as sent"
    );
    assert!(body["time_ms"].as_u64().unwrap() > 1_700_000_000_000);

    let standard = rx.wait_for("std", 1, WAIT).await;
    verify_standard(&standard[0], WHSEC);
    assert_eq!(
        standard[0].header("webhook-id"),
        id,
        "webhook-id is the id the ingest answered"
    );
    let body = standard[0].json();
    assert_eq!(body["type"], "client_event");
    assert_eq!(body["data"], event);
    assert!(body["timestamp"].as_str().unwrap().ends_with('Z'));
    assert!(standard[0].header("user-agent").starts_with("wasmhook/"));

    // Exactly once each, and the queue is left empty.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(rx.received("pusher").len(), 1);
    assert_eq!(rx.received("std").len(), 1);
    let q = queue(&text);
    // The outcomes are committed just after the receiver answers.
    let depth = eventually("both committed", WAIT, async || {
        let d = q.depth().await.unwrap();
        (d.in_flight == 0).then_some(d)
    })
    .await;
    assert_eq!(
        (depth.ready, depth.in_flight, depth.delayed, depth.dead),
        (0, 0, 0, 0)
    );
    wh.shutdown().await;
}

async fn a_500_is_retried_and_delivered_on_the_second_attempt(redis: Backend) {
    let rx = Receiver::start().await;
    rx.script("flaky", &[500], 200);
    let text = redis.config(
        &prefix("retry"),
        "127.0.0.1:0",
        &app("app-1", &standard_endpoint(&rx.url("flaky"))),
    );
    let wh = Running::start(&text, Mode::All).await;

    let id = send(
        &wh.ingest,
        "app-1",
        json!({"name": "channel_occupied", "channel": "c"}),
    )
    .await;
    let got = rx.wait_for("flaky", 2, WAIT).await;
    assert_eq!(got[0].status, 500);
    assert_eq!(got[1].status, 200);
    assert_eq!(got[0].header("webhook-id"), id);
    assert_eq!(
        got[1].header("webhook-id"),
        id,
        "the retry keeps the webhook id"
    );
    assert_eq!(got[0].body, got[1].body, "the retry sends the same bytes");
    verify_standard(&got[1], WHSEC);

    let q = queue(&text);
    let stats = eventually("outcome recorded", WAIT, async || {
        let s = q.stats().await.unwrap();
        (s.get("delivered") == Some(&1)).then_some(s)
    })
    .await;
    assert_eq!(stats.get("retried"), Some(&1));
    assert_eq!(stats.get("dead"), None);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        rx.received("flaky").len(),
        2,
        "one success, nothing after it"
    );
    wh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_run_out_into_the_dead_letter_queue_with_every_attempt() {
    let redis = RedisServer::start();
    let rx = Receiver::start().await;
    rx.script("down", &[], 503);
    let text = config(
        Some(&redis.url),
        &prefix("exhaust"),
        "127.0.0.1:0",
        &app("app-1", &pusher_endpoint(&rx.url("down"))),
    );
    let wh = Running::start(&text, Mode::All).await;
    send(
        &wh.ingest,
        "app-1",
        json!({"name": "member_added", "channel": "presence-a", "user_id": "42"}),
    )
    .await;

    let q = queue(&text);
    let letters = dead_letters(&q, 1).await;
    assert_eq!(
        rx.received("down").len(),
        3,
        "the schedule has three attempts"
    );
    let (_, letter) = &letters[0];
    assert_eq!(letter.attempts, 3);
    assert_eq!(letter.status, Some(503));
    assert!(
        letter
            .reason
            .starts_with("gave up after 3 attempts: HTTP 503"),
        "{}",
        letter.reason
    );
    assert_eq!(letter.response_body.as_deref(), Some("receiver says hi"));
    let job = letter.job.as_ref().unwrap();
    assert_eq!(job.history.len(), 3);
    assert!(job.history.windows(2).all(|w| w[0].at_ms <= w[1].at_ms));
    assert!(job.history.iter().all(|a| a.status == Some(503)));
    wh.shutdown().await;
}

async fn a_400_is_dead_lettered_at_once_and_replay_delivers_it_with_the_same_id(redis: Backend) {
    let rx = Receiver::start().await;
    rx.script("strict", &[400], 200);
    let text = redis.config(
        &prefix("replay"),
        "127.0.0.1:0",
        &app("app-1", &standard_endpoint(&rx.url("strict"))),
    );
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(&dir, &text);
    let wh = Running::start(&text, Mode::All).await;
    let id = send(
        &wh.ingest,
        "app-1",
        json!({"name": "client_event", "channel": "c", "data": "{}"}),
    )
    .await;

    let q = queue(&text);
    let letters = dead_letters(&q, 1).await;
    assert_eq!(
        letters[0].1.attempts, 1,
        "a permanent failure is not retried"
    );
    assert!(
        letters[0]
            .1
            .reason
            .starts_with("permanent failure: HTTP 400")
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(rx.received("strict").len(), 1);

    // The CLI lists it, shows it, and replays it.
    let (ok, out, err) = run_cli(&path, &["dlq", "list", "--json"]).await;
    assert!(ok, "{err}");
    let listed: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    let dlq_id = listed["id"].as_str().unwrap().to_string();
    assert_eq!(dlq_id, letters[0].0);
    assert_eq!(listed["dead_letter"]["job"]["id"], id);
    let (ok, out, _) = run_cli(&path, &["dlq", "show", &dlq_id]).await;
    assert!(ok && out.contains("permanent failure"), "{out}");
    let (ok, out, err) = run_cli(&path, &["dlq", "replay", &dlq_id]).await;
    assert!(ok, "{err}");
    assert!(out.contains(&id), "{out}");

    let got = rx.wait_for("strict", 2, WAIT).await;
    assert_eq!(got[1].status, 200);
    assert_eq!(
        got[1].header("webhook-id"),
        id,
        "replay keeps the webhook id"
    );
    verify_standard(&got[1], WHSEC);
    eventually("dead letter gone", WAIT, async || {
        q.dead_letters(10).await.unwrap().is_empty().then_some(())
    })
    .await;
    let (ok, out, _) = run_cli(&path, &["dlq", "replay", &dlq_id]).await;
    assert!(!ok, "a replayed letter is gone: {out}");
    wh.shutdown().await;
}

async fn when_one_endpoint_fails_the_other_gets_the_event_exactly_once(redis: Backend) {
    let rx = Receiver::start().await;
    rx.script("bad", &[500, 500], 200);
    let endpoints = pusher_endpoint(&rx.url("good")) + &pusher_endpoint(&rx.url("bad"));
    let text = redis.config(&prefix("fanout"), "127.0.0.1:0", &app("app-1", &endpoints));
    let wh = Running::start(&text, Mode::All).await;
    send(
        &wh.ingest,
        "app-1",
        json!({"name": "channel_vacated", "channel": "c"}),
    )
    .await;

    let bad = rx.wait_for("bad", 3, WAIT).await;
    assert_eq!(
        bad.iter().map(|r| r.status).collect::<Vec<_>>(),
        [500, 500, 200]
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let good = rx.received("good");
    assert_eq!(
        good.len(),
        1,
        "the endpoint that succeeded never gets the event again"
    );
    assert_eq!(good[0].body, bad[2].body, "both get the same event");
    wh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_types_and_soketi_filters_pick_the_endpoints() {
    let redis = RedisServer::start();
    let rx = Receiver::start().await;
    let endpoints = format!(
        "{}event_types = [\"channel_occupied\"]\n{}filter = {{ channel_name_starts_with = \"private-\", channel_name_ends_with = \"-orders\" }}\n",
        pusher_endpoint(&rx.url("occupied")),
        pusher_endpoint(&rx.url("orders"))
    );
    let text = config(
        Some(&redis.url),
        &prefix("filters"),
        "127.0.0.1:0",
        &app("app-1", &endpoints),
    );
    let wh = Running::start(&text, Mode::All).await;
    for (name, channel) in [
        ("channel_occupied", "public-x"),
        ("client_event", "private-eu-orders"),
        ("client_event", "private-eu-users"),
        ("channel_occupied", "private-a-orders"),
    ] {
        send(
            &wh.ingest,
            "app-1",
            json!({"name": name, "channel": channel}),
        )
        .await;
    }
    rx.wait_for("occupied", 2, WAIT).await;
    rx.wait_for("orders", 2, WAIT).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let channels = |p: &str| {
        let mut c: Vec<String> = rx
            .received(p)
            .iter()
            .map(|r| {
                r.json()["events"][0]["channel"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect();
        c.sort();
        c
    };
    assert_eq!(channels("occupied"), ["private-a-orders", "public-x"]);
    assert_eq!(
        channels("orders"),
        ["private-a-orders", "private-eu-orders"]
    );
    let q = queue(&text);
    assert_eq!(q.stats().await.unwrap().get("unrouted"), Some(&1));
    wh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_is_honoured_and_410_stops_an_endpoint() {
    let redis = RedisServer::start();
    let rx = Receiver::start().await;
    rx.script("slow-down", &[429], 200);
    rx.retry_after("slow-down", "1");
    rx.script("gone", &[410], 200);
    let endpoints = format!(
        "{}event_types = [\"client_event\"]\n{}event_types = [\"cache_miss\"]\n",
        standard_endpoint(&rx.url("slow-down")),
        standard_endpoint(&rx.url("gone"))
    );
    let text = config(
        Some(&redis.url),
        &prefix("ra"),
        "127.0.0.1:0",
        &app("app-1", &endpoints),
    );
    let wh = Running::start(&text, Mode::All).await;

    send(
        &wh.ingest,
        "app-1",
        json!({"name": "client_event", "channel": "c"}),
    )
    .await;
    let got = rx.wait_for("slow-down", 2, WAIT).await;
    let t0: u64 = got[0].header("webhook-timestamp").parse().unwrap();
    let t1: u64 = got[1].header("webhook-timestamp").parse().unwrap();
    assert!(
        t1 > t0,
        "the second attempt waited for Retry-After (1 s), not the 50 ms schedule"
    );

    send(
        &wh.ingest,
        "app-1",
        json!({"name": "cache_miss", "channel": "cache-x"}),
    )
    .await;
    rx.wait_for("gone", 1, WAIT).await;
    send(
        &wh.ingest,
        "app-1",
        json!({"name": "cache_miss", "channel": "cache-y"}),
    )
    .await;
    let q = queue(&text);
    let letters = dead_letters(&q, 2).await;
    let gone = letters
        .iter()
        .find(|(_, l)| l.reason.starts_with("endpoint is gone"))
        .expect("the 410 itself");
    let stopped = letters
        .iter()
        .find(|(_, l)| l.reason == "endpoint disabled: answered 410 Gone")
        .unwrap_or_else(|| panic!("the event after it: {letters:?}"));
    assert_eq!(gone.1.status, Some(410));
    assert_eq!(
        rx.received("gone").len(),
        1,
        "nothing is sent to a gone endpoint"
    );

    let states = q
        .endpoints(&[(
            "app-1".into(),
            gone.1.job.as_ref().unwrap().endpoint.clone().unwrap(),
        )])
        .await
        .unwrap();
    assert_eq!(states[0].state, wasmhook::breaker::State::Disabled);
    let ep = states[0].endpoint.clone();
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(&dir, &text);
    let (ok, out, err) = run_cli(&path, &["endpoints"]).await;
    assert!(ok, "{err}");
    assert!(
        out.lines()
            .any(|l| l.contains(&ep) && l.contains("disabled") && l.contains("answered 410 Gone")),
        "{out}"
    );
    // Replaying enables it again: the endpoint (now answering 200) gets it.
    q.replay(&stopped.0).await.unwrap();
    let got = rx.wait_for("gone", 2, WAIT).await;
    assert_eq!(got[1].status, 200);

    // Disabled again by a 410, then enabled by hand.
    rx.script("gone", &[410], 200);
    send(
        &wh.ingest,
        "app-1",
        json!({"name": "cache_miss", "channel": "cache-z"}),
    )
    .await;
    rx.wait_for("gone", 3, WAIT).await;
    eventually("disabled again", WAIT, async || {
        let s = q.endpoints(&[("app-1".into(), ep.clone())]).await.unwrap();
        (s[0].state == wasmhook::breaker::State::Disabled).then_some(())
    })
    .await;
    let (ok, out, err) = run_cli(&path, &["endpoints", "reset", &format!("app-1/{ep}")]).await;
    assert!(ok && out.contains("reset"), "{out}{err}");
    let (ok, _, err) = run_cli(&path, &["endpoints", "reset", "app-1/nope"]).await;
    assert!(!ok && err.contains("no endpoint"), "{err}");
    send(
        &wh.ingest,
        "app-1",
        json!({"name": "cache_miss", "channel": "cache-after-reset"}),
    )
    .await;
    let got = rx.wait_for("gone", 4, WAIT).await;
    assert_eq!(got[3].status, 200, "delivered after the reset");
    wh.shutdown().await;
}

async fn a_malformed_inbox_entry_is_dead_lettered_and_the_next_job_still_flows(redis: Backend) {
    let p = prefix("malformed");
    let rx = Receiver::start().await;
    let text = redis.config(
        &p,
        "127.0.0.1:0",
        &app("app-1", &pusher_endpoint(&rx.url("hook"))),
    );
    let wh = Running::start(&text, Mode::All).await;

    let mut conn = redis.conn();
    let stream = format!("{p}:{{0}}:inbox");
    let _: String = redis::cmd("XADD")
        .arg(&stream)
        .arg("*")
        .arg("job")
        .arg("{this is not json")
        .query(&mut *conn)
        .unwrap();
    let _: String = redis::cmd("XADD")
        .arg(&stream)
        .arg("*")
        .arg("other")
        .arg("field")
        .query(&mut *conn)
        .unwrap();
    let _: String = redis::cmd("XADD")
        .arg(&stream)
        .arg("*")
        .arg("job")
        .arg(r#"{"app_id":"nope","event":{"name":"client_event"}}"#)
        .query(&mut *conn)
        .unwrap();
    // A time no signature can show (it once made the signer panic).
    let _: String = redis::cmd("XADD")
        .arg(&stream)
        .arg("*")
        .arg("job")
        .arg(
            r#"{"app_id":"app-1","created_ms":999999999999999999,"event":{"name":"client_event"}}"#,
        )
        .query(&mut *conn)
        .unwrap();
    // A producer writing the documented minimal format.
    let _: String = redis::cmd("XADD")
        .arg(&stream)
        .arg("*")
        .arg("job")
        .arg(r#"{"app_id":"app-1","event":{"name":"client_event","channel":"private-a","data":"{}"}}"#)
        .query(&mut *conn)
        .unwrap();

    let got = rx.wait_for("hook", 1, WAIT).await;
    verify_pusher(&got[0], "app-1-key", APP_SECRET);
    assert_eq!(got[0].json()["events"][0]["channel"], "private-a");
    let q = queue(&text);
    let letters = dead_letters(&q, 4).await;
    // Jobs run concurrently: the letters may be in any order.
    let find = |prefix: &str| {
        letters
            .iter()
            .map(|(_, l)| l)
            .find(|l| l.reason.starts_with(prefix))
            .unwrap_or_else(|| panic!("no letter {prefix:?}: {letters:?}"))
    };
    assert_eq!(
        find("malformed entry: not a job").raw.as_deref(),
        Some("{this is not json")
    );
    assert!(
        find("malformed entry: entry has no `job` field")
            .job
            .is_none()
    );
    assert_eq!(find("unknown app").reason, "unknown app \"nope\"");
    assert!(find("malformed entry: `created_ms`").raw.is_some());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(rx.received("hook").len(), 1, "nothing else was sent");
    assert_eq!(q.dead_letters(100).await.unwrap().len(), 4, "each once");
    wh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rust_producer_api() {
    let redis = RedisServer::start();
    let rx = Receiver::start().await;
    let p = prefix("producer");
    let text = config(
        Some(&redis.url),
        &p,
        "127.0.0.1:0",
        &app("app-1", &standard_endpoint(&rx.url("hook"))),
    );
    let wh = Running::start(&text, Mode::Worker).await;
    let producer = wasmhook::producer::Producer::connect(&redis.url, &p).unwrap();
    let ids = producer
        .send_many(
            "app-1",
            vec![
                json!({"name": "custom_type", "channel": "x"}),
                json!({"name": "member_removed"}),
            ],
        )
        .await
        .unwrap();
    let got = rx.wait_for("hook", 2, WAIT).await;
    let mut seen: Vec<&str> = got.iter().map(|r| r.header("webhook-id")).collect();
    seen.sort();
    let mut want: Vec<&str> = ids.iter().map(String::as_str).collect();
    want.sort();
    assert_eq!(seen, want);
    // The outcome is committed just after the receiver answers.
    let q = queue(&text);
    eventually("both recorded as delivered", WAIT, async || {
        (q.stats().await.unwrap().get("delivered") == Some(&2)).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(q.stats().await.unwrap().get("delivered"), Some(&2));
    wh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_queue_delivers_and_retries_without_redis() {
    let rx = Receiver::start().await;
    rx.script("hook", &[503], 200);
    let text = config(
        None,
        "unused",
        "127.0.0.1:0",
        &app("app-1", &standard_endpoint(&rx.url("hook"))),
    );
    let wh = Running::start(&text, Mode::All).await;
    let id = send(
        &wh.ingest,
        "app-1",
        json!({"name": "client_event", "channel": "c"}),
    )
    .await;
    let got = rx.wait_for("hook", 2, WAIT).await;
    assert_eq!(got[1].header("webhook-id"), id);
    verify_standard(&got[1], WHSEC);
    wh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_for_an_endpoint_removed_from_the_config_is_dead_lettered() {
    let (_redis, _rx, text) = one_app(&prefix("removed")).await;
    let q = queue(&text);
    let mut job = Job::new(
        "app-1",
        Event::from_json(json!({"name": "client_event"})).unwrap(),
        now_ms(),
    );
    job.endpoint = Some("ep_removed".into());
    q.enqueue("app-1", &[job]).await.unwrap();
    let wh = Running::start(&text, Mode::Worker).await;
    let letters = dead_letters(&q, 1).await;
    assert!(
        letters[0].1.reason.contains("no longer configured"),
        "{}",
        letters[0].1.reason
    );
    wh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_taken_but_never_committed_is_handed_out_again_after_the_lease() {
    let redis = RedisServer::start();
    let text = config(
        Some(&redis.url),
        &prefix("reclaim"),
        "127.0.0.1:0",
        &app("app-1", ""),
    );
    let q = queue(&text);
    let job = Job::new(
        "app-1",
        Event::from_json(json!({"name": "client_event"})).unwrap(),
        now_ms(),
    );
    q.enqueue("app-1", std::slice::from_ref(&job))
        .await
        .unwrap();
    let ask = || wasmhook::queue::TakeRequest {
        max: 10,
        ..Default::default()
    };
    let taken = q.take(&ask()).await.unwrap();
    assert_eq!(taken.jobs.len(), 1);
    // Invisible to other workers while the lease holds...
    assert!(q.take(&ask()).await.unwrap().jobs.is_empty());
    let due = q
        .take(&ask())
        .await
        .unwrap()
        .next_due
        .expect("the lease expires");
    assert!(due <= Duration::from_secs(3), "{due:?}");
    // ...until it expires (the visibility timeout, 3 s here).
    tokio::time::sleep(due + Duration::from_millis(50)).await;
    let again = q.take(&ask()).await.unwrap();
    assert_eq!(again.jobs.len(), 1);
    assert_ne!(again.jobs[0].lease, taken.jobs[0].lease);
    assert_eq!(again.jobs[0].job.as_ref().unwrap(), &job);
    // The first worker's late commit records nothing: the job is not
    // counted twice, and the new lease is still live.
    let late = wasmhook::queue::Completion {
        lease: taken.jobs[0].lease.clone(),
        effects: vec![wasmhook::queue::Effect::Count(
            wasmhook::queue::Stat::Delivered,
        )],
    };
    q.commit(&[late]).await.unwrap();
    assert_eq!(q.stats().await.unwrap().get("delivered"), None);
    assert_eq!(q.depth().await.unwrap().in_flight, 1);
    // Leases that were never ours record nothing either, and do not fail.
    let bogus: Vec<wasmhook::queue::Completion> = ["nonsense", "1|app-1|#x", "#", ""]
        .into_iter()
        .map(|lease| wasmhook::queue::Completion {
            lease: lease.into(),
            effects: vec![wasmhook::queue::Effect::Count(
                wasmhook::queue::Stat::Delivered,
            )],
        })
        .collect();
    q.commit(&bogus).await.unwrap();
    assert_eq!(q.stats().await.unwrap().get("delivered"), None);
    assert_eq!(q.depth().await.unwrap().in_flight, 1);
}

/// A stage with a bug: it panics on events named `boom`.
struct PanicsOnBoom;

impl wasmhook::pipeline::Stage for PanicsOnBoom {
    fn name(&self) -> &str {
        "panics-on-boom"
    }

    fn decide<'a>(
        &'a self,
        _app: &'a wasmhook::app::App,
        job: &'a Job,
    ) -> wasmhook::pipeline::StageFuture<'a> {
        Box::pin(async move {
            if job.event.name == "boom" {
                panic!("stage bug on {}", job.id);
            }
            Ok(wasmhook::pipeline::Decision::Keep)
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_task_panics_is_dead_lettered_after_its_retries_not_redelivered_forever() {
    use std::collections::HashMap;
    use std::sync::Arc;
    let (_redis, rx, text) = one_app(&prefix("panic")).await;
    let settings = Arc::new(settings(&text));
    let queue = wasmhook::service::open_queue(&settings).unwrap();
    let stages: wasmhook::pipeline::Chain = vec![Arc::new(PanicsOnBoom)];
    let pipeline = wasmhook::pipeline::Pipeline::new(
        HashMap::from([("app-1".to_string(), stages)]),
        HashMap::new(),
    );
    let ctx = Arc::new(wasmhook::worker::Context::new(&settings, queue.clone(), pipeline).unwrap());
    let stop = tokio_util::sync::CancellationToken::new();
    let worker = tokio::spawn(wasmhook::worker::run(settings.clone(), ctx, stop.clone()));
    let event = |name: &str| Event::from_json(json!({"name": name, "channel": "c"})).unwrap();
    let boom = Job::new("app-1", event("boom"), now_ms());
    let fine = Job::new("app-1", event("fine"), now_ms());
    queue.enqueue("app-1", &[boom.clone(), fine]).await.unwrap();

    rx.wait_for("hook", 1, WAIT).await;
    let letters = dead_letters(&queue, 1).await;
    let letter = &letters[0].1;
    assert_eq!(letter.job.as_ref().unwrap().id, boom.id);
    assert!(
        letter.reason.contains("panicked") && letter.reason.contains("stage bug on"),
        "{}",
        letter.reason
    );
    assert_eq!(
        letter.attempts, 3,
        "the retry schedule, then the dead letter"
    );
    // Nothing comes back: the queue is empty and stays so.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let depth = queue.depth().await.unwrap();
    assert_eq!(depth.ready + depth.in_flight + depth.delayed, 0);
    assert_eq!(queue.dead_letters(100).await.unwrap().len(), 1);
    assert_eq!(rx.arrived("hook"), 1);
    stop.cancel();
    worker.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acl_user_with_a_password_file_delivers_and_a_refused_login_stops_serve() {
    let redis = RedisServer::start();
    let rx = Receiver::start().await;
    let mut conn = redis.conn();
    redis::cmd("ACL")
        .arg(
            &[
                "SETUSER",
                "hooks",
                "on",
                ">hooks-pw-123",
                "~*",
                "&*",
                "+@all",
            ][..],
        )
        .query::<()>(&mut conn)
        .unwrap();
    redis::cmd("CONFIG")
        .arg(&["SET", "requirepass", "default-pw-456"][..])
        .query::<()>(&mut conn)
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let password_file = dir.path().join("redis-password");
    std::fs::write(&password_file, "hooks-pw-123\n").unwrap();
    let base = config(
        Some(&redis.url),
        &prefix("acl"),
        "127.0.0.1:0",
        &app("app-1", &pusher_endpoint(&rx.url("hook"))),
    );
    let with = |auth: &str| base.replace("[redis]\n", &format!("[redis]\n{auth}\n"));

    let text = with(&format!(
        "username = \"hooks\"\npassword_file = \"{}\"",
        password_file.display()
    ));
    one_event_arrives(&text, &rx).await;

    for (auth, code) in [
        (
            "username = \"hooks\"\npassword = \"wrong-pw-789\"",
            "WRONGPASS",
        ),
        ("", "NOAUTH"),
    ] {
        let error = Running::refused(&with(auth)).await;
        assert!(error.contains("Redis refused the login"), "{error}");
        assert!(error.contains(code), "{error}");
        assert!(!error.contains("wrong-pw-789"), "{error}");
    }
}

/// A CA and a server certificate for 127.0.0.1 signed by it, made with the
/// `openssl` command in `dir`: (ca.crt, server.crt, server.key).
fn tls_certificates(dir: &std::path::Path, name: &str) -> [std::path::PathBuf; 3] {
    let path = |f: &str| dir.join(format!("{name}-{f}"));
    let [ca_key, ca, key, csr, cert, ext] = [
        "ca.key",
        "ca.crt",
        "server.key",
        "server.csr",
        "server.crt",
        "ext.cnf",
    ]
    .map(path);
    std::fs::write(&ext, "subjectAltName=IP:127.0.0.1\n").unwrap();
    let openssl = |args: &[&std::ffi::OsStr]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .output()
            .expect("openssl runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let s = |p: &std::path::PathBuf| p.as_os_str().to_owned();
    let o = |t: &str| std::ffi::OsString::from(t);
    let run = |args: Vec<std::ffi::OsString>| {
        let refs: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
        openssl(&refs)
    };
    run(vec![
        o("req"),
        o("-x509"),
        o("-newkey"),
        o("rsa:2048"),
        o("-nodes"),
        o("-keyout"),
        s(&ca_key),
        o("-out"),
        s(&ca),
        o("-days"),
        o("1"),
        o("-subj"),
        o(&format!("/CN={name} test CA")),
    ]);
    run(vec![
        o("req"),
        o("-newkey"),
        o("rsa:2048"),
        o("-nodes"),
        o("-keyout"),
        s(&key),
        o("-out"),
        s(&csr),
        o("-subj"),
        o("/CN=127.0.0.1"),
    ]);
    run(vec![
        o("x509"),
        o("-req"),
        o("-in"),
        s(&csr),
        o("-CA"),
        s(&ca),
        o("-CAkey"),
        s(&ca_key),
        o("-CAcreateserial"),
        o("-out"),
        s(&cert),
        o("-days"),
        o("1"),
        o("-extfile"),
        s(&ext),
    ]);
    [ca, cert, key]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_redis_is_used_with_its_ca_and_refused_with_another() {
    let dir = tempfile::tempdir().unwrap();
    let [ca, cert, key] = tls_certificates(dir.path(), "real");
    let [other_ca, _, _] = tls_certificates(dir.path(), "other");
    let port = free_port();
    let mut server = std::process::Command::new("redis-server")
        .args([
            "--port",
            "0",
            "--tls-port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
        ])
        .args([
            "--save",
            "",
            "--appendonly",
            "no",
            "--tls-auth-clients",
            "no",
        ])
        .arg("--tls-cert-file")
        .arg(&cert)
        .arg("--tls-key-file")
        .arg(&key)
        .arg("--tls-ca-cert-file")
        .arg(&ca)
        .arg("--dir")
        .arg(dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("redis-server runs");
    eventually("the TLS port listens", WAIT, async || {
        std::net::TcpStream::connect(("127.0.0.1", port)).ok()
    })
    .await;
    let rx = Receiver::start().await;
    let base = config(
        Some(&format!("rediss://127.0.0.1:{port}")),
        &prefix("tls"),
        "127.0.0.1:0",
        &app("app-1", &pusher_endpoint(&rx.url("hook"))),
    );
    let with = |ca: &std::path::Path| {
        base.replace(
            "[redis]\n",
            &format!("[redis]\nca_file = \"{}\"\n", ca.display()),
        )
    };

    one_event_arrives(&with(&ca), &rx).await;

    // A server certificate the configured CA did not sign: nothing is
    // written, so the ingest says 503, never 202.
    let wh = Running::start(&with(&other_ca), Mode::Server).await;
    let (status, _) = post_events(
        &wh.ingest,
        "app-1",
        Some("app-1-token"),
        json!({"name": "client_event", "channel": "c"}).to_string(),
    )
    .await;
    assert_eq!(status, 503);
    wh.shutdown().await;
    let _ = server.kill();
    let _ = server.wait();
}

/// On a cluster, SIGKILL the primary that holds the queue's slot during a
/// run: its replica takes over, the worker goes on without a restart, the
/// ingest answers 503 while no primary (and, with `wait_replicas = 1`, no
/// replica) can store an event, and every event answered 202 is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_primary_is_failed_over_and_no_accepted_event_is_lost() {
    let mut cluster = RedisCluster::start(Duration::from_secs(2));
    let rx = Receiver::start().await;
    let p = prefix("failover");
    let text = config_with(
        &format!(
            "{}wait_replicas = 1\nwait_timeout = \"1s\"\n",
            cluster.section()
        ),
        &p,
        "127.0.0.1:0",
        &app("app-1", &standard_endpoint(&rx.url("hook"))),
    );
    let wh = Running::start(&text, Mode::All).await;

    // A producer posting one event at a time, recording every answer.
    type Answers = std::sync::Mutex<Vec<(u16, Option<String>)>>;
    let answers: std::sync::Arc<Answers> = Default::default();
    let stop = tokio_util::sync::CancellationToken::new();
    let poster = tokio::spawn({
        let (ingest, answers, stop) = (wh.ingest.clone(), answers.clone(), stop.clone());
        async move {
            let mut i = 0;
            while !stop.is_cancelled() {
                i += 1;
                let event = json!({"name": "client_event", "channel": "c", "data": i.to_string()});
                let (status, body) =
                    post_events(&ingest, "app-1", Some("app-1-token"), event.to_string()).await;
                let id = body["ids"][0].as_str().map(String::from);
                answers.lock().unwrap().push((status, id));
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    });
    let accepted = |answers: &Answers| -> Vec<String> {
        let a = answers.lock().unwrap();
        a.iter()
            .filter(|(s, _)| *s == 202)
            .filter_map(|(_, id)| id.clone())
            .collect()
    };
    eventually("deliveries under way", WAIT, async || {
        (rx.arrived("hook") >= 30).then_some(())
    })
    .await;

    // The primary of the shard that holds app-1's queue.
    let shard = wasmhook::queue::keys::shard_of("app-1", CLUSTER_SHARDS);
    let queue_key = format!("{p}:{{{shard}}}:ready");
    let victim = cluster.primary_of(&queue_key);
    cluster.nodes[victim].stop();
    let killed_at = answers.lock().unwrap().len();
    // The replica is promoted (the node timeout is 2 s).
    tokio::task::block_in_place(|| cluster.wait_until_ok(Duration::from_secs(30)));
    let promoted = cluster.primary_of(&queue_key);
    assert_ne!(promoted, victim);
    // The new primary has no replica yet: nothing can be stored as asked.
    eventually("a 503 while the slot cannot store", WAIT, async || {
        let a = answers.lock().unwrap();
        a[killed_at..].iter().any(|(s, _)| *s == 503).then_some(())
    })
    .await;
    // The killed node comes back as the new primary's replica.
    tokio::task::block_in_place(|| {
        cluster.nodes[victim].restart();
        cluster.wait_until_ok(Duration::from_secs(30));
    });
    let back_at = answers.lock().unwrap().len();
    eventually("events accepted again", WAIT, async || {
        let a = answers.lock().unwrap();
        (a[back_at..].iter().filter(|(s, _)| *s == 202).count() >= 20).then_some(())
    })
    .await;
    stop.cancel();
    poster.await.unwrap();

    let all = answers.lock().unwrap().clone();
    assert!(
        all.iter().all(|(s, _)| *s == 202 || *s == 503),
        "only 202 or 503: {:?}",
        all.iter()
            .map(|(s, _)| s)
            .collect::<std::collections::BTreeSet<_>>()
    );
    let ids: std::collections::HashSet<String> = accepted(&answers).into_iter().collect();
    let seen = eventually("every accepted event delivered", WAIT, async || {
        let seen: std::collections::HashSet<String> = rx
            .received("hook")
            .iter()
            .map(|r| r.header("webhook-id").to_string())
            .collect();
        ids.is_subset(&seen).then_some(seen)
    })
    .await;
    assert!(ids.is_subset(&seen));
    eprintln!(
        "failover: {} answers, {} accepted, {} refused with 503, {} deliveries",
        all.len(),
        ids.len(),
        all.iter().filter(|(s, _)| *s == 503).count(),
        rx.arrived("hook")
    );
    wh.shutdown().await;
}

/// A cluster whose nodes require a password: wasmhook logs in to every node
/// it reaches and delivers; a wrong password stops `serve` at start, and
/// the error does not hold it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_with_a_password_delivers_and_a_wrong_one_stops_serve() {
    let cluster = RedisCluster::start_with(Duration::from_secs(15), Some("cluster-pw-123"));
    let rx = Receiver::start().await;
    let with = |password: &str| {
        config_with(
            &format!("{}password = \"{password}\"\n", cluster.section()),
            &prefix("cluster-auth"),
            "127.0.0.1:0",
            &app("app-1", &pusher_endpoint(&rx.url("hook"))),
        )
    };
    one_event_arrives(&with("cluster-pw-123"), &rx).await;

    let error = Running::refused(&with("wrong-pw-789")).await;
    assert!(error.contains("Redis refused the login"), "{error}");
    assert!(!error.contains("wrong-pw-789"), "{error}");
}

/// A cluster that speaks only TLS to its clients: seed nodes by rediss://
/// URL, the CA from `redis.ca_file`, every node it is redirected to checked
/// against it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_cluster_delivers() {
    let dir = tempfile::tempdir().unwrap();
    let [ca, cert, key] = tls_certificates(dir.path(), "cluster");
    let cluster = RedisCluster::start_tls([&ca, &cert, &key]);
    let rx = Receiver::start().await;
    let text = config_with(
        &cluster.section(),
        &prefix("cluster-tls"),
        "127.0.0.1:0",
        &app("app-1", &pusher_endpoint(&rx.url("hook"))),
    );
    assert!(text.contains("rediss://"));
    one_event_arrives(&text, &rx).await;
}

/// With `redis.shards = 3` on a cluster, apps spread over the shards (and
/// over more than one primary), every event of every app is delivered
/// exactly once, dead letters of all shards are listed together and one
/// from another shard than 0 replays; a process configured with another
/// number of shards refuses to start on that queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sharded_queue_spreads_apps_over_primaries_and_loses_nothing() {
    use wasmhook::queue::keys::shard_of;
    let cluster = RedisCluster::start(Duration::from_secs(15));
    let rx = Receiver::start().await;
    let p = prefix("sharded");
    let ids: Vec<String> = (0..30).map(|i| format!("app-{i}")).collect();
    // Two apps in different shards, the second not in shard 0, get a second
    // endpoint that refuses its first request.
    let a = ids[0].clone();
    let b = ids
        .iter()
        .find(|id| {
            let s = shard_of(id, CLUSTER_SHARDS);
            s != 0 && s != shard_of(&a, CLUSTER_SHARDS)
        })
        .unwrap()
        .clone();
    let mut apps = String::new();
    for id in &ids {
        let mut endpoints = pusher_endpoint(&rx.url("hook"));
        if *id == a || *id == b {
            rx.script(&format!("strict-{id}"), &[400], 200);
            endpoints += &pusher_endpoint(&rx.url(&format!("strict-{id}")));
        }
        apps += &app(id, &endpoints);
    }
    let text = config_with(&cluster.section(), &p, "127.0.0.1:0", &apps);
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(&dir, &text);
    let wh = Running::start(&text, Mode::All).await;
    for id in &ids {
        let events: Vec<serde_json::Value> = (0..20)
            .map(|i| json!({"name": "client_event", "channel": format!("c-{i}")}))
            .collect();
        let (status, body) = post_events(
            &wh.ingest,
            id,
            Some(&format!("{id}-token")),
            json!({ "events": events }).to_string(),
        )
        .await;
        assert_eq!(status, 202, "{body}");
    }
    let got = rx.wait_for("hook", 600, WAIT).await;
    let mut per_app = std::collections::BTreeMap::<String, usize>::new();
    for r in &got {
        *per_app
            .entry(r.header("x-pusher-key").to_string())
            .or_default() += 1;
    }
    assert_eq!(per_app.len(), 30);
    assert!(per_app.values().all(|n| *n == 20), "{per_app:?}");

    // Spread: shards in use, on more than one primary.
    let shards: std::collections::BTreeSet<usize> =
        ids.iter().map(|id| shard_of(id, CLUSTER_SHARDS)).collect();
    assert_eq!(shards.len(), CLUSTER_SHARDS);
    let primaries: std::collections::BTreeSet<usize> = shards
        .iter()
        .map(|s| cluster.primary_of(&format!("{p}:{{{s}}}:ready")))
        .collect();
    assert!(primaries.len() >= 2, "one primary holds every shard");

    // Dead letters of two shards, listed together; the one outside shard 0
    // replays by its id.
    let q = queue(&text);
    let letters = dead_letters(&q, 2).await;
    assert_eq!(letters.len(), 2, "the first event of each strict endpoint");
    let of_b = letters
        .iter()
        .find(|(_, l)| l.job.as_ref().is_some_and(|j| j.app_id == b))
        .unwrap();
    assert!(
        of_b.0
            .starts_with(&format!("{}:", shard_of(&b, CLUSTER_SHARDS))),
        "{}",
        of_b.0
    );
    let (ok, out, err) = run_cli(&path, &["dlq", "replay", &of_b.0]).await;
    assert!(ok, "{out}{err}");
    rx.wait_for(&format!("strict-{b}"), 21, WAIT).await;
    let stats = eventually("the replay recorded", WAIT, async || {
        let s = q.stats().await.unwrap();
        (s.get("delivered") == Some(&639)).then_some(s)
    })
    .await;
    // 600 + 19 + 19 + the replayed one delivered, summed over the shards.
    assert_eq!(stats["dead"], 2);
    assert_eq!(q.dead_letters(100).await.unwrap().len(), 1);
    wh.shutdown().await;

    // Another number of shards on the same queue: refused at start.
    let other = text.replace(&format!("shards = {CLUSTER_SHARDS}"), "shards = 2");
    let error = Running::refused(&other).await;
    assert!(error.contains("made with 3 shards"), "{error}");
}

/// A producer learns nothing by itself about shards: one made for another
/// number than the queue's is refused before it writes anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_with_another_number_of_shards_is_refused() {
    let redis = RedisServer::start();
    let p = prefix("producer-shards");
    let text = config_with(
        &format!("url = \"{}\"\nshards = 4\n", redis.url),
        &p,
        "127.0.0.1:0",
        &app("app-1", ""),
    );
    let sharded = wasmhook::producer::Producer::from_settings(&settings(&text)).unwrap();
    sharded
        .send("app-1", json!({"name": "client_event"}))
        .await
        .unwrap();
    let q = queue(&text);
    assert_eq!(q.app_depth("app-1", &[]).await.unwrap(), [(None, 1)]);

    let plain = wasmhook::producer::Producer::connect(&redis.url, &p).unwrap();
    let error = plain
        .send("app-1", json!({"name": "client_event"}))
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains("made with 4 shards"), "{error}");
    assert_eq!(
        q.depth().await.unwrap().ready,
        1,
        "nothing more was written"
    );
}
