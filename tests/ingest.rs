//! The HTTP ingest against a real Redis: what it accepts, what it refuses,
//! and that a refusal enqueues nothing.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;
use wasmhook::service::Mode;

/// Jobs waiting, in flight or scheduled anywhere in the queue.
async fn queued(q: &wasmhook::queue::Queue) -> u64 {
    let d = q.depth().await.unwrap();
    d.ready + d.in_flight + d.delayed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_request_gets_its_status_and_enqueues_nothing() {
    let mut redis = RedisServer::start();
    let text = config(
        Some(&redis.url),
        &prefix("errors"),
        "127.0.0.1:0",
        &app("app-1", &pusher_endpoint("http://127.0.0.1:9/unused")),
    )
    .replace(
        "[server]\n",
        "[server]\nmax_body_bytes = 2048\nmax_batch = 3\n",
    );
    let wh = Running::start(&text, Mode::Server).await;
    let q = queue(&text);
    let ok = Some("app-1-token");
    let good = json!({"name": "client_event", "channel": "c"}).to_string();

    let cases: Vec<(&str, &str, Option<&str>, String, u16, &str)> = vec![
        (
            "malformed JSON",
            "app-1",
            ok,
            "{\"name\": ".into(),
            400,
            "bad_request",
        ),
        (
            "missing type",
            "app-1",
            ok,
            json!({"channel": "c"}).to_string(),
            400,
            "bad_request",
        ),
        (
            "bad event in a batch",
            "app-1",
            ok,
            json!({"events": [{"name": "a"}, {"channel": "c"}]}).to_string(),
            400,
            "bad_request",
        ),
        (
            "batch over the limit",
            "app-1",
            ok,
            json!({"events": [{"name": "a"}, {"name": "a"}, {"name": "a"}, {"name": "a"}]})
                .to_string(),
            400,
            "bad_request",
        ),
        ("no token", "app-1", None, good.clone(), 401, "unauthorized"),
        (
            "wrong token",
            "app-1",
            Some("app-2-token"),
            good.clone(),
            401,
            "unauthorized",
        ),
        (
            "unknown app",
            "app-9",
            ok,
            good.clone(),
            401,
            "unauthorized",
        ),
        (
            "body over the limit",
            "app-1",
            ok,
            json!({"name": "client_event", "data": "x".repeat(4096)}).to_string(),
            413,
            "payload_too_large",
        ),
    ];
    for (what, app_id, token, body, status, code) in cases {
        let (got, answer) = post_events(&wh.ingest, app_id, token, body).await;
        assert_eq!(got, status, "{what}: {answer}");
        assert_eq!(answer["error"], code, "{what}: {answer}");
        assert!(!answer["message"].as_str().unwrap().is_empty(), "{what}");
        assert!(
            !answer.to_string().contains("app-1-token"),
            "{what}: the token is never echoed"
        );
    }

    // A chunked body (no Content-Length) over the limit is refused too.
    let status_line = chunked_post(
        &wh.ingest,
        "/v1/apps/app-1/events",
        "app-1-token",
        &[b"{\"name\":\"a\",\"data\":\"", &[b'x'; 4096], b"\"}"],
    )
    .await;
    assert!(status_line.starts_with("HTTP/1.1 413"), "{status_line}");
    assert_eq!(queued(&q).await, 0, "no refused request enqueued anything");

    // Redis down: 503 for events and for readiness, liveness still 200.
    let (got, _) = post_events(&wh.ingest, "app-1", ok, good.clone()).await;
    assert_eq!(got, 202);
    redis.stop();
    let (got, answer) = post_events(&wh.ingest, "app-1", ok, good.clone()).await;
    assert_eq!(got, 503, "{answer}");
    assert_eq!(answer["error"], "unavailable");
    let client = reqwest::Client::new();
    assert_eq!(
        client
            .get(format!("{}/readyz", wh.ingest))
            .send()
            .await
            .unwrap()
            .status(),
        503
    );
    assert_eq!(
        client
            .get(format!("{}/healthz", wh.ingest))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    wh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_app_and_a_wrong_token_get_the_same_answer() {
    let redis = RedisServer::start();
    let text = config(
        Some(&redis.url),
        &prefix("probe"),
        "127.0.0.1:0",
        &app("app-1", ""),
    );
    let wh = Running::start(&text, Mode::Server).await;
    wasmhook::install_crypto_provider();
    let client = reqwest::Client::new();
    let answer = async |app: &str, token: Option<&str>| {
        let mut req = client
            .post(format!("{}/v1/apps/{app}/events", wh.ingest))
            .body(json!({"name": "client_event"}).to_string());
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let content_type = resp.headers()["content-type"].clone();
        (status, content_type, resp.bytes().await.unwrap())
    };
    let wrong_token = answer("app-1", Some("app-1-token-x")).await;
    assert_eq!(wrong_token.0, 401);
    for (what, app_id, token) in [
        ("unknown app, some token", "app-9", Some("app-1-token-x")),
        (
            "unknown app, a real app's token",
            "app-9",
            Some("app-1-token"),
        ),
        ("unknown app, no token", "app-9", None),
        ("known app, no token", "app-1", None),
        ("known app, empty token", "app-1", Some("")),
    ] {
        assert_eq!(answer(app_id, token).await, wrong_token, "{what}");
    }
    // With the right token it goes through.
    assert_eq!(answer("app-1", Some("app-1-token")).await.0, 202);
    wh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_echo_receiver_is_not_served_unless_enabled() {
    let text = config(None, &prefix("echo"), "127.0.0.1:0", &app("app-1", ""));
    wasmhook::install_crypto_provider();
    let client = reqwest::Client::new();
    let echo = async |ingest: &str| {
        client
            .post(format!("{ingest}/v1/echo"))
            .body("{}")
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    };
    let wh = Running::start(&text, Mode::All).await;
    assert_eq!(echo(&wh.ingest).await, 404, "not with a config file");
    wh.shutdown().await;
    let wh = Running::start(
        &text.replace("[server]\n", "[server]\necho = true\n"),
        Mode::All,
    )
    .await;
    assert_eq!(echo(&wh.ingest).await, 200, "when enabled");
    wh.shutdown().await;
}

/// POSTs a body in chunks (Transfer-Encoding: chunked, no Content-Length)
/// over a plain socket; returns the response's status line.
async fn chunked_post(base: &str, path: &str, token: &str, chunks: &[&[u8]]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = base.trim_start_matches("http://");
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    for chunk in chunks {
        // The server may answer and close before the whole body is sent.
        if s.write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
            .await
            .is_err()
            || s.write_all(chunk).await.is_err()
            || s.write_all(b"\r\n").await.is_err()
        {
            break;
        }
    }
    let _ = s.write_all(b"0\r\n\r\n").await;
    let mut response = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut response)).await;
    String::from_utf8_lossy(&response)
        .lines()
        .next()
        .unwrap_or("")
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotency_key_enqueues_once_and_replays_the_first_answer() {
    let redis = RedisServer::start();
    let text = config(
        Some(&redis.url),
        &prefix("idem"),
        "127.0.0.1:0",
        &(app("app-1", "") + &app("app-2", "")),
    );
    let wh = Running::start(&text, Mode::Server).await;
    let q = queue(&text);
    wasmhook::install_crypto_provider();
    let client = reqwest::Client::new();
    let post = |app: &'static str, key: &'static str, body: String| {
        client
            .post(format!("{}/v1/apps/{app}/events", wh.ingest))
            .bearer_auth(format!("{app}-token"))
            .header("idempotency-key", key)
            .body(body)
            .send()
    };
    let batch =
        json!({"events": [{"name": "client_event"}, {"name": "member_added", "user_id": "1"}]})
            .to_string();
    let first = post("app-1", "order-17", batch.clone()).await.unwrap();
    assert_eq!(first.status(), 202);
    let first: serde_json::Value = serde_json::from_slice(&first.bytes().await.unwrap()).unwrap();
    assert_eq!(first["ids"].as_array().unwrap().len(), 2);

    let again = post("app-1", "order-17", batch.clone()).await.unwrap();
    assert_eq!(again.status(), 202);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    let again: serde_json::Value = serde_json::from_slice(&again.bytes().await.unwrap()).unwrap();
    assert_eq!(again, first, "the first answer, not a new one");
    assert_eq!(queued(&q).await, 2, "nothing new enqueued");

    // Keys are per app.
    let other = post("app-2", "order-17", batch.clone()).await.unwrap();
    assert_eq!(other.status(), 202);
    assert_eq!(queued(&q).await, 4);

    // The same key with another body: 422, nothing enqueued, and the key
    // still answers its own request.
    let changed = batch.replace("member_added", "member_removed");
    let reused = post("app-1", "order-17", changed).await.unwrap();
    assert_eq!(reused.status(), 422);
    let reused: serde_json::Value = serde_json::from_slice(&reused.bytes().await.unwrap()).unwrap();
    assert_eq!(reused["error"], "idempotency_key_reused");
    assert!(
        reused["message"]
            .as_str()
            .unwrap()
            .contains("different request body"),
        "{reused}"
    );
    assert_eq!(queued(&q).await, 4, "nothing enqueued");
    let again = post("app-1", "order-17", batch).await.unwrap();
    assert_eq!(again.status(), 202);
    let again: serde_json::Value = serde_json::from_slice(&again.bytes().await.unwrap()).unwrap();
    assert_eq!(again, first);
    wh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepted_events_are_in_redis_before_the_answer() {
    let redis = RedisServer::start();
    let p = prefix("durable");
    let text = config(Some(&redis.url), &p, "127.0.0.1:0", &app("app-1", ""));
    let wh = Running::start(&text, Mode::Server).await;
    let body = json!({"events": [{"name": "client_event", "channel": "a"}, {"name": "custom.type", "channel": "b"}]}).to_string();
    let (status, answer) = post_events(&wh.ingest, "app-1", Some("app-1-token"), body).await;
    assert_eq!(status, 202);
    let ids: Vec<String> = answer["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    let mut conn = redis.conn();
    // Both wait, in order, in the app's partition of new events: an event
    // type of its own makes no queue and no key.
    let listed: Vec<String> = redis::cmd("LRANGE")
        .arg(format!("{p}:{{0}}:list:app-1|"))
        .arg(0)
        .arg(-1)
        .query(&mut conn)
        .unwrap();
    assert_eq!(listed.len(), 2);
    let bodies: Vec<String> = redis::cmd("HMGET")
        .arg(format!("{p}:{{0}}:jobs"))
        .arg(&listed)
        .query(&mut conn)
        .unwrap();
    for (raw, id) in bodies.iter().zip(&ids) {
        let job: serde_json::Value = serde_json::from_str(raw).unwrap();
        assert_eq!(&job["id"], id.as_str());
        assert_eq!(job["app_id"], "app-1");
    }
    let ready: Vec<String> = redis::cmd("ZRANGE")
        .arg(format!("{p}:{{0}}:ready"))
        .arg(0)
        .arg(-1)
        .query(&mut conn)
        .unwrap();
    assert_eq!(
        ready,
        ["app-1"],
        "the app is in the ring for workers to find"
    );
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{p}:*"))
        .query(&mut conn)
        .unwrap();
    assert!(
        keys.iter().all(|k| !k.contains("custom.type")),
        "no key per event type: {keys:?}"
    );
    wh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_event_names_in_one_request_make_no_queues_and_no_connections() {
    let p = prefix("names");
    let (redis, rx, text) = one_app(&p).await;
    let wh = Running::start(&text, Mode::All).await;
    // Warm up: one event through, so every connection the process keeps is open.
    let (status, _) = post_events(
        &wh.ingest,
        "app-1",
        Some("app-1-token"),
        json!({"name": "warm-up"}).to_string(),
    )
    .await;
    assert_eq!(status, 202);
    rx.wait_for("hook", 1, Duration::from_secs(20)).await;
    let clients_before = redis_clients(&redis);
    let events: Vec<_> = (0..1000)
        .map(|i| json!({"name": format!("custom.type-{i}"), "channel": "c"}))
        .collect();
    let (status, body) = post_events(
        &wh.ingest,
        "app-1",
        Some("app-1-token"),
        json!({ "events": events }).to_string(),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    let got = rx.wait_for("hook", 1001, Duration::from_secs(60)).await;
    let names: std::collections::HashSet<String> = got
        .iter()
        .map(|r| r.json()["events"][0]["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names.len(), 1001, "every event delivered once");
    assert_eq!(
        redis_clients(&redis),
        clients_before,
        "no connection per event name"
    );
    let mut conn = redis.conn();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{p}*"))
        .query(&mut conn)
        .unwrap();
    assert!(
        keys.len() < 20 && keys.iter().all(|k| !k.contains("custom.type")),
        "{} keys: {keys:?}",
        keys.len()
    );
    wh.shutdown().await;
}

/// `redis.wait_replicas = 1`: an event is answered 202 only once a replica
/// has it; with no replica the answer is 503 (try again), never 202.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_wait_replicas_an_event_is_accepted_only_once_a_replica_has_it() {
    let primary = RedisServer::start();
    let rx = Receiver::start().await;
    let text = config_with(
        &format!(
            "url = \"{}\"\nwait_replicas = 1\nwait_timeout = \"500ms\"\n",
            primary.url
        ),
        &prefix("durable"),
        "127.0.0.1:0",
        &app("app-1", &pusher_endpoint(&rx.url("hook"))),
    );
    let wh = Running::start(&text, Mode::All).await;
    let event = json!({"name": "client_event", "channel": "c"}).to_string();
    let (status, body) = post_events(&wh.ingest, "app-1", Some("app-1-token"), event.clone()).await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("only 0 of 1 Redis replicas confirmed the write within 500ms"),
        "{body}"
    );

    let port = primary.port.to_string();
    let replica = (0..5)
        .find_map(|_| RedisServer::spawn(free_port(), &["--replicaof", "127.0.0.1", &port]))
        .expect("a replica starts");
    let mut conn = replica.conn();
    eventually(
        "the replica is in sync",
        Duration::from_secs(15),
        async || {
            let info: String = redis::cmd("INFO")
                .arg("replication")
                .query(&mut conn)
                .unwrap();
            info.contains("master_link_status:up").then_some(())
        },
    )
    .await;
    // A busy box may miss one WAIT deadline: the producer tries again, as
    // the 503's Retry-After tells it to.
    eventually("an event accepted", Duration::from_secs(15), async || {
        let (status, _) =
            post_events(&wh.ingest, "app-1", Some("app-1-token"), event.clone()).await;
        (status == 202).then_some(())
    })
    .await;
    let got = rx.wait_for("hook", 1, Duration::from_secs(15)).await;
    verify_pusher(&got[0], "app-1-key", APP_SECRET);
    wh.shutdown().await;
}

/// The app of the Pusher fixtures, one `pusher` endpoint at `url`.
fn pusher_app(url: &str) -> String {
    format!(
        "\n[[apps]]\nid = \"app-1\"\nkey = \"app-key\"\nsecret = \"app-secret\"\ningest_token = \"app-1-token\"\n{}",
        pusher_endpoint(url)
    )
}

/// POSTs `body` to the Pusher route with the given key and signature.
async fn post_pusher(
    ingest: &str,
    body: &str,
    key: &str,
    signature: &str,
) -> (u16, reqwest::header::HeaderMap, serde_json::Value) {
    let resp = reqwest::Client::new()
        .post(format!("{ingest}/v1/pusher/webhooks"))
        .header("content-type", "application/json")
        .header("x-pusher-key", key)
        .header("x-pusher-signature", signature)
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let bytes = resp.bytes().await.unwrap();
    let body = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
    (status, headers, body)
}

fn pusher_sign(secret: &str, body: &str) -> String {
    use hmac::Mac;
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(body.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

/// What soketi and Pusher send (the fixture bodies, signed as they sign)
/// is accepted, and each event reaches the receiver as sent, in a body of
/// the same shape signed with the app secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soketi_webhooks_are_accepted_and_their_events_delivered_as_sent() {
    let fixtures: serde_json::Value =
        serde_json::from_str(include_str!("fixtures/pusher-webhooks.json")).unwrap();
    let (key, secret) = (
        fixtures["app"]["key"].as_str().unwrap(),
        fixtures["app"]["secret"].as_str().unwrap(),
    );
    let redis = RedisServer::start();
    let rx = Receiver::start().await;
    // The fixtures carry their own (old) time_ms: a window that takes them.
    let text = config(
        Some(&redis.url),
        &prefix("soketi"),
        "127.0.0.1:0",
        &pusher_app(&rx.url("hook")),
    )
    .replace("[server]\n", "[server]\npusher_max_age = \"36500d\"\n");
    let wh = Running::start(&text, Mode::All).await;

    let examples = fixtures["examples"].as_array().unwrap();
    let mut sent = Vec::new();
    for example in examples {
        // soketi's JSON.stringify order: time_ms, then events.
        let body = format!(
            "{{\"time_ms\":{},\"events\":{}}}",
            example["time_ms"],
            serde_json::to_string(&example["events"]).unwrap()
        );
        let (status, _, answer) =
            post_pusher(&wh.ingest, &body, key, &pusher_sign(secret, &body)).await;
        assert_eq!(status, 202, "{answer}");
        assert_eq!(answer["ids"].as_array().unwrap().len(), 1);
        sent.push((
            example["time_ms"].as_u64().unwrap(),
            example["events"][0].clone(),
        ));
    }
    let got = rx
        .wait_for("hook", examples.len(), Duration::from_secs(15))
        .await;
    let mut arrived: Vec<(u64, serde_json::Value)> = got
        .iter()
        .map(|r| {
            verify_pusher(r, key, secret);
            let body = r.json();
            assert_eq!(body["events"].as_array().unwrap().len(), 1);
            (body["time_ms"].as_u64().unwrap(), body["events"][0].clone())
        })
        .collect();
    arrived.sort_by_key(|(t, _)| *t);
    assert_eq!(arrived, sent, "the same events, with soketi's time_ms");
    wh.shutdown().await;
}

/// Wrong signatures, unknown keys, stale or replayed webhooks and bodies
/// that are not webhooks are refused, each with its status, and enqueue
/// nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_soketi_webhooks_are_refused_and_enqueue_nothing() {
    let redis = RedisServer::start();
    let p = prefix("soketi-bad");
    let text = config(
        Some(&redis.url),
        &p,
        "127.0.0.1:0",
        &pusher_app("http://127.0.0.1:9/unused"),
    );
    let wh = Running::start(&text, Mode::Server).await;
    let q = queue(&text);
    let fresh = |events: &str| {
        format!(
            "{{\"time_ms\":{},\"events\":{events}}}",
            wasmhook::event::now_ms()
        )
    };
    let body = fresh(r#"[{"name":"channel_occupied","channel":"private-orders"}]"#);
    let good = pusher_sign("app-secret", &body);

    let (status, _, wrong_sig) =
        post_pusher(&wh.ingest, &body, "app-key", &pusher_sign("other", &body)).await;
    assert_eq!(status, 401);
    let (status, _, unknown_key) = post_pusher(&wh.ingest, &body, "no-such-key", &good).await;
    assert_eq!(status, 401);
    assert_eq!(
        wrong_sig, unknown_key,
        "an unknown key looks like a wrong signature"
    );
    let (status, _, _) = post_pusher(&wh.ingest, &body, "app-key", "not hex").await;
    assert_eq!(status, 401);
    let (status, _, _) = post_pusher(&wh.ingest, &format!("{body} "), "app-key", &good).await;
    assert_eq!(status, 401, "the signature covers every byte");
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/pusher/webhooks", wh.ingest))
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401, "no headers");

    let stale = format!(
        "{{\"time_ms\":{},\"events\":[{{\"name\":\"channel_vacated\",\"channel\":\"c\"}}]}}",
        wasmhook::event::now_ms() - 6 * 60 * 1000
    );
    let (status, _, answer) = post_pusher(
        &wh.ingest,
        &stale,
        "app-key",
        &pusher_sign("app-secret", &stale),
    )
    .await;
    assert_eq!(
        (status, answer["error"].as_str()),
        (401, Some("stale")),
        "{answer}"
    );
    for (bad, what) in [
        ("{\"events\":[]", "malformed JSON"),
        (&fresh("[]") as &str, "no events"),
        (&fresh(r#"[{"channel":"c"}]"#), "an event without a name"),
        (
            "{\"time_ms\":\"soon\",\"events\":[]}",
            "time_ms not a number",
        ),
    ] {
        let (status, _, answer) =
            post_pusher(&wh.ingest, bad, "app-key", &pusher_sign("app-secret", bad)).await;
        assert_eq!(status, 400, "{what}: {answer}");
    }
    assert_eq!(
        q.depth().await.unwrap().ready,
        0,
        "nothing refused was enqueued"
    );

    // Accepted once; the same bytes again are answered, not stored again.
    let (status, _, first) = post_pusher(&wh.ingest, &body, "app-key", &good).await;
    assert_eq!(status, 202, "{first}");
    let (status, headers, again) = post_pusher(&wh.ingest, &body, "app-key", &good).await;
    assert_eq!(status, 202);
    assert_eq!(again, first, "the first answer");
    assert_eq!(headers["idempotent-replayed"], "true");
    assert_eq!(q.depth().await.unwrap().ready, 1, "stored once");
    // What the replay check keeps: one key per accepted webhook, none for
    // refused ones, each gone after twice the window (5 min by default).
    let mut conn = redis.conn();
    let kept: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{p}:{{idem:app-1}}:*"))
        .query(&mut conn)
        .unwrap();
    assert_eq!(kept.len(), 1, "{kept:?}");
    let ttl: i64 = redis::cmd("PTTL").arg(&kept[0]).query(&mut conn).unwrap();
    assert!(ttl > 0 && ttl <= 600_000, "{ttl}");
    wh.shutdown().await;
}
