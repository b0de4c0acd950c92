use super::*;

fn load(text: &str) -> Result<Settings, ConfigError> {
    load_from(
        Some("test.toml".into()),
        Some(text),
        Vec::<(String, String)>::new(),
    )
}

/// Fails unless one of `p` starts with `start`.
#[track_caller]
fn assert_problem(p: &[String], start: &str) {
    assert!(
        p.iter().any(|m| m.starts_with(start)),
        "no {start:?} in {p:?}"
    );
}

fn problems(text: &str) -> Vec<String> {
    load(text)
        .unwrap_err()
        .problems
        .iter()
        .map(ToString::to_string)
        .collect()
}

const APP: &str = r#"
[[apps]]
id = "app-1"
key = "app-key"
secret = "app-secret"
ingest_token = "token-1"

[[apps.webhooks]]
url = "https://example.com/hooks"
event_types = ["client_event", "channel_occupied"]
filter = { channel_name_starts_with = "private-" }
headers = { "X-Env" = "prod" }

[[apps.webhooks]]
url = "https://example.com/std"
scheme = "standard"
secrets = ["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"]
"#;

#[test]
fn the_documented_shape_loads() {
    let s = load(&format!("[redis]\nurl = \"redis://127.0.0.1:6379\"\nprefix = \"wh\"\n[server]\nlisten = \"127.0.0.1:8080\"\n{APP}")).unwrap();
    assert_eq!(s.redis_url.as_deref(), Some("redis://127.0.0.1:6379"));
    let app = s.apps.get("app-1").unwrap();
    assert_eq!(app.endpoints.len(), 2);
    assert_eq!(app.endpoints[0].scheme.name(), "pusher");
    assert_eq!(app.endpoints[1].scheme.name(), "standard");
    assert!(app.endpoints[0].accepts("client_event", Some("private-a")));
    assert!(!app.endpoints[0].accepts("member_added", Some("private-a")));
    assert_eq!(app.endpoints[0].timeout, std::time::Duration::from_secs(15));
    assert_ne!(app.endpoints[0].id, app.endpoints[1].id);
    // Defaults came through the merge.
    assert_eq!(s.server.max_body_bytes, 1024 * 1024);
    assert_eq!(s.retry.max_attempts(), 10);
}

#[test]
fn no_file_means_the_demo_app_and_no_redis() {
    let s = load_from(None, None, Vec::<(String, String)>::new()).unwrap();
    assert!(s.redis_url.is_none());
    assert!(s.apps.get("demo").is_some());
}

#[test]
fn a_soketi_webhooks_entry_comes_over_as_it_is() {
    // soketi's app `webhooks` entry, in TOML: scheme defaults to pusher.
    let s = load(
        r#"
[[apps]]
id = "app-1"
key = "app-key"
secret = "app-secret"
ingest_token = "t"
[[apps.webhooks]]
url = "https://example.com/pusher/webhooks"
event_types = ["channel_occupied", "channel_vacated"]
filter = { channel_name_starts_with = "private-", channel_name_ends_with = "-orders" }
headers = { "X-Custom" = "1" }
"#,
    )
    .unwrap();
    let e = &s.apps.get("app-1").unwrap().endpoints[0];
    assert_eq!(e.scheme.name(), "pusher");
    assert!(e.accepts("channel_vacated", Some("private-eu-orders")));
    assert!(!e.accepts("channel_vacated", Some("private-eu-users")));
}

#[test]
fn soketi_lambda_targets_are_refused_clearly() {
    let p = problems(
        r#"
[[apps]]
id = "a"
key = "k"
secret = "s"
ingest_token = "t"
[[apps.webhooks]]
lambda_function = "my-fn"
lambda = { async = true }
"#,
    );
    assert_eq!(p.len(), 1, "{p:?}");
    assert!(
        p[0].starts_with(
            "apps[0].webhooks[0].lambda_function: AWS Lambda webhooks are not supported"
        ),
        "{p:?}"
    );
}

#[test]
fn unknown_keys_are_named_with_their_path() {
    let p = problems(&format!(
        "{APP}\n[[apps.webhooks]]\nurl = \"https://x.example\"\nretries = 3\n"
    ));
    assert_eq!(p.len(), 1);
    assert!(
        p[0].starts_with("apps[0].webhooks[2].retries: unknown field `retries`"),
        "{p:?}"
    );
    let p = problems("[redis]\nurll = \"redis://x\"\n");
    assert!(
        p[0].starts_with("redis.urll: unknown field `urll`"),
        "{p:?}"
    );
}

#[test]
fn every_validation_problem_is_reported_at_once() {
    let p = problems(
        r#"
[server]
listen = "nowhere"
[retry]
schedule = []
[[apps]]
id = "has space"
key = "k"
ingest_token = "t"
[[apps.webhooks]]
url = "ftp://example.com"
headers = { "X-Pusher-Signature" = "forged" }
[[apps.webhooks]]
url = "https://example.com"
scheme = "standard"
secrets = ["not-a-whsec"]
"#,
    );
    let has = |prefix: &str| p.iter().any(|x| x.starts_with(prefix));
    assert!(has("server.listen: "), "{p:?}");
    assert!(has("retry.schedule: "), "{p:?}");
    assert!(has("apps[0].id: "), "{p:?}");
    assert!(has("apps[0].webhooks[0].url: must be an http"), "{p:?}");
    assert!(
        has("apps[0].webhooks[0].headers.X-Pusher-Signature: this header is set by wasmhook"),
        "{p:?}"
    );
    assert!(
        has("apps[0].webhooks[1].secrets[0]: must start with `whsec_`"),
        "{p:?}"
    );
}

#[test]
fn pusher_endpoints_need_an_app_secret() {
    let p = problems(
        "[[apps]]\nid = \"a\"\nkey = \"k\"\ningest_token = \"t\"\n[[apps.webhooks]]\nurl = \"https://x.example\"\n",
    );
    assert_problem(&p, "apps[0].secret: required");
}

#[test]
fn secrets_never_appear_in_errors() {
    let err = load(
        r#"
[[apps]]
id = "a"
key = "k"
secret = "hunter2-app-secret"
ingest_token = "t"
[[apps.webhooks]]
url = "https://x.example"
scheme = "standard"
secrets = ["whsec_c3VwZXJzZWNyZXQ="]
"#,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("secrets[0]"), "{err}");
    assert!(
        !err.contains("hunter2") && !err.contains("c3VwZXJzZWNyZXQ"),
        "{err}"
    );
}

#[test]
fn visibility_timeout_must_outlast_every_endpoint_timeout() {
    let p = problems(&format!("[queues]\nvisibility_timeout = \"10s\"\n{APP}"));
    assert_problem(&p, "queues.visibility_timeout: ");
}

/// Found by the config property test: an endpoint timeout near the largest
/// `Duration` overflowed the visibility timeout check and panicked.
#[test]
fn durations_past_a_hundred_years_are_refused() {
    let p = problems("[delivery]\ntimeout = \"18446744073709551615s\"\n");
    assert!(
        p.iter()
            .any(|x| x.starts_with("delivery.timeout: ") && x.contains("100 years")),
        "{p:?}"
    );
    let p = problems(&format!("{APP}timeout = \"584942417355y\"\n"));
    assert_problem(&p, "apps[0].webhooks[1].timeout: ");
    let p = problems("[retry]\nschedule = [\"0s\", \"36501d\"]\n");
    assert_problem(&p, "retry.schedule[1]: ");
    assert!(load("[retry]\nschedule = [\"0s\", \"36500d\"]\n").is_ok());
}

#[test]
fn environment_variables_override_any_key() {
    let env = vec![
        (
            "WASMHOOK_REDIS__URL".to_string(),
            "redis://10.0.0.1:6380".to_string(),
        ),
        ("WASMHOOK_QUEUES__CONCURRENCY".to_string(), "7".to_string()),
        ("WASMHOOK_APPS__0__KEY".to_string(), "12345".to_string()),
        (
            "WASMHOOK_DELIVERY__BREAKER__MIN_REQUESTS".to_string(),
            "99".to_string(),
        ),
        ("WASMHOOK_CONFIG".to_string(), "ignored.toml".to_string()),
        ("OTHER".to_string(), "x".to_string()),
    ];
    let s = load_from(None, Some(APP), env).unwrap();
    assert_eq!(s.redis_url.as_deref(), Some("redis://10.0.0.1:6380"));
    assert_eq!(s.queues.concurrency, 7);
    assert_eq!(s.delivery.breaker.min_requests, 99);
    assert_eq!(
        s.apps.get("app-1").unwrap().key,
        "12345",
        "a string key stays a string"
    );
}

#[test]
fn environment_mistakes_are_named() {
    let bad = |k: &str, v: &str| {
        load_from(None, Some(APP), vec![(k.to_string(), v.to_string())])
            .unwrap_err()
            .problems
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert!(
        bad("WASMHOOK_REDIS_URL", "redis://x").contains("WASMHOOK_REDIS_URL: not a config key")
    );
    assert!(bad("WASMHOOK_APPS__5__KEY", "k").contains("index 5 is past the end"));
    assert!(bad("WASMHOOK_REDIS__NOPE", "1").contains("unknown field `nope`"));
}

#[test]
fn malformed_toml_says_where() {
    let e = load("[redis\nurl = 1").unwrap_err().to_string();
    assert!(
        e.contains("<file>: not valid TOML") && e.contains("line 1"),
        "{e}"
    );
}

#[test]
fn weights_caps_and_rate_limits_reach_the_queue() {
    let text = APP.replace("[[apps]]\n", "[[apps]]\nweight = 3\nmax_in_flight = 5\n")
        + "max_in_flight = 2\nrate_limit = \"20/s\"\nrate_limit_burst = 4\n";
    let s = load(&text).unwrap();
    let t = s.tenancy();
    assert_eq!(
        (t.quantum, t.app_max_in_flight, t.endpoint_max_in_flight),
        (8, 128, 16)
    );
    assert_eq!(t.apps, vec![("app-1".to_string(), 3, 5)]);
    assert_eq!(t.endpoints.len(), 1);
    let e = &t.endpoints[0];
    assert_eq!(e.max_in_flight, 2);
    let r = e.rate_limit.unwrap();
    assert_eq!((r.count, r.burst), (20, 4));
    // An app and endpoint with nothing of their own are not listed.
    assert!(load(APP).unwrap().tenancy().apps.is_empty());
}

#[test]
fn ordering_keys_are_parsed_and_need_an_ordered_endpoint() {
    use crate::app::OrderBy;
    let s = load(&(APP.to_string() + "ordered = true\norder_by = \"channel\"\n")).unwrap();
    let e = &s.apps.iter().next().unwrap().endpoints[1];
    assert_eq!(e.order_by, Some(OrderBy::Channel));
    assert!(s.tenancy().endpoints[0].keyed);
    for (text, want) in [
        ("event.user_id", Some(OrderBy::Field("user_id".into()))),
        ("metadata.tenant", Some(OrderBy::Metadata("tenant".into()))),
        ("event.", None),
        ("user", None),
    ] {
        assert_eq!(OrderBy::parse(text), want, "{text}");
    }
    for (extra, want) in [
        (
            "order_by = \"channel\"\n",
            "webhooks[1].order_by: only with `ordered = true`",
        ),
        (
            "ordered = true\norder_by = \"room\"\n",
            "webhooks[1].order_by: expected \"channel\"",
        ),
    ] {
        let err = load(&(APP.to_string() + extra)).unwrap_err();
        let text: Vec<String> = err.problems.iter().map(ToString::to_string).collect();
        assert!(text.iter().any(|p| p.contains(want)), "{extra}: {text:?}");
    }
}

#[test]
fn a_batched_endpoint_reaches_the_queue_and_its_bounds_are_checked() {
    let s =
        load(&(APP.to_string() + "batch = { max_events = 50, max_wait = \"250ms\" }\n")).unwrap();
    let t = s.tenancy();
    let b = t.endpoints[0].batch.expect("batched");
    assert_eq!(
        (b.max_events, b.max_wait, b.max_bytes),
        (50, std::time::Duration::from_millis(250), 1 << 20)
    );
    let s =
        load(&(APP.to_string() + "batch = { max_events = 5 }\nmax_batch_bytes = 4096\n")).unwrap();
    let b = s.tenancy().endpoints[0].batch.unwrap();
    assert_eq!(
        (b.max_wait, b.max_bytes),
        (std::time::Duration::from_secs(1), 4096)
    );
    for (extra, want) in [
        (
            "batch = { max_events = 0 }\n",
            "webhooks[1].batch.max_events: must be 1 to 1000",
        ),
        (
            "batch = { max_events = 1001 }\n",
            "webhooks[1].batch.max_events: must be 1 to 1000",
        ),
        (
            "batch = { max_events = 5, max_wait = \"2h\" }\n",
            "webhooks[1].batch.max_wait: must be at most 1h",
        ),
        (
            "batch = { max_events = 5 }\nmax_batch_bytes = 10\n",
            "webhooks[1].max_batch_bytes: must be 1024 to 67108864 bytes",
        ),
        (
            "max_batch_bytes = 4096\n",
            "webhooks[1].max_batch_bytes: only with a `batch`",
        ),
        (
            "batch = { max_events = 5 }\nordered = true\n",
            "webhooks[1].batch: an endpoint is either `ordered` or batched",
        ),
        (
            "batch = { max_events = 5, size = 3 }\n",
            "unknown field `size`",
        ),
    ] {
        let err = load(&(APP.to_string() + extra)).unwrap_err();
        let text: Vec<String> = err.problems.iter().map(ToString::to_string).collect();
        assert!(text.iter().any(|p| p.contains(want)), "{extra}: {text:?}");
    }
}

#[test]
fn bad_scheduling_values_are_named() {
    let problems = |extra_app: &str, extra_ep: &str, top: &str| {
        let text = format!(
            "{top}\n{}",
            APP.replace("[[apps]]\n", &format!("[[apps]]\n{extra_app}"))
        ) + extra_ep;
        load(&text)
            .unwrap_err()
            .problems
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert!(problems("weight = 0\n", "", "").contains("apps[0].weight: must be 1 to 1000"));
    assert!(
        problems("", "rate_limit = \"fast\"\n", "")
            .contains("apps[0].webhooks[1].rate_limit: expected a rate")
    );
    assert!(
        problems("", "rate_limit_burst = 3\n", "")
            .contains("rate_limit_burst: only with a `rate_limit`")
    );
    assert!(problems("", "max_in_flight = 0\n", "").contains("max_in_flight: must be at least 1"));
    assert!(
        problems("", "", "[delivery.breaker]\nfailure_rate = 1.5")
            .contains("delivery.breaker.failure_rate")
    );
    assert!(
        problems("", "", "[queues]\nquantum = 0").contains("queues.quantum: must be at least 1")
    );
    // The keys of the old one-queue-per-event-type layout are refused by name.
    assert!(problems("", "", "[queues]\nkey = \"app\"").contains("unknown field `key`"));
}

#[test]
fn the_built_in_defaults_are_valid() {
    let table: toml::Table = DEFAULTS.parse().unwrap();
    assert!(table.contains_key("redis") && table.contains_key("retry"));
    assert!(load("").is_ok());
}

#[test]
fn instance_reuse_has_defaults_per_plugin_overrides_and_a_floor() {
    let s = load(
        r#"
[plugins.fresh]
path = "fresh.wasm"
max_reuse = 1
[plugins.warm]
path = "warm.wasm"
"#,
    )
    .unwrap();
    let reuse = |name: &str| {
        s.plugins
            .iter()
            .find(|p| p.name == name)
            .map(|p| p.limits.max_reuse)
    };
    assert_eq!(reuse("fresh"), Some(1));
    assert_eq!(reuse("warm"), Some(1000), "the built-in default");
    assert_eq!(s.wasm.warm_instances, 64);

    let p = problems(
        r#"
[wasm]
max_reuse = 0
[plugins.x]
path = "x.wasm"
max_reuse = 0
"#,
    );
    assert_problem(&p, "wasm.max_reuse: must be at least 1");
    assert_problem(&p, "plugins.x.max_reuse: must be at least 1");
}

#[test]
fn allowed_networks_proxy_and_no_proxy_are_validated() {
    let s = load(&format!(
        "[delivery]\nallow_networks = [\"127.0.0.0/8\", \"10.1.2.3/16\", \"fd00::1\"]\n{APP}"
    ))
    .unwrap();
    let allowed: Vec<String> = s
        .delivery
        .egress
        .guard
        .allowed_networks()
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(allowed, ["127.0.0.0/8", "10.1.0.0/16", "fd00::1/128"]);
    assert!(s.delivery.egress.proxy.is_none());
    let s = load_from(
        Some("test.toml".into()),
        Some(APP),
        [(
            "WASMHOOK_DELIVERY__ALLOW_NETWORKS".to_string(),
            r#"["127.0.0.0/8"]"#.to_string(),
        )],
    )
    .unwrap();
    assert_eq!(
        s.delivery.egress.guard.allowed_networks()[0].to_string(),
        "127.0.0.0/8",
        "the environment sets it too"
    );

    let p = problems("[delivery]\nallow_networks = [\"10.0.0.0/8\", \"10.0.0/8\", \"nope\"]\n");
    assert_eq!(p.len(), 2, "{p:?}");
    assert!(
        p[0].starts_with("delivery.allow_networks[1]: not a network") && !p[0].contains("10.0.0/8"),
        "{p:?}"
    );
    assert!(p[1].starts_with("delivery.allow_networks[2]:"), "{p:?}");

    let s = load(&format!(
        "[delivery]\nproxy = \"http://user:pw@proxy.internal:3128\"\nno_proxy = [\"internal.example\", \"10.1.0.0/16\"]\n{APP}"
    ))
    .unwrap();
    let proxy = s.delivery.egress.proxy.as_ref().unwrap();
    assert_eq!(proxy.url.host_str(), Some("proxy.internal"));
    assert_eq!(proxy.no_proxy, ["internal.example", "10.1.0.0/16"]);
    assert!(
        !format!("{:?}", s.delivery).contains("pw"),
        "the proxy's credentials stay out of Debug"
    );

    for (text, want) in [
        (
            "proxy = \"socks5://user:secret-pw@p:1080\"",
            "delivery.proxy: must be an http:// or https:// URL",
        ),
        ("proxy = \"::secret-pw\"", "delivery.proxy: not a URL"),
        (
            "no_proxy = [\"internal.example\"]",
            "delivery.no_proxy: only with a delivery.proxy",
        ),
        (
            "proxy = \"http://p:3128\"\nno_proxy = [\"a.example,b.example\"]",
            "delivery.no_proxy[0]: one host",
        ),
    ] {
        let p = problems(&format!("[delivery]\n{text}\n"));
        assert_eq!(p.len(), 1, "{text}: {p:?}");
        assert!(p[0].starts_with(want), "{text}: {p:?}");
        assert!(!p[0].contains("secret-pw"), "{p:?}");
    }
}

#[test]
fn endpoints_the_guard_will_refuse_are_warnings_not_errors() {
    let app = |urls: &[&str]| {
        let mut text =
            "[[apps]]\nid = \"a\"\nkey = \"k\"\nsecret = \"s\"\ningest_token = \"t\"\n".to_string();
        for url in urls {
            text.push_str(&format!("[[apps.webhooks]]\nurl = \"{url}\"\n"));
        }
        text
    };
    let urls = [
        "https://example.com/hooks",
        "http://10.0.0.5/hook",
        "http://localhost:8080/",
        "http://[::ffff:127.0.0.1]/",
        "https://internal.example/",
    ];
    let s = load(&app(&urls)).unwrap();
    let warnings: Vec<String> = s.warnings.iter().map(ToString::to_string).collect();
    assert_eq!(warnings.len(), 3, "{warnings:?}");
    assert!(
        warnings[0].starts_with(
            "apps[0].webhooks[1].url: blocked: 10.0.0.5 is a private address: deliveries to it will be refused"
        ),
        "{warnings:?}"
    );
    assert!(
        warnings[1].starts_with("apps[0].webhooks[2].url: blocked: localhost (127.0.0.1)"),
        "{warnings:?}"
    );
    assert!(
        warnings[2].starts_with("apps[0].webhooks[3].url: blocked: ::ffff:127.0.0.1 embeds"),
        "{warnings:?}"
    );

    let s = load(&format!(
        "[delivery]\nallow_networks = [\"127.0.0.0/8\", \"10.0.0.0/8\"]\n{}",
        app(&urls)
    ))
    .unwrap();
    assert!(s.warnings.is_empty(), "{:?}", s.warnings);
}

#[test]
fn the_demo_app_may_reach_its_loopback_echo_receiver() {
    let s = load_from(None, None, Vec::<(String, String)>::new()).unwrap();
    assert!(s.warnings.is_empty(), "{:?}", s.warnings);
    let guard = &s.delivery.egress.guard;
    assert!(guard.check("127.0.0.1".parse().unwrap()).is_ok());
    assert!(guard.check("::1".parse().unwrap()).is_ok());
    assert!(guard.check("10.0.0.1".parse().unwrap()).is_err());
    // With a file, nothing is allowed unless it says so.
    let s = load(APP).unwrap();
    assert!(
        s.delivery
            .egress
            .guard
            .check("127.0.0.1".parse().unwrap())
            .is_err()
    );
}

#[test]
fn the_echo_receiver_is_on_only_in_the_demo_or_when_asked() {
    assert!(
        load_from(None, None, Vec::<(String, String)>::new())
            .unwrap()
            .server
            .echo
    );
    assert!(!load(APP).unwrap().server.echo, "off with a config file");
    assert!(
        load(&format!("[server]\necho = true\n{APP}"))
            .unwrap()
            .server
            .echo
    );
}

/// Looks like a secret; must never show in an error.
const LEAK: &str = "whsec_TOPSECRETc2VjcmV0";

fn error_text(text: &str, env: &[(&str, &str)]) -> String {
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let e = load_from(Some("test.toml".into()), Some(text), env)
        .unwrap_err()
        .to_string();
    assert!(!e.contains("TOPSECRET"), "the value is echoed: {e}");
    e
}

#[test]
fn config_errors_name_the_key_and_what_was_expected_never_the_value() {
    // A secret where a number goes.
    let e = error_text(&format!("[queues]\nconcurrency = \"{LEAK}\"\n{APP}"), &[]);
    assert!(
        e.contains("queues.concurrency: wrong type: expected usize, found a string"),
        "{e}"
    );
    // A secret where a list goes.
    let e = error_text(
        &APP.replace(
            "secrets = [\"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"]",
            &format!("secrets = \"{LEAK}\""),
        ),
        &[],
    );
    assert!(
        e.contains("apps[0].webhooks[1].secrets: wrong type: expected a sequence"),
        "{e}"
    );
    // Not one of an enum's names.
    let e = error_text(&format!("[log]\nformat = \"{LEAK}\"\n{APP}"), &[]);
    assert!(
        e.contains("log.format: invalid value: expected `pretty` or `json`"),
        "{e}"
    );
    // Not a duration.
    let e = error_text(
        &format!("[server]\nidempotency_ttl = \"{LEAK}\"\n{APP}"),
        &[],
    );
    assert!(
        e.contains("server.idempotency_ttl: invalid value: expected a duration"),
        "{e}"
    );
    // URLs holding a password.
    let e = error_text(
        &format!("[redis]\nurl = \"redis://user:{LEAK}@host:port\"\n{APP}"),
        &[],
    );
    assert!(e.contains("redis.url: not a Redis URL"), "{e}");
    let e = error_text(
        &APP.replace(
            "https://example.com/hooks",
            &format!("https://user:{LEAK}@exa mple.com:99999/"),
        ),
        &[],
    );
    assert!(e.contains("apps[0].webhooks[0].url: not a URL"), "{e}");
    // Environment overrides.
    let e = error_text(APP, &[("WASMHOOK_QUEUES__CONCURRENCY", LEAK)]);
    assert!(e.contains("queues.concurrency: wrong type"), "{e}");
    let e = error_text(APP, &[("WASMHOOK_APPS__0__WEIGHT", LEAK)]);
    assert!(e.contains("apps[0].weight: wrong type"), "{e}");
    let e = error_text(APP, &[("WASMHOOK_LOG__FORMAT", LEAK)]);
    assert!(e.contains("log.format: invalid value"), "{e}");
    // Names that repeat, or point nowhere.
    let e = error_text(
        &(APP.replace("app-1", LEAK) + &APP.replace("app-1", LEAK)),
        &[],
    );
    assert!(
        e.contains("apps[1].id: the same id as an earlier app"),
        "{e}"
    );
    let e = error_text(
        &APP.replace(
            "[[apps]]\n",
            &format!("[[apps]]\nplugins = [{{ plugin = \"{LEAK}\" }}]\n"),
        ),
        &[],
    );
    assert!(
        e.contains("apps[0].plugins[0].plugin: names no plugin"),
        "{e}"
    );
}

#[test]
fn a_value_with_a_comma_and_expected_in_it_is_still_left_out() {
    let m =
        super::without_value("invalid type: string \"s3cret, expected x\", expected a duration");
    assert_eq!(m, "wrong type: expected a duration, found a string");
    assert_eq!(
        super::without_value("unknown field `urll`, expected `url` or `prefix`"),
        "unknown field `urll`, expected `url` or `prefix`"
    );
    assert_eq!(super::without_value("something s3cret"), "invalid value");
}

#[test]
fn the_automatic_plugin_cache_is_per_user_or_none() {
    use std::path::PathBuf;
    let dir = |vars: &[(&str, &str)]| {
        let vars: Vec<(String, std::ffi::OsString)> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.into()))
            .collect();
        super::settings::user_cache_dir(|name| {
            vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
        })
    };
    assert_eq!(
        dir(&[("XDG_CACHE_HOME", "/x/cache"), ("HOME", "/home/u")]),
        Some(PathBuf::from("/x/cache/wasmhook"))
    );
    assert_eq!(
        dir(&[("HOME", "/home/u")]),
        Some(PathBuf::from("/home/u/.cache/wasmhook"))
    );
    assert_eq!(
        dir(&[("XDG_CACHE_HOME", "relative"), ("HOME", "/home/u")]),
        Some(PathBuf::from("/home/u/.cache/wasmhook"))
    );
    // Never a shared directory such as the temp directory.
    assert_eq!(dir(&[]), None);
    assert_eq!(dir(&[("HOME", "")]), None);
}

#[test]
fn counts_too_large_to_size_anything_from_are_refused() {
    let p = problems(
        "[queues]\nconcurrency = 1000001\n[wasm]\nmax_instances = 4294967295\nplugin_max_memories = 100000\n",
    );
    let has = |want: &str| p.iter().any(|m| m.starts_with(want));
    assert!(has("queues.concurrency: must be at most 1000000"), "{p:?}");
    assert!(has("wasm.max_instances: must be at most 10000"), "{p:?}");
    assert!(
        has("wasm.plugin_max_memories: must be at most 1000"),
        "{p:?}"
    );
}

#[test]
fn metrics_are_on_the_ingest_listener_by_default_and_nowhere_else() {
    let s = load(APP).unwrap();
    assert!(s.metrics.on_ingest);
    assert_eq!(s.metrics.listen, None);
    assert!(s.metrics.token.is_none());
    assert!(s.metrics.endpoints.is_empty());
}

#[test]
fn metrics_settings_are_checked_without_echoing_them() {
    let p = problems(&format!(
        "{APP}\n[metrics]\nlisten = \"secret-host:x\"\nendpoints = [\"app-1/nope\", \"private-app\"]\n"
    ));
    assert_eq!(p.len(), 3, "{p:?}");
    assert!(p[0].starts_with("metrics.listen: must be an address"));
    assert!(p[1].starts_with("metrics.endpoints[0]: must be"));
    assert!(p[2].starts_with("metrics.endpoints[1]: must be"));
    for e in &p {
        assert!(
            !e.contains("secret-host") && !e.contains("nope") && !e.contains("private-app"),
            "{e}"
        );
    }
    let many: Vec<String> = (0..101).map(|_| "\"app-1/x\"".to_string()).collect();
    let p = problems(&format!(
        "{APP}\n[metrics]\nendpoints = [{}]\n",
        many.join(",")
    ));
    assert!(p[0].starts_with("metrics.endpoints: at most 100"), "{p:?}");
}

#[test]
fn a_listed_endpoint_is_found_by_its_id() {
    let text = format!("{APP}\n[metrics]\nlisten = \"127.0.0.1:9090\"\ntoken = \"t\"\n");
    let s = load(&text).unwrap();
    let id = s.apps.get("app-1").unwrap().endpoints[1].id.clone();
    let s = load(&format!("{text}endpoints = [\"app-1/{id}\"]\n")).unwrap();
    assert_eq!(s.metrics.endpoints, [("app-1".to_string(), id)]);
    assert_eq!(s.metrics.listen, Some("127.0.0.1:9090".parse().unwrap()));
    assert!(s.metrics.token.as_ref().is_some_and(|t| t.matches("t")));
    assert!(
        !format!("{:?}", s.metrics).contains("\"t\""),
        "the token stays out of Debug"
    );
}

#[test]
fn redis_credentials_come_from_the_config_the_environment_or_a_file_and_never_show() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pw");
    std::fs::write(&file, "file-pw-123\n").unwrap();
    let url = "[redis]\nurl = \"redis://127.0.0.1:6379\"\n";
    let s = load(&format!(
        "{url}username = \"hooks\"\npassword_file = \"{}\"\n{APP}",
        file.display()
    ))
    .unwrap();
    let info = s.redis_connection().unwrap().unwrap();
    assert_eq!(info.redis_settings().username(), Some("hooks"));
    assert_eq!(info.redis_settings().password(), Some("file-pw-123"));
    assert!(!format!("{:?}", s.redis_auth).contains("file-pw-123"));
    let s = load_from(
        Some("test.toml".into()),
        Some(&format!("{url}{APP}")),
        [(
            "WASMHOOK_REDIS__PASSWORD".to_string(),
            "env-pw-456".to_string(),
        )],
    )
    .unwrap();
    assert_eq!(
        s.redis_connection()
            .unwrap()
            .unwrap()
            .redis_settings()
            .password(),
        Some("env-pw-456")
    );

    let p = problems(&format!(
        "{url}password = \"cfg-pw-789\"\npassword_file = \"{}\"\n",
        file.display()
    ));
    assert_problem(&p, "redis.password_file: set either");
    let p = problems(&format!("{url}password_file = \"/nonexistent/pw\"\n"));
    assert_problem(&p, "redis.password_file: cannot read");
    let p = problems("[redis]\npassword = \"cfg-pw-789\"\n");
    assert_problem(&p, "redis.url: required");
    assert!(p.iter().all(|m| !m.contains("cfg-pw-789")), "{p:?}");
}

#[test]
fn tls_settings_need_a_rediss_url_and_a_readable_pem() {
    let dir = tempfile::tempdir().unwrap();
    let pem = dir.path().join("ca.pem");
    std::fs::write(
        &pem,
        "-----BEGIN CERTIFICATE-----\nx\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let not_pem = dir.path().join("ca.txt");
    std::fs::write(&not_pem, "hello").unwrap();
    let s = load(&format!(
        "[redis]\nurl = \"rediss://127.0.0.1:6380\"\nca_file = \"{}\"\n{APP}",
        pem.display()
    ))
    .unwrap();
    assert!(
        s.redis_auth
            .ca
            .as_ref()
            .is_some_and(|c| c.starts_with(b"-----BEGIN"))
    );
    let p = problems(&format!(
        "[redis]\nurl = \"redis://127.0.0.1:6379\"\nca_file = \"{}\"\n",
        pem.display()
    ));
    assert!(
        p.iter().any(|m| m
            .starts_with("redis.url: redis.ca_file and redis.tls_insecure need a rediss:// URL")),
        "{p:?}"
    );
    let p = problems(&format!(
        "[redis]\nurl = \"rediss://127.0.0.1:6380\"\nca_file = \"{}\"\n",
        not_pem.display()
    ));
    assert_problem(&p, "redis.ca_file: must be a PEM certificate");
    let s = load(&format!(
        "[redis]\nurl = \"rediss://127.0.0.1:6380\"\ntls_insecure = true\n{APP}"
    ))
    .unwrap();
    assert!(s.redis_connection().unwrap().is_some());
}

#[test]
fn a_cluster_is_named_by_seed_nodes_and_durability_is_bounded() {
    let s = load(&format!(
        "[redis]\nurl = \"redis://10.0.0.1:7000\"\ncluster = true\nurls = [\"redis://10.0.0.2:7000\"]\nusername = \"hooks\"\nwait_replicas = 1\nwait_timeout = \"200ms\"\n{APP}"
    ))
    .unwrap();
    let target = s.redis_target().unwrap().unwrap();
    assert!(target.cluster);
    assert_eq!(target.nodes.len(), 2);
    assert!(
        target
            .nodes
            .iter()
            .all(|n| n.redis_settings().username() == Some("hooks")),
        "the login applies to every seed node"
    );
    assert_eq!(
        (target.wait_replicas, target.wait_timeout),
        (1, std::time::Duration::from_millis(200))
    );
    // The defaults: one server, nothing waited for.
    let s = load(&format!(
        "[redis]\nurl = \"redis://10.0.0.1:6379/2\"\n{APP}"
    ))
    .unwrap();
    let target = s.redis_target().unwrap().unwrap();
    assert!(!target.cluster && target.nodes.len() == 1 && target.wait_replicas == 0);
    assert_eq!(target.nodes[0].redis_settings().db(), 2);

    let p = problems("[redis]\ncluster = true\n");
    assert_problem(&p, "redis.cluster: needs redis.url");
    let p = problems("[redis]\nurl = \"redis://a:1\"\nurls = [\"redis://b:1\"]\n");
    assert_problem(&p, "redis.urls: more seed nodes are for a cluster");
    let p = problems("[redis]\nurl = \"redis://a:1/3\"\ncluster = true\n");
    assert_problem(&p, "redis.url: a cluster has database 0 only");
    let p = problems("[redis]\nurl = \"rediss://a:1\"\ncluster = true\nurls = [\"redis://b:1\"]\n");
    assert_problem(
        &p,
        "redis.urls: use rediss:// for every seed node or for none",
    );
    let p = problems(
        "[redis]\nurl = \"redis://a:1\"\ncluster = true\nurls = [\"redis://:seed-pw-321@b:1\", \"http://:seed-pw-321@c\"]\n",
    );
    assert_problem(&p, "redis.urls.1: not a Redis URL");
    assert!(p.iter().all(|m| !m.contains("seed-pw-321")), "{p:?}");
    let p = problems("[redis]\nwait_replicas = 1\n");
    assert_problem(&p, "redis.wait_replicas: needs redis.url");
    let p = problems("[redis]\nurl = \"redis://a:1\"\nwait_replicas = 1\nwait_timeout = \"10s\"\n");
    assert_problem(&p, "redis.wait_timeout: must be more than 0 and at most 3s");
    let p = problems("[redis]\nurl = \"redis://a:1\"\nwait_replicas = 101\n");
    assert_problem(&p, "redis.wait_replicas: must be at most 100");
}

#[test]
fn a_pusher_key_names_one_app_and_the_replay_window_is_positive() {
    let second = APP.replace("id = \"app-1\"", "id = \"app-2\"");
    let p = problems(&format!("{APP}{second}"));
    assert_problem(&p, "apps[1].key: the same key as an earlier app");
    let s = load(APP).unwrap();
    assert_eq!(s.server.pusher_max_age, std::time::Duration::from_secs(300));
    assert_eq!(s.apps.by_key("app-key").unwrap().id, "app-1");
    assert!(s.apps.by_key("app-1").is_none());
    let p = problems(&format!("[server]\npusher_max_age = \"0s\"\n{APP}"));
    assert_problem(&p, "server.pusher_max_age: must be more than 0");
}
