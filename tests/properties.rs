//! Property tests for the parsers that take tenant input: the ingest body,
//! the queue entry decoder and the config loader. Generated input of every
//! shape gives a value or an error, never a panic; what is accepted keeps
//! the invariants the rest of the system relies on. The fuzz targets in
//! `tests/fuzz` (FUZZING.md) search the same ground for longer.

use std::time::Duration;

use proptest::collection::{btree_map, vec};
use proptest::option;
use proptest::prelude::*;
use serde_json::{Map, Value, json};
use wasmhook::event::{Attempt, Event, Job};
use wasmhook::ingest::{IngestError, parse_events};
use wasmhook::queue::entry::{MAX_TIME_MS, decode, encode};

/// Cases per property: enough to shake out the shapes, few enough that
/// `cargo test` stays quick.
fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 256,
        ..ProptestConfig::default()
    }
}

// ---- generators ------------------------------------------------------------

/// Any JSON scalar, floats included (finite: JSON has no others).
fn json_leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("JSON numbers are finite", |f| f.is_finite())
            .prop_map(Value::from),
        ".{0,20}".prop_map(Value::String),
    ]
}

/// Any JSON value, a few levels deep.
fn json_value() -> impl Strategy<Value = Value> {
    json_leaf().prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..6).prop_map(Value::Array),
            btree_map(".{0,8}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// A valid event type, app or endpoint id.
fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "[A-Za-z0-9_.:-]{1,40}",
        1 => "[A-Za-z0-9_.:-]{200}",
    ]
}

/// A valid event: a name, maybe a channel, any other fields.
fn event() -> impl Strategy<Value = Event> {
    (
        name(),
        option::of(".{0,50}"),
        btree_map(
            ".{0,8}".prop_filter("not a reserved key", |k| k != "name" && k != "channel"),
            json_value(),
            0..5,
        ),
    )
        .prop_map(|(name, channel, fields)| Event {
            name,
            channel,
            fields: fields.into_iter().collect(),
        })
}

/// A job as a worker may write it back: any id, attempts so far, history.
fn job() -> impl Strategy<Value = Job> {
    let attempt = (
        0..=MAX_TIME_MS,
        option::of(any::<u16>()),
        option::of(".{0,30}"),
    )
        .prop_map(|(at_ms, status, error)| Attempt {
            at_ms,
            status,
            error,
        });
    let pairs = || vec((".{0,10}", ".{0,20}"), 0..3);
    (
        (".{1,50}", name(), event(), 0..=MAX_TIME_MS),
        (
            0..u32::MAX,
            option::of(name()),
            vec(attempt, 0..4),
            pairs(),
            pairs(),
        ),
    )
        .prop_map(
            |((id, app_id, event, created_ms), (attempt, endpoint, history, headers, metadata))| {
                Job {
                    batch: Vec::new(),
                    id,
                    app_id,
                    event,
                    created_ms,
                    attempt,
                    endpoint,
                    history,
                    headers,
                    metadata,
                    order_key: None,
                }
            },
        )
}

/// A JSON object shaped like an inbox entry, each field valid, wrong or absent.
fn job_shaped() -> impl Strategy<Value = Value> {
    let field =
        |valid: BoxedStrategy<Value>| option::of(prop_oneof![3 => valid, 1 => json_value()]);
    (
        field(".{0,210}".prop_map(Value::from).boxed()),
        field(name().prop_map(Value::from).boxed()),
        field(
            event()
                .prop_map(|e| serde_json::to_value(e).unwrap())
                .boxed(),
        ),
        field(
            prop_oneof![0..=MAX_TIME_MS, Just(MAX_TIME_MS + 1), Just(u64::MAX)]
                .prop_map(Value::from)
                .boxed(),
        ),
        field(
            prop_oneof![any::<u32>(), Just(u32::MAX)]
                .prop_map(Value::from)
                .boxed(),
        ),
        field(".{0,210}".prop_map(Value::from).boxed()),
        field(Just(json!([{"at_ms": 1, "status": 500, "error": "x"}])).boxed()),
        option::of(json_value()),
    )
        .prop_map(
            |(id, app_id, event, created_ms, attempt, endpoint, history, extra)| {
                let mut m = Map::new();
                for (k, v) in [
                    ("id", id),
                    ("app_id", app_id),
                    ("event", event),
                    ("created_ms", created_ms),
                    ("attempt", attempt),
                    ("endpoint", endpoint),
                    ("history", history),
                    ("extra", extra),
                ] {
                    if let Some(v) = v {
                        m.insert(k.to_string(), v);
                    }
                }
                Value::Object(m)
            },
        )
}

// ---- ingest ----------------------------------------------------------------

const MAX_BATCH: usize = 8;

proptest! {
    #![proptest_config(config())]

    #[test]
    fn ingest_never_panics_on_bytes(bytes in vec(any::<u8>(), 0..512)) {
        let _ = parse_events(&bytes, MAX_BATCH);
    }

    #[test]
    fn ingest_never_panics_on_json(value in json_value()) {
        let body = serde_json::to_vec(&value).unwrap();
        if let Ok(events) = parse_events(&body, MAX_BATCH) {
            prop_assert!(!events.is_empty() && events.len() <= MAX_BATCH);
            for e in &events {
                prop_assert_eq!(e.validate(), Ok(()));
            }
        }
        let batch = serde_json::to_vec(&json!({ "events": [value] })).unwrap();
        let _ = parse_events(&batch, MAX_BATCH);
    }

    #[test]
    fn ingest_takes_back_the_events_it_was_given(events in vec(event(), 1..=MAX_BATCH)) {
        let body = serde_json::to_vec(&json!({ "events": events })).unwrap();
        prop_assert_eq!(&parse_events(&body, MAX_BATCH).unwrap(), &events);
        let one = serde_json::to_vec(&events[0]).unwrap();
        prop_assert_eq!(&parse_events(&one, MAX_BATCH).unwrap()[0], &events[0]);
    }

    #[test]
    fn ingest_refuses_batches_over_the_limit(
        events in vec(event(), MAX_BATCH + 1..MAX_BATCH + 20)
    ) {
        let body = serde_json::to_vec(&json!({ "events": events })).unwrap();
        match parse_events(&body, MAX_BATCH) {
            Err(IngestError::BadRequest(m)) => {
                prop_assert!(m.contains(&format!("at most {MAX_BATCH}")), "{}", m)
            }
            other => prop_assert!(false, "accepted or wrong error: {other:?}"),
        }
    }
}

// ---- queue entries ---------------------------------------------------------

proptest! {
    #![proptest_config(config())]

    #[test]
    fn entries_round_trip(job in job()) {
        let text = encode(&job);
        prop_assert_eq!(&decode("1-0", Some(text.as_bytes())).unwrap(), &job);
    }

    #[test]
    fn entry_decoder_never_panics_on_bytes(bytes in vec(any::<u8>(), 0..512)) {
        match decode("1700000000000-0", Some(&bytes)) {
            Ok(job) => prop_assert_eq!(decode("1-0", Some(encode(&job).as_bytes())).unwrap(), job),
            Err(m) => prop_assert!(!m.reason.is_empty()),
        }
    }

    #[test]
    fn entry_decoder_checks_what_producers_write(value in job_shaped()) {
        let raw = serde_json::to_vec(&value).unwrap();
        match decode("1700000000000-0", Some(&raw)) {
            Ok(job) => {
                prop_assert!(wasmhook::event::valid_name(&job.app_id));
                prop_assert!(job.endpoint.as_deref().is_none_or(wasmhook::event::valid_name));
                prop_assert!(job.created_ms <= MAX_TIME_MS);
                prop_assert!(
                    job.attempt.checked_add(1).is_some(),
                    "the next attempt's number must be representable"
                );
                prop_assert_eq!(decode("1-0", Some(encode(&job).as_bytes())).unwrap(), job);
            }
            Err(m) => prop_assert!(!m.reason.is_empty()),
        }
    }
}

// ---- config ----------------------------------------------------------------

/// Values, by the type a key takes, at and past the edges of what it accepts.
const DURATION: &[&str] = &[
    "\"0s\"",
    "\"1ms\"",
    "\"5s\"",
    "\"2h 5m\"",
    "\"24h\"",
    "\"18446744073709551615s\"",
    "\"584942417355y\"",
    "\"99999999999999999999s\"",
    "\"5\"",
];
const INT: &[&str] = &[
    "0",
    "1",
    "-1",
    "1000",
    "4294967295",
    "4294967296",
    "9223372036854775807",
    "-9223372036854775808",
];
const FLOAT: &[&str] = &[
    "0.0", "0.5", "0.99999", "1.0", "1.5", "-0.0", "nan", "inf", "-inf",
];
const BOOL: &[&str] = &["true", "false"];
const TEXT: &[&str] = &[
    "\"\"",
    "\"x\"",
    "\"{x}\"",
    "\"a|b\"",
    "\"a b\"",
    "\"client_event\"",
    "\"\\u0000\"",
];
const ADDR: &[&str] = &[
    "\"127.0.0.1:0\"",
    "\"[::1]:8080\"",
    "\"localhost:80\"",
    "\"1.2.3.4\"",
];
const REDIS: &[&str] = &[
    "\"redis://127.0.0.1:6379\"",
    "\"redis://\"",
    "\"rediss://[::\"",
    "\"redis+unix:///tmp/r.sock\"",
    "\"redis://:p@h:99999/0\"",
    "\"redis://h/99999999999999999999\"",
    "\"x\"",
];
const REDIS_LISTS: &[&str] = &[
    "[]",
    "[\"redis://127.0.0.1:7001\", \"redis://127.0.0.1:7002\"]",
    "[\"rediss://127.0.0.1:7001\"]",
    "[\"redis://h/3\", \"x\"]",
];
const URL: &[&str] = &[
    "\"http://127.0.0.1:9/h\"",
    "\"https://example.com/x\"",
    "\"ftp://h/\"",
    "\"http://\"",
    "\"http://[::1]:0/\"",
    "\"x\"",
];
const PATHS: &[&str] = &[
    "\"\"",
    "\"/nonexistent/file\"",
    "\"/dev/null\"",
    "\"relative/file\"",
];
const NETWORKS: &[&str] = &[
    "[]",
    "[\"127.0.0.0/8\", \"::1\"]",
    "[\"10.0.0/8\", \"\"]",
    "[\"0.0.0.0/0\", \"fd00::/8\", \"example.com\"]",
];
const LEVEL: &[&str] = &[
    "\"info\"",
    "\"wasmhook=debug,info\"",
    "\"[{\"",
    "\"a[b{c=d}]=trace\"",
    "\"[span{x=\\\"/(\\\"}]=info\"",
    "\"=\"",
];
const ENUMS: &[&str] = &[
    "\"pusher\"",
    "\"standard\"",
    "\"raw\"",
    "\"json\"",
    "\"pretty\"",
    "\"skip\"",
    "\"drop\"",
    "\"fail\"",
    "\"auto\"",
    "\"\"",
];
const RATE: &[&str] = &[
    "\"50/s\"",
    "\"4294967295/s\"",
    "\"1/h\"",
    "\"0/s\"",
    "\"1/d\"",
    "\"50\"",
];
const SECRETS: &[&str] = &[
    "[]",
    "[\"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"]",
    "[\"whsec_\"]",
    "[\"whsec_!!\"]",
    "[\"x\", \"\"]",
];
const SCHEDULE: &[&str] = &[
    "[]",
    "[\"0s\"]",
    "[\"0s\", \"1s\", \"5m\"]",
    "[\"0s\", \"18446744073709551615s\"]",
    "[\"584942417355y\"]",
];
const TABLES: &[&str] = &[
    "{}",
    "{ schedule = [\"0s\", \"1s\"] }",
    "{ schedule = [\"18446744073709551615s\"] }",
    "{ schedule = [] }",
    "{ channel_name_starts_with = \"private-\" }",
    "{ \"X-Env\" = \"prod\" }",
    "{ \"content-type\" = \"x\" }",
    "{ \"bad name\" = \"x\" }",
    "{ \"x-ok\" = \"bad\\nvalue\" }",
];
const LISTS: &[&str] = &[
    "[]",
    "[\"client_event\", \"a b\"]",
    "[{ plugin = \"p\" }]",
    "[{ plugin = \"p\", config = { a = 1, b = [1, { c = 2 }] } }]",
    "[{ plugin = \"nope\" }]",
];

type Keys = &'static [(&'static str, &'static [&'static str])];

/// Every key of the config file (besides apps and plugins), by table.
const KEYS: &[(&str, Keys)] = &[
    (
        "redis",
        &[
            ("url", REDIS),
            ("cluster", BOOL),
            ("urls", REDIS_LISTS),
            ("wait_replicas", INT),
            ("wait_timeout", DURATION),
            ("prefix", TEXT),
            ("username", TEXT),
            ("password", TEXT),
            ("password_file", PATHS),
            ("ca_file", PATHS),
            ("tls_insecure", BOOL),
        ],
    ),
    (
        "metrics",
        &[
            ("enabled", BOOL),
            ("listen", ADDR),
            ("token", TEXT),
            ("endpoints", LISTS),
        ],
    ),
    (
        "server",
        &[
            ("listen", ADDR),
            ("max_body_bytes", INT),
            ("max_batch", INT),
            ("idempotency_ttl", DURATION),
            ("echo", BOOL),
            ("pusher_max_age", DURATION),
        ],
    ),
    (
        "queues",
        &[
            ("concurrency", INT),
            ("quantum", INT),
            ("app_max_in_flight", INT),
            ("visibility_timeout", DURATION),
            ("reclaim_interval", DURATION),
            ("idle_poll", DURATION),
        ],
    ),
    (
        "retry",
        &[
            ("schedule", SCHEDULE),
            ("jitter", FLOAT),
            ("max_retry_after", DURATION),
        ],
    ),
    (
        "delivery",
        &[
            ("timeout", DURATION),
            ("max_response_bytes", INT),
            ("max_in_flight", INT),
            ("allow_networks", NETWORKS),
            ("proxy", URL),
            ("no_proxy", NETWORKS),
        ],
    ),
    (
        "delivery.breaker",
        &[
            ("failure_rate", FLOAT),
            ("min_requests", INT),
            ("window", DURATION),
            ("consecutive_failures", INT),
            ("cool_down", DURATION),
            ("max_cool_down", DURATION),
            ("disable_after", DURATION),
        ],
    ),
    ("log", &[("format", ENUMS), ("level", LEVEL)]),
    (
        "wasm",
        &[
            ("cache_dir", ENUMS),
            ("max_instances", INT),
            ("app_max_instances", INT),
            ("warm_instances", INT),
            ("plugin_max_core_instances", INT),
            ("plugin_max_memories", INT),
            ("plugin_max_tables", INT),
            ("deadline", DURATION),
            ("fuel", INT),
            ("max_memory", INT),
            ("max_output", INT),
            ("max_reuse", INT),
            ("on_failure", ENUMS),
            ("watch_interval", DURATION),
        ],
    ),
];

const APP_KEYS: Keys = &[
    ("id", TEXT),
    ("key", TEXT),
    ("secret", TEXT),
    ("secrets", SECRETS),
    ("ingest_token", TEXT),
    ("weight", INT),
    ("max_in_flight", INT),
    ("plugins", LISTS),
];

const WEBHOOK_KEYS: Keys = &[
    ("id", TEXT),
    ("url", URL),
    ("scheme", ENUMS),
    ("event_types", LISTS),
    ("filter", TABLES),
    ("headers", TABLES),
    ("secrets", SECRETS),
    ("timeout", DURATION),
    ("retry", TABLES),
    ("max_in_flight", INT),
    ("rate_limit", RATE),
    ("rate_limit_burst", INT),
    ("ordered", BOOL),
    ("plugins", LISTS),
    ("lambda", TABLES),
];

const PLUGIN_KEYS: Keys = &[
    ("deadline", DURATION),
    ("fuel", INT),
    ("max_memory", INT),
    ("max_output", INT),
    ("max_reuse", INT),
    ("on_failure", ENUMS),
];

/// Mostly a value of the key's own type; now and then one of another.
fn value(own: &'static [&'static str]) -> impl Strategy<Value = String> {
    let any_pool = proptest::sample::select(&[DURATION, INT, FLOAT, BOOL, TEXT, TABLES, LISTS][..])
        .prop_flat_map(proptest::sample::select);
    prop_oneof![
        8 => proptest::sample::select(own).prop_map(str::to_string),
        1 => any_pool.prop_map(str::to_string),
        1 => any::<i64>().prop_map(|n| n.to_string()),
    ]
}

/// Some of `keys`, each once, with values.
fn assignments(keys: Keys, most: usize) -> impl Strategy<Value = Vec<(&'static str, String)>> {
    proptest::sample::subsequence(keys, 0..=most.min(keys.len())).prop_flat_map(|chosen| {
        chosen
            .into_iter()
            .map(|(k, pool)| value(pool).prop_map(move |v| (k, v)))
            .collect::<Vec<_>>()
    })
}

/// `base` with `over` laid on top, as `key = value` lines.
fn lines(base: &[(&str, &str)], over: Vec<(&'static str, String)>) -> String {
    let mut all: std::collections::BTreeMap<&str, String> =
        base.iter().map(|(k, v)| (*k, v.to_string())).collect();
    all.extend(over);
    all.into_iter()
        .map(|(k, v)| format!("{k} = {v}\n"))
        .collect()
}

fn tables() -> impl Strategy<Value = String> {
    proptest::sample::subsequence(KEYS, 0..=4).prop_flat_map(|chosen| {
        chosen
            .into_iter()
            .map(|(name, keys)| {
                assignments(keys, 4).prop_map(move |a| format!("[{name}]\n{}", lines(&[], a)))
            })
            .collect::<Vec<_>>()
            .prop_map(|t| t.concat())
    })
}

fn plugin() -> impl Strategy<Value = String> {
    (
        prop_oneof![Just("p"), Just("bad name")],
        assignments(PLUGIN_KEYS, 4),
    )
        .prop_map(|(name, a)| {
            format!(
                "[plugins.\"{name}\"]\n{}",
                lines(&[("path", "\"p.wasm\"")], a)
            )
        })
}

fn app() -> impl Strategy<Value = String> {
    (
        any::<bool>(),
        assignments(APP_KEYS, 3),
        vec((any::<bool>(), assignments(WEBHOOK_KEYS, 5)), 0..3),
    )
        .prop_map(|(with_base, a, webhooks)| {
            let base: &[(&str, &str)] = if with_base {
                &[
                    ("id", "\"app-1\""),
                    ("key", "\"k\""),
                    ("secret", "\"s\""),
                    ("ingest_token", "\"t\""),
                ]
            } else {
                &[]
            };
            let mut text = format!("[[apps]]\n{}", lines(base, a));
            for (with_url, w) in webhooks {
                let base: &[(&str, &str)] = if with_url {
                    &[("url", "\"http://127.0.0.1:9/hook\"")]
                } else {
                    &[]
                };
                text.push_str(&format!("[[apps.webhooks]]\n{}", lines(base, w)));
            }
            text
        })
}

/// Config text: known tables and keys with values of every kind, and now
/// and then a line of noise.
fn config_text() -> impl Strategy<Value = String> {
    (
        tables(),
        vec(app(), 0..3),
        option::of(plugin()),
        option::of(".{0,30}"),
    )
        .prop_map(|(tables, apps, plugin, noise)| {
            let mut text = tables;
            // Array-of-tables and sub-tables go after the plain tables.
            text.push_str(&apps.concat());
            text.push_str(&plugin.unwrap_or_default());
            if let Some(noise) = noise {
                text.push_str(&noise);
                text.push('\n');
            }
            text
        })
}

fn load(text: &str) -> Result<wasmhook::config::Settings, wasmhook::config::ConfigError> {
    wasmhook::config::load_from(
        Some("props.toml".into()),
        Some(text),
        Vec::<(String, String)>::new(),
    )
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn config_loader_never_panics_on_text(text in ".{0,200}") {
        if let Err(e) = load(&text) {
            prop_assert!(!e.problems.is_empty());
        }
    }

    #[test]
    fn config_loader_never_panics_on_config_like_text(text in config_text()) {
        match load(&text) {
            Ok(s) => {
                // What is accepted is what the runtime can start with.
                prop_assert!(s.server.max_batch >= 1);
                prop_assert!(s.queues.concurrency >= 1);
                prop_assert!(s.retry.max_attempts() >= 1);
                let mut rng = rand::rng();
                let mut policies = vec![s.retry.clone()];
                for app in s.apps.iter() {
                    for e in &app.endpoints {
                        prop_assert!(s.queues.visibility_timeout > e.timeout);
                        prop_assert!(e.timeout > Duration::ZERO);
                        policies.push(e.retry.clone());
                    }
                }
                // Every retry delay, jittered either way, can be computed.
                for p in policies {
                    for attempt in 0..p.max_attempts() {
                        for _ in 0..8 {
                            let ra = Some(p.max_retry_after());
                            prop_assert!(p.next_delay(attempt, ra, &mut rng).is_some());
                        }
                    }
                }
            }
            Err(e) => prop_assert!(!e.problems.is_empty(), "{}", e),
        }
    }
}

// ---- plugin decisions ------------------------------------------------------

mod decisions {
    use std::collections::HashSet;

    use proptest::collection::vec;
    use proptest::option;
    use proptest::prelude::*;
    use wasmhook::event::Event;
    use wasmhook::pipeline::{Decision, Message};
    use wasmhook::plugin::{DecisionBounds, MAX_REASON, PluginFailure, check_decision, wit};

    /// The payload the plugin was given.
    const PAYLOAD: &str = r#"{"name":"client_event","channel":"private-a","data":"{}"}"#;

    fn header_name() -> impl Strategy<Value = String> {
        prop_oneof![
            4 => "[A-Za-z0-9-]{1,12}",
            1 => Just("x a".to_string()),
            1 => Just(String::new()),
            1 => ".{0,8}",
        ]
    }

    fn header_value() -> impl Strategy<Value = String> {
        prop_oneof![
            4 => "[ -~]{0,20}",
            1 => Just("line\r\nx-injected: 1".to_string()),
            1 => ".{0,8}",
        ]
    }

    fn payload() -> impl Strategy<Value = String> {
        prop_oneof![
            2 => Just(PAYLOAD.to_string()),
            2 => ("[A-Za-z0-9_]{1,10}", option::of(".{0,10}"))
                .prop_map(|(n, c)| serde_json::json!({"name": n, "channel": c}).to_string()),
            1 => ".{0,40}",
        ]
    }

    fn message() -> impl Strategy<Value = wit::Message> {
        (
            payload(),
            vec(
                (header_name(), header_value())
                    .prop_map(|(name, value)| wit::Header { name, value }),
                0..6,
            ),
            vec(
                (".{0,6}", ".{0,12}").prop_map(|(key, value)| wit::Pair { key, value }),
                0..6,
            ),
        )
            .prop_map(|(payload, headers, metadata)| wit::Message {
                payload,
                headers,
                metadata,
            })
    }

    fn decision() -> impl Strategy<Value = wit::Decision> {
        prop_oneof![
            Just(wit::Decision::Keep),
            prop_oneof![".{0,40}", ".{1000,1100}"].prop_map(wit::Decision::Drop),
            message().prop_map(wit::Decision::Transform),
            vec(
                ("[a-d]{1,2}", option::of(message()))
                    .prop_map(|(endpoint, message)| wit::RouteTarget { endpoint, message }),
                0..6,
            )
            .prop_map(wit::Decision::Route),
        ]
    }

    fn bounds() -> impl Strategy<Value = DecisionBounds> {
        (0usize..2048, 0usize..6, 0usize..6, 0usize..6).prop_map(
            |(max_output, max_headers, max_metadata, max_routes)| DecisionBounds {
                max_output,
                max_headers,
                max_metadata,
                max_routes,
            },
        )
    }

    fn within(m: &Message, b: &DecisionBounds) -> Result<(), TestCaseError> {
        prop_assert!(m.headers.len() <= b.max_headers);
        prop_assert!(m.metadata.len() <= b.max_metadata);
        for (name, value) in &m.headers {
            prop_assert!(reqwest::header::HeaderName::from_bytes(name.as_bytes()).is_ok());
            prop_assert!(reqwest::header::HeaderValue::from_str(value).is_ok());
        }
        prop_assert_eq!(m.event.validate(), Ok(()));
        Ok(())
    }

    proptest! {
        #![proptest_config(super::config())]

        #[test]
        fn decisions_are_refused_or_within_bounds(d in decision(), b in bounds()) {
            let event = Event::from_json(serde_json::from_str(PAYLOAD).unwrap()).unwrap();
            let asked = d.clone();
            match check_decision(d, PAYLOAD, &event, &b) {
                Err(PluginFailure::OutputTooLarge { size, limit }) => prop_assert!(size > limit),
                Err(PluginFailure::BadOutput(m)) => prop_assert!(!m.is_empty()),
                Err(other) => prop_assert!(false, "unexpected failure {other:?}"),
                Ok(Decision::Keep) => prop_assert!(matches!(asked, wit::Decision::Keep)),
                Ok(Decision::Drop(reason)) => prop_assert!(reason.len() <= MAX_REASON + 32),
                Ok(Decision::Transform(m)) => within(&m, &b)?,
                Ok(Decision::Route(targets)) => {
                    prop_assert!(targets.len() <= b.max_routes);
                    let mut seen = HashSet::new();
                    for t in &targets {
                        prop_assert!(seen.insert(t.endpoint.clone()), "{} twice", t.endpoint);
                        if let Some(m) = &t.message {
                            within(m, &b)?;
                        }
                    }
                }
                Ok(other) => prop_assert!(false, "a guest cannot decide {other:?}"),
            }
        }
    }
}
