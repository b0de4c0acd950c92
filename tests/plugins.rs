//! The WebAssembly plugin pipeline end to end: real components built from
//! `plugins/`, a real Redis, a real receiver.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::*;
use serde_json::{Value, json};
use wasmhook::service::Mode;

const WAIT: Duration = Duration::from_secs(20);

/// Posts an event (or `{"events": [...]}`); the first id the ingest answered.
async fn send(ingest: &str, app: &str, event: Value) -> String {
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

/// A temporary directory only this user may use (the plugin cache is used
/// only in one).
fn private_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .unwrap();
    dir
}

/// Engine settings with a compile cache in `cache`.
fn cached_engine(cache: &tempfile::TempDir, warm: u32) -> wasmhook::plugin::EngineSettings {
    wasmhook::plugin::EngineSettings {
        cache_dir: Some(cache.path().to_path_buf()),
        max_instances: 4,
        warm_instances: warm,
        ..Default::default()
    }
}

/// Limits for calling a plugin straight on an engine.
fn test_limits(deadline: Duration, max_reuse: u32) -> wasmhook::plugin::Limits {
    wasmhook::plugin::Limits {
        deadline,
        fuel: None,
        max_memory: 32 << 20,
        max_output: 1 << 20,
        max_reuse,
    }
}

fn client_event() -> wasmhook::event::Event {
    wasmhook::event::Event::from_json(json!({"name": "client_event", "channel": "c"})).unwrap()
}

/// A plugin call's input: `event` of `app`, first attempt, app chain.
fn test_input<'a>(
    app: &'a str,
    event: &'a wasmhook::event::Event,
) -> wasmhook::plugin::PluginInput<'a> {
    wasmhook::plugin::PluginInput {
        id: "msg_1",
        app_id: app,
        event,
        headers: &[],
        metadata: &[],
        attempt: 1,
        endpoint: None,
        endpoints: 1,
    }
}

fn event_of(r: &Received) -> Value {
    let body = r.json();
    if body.get("events").is_some() {
        body["events"][0].clone()
    } else {
        body["data"].clone()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redact_transforms_and_the_signature_covers_the_transformed_bytes() {
    let redis = RedisServer::start();
    let rx = Receiver::start().await;
    // add-header passes the redacted payload on as it got it (the host
    // keeps the event rather than parsing it again) and adds a header.
    let chain = r#"[{ plugin = "redact", config = { paths = "data.email,data.card.number" } },
                    { plugin = "add-header", config = { name = "X-Redacted", value = "yes" } }]"#;
    let endpoints = pusher_endpoint(&rx.url("pusher")) + &standard_endpoint(&rx.url("std"));
    let text = config(
        Some(&redis.url),
        &prefix("redact"),
        "127.0.0.1:0",
        &app_with_chain("app-1", chain, &endpoints),
    ) + &wasm_section("")
        + &plugin_def("redact", &plugin("redact"), "")
        + &plugin_def("add-header", &plugin("add-header"), "");
    let wh = Running::start(&text, Mode::All).await;
    let data =
        json!({"email": "ada@example.com", "card": {"number": "4242424242424242"}, "order": 17})
            .to_string();
    send(&wh.ingest, "app-1", json!({"name": "client_event", "channel": "private-a", "event": "client-pay", "data": data})).await;

    for path in ["pusher", "std"] {
        let got = rx.wait_for(path, 1, WAIT).await;
        let body = String::from_utf8_lossy(&got[0].body).into_owned();
        assert!(
            !body.contains("ada@example.com") && !body.contains("4242424242424242"),
            "{body}"
        );
        let inner: Value =
            serde_json::from_str(event_of(&got[0])["data"].as_str().unwrap()).unwrap();
        assert_eq!(
            inner,
            json!({"email": "***", "card": {"number": "***"}, "order": 17})
        );
        assert_eq!(got[0].header("x-redacted"), "yes");
        if path == "pusher" {
            verify_pusher(&got[0], "app-1-key", APP_SECRET);
        } else {
            verify_standard(&got[0], WHSEC);
        }
    }
    wh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_filter_drops_are_recorded_and_never_delivered() {
    let redis = RedisServer::start();
    let rx = Receiver::start().await;
    let chain = r#"[{ plugin = "tenant-filter", config = { deny_types = "member_added", channel_prefix = "private-" } }]"#;
    let text = config(
        Some(&redis.url),
        &prefix("filter"),
        "127.0.0.1:0",
        &app_with_chain("app-1", chain, &pusher_endpoint(&rx.url("hook"))),
    ) + &wasm_section("")
        + &plugin_def("tenant-filter", &plugin("tenant-filter"), "");
    let wh = Running::start(&text, Mode::All).await;
    send(
        &wh.ingest,
        "app-1",
        json!({"name": "member_added", "channel": "private-a", "user_id": "1"}),
    )
    .await;
    send(
        &wh.ingest,
        "app-1",
        json!({"name": "client_event", "channel": "public-a"}),
    )
    .await;
    send(
        &wh.ingest,
        "app-1",
        json!({"name": "client_event", "channel": "private-b"}),
    )
    .await;

    let got = rx.wait_for("hook", 1, WAIT).await;
    assert_eq!(event_of(&got[0])["channel"], "private-b");
    verify_pusher(&got[0], "app-1-key", APP_SECRET);
    let q = queue(&text);
    eventually("drops recorded", WAIT, async || {
        let dropped = q.stats().await.unwrap().get("dropped").copied();
        (dropped == Some(2)).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(rx.received("hook").len(), 1);
    wh.shutdown().await;
}

/// An app with an ordered endpoint whose app chain fails on one event: that
/// event's routing is retried in its place (the app's later events wait),
/// then it is dead-lettered saying so, and the rest follow in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ordered_apps_routing_retry_keeps_its_place() {
    let redis = RedisServer::start();
    let rx = Receiver::start().await;
    let chain = r#"[{ plugin = "add", config = { field = "payload.seen" } }]"#;
    let text = config(
        Some(&redis.url),
        &prefix("ordered-routing"),
        "127.0.0.1:0",
        &app_with_chain(
            "app-1",
            chain,
            &(standard_endpoint(&rx.url("hook")) + "ordered = true\n"),
        ),
    )
    .replace(
        r#"schedule = ["0ms", "50ms", "100ms"]"#,
        r#"schedule = ["0ms", "1s"]"#,
    ) + &wasm_section("")
        + &plugin_def("add", &plugin("add-field"), "");
    let wh = Running::start(&text, Mode::All).await;
    let (started, started_ms) = (std::time::Instant::now(), wasmhook::event::now_ms());
    // Event 5's payload is no object: the plugin fails on it, every time.
    let events: Vec<Value> = (0..20)
        .map(|i| {
            let payload = if i == 5 { json!(7) } else { json!({}) };
            json!({"name": "client_event", "channel": "c", "n": i, "payload": payload})
        })
        .collect();
    send(&wh.ingest, "app-1", json!({ "events": events })).await;

    let got = rx.wait_for("hook", 19, WAIT).await;
    let order: Vec<i64> = got
        .iter()
        .map(|r| r.json()["data"]["n"].as_i64().unwrap())
        .collect();
    let want: Vec<i64> = (0..20).filter(|&i| i != 5).collect();
    assert_eq!(order, want, "in order, without the failed one");
    let letters = dead_letters(&queue(&text), 1).await;
    let letter = &letters[0].1;
    assert_eq!(letter.job.as_ref().unwrap().event.fields["n"], 5);
    assert!(letter.reason.contains("add-field"), "{}", letter.reason);
    assert!(
        letter.reason.contains("routed without it"),
        "{}",
        letter.reason
    );
    // Nothing after it went while it waited for its retry (1 s).
    let arrived_ms = |r: &Received| started_ms + (r.at - started).as_millis() as u64;
    for r in got
        .iter()
        .filter(|r| r.json()["data"]["n"].as_i64() > Some(5))
    {
        assert!(
            arrived_ms(r) + 100 >= letter.dead_at_ms,
            "event {} arrived {} ms before event 5 was given up",
            r.json()["data"]["n"],
            letter.dead_at_ms - arrived_ms(r)
        );
    }
    wh.shutdown().await;
}

/// A batched endpoint whose chain makes its events larger than the batch
/// may carry: the events that do not fit go first in the next batch; every
/// body stays within `max_batch_bytes`, each event arrives once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_a_chain_enlarges_past_the_batch_limit_go_in_the_next_batch() {
    let redis = RedisServer::start();
    let rx = Receiver::start().await;
    let pad = "x".repeat(1500);
    let endpoint = pusher_endpoint(&rx.url("hook"))
        + "batch = { max_events = 10, max_wait = \"200ms\" }\nmax_batch_bytes = 4096\n"
        + &format!(
            r#"plugins = [{{ plugin = "add", config = {{ field = "pad", value = "{pad}" }} }}]"#
        )
        + "\n";
    let text = config(
        Some(&redis.url),
        &prefix("batch-grown"),
        "127.0.0.1:0",
        &app("app-1", &endpoint),
    ) + &wasm_section("")
        + &plugin_def("add", &plugin("add-field"), "");
    let wh = Running::start(&text, Mode::All).await;
    let events: Vec<Value> = (0..10)
        .map(|i| json!({"name": "client_event", "channel": "c", "n": i}))
        .collect();
    send(&wh.ingest, "app-1", json!({ "events": events })).await;

    eventually("10 events delivered", WAIT, async || {
        let n: usize = rx
            .received("hook")
            .iter()
            .map(|r| r.json()["events"].as_array().unwrap().len())
            .sum();
        (n >= 10).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let got = rx.received("hook");
    assert!(got.len() >= 4, "{} requests", got.len());
    let mut ns: Vec<i64> = Vec::new();
    for r in &got {
        verify_pusher(r, "app-1-key", APP_SECRET);
        assert!(r.body.len() <= 4096, "a body of {} bytes", r.body.len());
        for e in r.json()["events"].as_array().unwrap() {
            assert_eq!(e["pad"].as_str().map(str::len), Some(1500));
            ns.push(e["n"].as_i64().unwrap());
        }
    }
    ns.sort();
    assert_eq!(ns, (0..10).collect::<Vec<_>>(), "each event once");
    wh.shutdown().await;
}

/// A batched endpoint's chain runs on each event before batching: the batch
/// carries each event as the chain left it, without the ones it dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batched_endpoints_chain_runs_per_event_before_batching() {
    let redis = RedisServer::start();
    let rx = Receiver::start().await;
    let endpoint = pusher_endpoint(&rx.url("hook"))
        + "batch = { max_events = 6, max_wait = \"5s\" }\n"
        + r#"plugins = [{ plugin = "filter", config = { deny_types = "member_added" } }, { plugin = "add", config = { field = "seen_by", value = "endpoint-chain" } }]"#
        + "\n";
    let text = config(
        Some(&redis.url),
        &prefix("batch-chain"),
        "127.0.0.1:0",
        &app("app-1", &endpoint),
    ) + &wasm_section("")
        + &plugin_def("filter", &plugin("tenant-filter"), "")
        + &plugin_def("add", &plugin("add-field"), "");
    let wh = Running::start(&text, Mode::All).await;
    let events: Vec<Value> = (0..6)
        .map(|i| {
            let name = if i % 2 == 0 {
                "client_event"
            } else {
                "member_added"
            };
            json!({"name": name, "channel": "c", "n": i})
        })
        .collect();
    send(&wh.ingest, "app-1", json!({ "events": events })).await;

    let got = rx.wait_for("hook", 1, WAIT).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(rx.received("hook").len(), 1, "one batch");
    verify_pusher(&got[0], "app-1-key", APP_SECRET);
    let body = got[0].json();
    let sent = body["events"].as_array().unwrap();
    // Routed side by side: the batch holds them in the order they were parked.
    let mut ns: Vec<i64> = sent.iter().map(|e| e["n"].as_i64().unwrap()).collect();
    ns.sort();
    assert_eq!(ns, [0, 2, 4], "the dropped events left the batch");
    for e in sent {
        assert_eq!(e["seen_by"], "endpoint-chain", "{e}");
    }
    let q = queue(&text);
    eventually("drops counted", WAIT, async || {
        let stats = q.stats().await.unwrap();
        (stats.get("dropped") == Some(&3) && stats.get("delivered") == Some(&3)).then_some(())
    })
    .await;
    wh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_by_event_sends_to_exactly_the_chosen_endpoints() {
    let redis = RedisServer::start();
    let rx = Receiver::start().await;
    let chain = r#"[{ plugin = "route-by-event", config = { "type.client_event" = "a", "type.member_added" = "a,b", "channel_prefix.presence-" = "c" } }]"#;
    let endpoints = format!(
        "{}id = \"a\"\n{}id = \"b\"\n{}id = \"c\"\n",
        pusher_endpoint(&rx.url("a")),
        pusher_endpoint(&rx.url("b")),
        pusher_endpoint(&rx.url("c"))
    );
    let text = config(
        Some(&redis.url),
        &prefix("route"),
        "127.0.0.1:0",
        &app_with_chain("app-1", chain, &endpoints),
    ) + &wasm_section("")
        + &plugin_def("route-by-event", &plugin("route-by-event"), "");
    let wh = Running::start(&text, Mode::All).await;
    send(
        &wh.ingest,
        "app-1",
        json!({"name": "client_event", "channel": "x"}),
    )
    .await;
    send(
        &wh.ingest,
        "app-1",
        json!({"name": "member_added", "channel": "y", "user_id": "1"}),
    )
    .await;
    send(
        &wh.ingest,
        "app-1",
        json!({"name": "channel_vacated", "channel": "presence-z"}),
    )
    .await;
    send(
        &wh.ingest,
        "app-1",
        json!({"name": "cache_miss", "channel": "nothing-matches"}),
    )
    .await;

    rx.wait_for("a", 2, WAIT).await;
    rx.wait_for("b", 1, WAIT).await;
    rx.wait_for("c", 1, WAIT).await;
    let q = queue(&text);
    eventually("no-match drop recorded", WAIT, async || {
        (q.stats().await.unwrap().get("dropped") == Some(&1)).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let names = |p: &str| -> Vec<String> {
        let mut v: Vec<String> = rx
            .received(p)
            .iter()
            .map(|r| event_of(r)["name"].as_str().unwrap().to_string())
            .collect();
        v.sort();
        v
    };
    assert_eq!(names("a"), ["client_event", "member_added"]);
    assert_eq!(names("b"), ["member_added"]);
    assert_eq!(names("c"), ["channel_vacated"]);
    for r in rx
        .received("a")
        .iter()
        .chain(&rx.received("b"))
        .chain(&rx.received("c"))
    {
        verify_pusher(r, "app-1-key", APP_SECRET);
    }
    wh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slack_format_reshapes_the_body_for_one_endpoint_only() {
    let redis = RedisServer::start();
    let rx = Receiver::start().await;
    let endpoints = format!(
        "{}\n[[apps.webhooks]]\nurl = \"{}\"\nscheme = \"raw\"\nsecrets = [\"{WHSEC}\"]\nplugins = [{{ plugin = \"slack\", config = {{ template = \"{{name}} on {{channel}}\", username = \"hooks\" }} }}]\n",
        pusher_endpoint(&rx.url("plain")),
        rx.url("slack")
    );
    let text = config(
        Some(&redis.url),
        &prefix("slack"),
        "127.0.0.1:0",
        &app("app-1", &endpoints),
    ) + &wasm_section("")
        + &plugin_def("slack", &plugin("slack-format"), "");
    let wh = Running::start(&text, Mode::All).await;
    send(
        &wh.ingest,
        "app-1",
        json!({"name": "channel_occupied", "channel": "private-orders"}),
    )
    .await;

    let slack = rx.wait_for("slack", 1, WAIT).await;
    let body = slack[0].json();
    assert_eq!(body["text"], "channel_occupied on private-orders", "{body}");
    assert_eq!(body["username"], "hooks");
    verify_standard(&slack[0], WHSEC);
    let plain = rx.wait_for("plain", 1, WAIT).await;
    assert_eq!(
        event_of(&plain[0]),
        json!({"name": "channel_occupied", "channel": "private-orders"})
    );
    verify_pusher(&plain[0], "app-1-key", APP_SECRET);
    wh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runaway_plugin_is_cut_off_while_other_apps_keep_delivering() {
    let redis = RedisServer::start();
    let rx = Receiver::start().await;
    let apps = app_with_chain(
        "looper",
        r#"[{ plugin = "loop" }]"#,
        &pusher_endpoint(&rx.url("looper")),
    ) + &app("calm", &pusher_endpoint(&rx.url("calm")));
    let text = config(Some(&redis.url), &prefix("loop"), "127.0.0.1:0", &apps)
        + &wasm_section("")
        + &plugin_def("loop", &plugin("infinite-loop"), "deadline = \"50ms\"");
    let wh = Running::start(&text, Mode::All).await;
    send(
        &wh.ingest,
        "looper",
        json!({"name": "client_event", "channel": "x"}),
    )
    .await;
    for i in 0..20 {
        send(
            &wh.ingest,
            "calm",
            json!({"name": "client_event", "channel": format!("c{i}")}),
        )
        .await;
    }
    rx.wait_for("calm", 20, WAIT).await;

    let q = queue(&text);
    let letters = dead_letters(&q, 1).await;
    let letter = &letters[0].1;
    assert_eq!(
        letter.attempts, 3,
        "failure policy `fail`: retried on the schedule"
    );
    assert!(
        letter.reason.contains("ran past its deadline of 50ms"),
        "{}",
        letter.reason
    );
    assert_eq!(letter.job.as_ref().unwrap().app_id, "looper");
    assert!(rx.received("looper").is_empty());
    wh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_failure_follows_its_plugins_policy() {
    let redis = RedisServer::start();
    let rx = Receiver::start().await;
    let apps = [
        ("hog", "hog"),
        ("big", "big"),
        ("skipper", "trap-skip"),
        ("dropper", "error-drop"),
        ("failer", "error-fail"),
    ]
    .iter()
    .map(|(app, p)| {
        app_with_chain(
            app,
            &format!("[{{ plugin = \"{p}\", config = {{ message = \"no thanks\" }} }}]"),
            &pusher_endpoint(&rx.url(app)),
        )
    })
    .collect::<String>();
    let text = config(Some(&redis.url), &prefix("policies"), "127.0.0.1:0", &apps)
        + &wasm_section("")
        + &plugin_def(
            "hog",
            &plugin("memory-hog"),
            "max_memory = 16777216\ndeadline = \"5s\"",
        )
        + &plugin_def("big", &plugin("oversized-output"), "deadline = \"5s\"")
        + &plugin_def("trap-skip", &plugin("trap"), "on_failure = \"skip\"")
        + &plugin_def(
            "error-drop",
            &plugin("plugin-error"),
            "on_failure = \"drop\"",
        )
        + &plugin_def(
            "error-fail",
            &plugin("plugin-error"),
            "on_failure = \"fail\"",
        );
    let wh = Running::start(&text, Mode::All).await;
    for (app, name) in [
        ("hog", "cache_miss"),
        ("big", "member_removed"),
        ("skipper", "client_event"),
        ("dropper", "channel_vacated"),
        ("failer", "channel_occupied"),
    ] {
        send(
            &wh.ingest,
            app,
            json!({"name": name, "channel": "private-x", "data": "{}"}),
        )
        .await;
    }
    let skipped = rx.wait_for("skipper", 1, WAIT).await;
    assert_eq!(
        event_of(&skipped[0]),
        json!({"name": "client_event", "channel": "private-x", "data": "{}"}),
        "skip: delivered unchanged"
    );

    let q = queue(&text);
    eventually("the skip counted", WAIT, async || {
        (q.stats().await.unwrap().get("plugin_skipped") == Some(&1)).then_some(())
    })
    .await;
    let letters = dead_letters(&q, 3).await;
    let reason_of = |event: &str| -> String {
        letters
            .iter()
            .find(|(_, l)| l.job.as_ref().is_some_and(|j| j.event.name == event))
            .map(|(_, l)| l.reason.clone())
            .unwrap_or_else(|| panic!("no dead letter for {event}: {letters:?}"))
    };
    assert!(reason_of("cache_miss").contains("hit its memory limit of 16777216 bytes"));
    assert!(reason_of("member_removed").contains("over its output limit of 1048576"));
    let failed = reason_of("channel_occupied");
    assert!(
        failed.contains("returned an error") && failed.contains("no thanks"),
        "the plugin's own message is kept: {failed}"
    );
    eventually("drop recorded", WAIT, async || {
        (q.stats().await.unwrap().get("dropped") == Some(&1)).then_some(())
    })
    .await;
    for path in ["hog", "big", "dropper", "failer"] {
        assert!(rx.received(path).is_empty(), "{path} got nothing");
    }
    wh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_only_ever_sees_its_own_apps_events() {
    let redis = RedisServer::start();
    let rx = Receiver::start().await;
    let apps = app_with_chain(
        "tenant-a",
        r#"[{ plugin = "echo", config = { tenant = "A" } }]"#,
        &pusher_endpoint(&rx.url("a")),
    ) + &app_with_chain(
        "tenant-b",
        r#"[{ plugin = "echo", config = { tenant = "B" } }, { plugin = "trap" }]"#,
        &pusher_endpoint(&rx.url("b")),
    ) + &app("tenant-c", &pusher_endpoint(&rx.url("c")));
    let text = config(Some(&redis.url), &prefix("isolation"), "127.0.0.1:0", &apps)
        + &wasm_section("")
        + &plugin_def("echo", &plugin("echo-config"), "")
        + &plugin_def("trap", &plugin("trap"), "");
    let wh = Running::start(&text, Mode::All).await;
    for i in 0..5 {
        for app in ["tenant-a", "tenant-b", "tenant-c"] {
            send(
                &wh.ingest,
                app,
                json!({"name": "client_event", "channel": format!("{app}-{i}")}),
            )
            .await;
        }
    }
    let a = rx.wait_for("a", 5, WAIT).await;
    let c = rx.wait_for("c", 5, WAIT).await;
    for r in &a {
        let e = event_of(r);
        assert_eq!(e["plugin"]["app_id"], "tenant-a");
        assert_eq!(e["plugin"]["config"], json!({"tenant": "A"}));
        assert!(e["channel"].as_str().unwrap().starts_with("tenant-a-"));
    }
    for r in &c {
        assert!(event_of(r).get("plugin").is_none(), "app C has no plugins");
    }
    // App B's chain traps: its events never arrive, and nothing of A or C is affected.
    let q = queue(&text);
    let letters = dead_letters(&q, 5).await;
    assert_eq!(letters.len(), 5);
    assert!(
        letters
            .iter()
            .all(|(_, l)| l.job.as_ref().unwrap().app_id == "tenant-b"
                && l.reason.contains("trapped"))
    );
    assert!(rx.received("b").is_empty());
    wh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replacing_a_plugin_file_switches_behaviour_and_loses_nothing() {
    let redis = RedisServer::start();
    let rx = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let live = dir.path().join("live.wasm");
    std::fs::copy(plugin("add-field"), &live).unwrap();
    let chain = r#"[{ plugin = "live", config = { field = "version", value = "one" } }]"#;
    let text = config(
        Some(&redis.url),
        &prefix("reload"),
        "127.0.0.1:0",
        &app_with_chain("app-1", chain, &standard_endpoint(&rx.url("hook"))),
    ) + &wasm_section("")
        + &plugin_def("live", &live, "");
    let wh = Running::start(&text, Mode::All).await;

    let swap = |from: std::path::PathBuf| {
        let tmp = dir.path().join(format!("next-{}.wasm", ulid::Ulid::new()));
        std::fs::copy(from, &tmp).unwrap();
        std::fs::rename(&tmp, &live).unwrap();
    };
    let mut ids = HashSet::new();
    for i in 0..150 {
        ids.insert(
            send(
                &wh.ingest,
                "app-1",
                json!({"name": "client_event", "channel": format!("c{i}")}),
            )
            .await,
        );
        if i == 50 {
            swap(plugin("echo-config"));
        }
        if i == 100 {
            // A broken version is rejected; the running one stays.
            swap(plugin("wrong-world"));
        }
        tokio::time::sleep(Duration::from_millis(8)).await;
    }
    let got = rx.wait_for("hook", 150, WAIT).await;
    let seen: HashSet<String> = got
        .iter()
        .map(|r| r.header("webhook-id").to_string())
        .collect();
    assert_eq!(seen, ids, "every event delivered across the reloads");
    let by_channel = |c: &str| {
        got.iter()
            .map(event_of)
            .find(|e| e["channel"] == c)
            .unwrap()
    };
    assert_eq!(by_channel("c0")["version"], "one");
    assert!(by_channel("c0").get("plugin").is_none());
    let last = by_channel("c149");
    assert_eq!(
        last["plugin"]["config"]["field"], "version",
        "the new version runs (and keeps running after a bad file)"
    );
    assert!(last.get("version").is_none());
    wh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_plugins_stop_serve_before_any_job_is_taken() {
    let redis = RedisServer::start();
    let base = config(
        Some(&redis.url),
        &prefix("bad"),
        "127.0.0.1:0",
        &app_with_chain("app-1", r#"[{ plugin = "p" }]"#, ""),
    ) + &wasm_section("");
    for (file, expected) in [
        (
            plugin("wrong-world"),
            "does not implement the wasmhook:plugin/plugin world",
        ),
        (
            std::path::PathBuf::from("/nonexistent/plugin.wasm"),
            "cannot read",
        ),
    ] {
        let text = base.clone() + &plugin_def("p", &file, "");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let err = wasmhook::service::serve(
            settings(&text),
            Mode::All,
            Some(listener),
            Default::default(),
        )
        .await
        .unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.contains(expected) && msg.contains(&file.display().to_string()),
            "{msg}"
        );
    }
    // A plugin named by an app but not defined is a config error with its path.
    let err = wasmhook::config::load_from(None, Some(&base), Vec::<(String, String)>::new())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("apps[0].plugins[0].plugin: names no plugin defined under [plugins]"),
        "{err}"
    );
    // `config check` loads plugins too.
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(&dir, &(base + &plugin_def("p", &plugin("wrong-world"), "")));
    let (ok, _, err) = run_cli(&path, &["config", "check"]).await;
    assert!(!ok && err.contains("does not implement"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_test_inspect_and_new_work_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let event = dir.path().join("event.json");
    std::fs::write(&event, json!({"time_ms": 1, "events": [{"name": "client_event", "channel": "private-a", "data": "{\"email\":\"x@y.z\"}"}]}).to_string()).unwrap();
    let cli = |args: Vec<String>| async move { run_binary(&args).await };
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let redact = plugin("redact").display().to_string();
    let ev = event.display().to_string();

    let (ok, out, err) = cli(s(&[
        "plugin",
        "test",
        &redact,
        "--event",
        &ev,
        "--config",
        "paths=data.email",
        "--json",
    ]))
    .await;
    assert!(ok, "{err}");
    let result: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(result["decision"], "transform");
    assert_eq!(result["message"]["payload"]["data"], "{\"email\":\"***\"}");
    assert!(result["elapsed_us"].as_u64().unwrap() > 0);
    let (ok, out, _) = cli(s(&[
        "plugin",
        "test",
        &plugin("infinite-loop").display().to_string(),
        "--event",
        &ev,
        "--deadline",
        "20ms",
        "--json",
    ]))
    .await;
    assert!(!ok);
    assert!(out.contains("ran past its deadline of 20ms"), "{out}");

    let (ok, out, err) = cli(s(&["plugin", "inspect", &redact])).await;
    assert!(ok, "{err}");
    assert!(
        out.contains("exports:\n  handle") && out.contains("implemented"),
        "{out}"
    );
    let (ok, out, _) = cli(s(&[
        "plugin",
        "inspect",
        &plugin("wrong-world").display().to_string(),
    ]))
    .await;
    assert!(
        !ok && out.contains("greet") && out.contains("NOT implemented"),
        "{out}"
    );

    // The scaffold builds as is and works.
    let (ok, out, err) = cli(s(&[
        "plugin",
        "new",
        "my-tagger",
        "--dir",
        &dir.path().display().to_string(),
    ]))
    .await;
    assert!(ok, "{err}");
    assert!(out.contains("created"), "{out}");
    let crate_dir = dir.path().join("my-tagger");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let shared_target = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("plugins/target");
    let built = tokio::process::Command::new(cargo)
        .args(["build", "--release", "--target", "wasm32-wasip2"])
        .current_dir(&crate_dir)
        .env("CARGO_TARGET_DIR", &shared_target)
        .env_remove("RUSTFLAGS")
        .output()
        .await
        .unwrap();
    assert!(
        built.status.success(),
        "{}",
        String::from_utf8_lossy(&built.stderr)
    );
    let wasm = shared_target
        .join("wasm32-wasip2/release/my_tagger.wasm")
        .display()
        .to_string();
    let (ok, out, err) = cli(s(&[
        "plugin",
        "test",
        &wasm,
        "--event",
        &ev,
        "--config",
        "tag=hello",
        "--json",
    ]))
    .await;
    assert!(ok, "{err}");
    let result: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(result["message"]["payload"]["tagged_by"], "hello");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compiled_plugins_are_cached_on_disk_and_a_bad_cache_entry_is_ignored() {
    use wasmhook::plugin::{FailurePolicy, PluginEngine};
    let cache = private_dir();
    let settings = cached_engine(&cache, 4);
    let limits = test_limits(Duration::from_millis(50), 1);
    let cached = || {
        std::fs::read_dir(cache.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "cwasm"))
            .collect::<Vec<_>>()
    };

    let engine = PluginEngine::new(&settings).unwrap();
    let first = engine
        .load(
            "redact",
            &plugin("redact"),
            limits.clone(),
            FailurePolicy::Fail,
        )
        .unwrap();
    let files = cached();
    assert_eq!(files.len(), 1);
    assert!(
        files[0]
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .starts_with(&first.hash),
        "keyed by the component's hash"
    );
    let written = std::fs::metadata(&files[0]).unwrap().modified().unwrap();

    // A restart (a new engine) loads the artifact instead of compiling.
    let engine = PluginEngine::new(&settings).unwrap();
    engine
        .load(
            "redact",
            &plugin("redact"),
            limits.clone(),
            FailurePolicy::Fail,
        )
        .unwrap();
    assert_eq!(cached(), files);
    assert_eq!(
        std::fs::metadata(&files[0]).unwrap().modified().unwrap(),
        written,
        "not rewritten"
    );

    // A corrupt artifact is ignored and replaced.
    std::fs::write(&files[0], b"not a compiled component").unwrap();
    let p = engine
        .load("redact", &plugin("redact"), limits, FailurePolicy::Fail)
        .unwrap();
    assert_eq!(p.hash, first.hash);
    assert!(std::fs::metadata(&files[0]).unwrap().len() > 1000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_log_call_is_one_line_whatever_it_holds() {
    let dir = tempfile::tempdir().unwrap();
    let event = dir.path().join("event.json");
    std::fs::write(&event, json!({"name": "client_event"}).to_string()).unwrap();
    let forged = "first-MARK\n2026-01-01T00:00:00Z ERROR wasmhook: forged-MARK\r\u{1b}[2K\u{2028}\u{85}end-MARK";
    let escaped = "first-MARK\\n2026-01-01T00:00:00Z ERROR wasmhook: forged-MARK\\r\\u{1b}[2K\\u{2028}\\u{85}end-MARK";
    for format in ["pretty", "json"] {
        let out = tokio::process::Command::new(binary())
            .args(["--log-format", format, "plugin", "test"])
            .arg(plugin("add-field"))
            .arg("--event")
            .arg(&event)
            .arg("--config")
            .arg(format!("log={forged}"))
            .env("RUST_LOG", "info")
            .output()
            .await
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{err}");
        let lines: Vec<&str> = err.lines().filter(|l| l.contains("MARK")).collect();
        assert_eq!(lines.len(), 1, "{format}: one call, one line:\n{err}");
        assert!(
            !err.contains(['\u{1b}', '\r', '\u{2028}', '\u{85}']),
            "{format}: {err:?}"
        );
        if format == "json" {
            let line: Value = serde_json::from_str(lines[0]).unwrap();
            assert_eq!(line["message"], escaped, "{line}");
            assert_eq!(line["plugin"], "test");
        } else {
            assert!(lines[0].contains(escaped), "{err}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_planted_artifact_of_another_plugin_is_not_run() {
    use wasmhook::pipeline::Decision;
    use wasmhook::plugin::{FailurePolicy, PluginEngine};
    let cache = private_dir();
    let settings = cached_engine(&cache, 0);
    let limits = test_limits(Duration::from_secs(10), 1);
    let artifact_of = |hash: &str| {
        std::fs::read_dir(cache.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.file_name().unwrap().to_str().unwrap().starts_with(hash))
            .expect("an artifact")
    };
    let engine = PluginEngine::new(&settings).unwrap();
    let load = |engine: &PluginEngine, name: &str| {
        engine
            .load(name, &plugin(name), limits.clone(), FailurePolicy::Fail)
            .unwrap()
    };
    let own = artifact_of(&load(&engine, "add-field").hash);
    let other = artifact_of(&load(&engine, "add-header").hash);

    // add-header's artifact, tagged by this very cache, under add-field's
    // name: its tag is bound to add-header's bytes, so it is not loaded.
    std::fs::copy(&other, &own).unwrap();
    let engine = PluginEngine::new(&settings).unwrap();
    let tag = load(&engine, "add-field");
    let event = client_event();
    let input = test_input("app-1", &event);
    match tag.call(&input, &[]).await.decision.unwrap() {
        Decision::Transform(m) => assert_eq!(m.event.fields["added_by"], "add-field"),
        other => panic!("expected add-field's transform, got {other:?}"),
    }
    assert_ne!(
        std::fs::read(&own).unwrap(),
        std::fs::read(&other).unwrap(),
        "the planted artifact was overwritten"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_apps_and_plugins_and_rejects_a_bad_config() {
    let redis = RedisServer::start();
    let rx = Receiver::start().await;
    let listen = format!("127.0.0.1:{}", free_port());
    let ingest = format!("http://{listen}");
    let make = |value: &str, plugin_file: &std::path::Path| {
        let chain = format!(
            "[{{ plugin = \"tag\", config = {{ field = \"version\", value = \"{value}\" }} }}]"
        );
        config(
            Some(&redis.url),
            &prefix("sighup"),
            &listen,
            &app_with_chain("app-1", &chain, &pusher_endpoint(&rx.url("hook"))),
        ) + &wasm_section("")
            + &plugin_def("tag", plugin_file, "")
    };
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(&dir, &make("one", &plugin("add-field")));
    let mut serve = spawn_serve(&path, "all");
    eventually("ingest up", WAIT, async || {
        reqwest::Client::new()
            .get(format!("{ingest}/readyz"))
            .send()
            .await
            .ok()
            .filter(|r| r.status().is_success())
            .map(|_| ())
    })
    .await;

    let version = async |n: usize, channel: &str| -> Value {
        send(
            &ingest,
            "app-1",
            json!({"name": "client_event", "channel": channel}),
        )
        .await;
        let got = rx.wait_for("hook", n, WAIT).await;
        event_of(
            got.iter()
                .find(|r| event_of(r)["channel"] == channel)
                .expect("delivered"),
        )["version"]
            .clone()
    };
    assert_eq!(version(1, "a").await, "one");

    std::fs::write(&path, make("two", &plugin("add-field"))).unwrap();
    signal(&serve, libc::SIGHUP);
    let two = eventually("the reload applied", WAIT, async || {
        let n = rx.received("hook").len() + 1;
        let v = version(n, &format!("probe-{n}")).await;
        (v == "two").then_some(v)
    })
    .await;
    assert_eq!(two, "two");

    // A config with an unknown key, then one whose plugin is of the wrong
    // world: both are refused, the process stays up with "two".
    std::fs::write(
        &path,
        make("three", &plugin("add-field")) + "\n[redis2]\nx = 1\n",
    )
    .unwrap();
    signal(&serve, libc::SIGHUP);
    tokio::time::sleep(Duration::from_millis(500)).await;
    std::fs::write(&path, make("four", &plugin("wrong-world"))).unwrap();
    signal(&serve, libc::SIGHUP);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let n = rx.received("hook").len() + 1;
    assert_eq!(version(n, "after-bad").await, "two");
    assert!(serve.try_wait().unwrap().is_none(), "still running");
    signal(&serve, libc::SIGTERM);
    assert!(serve.wait().await.unwrap().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fuel_budget_stops_a_plugin_deterministically() {
    use wasmhook::plugin::{EngineSettings, FailurePolicy, Limits, PluginEngine, PluginFailure};
    let engine = PluginEngine::new(&EngineSettings {
        cache_dir: None,
        max_instances: 4,
        warm_instances: 4,
        max_memory: 32 << 20,
        fuel: true,
        ..Default::default()
    })
    .unwrap();
    let limits = |fuel| Limits {
        fuel: Some(fuel),
        ..test_limits(Duration::from_secs(10), 100)
    };
    let event = client_event();
    let input = test_input("app-1", &event);
    let looping = engine
        .load(
            "loop",
            &plugin("infinite-loop"),
            limits(5_000_000),
            FailurePolicy::Fail,
        )
        .unwrap();
    let called = looping.call(&input, &[]).await;
    assert_eq!(
        called.decision.unwrap_err(),
        PluginFailure::OutOfFuel(5_000_000)
    );
    // The same budget is plenty for a plugin that finishes.
    let tagging = engine
        .load(
            "tag",
            &plugin("add-field"),
            limits(5_000_000),
            FailurePolicy::Fail,
        )
        .unwrap();
    assert!(tagging.call(&input, &[]).await.decision.is_ok());
    // A warm instance gets the whole budget again on every call.
    for _ in 0..5 {
        assert!(tagging.call(&input, &[]).await.decision.is_ok());
    }
    // A plugin with no budget of its own (`fuel = 0`) on a metering engine
    // is not starved.
    let unmetered = engine
        .load(
            "free",
            &plugin("add-field"),
            Limits {
                fuel: None,
                ..limits(1)
            },
            FailurePolicy::Fail,
        )
        .unwrap();
    let called = unmetered.call(&input, &[]).await;
    assert!(called.decision.is_ok(), "{:?}", called.decision);
}

/// `calls` as the call-count plugin saw it: how many calls its instance has
/// served, this one included.
async fn calls_seen(
    plugin: &wasmhook::plugin::Plugin,
    app: &str,
    config: &[(String, String)],
) -> Result<u64, wasmhook::plugin::PluginFailure> {
    use wasmhook::pipeline::Decision;
    let event = client_event();
    let input = test_input(app, &event);
    match plugin.call(&input, config).await.decision? {
        Decision::Transform(m) => Ok(m.event.fields["calls"].as_u64().unwrap()),
        other => panic!("expected a transform, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_instances_serve_one_app_only_and_are_retired_when_they_must_be() {
    use wasmhook::plugin::{EngineSettings, FailurePolicy, PluginEngine, PluginFailure};
    let engine = |warm| {
        PluginEngine::new(&EngineSettings {
            cache_dir: None,
            max_instances: 4,
            warm_instances: warm,
            max_memory: 32 << 20,
            fuel: false,
            ..Default::default()
        })
        .unwrap()
    };
    let limits = |max_reuse| test_limits(Duration::from_secs(10), max_reuse);
    let cfg = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    let warm = engine(8);
    let count = warm
        .load(
            "count",
            &plugin("call-count"),
            limits(3),
            FailurePolicy::Fail,
        )
        .unwrap();

    // One app's calls share an instance, up to its call budget; another
    // app's calls never land on it.
    let mut seen = Vec::new();
    for app in ["app-a", "app-b", "app-a", "app-a", "app-b", "app-a"] {
        seen.push((app, calls_seen(&count, app, &[]).await.unwrap()));
    }
    assert_eq!(
        seen,
        [
            ("app-a", 1),
            ("app-b", 1),
            ("app-a", 2),
            ("app-a", 3),
            ("app-b", 2),
            ("app-a", 1)
        ],
        "app-a's instance is retired after 3 calls"
    );
    assert_eq!(warm.warm_instances(), 2, "one idle instance per app");

    // A trap retires the instance: the next call starts fresh.
    let trap_on_2 = cfg(&[("panic_at", "2")]);
    assert_eq!(calls_seen(&count, "app-c", &trap_on_2).await, Ok(1));
    let failure = calls_seen(&count, "app-c", &trap_on_2).await.unwrap_err();
    assert!(
        matches!(&failure, PluginFailure::Trapped(m) if m.contains("told to panic on call 2")),
        "{failure:?}"
    );
    assert_eq!(calls_seen(&count, "app-c", &trap_on_2).await, Ok(1));

    // An instance whose memory grew past half its cap is not kept.
    let hold = cfg(&[("hold_mib", "20")]);
    assert_eq!(calls_seen(&count, "app-d", &hold).await, Ok(1));
    assert_eq!(calls_seen(&count, "app-d", &hold).await, Ok(1));

    // Dropping a plugin version (a reload replaces it) drops its instances.
    assert!(warm.warm_instances() > 0);
    drop(count);
    assert_eq!(warm.warm_instances(), 0);

    // max_reuse = 1, or no warm pool at all: a fresh instance every call.
    let fresh = warm
        .load(
            "count",
            &plugin("call-count"),
            limits(1),
            FailurePolicy::Fail,
        )
        .unwrap();
    let cold = engine(0)
        .load(
            "count",
            &plugin("call-count"),
            limits(1000),
            FailurePolicy::Fail,
        )
        .unwrap();
    for _ in 0..3 {
        assert_eq!(calls_seen(&fresh, "app-a", &[]).await, Ok(1));
        assert_eq!(calls_seen(&cold, "app-a", &[]).await, Ok(1));
    }
}

/// The plugin kit's own unit tests (the SDK, the example and test plugins),
/// run natively with `cargo test` in `plugins/`, so the whole suite is one
/// command.
#[test]
fn the_plugin_kits_own_unit_tests_pass() {
    let out = plugins_cargo(&["test", "--workspace"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "cargo test in plugins/ failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (passed, ignored) = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("test result: ok. "))
        .map(|l| {
            let n = |key: &str| -> u32 {
                l.split("; ")
                    .find_map(|part| part.strip_suffix(key))
                    .and_then(|n| n.trim().parse().ok())
                    .unwrap_or(0)
            };
            (n(" passed"), n(" ignored"))
        })
        .fold((0, 0), |(p, i), (dp, di)| (p + dp, i + di));
    assert!(
        passed >= 30,
        "only {passed} plugin-kit tests ran:\n{stdout}"
    );
    assert_eq!(ignored, 0, "no plugin-kit test may be skipped:\n{stdout}");
}

/// A test component written in WAT (`plugins/testing/NAME.wat`), as a
/// binary component file in `dir`.
fn wat_component(dir: &std::path::Path, name: &str) -> std::path::PathBuf {
    let bytes = wat::parse_file(plugins_dir().join(format!("testing/{name}.wat"))).unwrap();
    let path = dir.join(format!("{name}.wasm"));
    std::fs::write(&path, bytes).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_component_over_the_per_plugin_caps_is_refused_and_other_apps_keep_delivering() {
    use wasmhook::plugin::{EngineSettings, FailurePolicy, LoadError, PluginEngine};
    let dir = tempfile::tempdir().unwrap();
    let engine = PluginEngine::new(&EngineSettings::default()).unwrap();
    let limits = test_limits(Duration::from_secs(1), 1);
    for (name, why) in [
        ("many-instances", "64 core module instances"),
        ("many-memories", "16 Wasm linear memories"),
    ] {
        let path = wat_component(dir.path(), name);
        match engine.load(name, &path, limits.clone(), FailurePolicy::Fail) {
            Err(e @ LoadError::OverLimits { .. }) => {
                let text = e.to_string();
                assert!(text.contains(why), "{text}");
                assert!(text.contains("more than a plugin may hold"), "{text}");
            }
            Err(other) => panic!("{name}: refused for another reason: {other}"),
            Ok(_) => panic!("{name} was loaded"),
        }
    }

    // Swapped in for a running plugin: refused, the old version keeps
    // running, and another app's plugin is not disturbed.
    let redis = RedisServer::start();
    let rx = Receiver::start().await;
    let hostile = dir.path().join("hostile.wasm");
    std::fs::copy(plugin("add-header"), &hostile).unwrap();
    let apps = app_with_chain(
        "hostile",
        r#"[{ plugin = "h" }]"#,
        &pusher_endpoint(&rx.url("hostile")),
    ) + &app_with_chain(
        "calm",
        r#"[{ plugin = "c" }]"#,
        &pusher_endpoint(&rx.url("calm")),
    );
    let text = config(Some(&redis.url), &prefix("caps"), "127.0.0.1:0", &apps)
        + &wasm_section("")
        + &plugin_def("h", &hostile, "")
        + &plugin_def("c", &plugin("add-header"), "");
    let wh = Running::start(&text, Mode::All).await;
    send(
        &wh.ingest,
        "hostile",
        json!({"name": "client_event", "channel": "first"}),
    )
    .await;
    rx.wait_for("hostile", 1, WAIT).await;
    let planted = wat_component(dir.path(), "many-memories");
    std::fs::copy(&planted, &hostile).unwrap();
    // Several watch intervals: the new file is tried and rejected.
    tokio::time::sleep(Duration::from_millis(600)).await;
    for i in 0..10 {
        for app in ["hostile", "calm"] {
            send(
                &wh.ingest,
                app,
                json!({"name": "client_event", "channel": format!("c{i}")}),
            )
            .await;
        }
    }
    let calm = rx.wait_for("calm", 10, WAIT).await;
    let hostile_got = rx.wait_for("hostile", 11, WAIT).await;
    for r in calm.iter().chain(&hostile_got) {
        assert_eq!(r.header("x-plugin"), "add-header");
    }
    wh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_blocked_in_a_clock_call_is_stopped_at_its_deadline() {
    use wasmhook::plugin::{EngineSettings, FailurePolicy, PluginEngine, PluginFailure};
    let engine = PluginEngine::new(&EngineSettings::default()).unwrap();
    let limits = test_limits(Duration::from_millis(100), 100);
    let sleeper = engine
        .load("sleeper", &plugin("sleeper"), limits, FailurePolicy::Fail)
        .unwrap();
    let event = client_event();
    let input = test_input("app-1", &event);
    let config = vec![("ms".to_string(), "3000".to_string())];
    let called = sleeper.call(&input, &config).await;
    assert_eq!(
        called.decision,
        Err(PluginFailure::TimedOut(Duration::from_millis(100)))
    );
    // A short sleep within the deadline decides, and the instance it ran on
    // (stopped or not) never leaks into the next call.
    let short = vec![("ms".to_string(), "1".to_string())];
    assert!(sleeper.call(&input, &short).await.decision.is_ok());
    assert_eq!(
        sleeper.call(&input, &config).await.decision,
        Err(PluginFailure::TimedOut(Duration::from_millis(100)))
    );

    // `plugin test` says the same.
    let dir = tempfile::tempdir().unwrap();
    let event_file = dir.path().join("event.json");
    std::fs::write(&event_file, r#"{"name":"client_event","channel":"c"}"#).unwrap();
    let (ok, out, err) = run_binary(&[
        "plugin".into(),
        "test".into(),
        plugin("sleeper").display().to_string(),
        "--event".into(),
        event_file.display().to_string(),
        "--deadline".into(),
        "100ms".into(),
        "--config".into(),
        "ms=3000".into(),
    ])
    .await;
    assert!(!ok, "{out}");
    assert!(
        out.contains("ran past its deadline of 100ms"),
        "{out}\n{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_apps_plugin_calls_cannot_hold_the_instances_another_app_needs() {
    let redis = RedisServer::start();
    let rx = Receiver::start().await;
    let apps = app_with_chain(
        "sleepy",
        r#"[{ plugin = "sleeper", config = { ms = "1500" } }]"#,
        &pusher_endpoint(&rx.url("sleepy")),
    ) + &app_with_chain(
        "calm",
        r#"[{ plugin = "tag" }]"#,
        &pusher_endpoint(&rx.url("calm")),
    );
    let text = config(Some(&redis.url), &prefix("share"), "127.0.0.1:0", &apps)
        + &wasm_section("max_instances = 4\napp_max_instances = 2")
        + &plugin_def("sleeper", &plugin("sleeper"), "deadline = \"5s\"")
        + &plugin_def("tag", &plugin("add-header"), "");
    let wh = Running::start(&text, Mode::All).await;
    for i in 0..8 {
        send(
            &wh.ingest,
            "sleepy",
            json!({"name": "client_event", "channel": format!("s{i}")}),
        )
        .await;
    }
    // The sleepy app's calls are under way before the calm app's arrive.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for i in 0..5 {
        send(
            &wh.ingest,
            "calm",
            json!({"name": "client_event", "channel": format!("c{i}")}),
        )
        .await;
    }
    rx.wait_for("calm", 5, WAIT).await;
    // With the pool to itself the sleepy app would have held all 4 instances
    // (and queued ahead of the calm app for the next ones): the calm app's
    // events would come after at least 4 of its own.
    let sleepy_before = rx.arrived("sleepy");
    assert!(
        sleepy_before < 4,
        "{sleepy_before} sleepy deliveries came first"
    );
    rx.wait_for("sleepy", 8, WAIT).await;
    wh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn everything_a_decision_carries_is_bounded() {
    let redis = RedisServer::start();
    let rx = Receiver::start().await;
    let cases: [(&str, &str, &str); 7] = [
        (
            "header",
            "part = \"header\", bytes = \"2097152\"",
            "over its output limit of 1048576",
        ),
        (
            "metadata",
            "part = \"metadata\", bytes = \"2097152\"",
            "over its output limit of 1048576",
        ),
        (
            "headers",
            "part = \"headers\"",
            "40000 headers in one message; at most 64",
        ),
        (
            "pairs",
            "part = \"metadata-pairs\"",
            "40000 metadata pairs in one message; at most 64",
        ),
        (
            "routes",
            "part = \"routes\"",
            "routes to 100000 targets; the app has 1 endpoints",
        ),
        (
            "error",
            "part = \"error\", bytes = \"2097152\"",
            "over its output limit of 1048576",
        ),
        (
            "long-error",
            "part = \"error\", bytes = \"524288\"",
            "(524288 bytes)",
        ),
    ];
    let apps = cases
        .iter()
        .map(|(app, cfg, _)| {
            app_with_chain(
                app,
                &format!("[{{ plugin = \"big\", config = {{ {cfg} }} }}]"),
                &pusher_endpoint(&rx.url(app)),
            )
        })
        .collect::<String>()
        + &app_with_chain(
            "twice",
            r#"[{ plugin = "big", config = { part = "routes", count = "2", endpoint = "a" } }]"#,
            &format!(
                "\n[[apps.webhooks]]\nid = \"a\"\nurl = \"{}\"\n\n[[apps.webhooks]]\nid = \"b\"\nurl = \"{}\"\n",
                rx.url("twice-a"),
                rx.url("twice-b")
            ),
        );
    let text = config(Some(&redis.url), &prefix("bounded"), "127.0.0.1:0", &apps)
        + &wasm_section("")
        + &plugin_def("big", &plugin("oversized-output"), "deadline = \"5s\"");
    let wh = Running::start(&text, Mode::All).await;
    for (app, _, _) in &cases {
        send(
            &wh.ingest,
            app,
            json!({"name": *app, "channel": "private-x"}),
        )
        .await;
    }
    // Named twice, delivered once.
    send(
        &wh.ingest,
        "twice",
        json!({"name": "twice", "channel": "x"}),
    )
    .await;
    let q = queue(&text);
    let letters = dead_letters(&q, cases.len()).await;
    rx.wait_for("twice-a", 1, WAIT).await;
    assert_eq!(rx.arrived("twice-a"), 1);
    assert_eq!(rx.arrived("twice-b"), 0);
    for (app, _, why) in &cases {
        let letter = letters
            .iter()
            .find(|(_, l)| l.job.as_ref().is_some_and(|j| j.event.name == *app))
            .map(|(_, l)| l)
            .unwrap_or_else(|| panic!("no dead letter for {app}: {letters:?}"));
        assert!(letter.reason.contains(why), "{app}: {}", letter.reason);
        assert!(
            letter.reason.len() < 4096,
            "{app}: {} bytes",
            letter.reason.len()
        );
    }
    for (app, _, _) in &cases {
        assert!(rx.received(app).is_empty(), "{app} got nothing");
    }
    wh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_app_keeps_no_more_warm_instances_than_its_share() {
    use wasmhook::plugin::{EngineSettings, FailurePolicy, PluginEngine};
    let engine = PluginEngine::new(&EngineSettings {
        max_instances: 4,
        app_max_instances: 2,
        warm_instances: 8,
        ..Default::default()
    })
    .unwrap();
    let plugins: Vec<_> = ["add-header", "add-field", "call-count"]
        .iter()
        .map(|name| {
            engine
                .load(
                    name,
                    &plugin(name),
                    test_limits(Duration::from_secs(10), 100),
                    FailurePolicy::Fail,
                )
                .unwrap()
        })
        .collect();
    let event = client_event();
    // App a: three plugins, each leaves an instance behind; a keeps two.
    for p in &plugins {
        assert!(p.call(&test_input("a", &event), &[]).await.decision.is_ok());
    }
    assert_eq!(engine.warm_instances(), 2);
    // App b's instances take room of their own, and push none of a's out.
    for p in &plugins[..2] {
        assert!(p.call(&test_input("b", &event), &[]).await.decision.is_ok());
    }
    assert_eq!(engine.warm_instances(), 4);
}
