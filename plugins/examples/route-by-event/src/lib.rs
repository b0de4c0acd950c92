//! Example plugin `route-by-event`: sends event types and channels to
//! different endpoints.
//!
//! Config (values are comma-separated endpoint ids):
//! - `type.<event_type>`: endpoints for events of that type
//!   (e.g. `type.member_added = audit,crm`).
//! - `channel.<channel>`: endpoints for events on exactly that channel.
//! - `channel_prefix.<prefix>`: endpoints for events whose channel starts with
//!   the prefix (e.g. `channel_prefix.private-billing- = billing`).
//! - `default`: endpoints when no rule above matches.
//!
//! Every matching rule contributes its endpoints (type rules first, then
//! channel, then channel prefixes in config order; duplicates removed). No
//! match and no `default` → drop with a reason; matching rules that list no
//! endpoint → drop.
//!
//! In an endpoint-level chain (the event has an endpoint; `route` is not
//! allowed there) the plugin filters instead: it keeps the event when that
//! endpoint is among the computed targets and drops it otherwise.

use wasmhook_plugin_sdk::{Decision, Error, Event, Plugin, export_plugin};

struct RouteByEvent;

impl Plugin for RouteByEvent {
    fn handle(event: Event) -> Result<Decision, Error> {
        let targets = match targets(&event) {
            Ok(targets) => targets,
            Err(reason) => return Ok(Decision::drop(format!("route-by-event: {reason}"))),
        };
        match event.endpoint() {
            None => Ok(Decision::route(targets)),
            Some(endpoint) if targets.contains(&endpoint) => Ok(Decision::keep()),
            Some(endpoint) => Ok(Decision::drop(format!(
                "route-by-event: endpoint `{endpoint}` is not a target of this event (targets: {})",
                targets.join(", ")
            ))),
        }
    }
}

/// The endpoints for this event, or why there are none.
fn targets(event: &Event) -> Result<Vec<&str>, String> {
    let mut matched_rules: Vec<String> = Vec::new();
    let mut endpoints: Vec<&str> = Vec::new();

    let event_type = event.event_type();
    for (t, list) in event.config_prefixed("type.") {
        if t == event_type {
            matched_rules.push(format!("type.{t}"));
            add_endpoints(&mut endpoints, list);
        }
    }
    if let Some(channel) = event.channel() {
        for (c, list) in event.config_prefixed("channel.") {
            if c == channel {
                matched_rules.push(format!("channel.{c}"));
                add_endpoints(&mut endpoints, list);
            }
        }
        for (prefix, list) in event.config_prefixed("channel_prefix.") {
            if channel.starts_with(prefix) {
                matched_rules.push(format!("channel_prefix.{prefix}"));
                add_endpoints(&mut endpoints, list);
            }
        }
    }

    if !matched_rules.is_empty() {
        if endpoints.is_empty() {
            return Err(format!(
                "matching rule(s) {} list no endpoint",
                matched_rules.join(", ")
            ));
        }
        return Ok(endpoints);
    }

    let default = event.config_list("default");
    if default.is_empty() {
        let channel = event
            .channel()
            .map(|c| format!(" on channel `{c}`"))
            .unwrap_or_default();
        return Err(format!(
            "no rule matches event type `{event_type}`{channel} and no `default` is configured"
        ));
    }
    Ok(default)
}

/// Appends the comma-separated endpoint ids of `list` not already present.
fn add_endpoints<'a>(endpoints: &mut Vec<&'a str>, list: &'a str) {
    for endpoint in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        if !endpoints.contains(&endpoint) {
            endpoints.push(endpoint);
        }
    }
}

export_plugin!(RouteByEvent);

#[cfg(test)]
mod tests {
    use super::*;

    fn event(event_type: &str, channel: Option<&str>) -> Event {
        let mut e = Event::new(event_type, r#"{"name":"x"}"#)
            .with_config("type.member_added", "audit, crm")
            .with_config("channel.lobby", "chat")
            .with_config("channel_prefix.private-billing-", "billing,audit")
            .with_config("type.muted", "");
        if let Some(c) = channel {
            e = e.with_channel(c);
        }
        e
    }

    fn route(e: Event) -> Decision {
        RouteByEvent::handle(e).unwrap()
    }

    #[test]
    fn unions_matching_rules() {
        let d = route(event("member_added", Some("private-billing-7")));
        assert_eq!(d.route_endpoints(), Some(vec!["audit", "crm", "billing"]));
        let d = route(event("client_event", Some("lobby")));
        assert_eq!(d.route_endpoints(), Some(vec!["chat"]));
    }

    #[test]
    fn default_and_drop() {
        let d = route(event("client_event", Some("other")));
        let reason = d.drop_reason().unwrap();
        assert!(
            reason.contains("no rule matches event type `client_event` on channel `other`"),
            "{reason}"
        );
        let d = route(event("client_event", None).with_config("default", "fallback"));
        assert_eq!(d.route_endpoints(), Some(vec!["fallback"]));
        let d = route(event("muted", None).with_config("default", "fallback"));
        assert!(d.drop_reason().unwrap().contains("type.muted"));
    }

    #[test]
    fn endpoint_chain_filters() {
        assert!(route(event("member_added", None).with_endpoint("crm")).is_keep());
        let d = route(event("member_added", None).with_endpoint("chat"));
        assert!(d.drop_reason().unwrap().contains("`chat` is not a target"));
    }
}
