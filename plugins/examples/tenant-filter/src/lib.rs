//! Example plugin `tenant-filter`: drops events that fail rules over their
//! type, channel and payload fields. Rules that are not configured don't
//! apply; the event is kept when every configured rule passes, otherwise it is
//! dropped with a reason naming the first failing rule.
//!
//! Config (all optional, lists are comma-separated):
//! - `allow_types`: the event type must be one of these.
//! - `deny_types`: the event type must not be one of these.
//! - `channel_prefix`: the channel must start with one of these.
//! - `channel_suffix`: the channel must end with one of these.
//! - `deny_channel_prefix`: the channel must not start with any of these.
//! - `require_field`: payload conditions that must all hold: `path=value`
//!   (the field's value, as text, equals `value`; strings compare as is, other
//!   values as compact JSON) or just `path` (the field exists and is not
//!   null). Paths are dotted and cross Pusher's JSON-string `data`.
//!
//! Channel rules fail for events without a channel.

use wasmhook_plugin_sdk::{Decision, Error, Event, Plugin, Value, export_plugin, json};

struct TenantFilter;

impl Plugin for TenantFilter {
    fn handle(event: Event) -> Result<Decision, Error> {
        match first_failing_rule(&event)? {
            None => Ok(Decision::keep()),
            Some(reason) => {
                wasmhook_plugin_sdk::debug!("tenant-filter: dropping {}: {reason}", event.id());
                Ok(Decision::drop(format!("tenant-filter: {reason}")))
            }
        }
    }
}

fn first_failing_rule(event: &Event) -> Result<Option<String>, Error> {
    let event_type = event.event_type();

    let allow = event.config_list("allow_types");
    if !allow.is_empty() && !allow.contains(&event_type) {
        return Ok(Some(format!(
            "rule `allow_types`: event type `{event_type}` is not one of [{}]",
            allow.join(", ")
        )));
    }

    let deny = event.config_list("deny_types");
    if deny.contains(&event_type) {
        return Ok(Some(format!(
            "rule `deny_types`: event type `{event_type}` is denied"
        )));
    }

    type ChannelTest = fn(&str, &str) -> bool;
    let channel_rules: [(&str, ChannelTest); 2] = [
        ("channel_prefix", |channel, prefix| {
            channel.starts_with(prefix)
        }),
        ("channel_suffix", |channel, suffix| {
            channel.ends_with(suffix)
        }),
    ];
    for (rule, matches) in channel_rules {
        let wanted = event.config_list(rule);
        if wanted.is_empty() {
            continue;
        }
        match event.channel() {
            None => {
                return Ok(Some(format!("rule `{rule}`: the event has no channel")));
            }
            Some(channel) if !wanted.iter().any(|w| matches(channel, w)) => {
                let what = if rule == "channel_prefix" {
                    "start"
                } else {
                    "end"
                };
                return Ok(Some(format!(
                    "rule `{rule}`: channel `{channel}` does not {what} with any of [{}]",
                    wanted.join(", ")
                )));
            }
            Some(_) => {}
        }
    }

    let denied_prefixes = event.config_list("deny_channel_prefix");
    if let Some(channel) = event.channel()
        && let Some(prefix) = denied_prefixes.iter().find(|p| channel.starts_with(**p))
    {
        return Ok(Some(format!(
            "rule `deny_channel_prefix`: channel `{channel}` starts with `{prefix}`"
        )));
    }

    let requirements = event.config_list("require_field");
    if !requirements.is_empty() {
        let payload = event.json()?;
        for requirement in requirements {
            if let Some(reason) = check_field(&payload, requirement) {
                return Ok(Some(format!(
                    "rule `require_field` ({requirement}): {reason}"
                )));
            }
        }
    }

    Ok(None)
}

/// `None` when the requirement holds, else why not.
fn check_field(payload: &Value, requirement: &str) -> Option<String> {
    let (path, expected) = match requirement.split_once('=') {
        Some((path, value)) => (path.trim(), Some(value.trim())),
        None => (requirement.trim(), None),
    };
    let found = json::get_all(payload, path);
    match expected {
        None => {
            if found.iter().any(|v| !v.is_null()) {
                None
            } else {
                Some(format!("field `{path}` is missing"))
            }
        }
        Some(expected) => {
            if found.iter().any(|v| json::as_text(v) == expected) {
                None
            } else if found.is_empty() {
                Some(format!("field `{path}` is missing"))
            } else {
                let got: Vec<String> = found.iter().map(|v| v.to_string()).collect();
                Some(format!(
                    "field `{path}` is {} instead of `{expected}`",
                    got.join(" / ")
                ))
            }
        }
    }
}

export_plugin!(TenantFilter);

#[cfg(test)]
mod tests {
    use super::*;

    fn event(event_type: &str, channel: Option<&str>) -> Event {
        let mut e = Event::new(
            event_type,
            r#"{"name":"x","data":"{\"tenant\":\"acme\",\"level\":3,\"vip\":true}"}"#,
        );
        if let Some(c) = channel {
            e = e.with_channel(c);
        }
        e
    }

    fn reason(e: Event) -> Option<String> {
        TenantFilter::handle(e)
            .unwrap()
            .drop_reason()
            .map(str::to_owned)
    }

    #[test]
    fn no_rules_keeps() {
        assert!(TenantFilter::handle(event("a", None)).unwrap().is_keep());
    }

    #[test]
    fn types() {
        let e = event("member_added", None)
            .with_config("allow_types", "client_event, channel_occupied");
        assert!(reason(e).unwrap().contains("rule `allow_types`"));
        let e = event("client_event", None).with_config("allow_types", "client_event");
        assert_eq!(reason(e), None);
        let e = event("client_event", None).with_config("deny_types", "x,client_event");
        assert!(reason(e).unwrap().contains("rule `deny_types`"));
    }

    #[test]
    fn channels() {
        let cfg = |e: Event| e.with_config("channel_prefix", "private-acme-,presence-acme-");
        assert_eq!(reason(cfg(event("e", Some("presence-acme-room")))), None);
        assert!(
            reason(cfg(event("e", Some("private-other"))))
                .unwrap()
                .contains("channel_prefix")
        );
        assert!(
            reason(cfg(event("e", None)))
                .unwrap()
                .contains("has no channel")
        );
        let e = event("e", Some("chat-eu")).with_config("channel_suffix", "-us");
        assert!(reason(e).unwrap().contains("rule `channel_suffix`"));
        let e = event("e", Some("private-internal-x"))
            .with_config("deny_channel_prefix", "private-internal-");
        assert!(reason(e).unwrap().contains("rule `deny_channel_prefix`"));
    }

    #[test]
    fn fields() {
        let ok = event("e", None)
            .with_config("require_field", "data.tenant=acme, data.level=3,data.vip");
        assert_eq!(reason(ok), None);
        let e = event("e", None).with_config("require_field", "data.tenant=globex");
        let r = reason(e).unwrap();
        assert!(
            r.contains("rule `require_field` (data.tenant=globex)"),
            "{r}"
        );
        assert!(r.contains("\"acme\""), "{r}");
        let e = event("e", None).with_config("require_field", "data.missing");
        assert!(reason(e).unwrap().contains("missing"));
    }
}
