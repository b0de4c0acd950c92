//! The network guard end to end: deliveries to loopback receivers are
//! refused by default (dead-lettered at once with the reason, nothing
//! reaching the receiver), reach them once `allow_networks` says so, go
//! through an outbound proxy when one is set; `config check` warns.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::*;
use serde_json::json;
use wasmhook::service::Mode;

const WAIT: Duration = Duration::from_secs(15);
const ALLOW_LOOPBACK: &str = "allow_networks = [\"127.0.0.0/8\"]\n";

/// The harness's config without its loopback allowance: the built-in guard.
fn guarded(text: String) -> String {
    assert!(text.contains(ALLOW_LOOPBACK));
    text.replace(ALLOW_LOOPBACK, "")
}

/// A TCP listener on 127.0.0.1 that counts the connections it accepts.
async fn counting_listener() -> (u16, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((_socket, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
        }
    });
    (port, accepted)
}

async fn send_one(ingest: &str) {
    let event = json!({"name": "client_event", "channel": "private-a", "data": "{}"});
    let (status, body) = post_events(ingest, "app-1", Some("app-1-token"), event.to_string()).await;
    assert_eq!(status, 202, "{body}");
}

/// The dead letters by the path of their endpoint's URL.
async fn letters_by_path(
    q: &wasmhook::queue::Queue,
    text: &str,
    n: usize,
) -> BTreeMap<String, wasmhook::queue::DeadLetter> {
    let s = settings(text);
    let app = s.apps.get("app-1").unwrap();
    dead_letters(q, n)
        .await
        .into_iter()
        .map(|(_, letter)| {
            let endpoint = letter.job.as_ref().unwrap().endpoint.clone().unwrap();
            let url = &app.endpoint(&endpoint).unwrap().url;
            (url.path().trim_start_matches('/').to_string(), letter)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loopback_receivers_are_refused_by_default_and_nothing_reaches_them() {
    let redis = RedisServer::start();
    let rx = Receiver::start().await;
    let (tcp_port, accepted) = counting_listener().await;
    let port = rx.base.rsplit(':').next().unwrap().to_string();
    let endpoints = [
        rx.url("literal"),
        format!("http://localhost:{port}/name"),
        format!("http://[::ffff:127.0.0.1]:{port}/mapped"),
        format!("http://2130706433:{port}/decimal"),
        format!("http://0x7f.1:{port}/hex"),
        format!("http://127.0.0.1:{tcp_port}/tcp"),
    ]
    .iter()
    .map(|u| pusher_endpoint(u))
    .collect::<String>();
    let text = guarded(config(
        Some(&redis.url),
        &prefix("guard-default"),
        "127.0.0.1:0",
        &app("app-1", &endpoints),
    ));
    let wh = Running::start(&text, Mode::All).await;
    send_one(&wh.ingest).await;

    let q = queue(&text);
    let letters = letters_by_path(&q, &text, 6).await;
    let reasons: BTreeMap<&str, &str> = letters
        .iter()
        .map(|(path, l)| (path.as_str(), l.reason.as_str()))
        .collect();
    assert_eq!(
        reasons,
        BTreeMap::from([
            (
                "decimal",
                "permanent failure: blocked: 127.0.0.1 is a loopback address"
            ),
            (
                "hex",
                "permanent failure: blocked: 127.0.0.1 is a loopback address"
            ),
            (
                "literal",
                "permanent failure: blocked: 127.0.0.1 is a loopback address"
            ),
            (
                "mapped",
                "permanent failure: blocked: ::ffff:127.0.0.1 embeds 127.0.0.1, a loopback address"
            ),
            (
                "name",
                "permanent failure: blocked: localhost (127.0.0.1) is a loopback address"
            ),
            (
                "tcp",
                "permanent failure: blocked: 127.0.0.1 is a loopback address"
            ),
        ])
    );
    for (path, letter) in &letters {
        assert_eq!(letter.attempts, 1, "{path}: dead at once, no retries");
        assert_eq!(letter.status, None, "{path}");
        assert_eq!(letter.response_body, None, "{path}");
        assert_eq!(letter.job.as_ref().unwrap().history.len(), 1, "{path}");
    }
    let stats = q.stats().await.unwrap();
    assert_eq!(stats.get("dead"), Some(&6), "{stats:?}");
    assert_eq!(stats.get("retried"), None, "{stats:?}");
    assert_eq!(stats.get("delivered"), None, "{stats:?}");
    for path in ["literal", "name", "mapped", "decimal", "hex"] {
        assert_eq!(rx.arrived(path), 0, "{path}");
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        0,
        "no connection was made to the blocked address"
    );
    wh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_receivers_are_reached_once_loopback_is_allowed() {
    let redis = RedisServer::start();
    let rx = Receiver::start().await;
    let port = rx.base.rsplit(':').next().unwrap().to_string();
    let endpoints = [
        rx.url("literal"),
        format!("http://localhost:{port}/name"),
        format!("http://2130706433:{port}/decimal"),
    ]
    .iter()
    .map(|u| pusher_endpoint(u))
    .collect::<String>();
    let text = config(
        Some(&redis.url),
        &prefix("guard-allowed"),
        "127.0.0.1:0",
        &app("app-1", &endpoints),
    );
    let wh = Running::start(&text, Mode::All).await;
    send_one(&wh.ingest).await;

    for path in ["literal", "name", "decimal"] {
        let got = rx.wait_for(path, 1, WAIT).await;
        verify_pusher(&got[0], "app-1-key", APP_SECRET);
    }
    let q = queue(&text);
    let stats = eventually("three deliveries recorded", WAIT, async || {
        let s = q.stats().await.unwrap();
        (s.get("delivered") == Some(&3)).then_some(s)
    })
    .await;
    assert_eq!(stats.get("dead"), None, "{stats:?}");
    wh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_a_proxy_names_go_to_the_proxy_and_literals_are_still_judged() {
    let redis = RedisServer::start();
    // The receiver answers absolute-form requests by their path: a plain
    // HTTP forward proxy that records what it is asked to forward.
    let proxy = Receiver::start().await;
    let (tcp_port, accepted) = counting_listener().await;
    let endpoints = [
        "http://webhooks.example/forwarded".to_string(),
        format!("http://127.0.0.1:{tcp_port}/literal"),
        "http://localhost/name".to_string(),
        "http://metadata.google.internal/metadata".to_string(),
    ]
    .iter()
    .map(|u| pusher_endpoint(u))
    .collect::<String>();
    let text = guarded(config(
        Some(&redis.url),
        &prefix("guard-proxy"),
        "127.0.0.1:0",
        &app("app-1", &endpoints),
    ))
    .replace(
        "[delivery]\n",
        &format!("[delivery]\nproxy = \"{}\"\n", proxy.base),
    );
    let wh = Running::start(&text, Mode::All).await;
    send_one(&wh.ingest).await;

    let got = proxy.wait_for("forwarded", 1, WAIT).await;
    assert_eq!(got[0].header("host"), "webhooks.example");
    verify_pusher(&got[0], "app-1-key", APP_SECRET);

    let q = queue(&text);
    let letters = letters_by_path(&q, &text, 3).await;
    let reasons: Vec<(&str, &str)> = letters
        .iter()
        .map(|(path, l)| (path.as_str(), l.reason.as_str()))
        .collect();
    assert_eq!(
        reasons,
        [
            (
                "literal",
                "permanent failure: blocked: 127.0.0.1 is a loopback address"
            ),
            (
                "metadata",
                "permanent failure: blocked: metadata.google.internal (169.254.169.254) is a link-local address"
            ),
            (
                "name",
                "permanent failure: blocked: localhost (127.0.0.1) is a loopback address"
            ),
        ]
    );
    assert_eq!(accepted.load(Ordering::SeqCst), 0);
    assert_eq!(proxy.arrived("literal"), 0);
    assert_eq!(proxy.arrived("name"), 0);
    assert_eq!(proxy.arrived("metadata"), 0);
    wh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_check_warns_about_endpoints_the_guard_will_refuse() {
    let dir = tempfile::tempdir().unwrap();
    let endpoints = pusher_endpoint("https://example.com/hooks")
        + &pusher_endpoint("http://127.0.0.1:9/hook")
        + &pusher_endpoint("http://localhost:9/hook");
    let text = guarded(config(
        None,
        "unused",
        "127.0.0.1:0",
        &app("app-1", &endpoints),
    ));
    let path = write_config(&dir, &text);
    let (ok, out, err) = run_cli(&path, &["config", "check"]).await;
    assert!(ok, "a warning is not an error: {err}");
    assert!(out.contains("configuration ok"), "{out}");
    let warnings: Vec<&str> = err.lines().filter(|l| l.starts_with("warning:")).collect();
    assert_eq!(warnings.len(), 2, "{err}");
    assert!(
        warnings[0].starts_with(
            "warning: apps[0].webhooks[1].url: blocked: 127.0.0.1 is a loopback address"
        ),
        "{err}"
    );
    assert!(
        warnings[1].starts_with(
            "warning: apps[0].webhooks[2].url: blocked: localhost (127.0.0.1) is a loopback address"
        ),
        "{err}"
    );

    let allowed = write_config(
        &dir,
        &config(None, "unused", "127.0.0.1:0", &app("app-1", &endpoints)),
    );
    let (ok, _, err) = run_cli(&allowed, &["config", "check"]).await;
    assert!(ok, "{err}");
    assert!(!err.contains("warning:"), "{err}");

    let bad = write_config(
        &dir,
        &text.replace(
            "[delivery]\n",
            "[delivery]\nallow_networks = [\"10.0.0.0/33\"]\n",
        ),
    );
    let (ok, _, err) = run_cli(&bad, &["config", "check"]).await;
    assert!(!ok);
    assert!(err.contains("delivery.allow_networks[0]:"), "{err}");
}
