//! The plugin decision validator: any decision a guest can return, under any
//! bounds, is refused with a reason or accepted within the bounds, never a
//! panic. The fuzz bytes pick the variant, the strings and the bounds.
#![no_main]

use std::collections::HashSet;

use arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use wasmhook::event::Event;
use wasmhook::pipeline::{self, Decision};
use wasmhook::plugin::{DecisionBounds, MAX_REASON, PluginFailure, check_decision, wit};

/// The event the plugin was called with, and its payload as the guest got it.
const PAYLOAD: &str = r#"{"name":"client_event","channel":"private-a","data":"{\"a\":1}"}"#;

fn string(u: &mut Unstructured, pool: &[&str]) -> Result<String> {
    if u.ratio(1, 3)? {
        u.arbitrary()
    } else {
        Ok(u.choose(pool)?.to_string())
    }
}

fn payload(u: &mut Unstructured) -> Result<String> {
    Ok(match u.int_in_range(0..=3)? {
        0 => PAYLOAD.to_string(),
        1 => {
            // An event built from fuzzed parts: valid or not.
            let name = string(u, &["x", "client_event", "a b", "", "{x}"])?;
            let channel: Option<String> = u.arbitrary()?;
            let data: String = u.arbitrary()?;
            serde_json::json!({ "name": name, "channel": channel, "data": data }).to_string()
        }
        2 => string(
            u,
            &[
                "{}",
                "[]",
                "null",
                "{\"name\":1}",
                "{\"name\":\"x\",\"channel\":5}",
            ],
        )?,
        _ => u.arbitrary()?,
    })
}

fn message(u: &mut Unstructured) -> Result<wit::Message> {
    let names = [
        "x-a",
        "X-Up",
        "content-type",
        "webhook-id",
        "",
        "x a",
        "x-\u{e9}",
        "x-a",
    ];
    let values = ["v", "", "line\r\nx-injected: 1", "\t", "\u{e9}", "\u{7f}"];
    let mut headers = Vec::new();
    for _ in 0..u.int_in_range(0..=10)? {
        headers.push(wit::Header {
            name: string(u, &names)?,
            value: string(u, &values)?,
        });
    }
    let mut metadata = Vec::new();
    for _ in 0..u.int_in_range(0..=10)? {
        metadata.push(wit::Pair {
            key: string(u, &["k", "", "trace-id"])?,
            value: u.arbitrary()?,
        });
    }
    Ok(wit::Message {
        payload: payload(u)?,
        headers,
        metadata,
    })
}

fn decision(u: &mut Unstructured) -> Result<wit::Decision> {
    Ok(match u.int_in_range(0..=3)? {
        0 => wit::Decision::Keep,
        1 => wit::Decision::Drop(u.arbitrary()?),
        2 => wit::Decision::Transform(message(u)?),
        _ => {
            let mut targets = Vec::new();
            for _ in 0..u.int_in_range(0..=10)? {
                targets.push(wit::RouteTarget {
                    endpoint: string(u, &["a", "b", "c", "", "a|b"])?,
                    message: if u.arbitrary()? {
                        Some(message(u)?)
                    } else {
                        None
                    },
                });
            }
            wit::Decision::Route(targets)
        }
    })
}

fn bounds(u: &mut Unstructured) -> Result<DecisionBounds> {
    Ok(if u.arbitrary()? {
        DecisionBounds::new(u.int_in_range(0..=4096)?, u.int_in_range(0..=8)?)
    } else {
        DecisionBounds {
            max_output: u.int_in_range(0..=4096)?,
            max_headers: u.int_in_range(0..=8)?,
            max_metadata: u.int_in_range(0..=8)?,
            max_routes: u.int_in_range(0..=8)?,
        }
    })
}

/// Bytes a guest's decision carries, counted here independently.
fn size(d: &wit::Decision) -> usize {
    let message = |m: &wit::Message| {
        m.payload.len()
            + m.headers
                .iter()
                .map(|h| h.name.len() + h.value.len())
                .sum::<usize>()
            + m.metadata
                .iter()
                .map(|p| p.key.len() + p.value.len())
                .sum::<usize>()
    };
    match d {
        wit::Decision::Keep => 0,
        wit::Decision::Drop(r) => r.len(),
        wit::Decision::Transform(m) => message(m),
        wit::Decision::Route(t) => t
            .iter()
            .map(|t| t.endpoint.len() + t.message.as_ref().map_or(0, message))
            .sum(),
    }
}

fn check_message(m: &pipeline::Message, b: &DecisionBounds) {
    assert!(m.headers.len() <= b.max_headers);
    assert!(m.metadata.len() <= b.max_metadata);
    for (name, value) in &m.headers {
        assert_eq!(name, &name.to_ascii_lowercase());
        assert!(reqwest_like_name(name), "{name:?}");
        assert!(
            !value.bytes().any(|c| (c < b' ' && c != b'\t') || c == 0x7f),
            "{value:?}"
        );
    }
    assert_eq!(m.event.validate(), Ok(()));
}

/// An HTTP token (RFC 9110), lower case.
fn reqwest_like_name(name: &str) -> bool {
    !name.is_empty()
        && name.bytes().all(|c| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || b"!#$%&'*+-.^_`|~".contains(&c)
        })
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    // Bounds first: when the bytes run out, what is left reads as zeros.
    let (Ok(b), Ok(d)) = (bounds(&mut u), decision(&mut u)) else {
        return;
    };
    let event = Event::from_json(serde_json::from_str(PAYLOAD).expect("JSON")).expect("an event");
    let carried = size(&d);
    let input = d.clone();
    match check_decision(d, PAYLOAD, &event, &b) {
        Err(PluginFailure::OutputTooLarge { size, limit }) => {
            assert_eq!((size, limit), (carried, b.max_output));
            assert!(size > limit);
        }
        Err(PluginFailure::BadOutput(reason)) => assert!(!reason.is_empty()),
        Err(other) => panic!("a decision is refused as too large or bad, not {other:?}"),
        Ok(accepted) => {
            assert!(carried <= b.max_output);
            match (input, accepted) {
                (wit::Decision::Keep, Decision::Keep) => {}
                (wit::Decision::Drop(text), Decision::Drop(kept)) => {
                    assert!(kept.len() <= MAX_REASON + 32);
                    if text.len() <= MAX_REASON {
                        assert_eq!(kept, text);
                    }
                }
                (wit::Decision::Transform(_), Decision::Transform(m)) => check_message(&m, &b),
                (wit::Decision::Route(asked), Decision::Route(targets)) => {
                    assert!(asked.len() <= b.max_routes);
                    // Each endpoint once, the first time it was named.
                    let mut seen = HashSet::new();
                    let firsts: Vec<&str> = asked
                        .iter()
                        .map(|t| t.endpoint.as_str())
                        .filter(|e| seen.insert(*e))
                        .collect();
                    let got: Vec<&str> = targets.iter().map(|t| t.endpoint.as_str()).collect();
                    assert_eq!(got, firsts);
                    for t in &targets {
                        if let Some(m) = &t.message {
                            check_message(m, &b);
                        }
                    }
                }
                (input, accepted) => panic!("{input:?} came back as {accepted:?}"),
            }
        }
    }
});
