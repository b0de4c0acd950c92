//! What a decision may carry: the checks that turn a guest's `decision` into
//! the host's [`Decision`], within bounds, before anything else looks at it.
//!
//! - Every byte a decision carries counts toward `max_output`: payloads,
//!   header names and values, metadata keys and values, route endpoint ids,
//!   drop text (and, in [`check_error`], a plugin's error text).
//! - A message carries at most [`MAX_HEADERS`] headers and [`MAX_METADATA`]
//!   metadata pairs; a header must be a valid HTTP header (name a token,
//!   value without control characters), or the decision is refused.
//! - A route names at most as many targets as the app has endpoints; a
//!   target named again is delivered once (the first one counts).
//! - Reasons (drop text, error text) are clipped to [`MAX_REASON`] bytes
//!   before they reach a log line or a dead letter.
//!
//! The checks are linear in the decision's size and run before a payload is
//! parsed.

use std::collections::HashSet;

use super::PluginFailure;
use super::bindings::types as wit;
use crate::event::Event;
use crate::pipeline::{Decision, MAX_HEADERS, MAX_METADATA, Message, RouteTarget, clip};

/// Longest drop or error text kept, in bytes.
pub const MAX_REASON: usize = 1024;

/// What one decision may carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecisionBounds {
    /// Bytes over everything the decision carries.
    pub max_output: usize,
    /// Headers per message.
    pub max_headers: usize,
    /// Metadata pairs per message.
    pub max_metadata: usize,
    /// Route targets (the app's endpoint count).
    pub max_routes: usize,
}

impl DecisionBounds {
    /// The bounds for a plugin with this output limit, called for an app
    /// with this many endpoints.
    pub fn new(max_output: usize, endpoints: usize) -> Self {
        DecisionBounds {
            max_output,
            max_headers: MAX_HEADERS,
            max_metadata: MAX_METADATA,
            max_routes: endpoints,
        }
    }
}

/// Checks a guest's decision and converts it. `payload` is the payload as the
/// guest got it and `event` its event: a payload returned unchanged is not
/// parsed again.
pub fn check_decision(
    decision: wit::Decision,
    payload: &str,
    event: &Event,
    bounds: &DecisionBounds,
) -> Result<Decision, PluginFailure> {
    check_counts(&decision, bounds)?;
    let size = size_of(&decision);
    if size > bounds.max_output {
        return Err(PluginFailure::OutputTooLarge {
            size,
            limit: bounds.max_output,
        });
    }
    let lift = |m| message(m, payload, event);
    Ok(match decision {
        wit::Decision::Keep => Decision::Keep,
        wit::Decision::Drop(reason) => Decision::Drop(clip(reason, MAX_REASON)),
        wit::Decision::Transform(m) => Decision::Transform(lift(m)?),
        wit::Decision::Route(targets) => {
            let mut seen = HashSet::with_capacity(targets.len());
            let mut out = Vec::with_capacity(targets.len());
            for t in targets {
                if !seen.insert(t.endpoint.clone()) {
                    continue;
                }
                out.push(RouteTarget {
                    endpoint: t.endpoint,
                    message: t.message.map(lift).transpose()?,
                });
            }
            Decision::Route(out)
        }
    })
}

/// A plugin's own error text: counted against `max_output` like a decision,
/// and clipped.
pub fn check_error(text: String, max_output: usize) -> PluginFailure {
    if text.len() > max_output {
        return PluginFailure::OutputTooLarge {
            size: text.len(),
            limit: max_output,
        };
    }
    PluginFailure::Rejected(clip(text, MAX_REASON))
}

fn check_counts(decision: &wit::Decision, bounds: &DecisionBounds) -> Result<(), PluginFailure> {
    let bad = |what: String| Err(PluginFailure::BadOutput(what));
    let check = |m: &wit::Message| {
        if m.headers.len() > bounds.max_headers {
            return bad(format!(
                "{} headers in one message; at most {}",
                m.headers.len(),
                bounds.max_headers
            ));
        }
        if m.metadata.len() > bounds.max_metadata {
            return bad(format!(
                "{} metadata pairs in one message; at most {}",
                m.metadata.len(),
                bounds.max_metadata
            ));
        }
        Ok(())
    };
    match decision {
        wit::Decision::Keep | wit::Decision::Drop(_) => Ok(()),
        wit::Decision::Transform(m) => check(m),
        wit::Decision::Route(targets) => {
            if targets.len() > bounds.max_routes {
                return bad(format!(
                    "routes to {} targets; the app has {} endpoints",
                    targets.len(),
                    bounds.max_routes
                ));
            }
            targets
                .iter()
                .filter_map(|t| t.message.as_ref())
                .try_for_each(check)
        }
    }
}

/// Bytes a decision carries.
fn size_of(decision: &wit::Decision) -> usize {
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
    match decision {
        wit::Decision::Keep => 0,
        wit::Decision::Drop(reason) => reason.len(),
        wit::Decision::Transform(m) => message(m),
        wit::Decision::Route(targets) => targets
            .iter()
            .map(|t| t.endpoint.len() + t.message.as_ref().map_or(0, message))
            .sum(),
    }
}

fn message(m: wit::Message, payload: &str, event: &Event) -> Result<Message, PluginFailure> {
    let mut headers = Vec::with_capacity(m.headers.len());
    for h in m.headers {
        let name = h.name.to_ascii_lowercase();
        if reqwest::header::HeaderName::from_bytes(name.as_bytes()).is_err() {
            return Err(PluginFailure::BadOutput(format!(
                "header name {:?} is not a valid HTTP header name",
                clip(name, 64)
            )));
        }
        if reqwest::header::HeaderValue::from_str(&h.value).is_err() {
            return Err(PluginFailure::BadOutput(format!(
                "header {name}: the value is not a valid HTTP header value"
            )));
        }
        headers.push((name, h.value));
    }
    let event = if m.payload == payload {
        event.clone()
    } else {
        parse_event(&m.payload)?
    };
    Ok(Message {
        event,
        headers,
        metadata: m.metadata.into_iter().map(|p| (p.key, p.value)).collect(),
    })
}

fn parse_event(payload: &str) -> Result<Event, PluginFailure> {
    let value: serde_json::Value = serde_json::from_str(payload)
        .map_err(|e| PluginFailure::BadOutput(format!("payload is not JSON: {e}")))?;
    Event::from_json(value)
        .map_err(|e| PluginFailure::BadOutput(format!("payload is not an event: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event() -> (String, Event) {
        let text = r#"{"name":"e","data":"x"}"#.to_string();
        let event = Event::from_json(serde_json::from_str(&text).unwrap()).unwrap();
        (text, event)
    }

    fn msg(payload: &str, headers: usize, metadata: usize) -> wit::Message {
        wit::Message {
            payload: payload.into(),
            headers: (0..headers)
                .map(|i| wit::Header {
                    name: format!("x-h{i}"),
                    value: "v".into(),
                })
                .collect(),
            metadata: (0..metadata)
                .map(|i| wit::Pair {
                    key: format!("k{i}"),
                    value: "v".into(),
                })
                .collect(),
        }
    }

    fn bounds() -> DecisionBounds {
        DecisionBounds::new(1000, 3)
    }

    fn check(d: wit::Decision) -> Result<Decision, PluginFailure> {
        let (text, e) = event();
        check_decision(d, &text, &e, &bounds())
    }

    #[test]
    fn headers_and_metadata_count_toward_the_output_limit() {
        let (text, _) = event();
        let mut m = msg(&text, 1, 0);
        m.headers[0].value = "v".repeat(1000);
        assert!(matches!(
            check(wit::Decision::Transform(m)),
            Err(PluginFailure::OutputTooLarge { limit: 1000, .. })
        ));
        let mut m = msg(&text, 0, 1);
        m.metadata[0].key = "k".repeat(990);
        assert!(matches!(
            check(wit::Decision::Transform(m)),
            Err(PluginFailure::OutputTooLarge { .. })
        ));
    }

    #[test]
    fn route_ids_and_drop_text_count_too() {
        let targets = vec![wit::RouteTarget {
            endpoint: "e".repeat(1001),
            message: None,
        }];
        assert!(matches!(
            check(wit::Decision::Route(targets)),
            Err(PluginFailure::OutputTooLarge { size: 1001, .. })
        ));
        assert!(matches!(
            check(wit::Decision::Drop("d".repeat(1001))),
            Err(PluginFailure::OutputTooLarge { .. })
        ));
        assert!(matches!(
            check_error("x".repeat(1001), 1000),
            PluginFailure::OutputTooLarge { .. }
        ));
    }

    #[test]
    fn counts_are_capped() {
        let (text, e) = event();
        let b = DecisionBounds::new(1 << 20, 3);
        let over = |h, m| check_decision(wit::Decision::Transform(msg(&text, h, m)), &text, &e, &b);
        assert!(over(MAX_HEADERS, MAX_METADATA).is_ok());
        assert!(
            matches!(over(MAX_HEADERS + 1, 0), Err(PluginFailure::BadOutput(m)) if m.contains("headers"))
        );
        assert!(
            matches!(over(0, MAX_METADATA + 1), Err(PluginFailure::BadOutput(m)) if m.contains("metadata"))
        );
        let routes = |n: usize| {
            wit::Decision::Route(
                (0..n)
                    .map(|i| wit::RouteTarget {
                        endpoint: format!("e{}", i % 2),
                        message: None,
                    })
                    .collect(),
            )
        };
        assert!(
            matches!(check(routes(4)), Err(PluginFailure::BadOutput(m)) if m.contains("4 targets"))
        );
        // Named again: delivered once.
        match check(routes(3)).unwrap() {
            Decision::Route(t) => assert_eq!(
                t.iter().map(|t| t.endpoint.as_str()).collect::<Vec<_>>(),
                ["e0", "e1"]
            ),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn headers_that_cannot_be_sent_are_refused() {
        let (text, _) = event();
        for (name, value) in [
            ("x-a", "line\r\nx-injected: 1"),
            ("x a", "v"),
            ("", "v"),
            ("x-\u{e9}", "v"),
        ] {
            let mut m = msg(&text, 0, 0);
            m.headers.push(wit::Header {
                name: name.into(),
                value: value.into(),
            });
            assert!(
                matches!(
                    check(wit::Decision::Transform(m)),
                    Err(PluginFailure::BadOutput(_))
                ),
                "{name:?}: {value:?}"
            );
        }
        let mut m = msg(&text, 0, 0);
        m.headers.push(wit::Header {
            name: "X-Tag".into(),
            value: "ok\tfine".into(),
        });
        match check(wit::Decision::Transform(m)).unwrap() {
            Decision::Transform(m) => assert_eq!(m.headers, [("x-tag".into(), "ok\tfine".into())]),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn reasons_are_clipped() {
        let (text, e) = event();
        let big = DecisionBounds::new(1 << 20, 3);
        let dropped = check_decision(wit::Decision::Drop("é".repeat(600)), &text, &e, &big);
        let Decision::Drop(reason) = dropped.unwrap() else {
            panic!()
        };
        assert!(reason.len() < MAX_REASON + 32, "{}", reason.len());
        assert!(reason.ends_with("(1200 bytes)"), "{reason}");
        let PluginFailure::Rejected(text) = check_error("y".repeat(2000), 1 << 20) else {
            panic!()
        };
        assert!(text.starts_with("yyy") && text.ends_with("(2000 bytes)"));
        assert_eq!(clip("short".into(), 10), "short");
    }

    #[test]
    fn an_unchanged_payload_is_not_parsed_again_and_a_bad_one_is_refused() {
        let (text, e) = event();
        match check(wit::Decision::Transform(msg(&text, 0, 0))).unwrap() {
            Decision::Transform(m) => assert_eq!(m.event, e),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            check(wit::Decision::Transform(msg("[1]", 0, 0))),
            Err(PluginFailure::BadOutput(_))
        ));
    }
}
