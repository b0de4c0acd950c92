//! Example plugin `slack-format`: turns the event into a Slack
//! incoming-webhook message body, `{"text": ..., "blocks": [...]}`.
//!
//! Config (all optional):
//! - `template`: the message text. Placeholders: `{name}`, `{channel}`,
//!   `{data}` (Pusher's `data` as it is: the JSON string raw, anything else as
//!   compact JSON), `{event_type}`, `{id}`, `{app_id}`, `{attempt}`,
//!   `{endpoint}`, and any dotted payload path such as `{data.user.name}`
//!   (crossing the JSON-string `data`). `{{` and `}}` are literal braces;
//!   unknown placeholders are left as they are. Substituted values are escaped
//!   for Slack (`&`, `<`, `>`); the template itself is not, so it may use
//!   Slack syntax like `<https://example.com|link>`.
//!   Default: `{name} on {channel}: {data}` (`{name}: {data}` without channel).
//! - `username`, `icon_emoji`: copied into the message when set.
//!
//! The text is cut at 3000 characters (Slack's limit for a section block).
//! The body also keeps `"name"` (the event type) because the worker requires
//! every payload to be a JSON object with a string `name`; Slack ignores it.

use wasmhook_plugin_sdk::{Decision, Error, Event, Map, Plugin, Value, export_plugin, json};

const MAX_TEXT_CHARS: usize = 3000;

struct SlackFormat;

impl Plugin for SlackFormat {
    fn handle(event: Event) -> Result<Decision, Error> {
        let payload = event.json()?;
        let default_template = if channel(&event, &payload).is_some() {
            "{name} on {channel}: {data}"
        } else {
            "{name}: {data}"
        };
        let template = event.config_or("template", default_template);
        let text = truncate(&render(template, &event, &payload), MAX_TEXT_CHARS);

        let mut body = Map::new();
        body.insert("name".into(), Value::String(name(&event, &payload)));
        body.insert("text".into(), Value::String(text.clone()));
        body.insert(
            "blocks".into(),
            json!([
                {"type": "section", "text": {"type": "mrkdwn", "text": text}},
                {"type": "context", "elements": [{
                    "type": "mrkdwn",
                    "text": format!(
                        "event `{}` · app `{}`",
                        escape(event.id()),
                        escape(event.app_id())
                    ),
                }]},
            ]),
        );
        for key in ["username", "icon_emoji"] {
            if let Some(value) = event.config(key).filter(|v| !v.trim().is_empty()) {
                body.insert(key.into(), Value::String(value.to_owned()));
            }
        }
        Ok(Decision::transform(Value::Object(body)))
    }
}

fn name(event: &Event, payload: &Value) -> String {
    payload
        .get("name")
        .and_then(Value::as_str)
        .unwrap_or(event.event_type())
        .to_owned()
}

fn channel(event: &Event, payload: &Value) -> Option<String> {
    event.channel().map(str::to_owned).or_else(|| {
        payload
            .get("channel")
            .and_then(Value::as_str)
            .map(str::to_owned)
    })
}

/// The raw (unescaped) value of a placeholder, `None` if unknown.
fn lookup(key: &str, event: &Event, payload: &Value) -> Option<String> {
    match key {
        "name" => Some(name(event, payload)),
        "channel" => Some(channel(event, payload).unwrap_or_default()),
        "event_type" => Some(event.event_type().to_owned()),
        "id" => Some(event.id().to_owned()),
        "app_id" => Some(event.app_id().to_owned()),
        "attempt" => Some(event.attempt().to_string()),
        "endpoint" => Some(event.endpoint().unwrap_or_default().to_owned()),
        // `data` itself stays as it is (not decoded); deeper paths cross it.
        "data" => Some(payload.get("data").map(json::as_text).unwrap_or_default()),
        path => json::get(payload, path).map(|v| json::as_text(&v)),
    }
}

fn render(template: &str, event: &Event, payload: &Value) -> String {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(i) = rest.find(['{', '}']) {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        if tail.starts_with("{{") || tail.starts_with("}}") {
            out.push_str(&tail[..1]);
            rest = &tail[2..];
        } else if let Some(stripped) = tail.strip_prefix('{')
            && let Some(end) = stripped.find('}')
            && let Some(value) = lookup(stripped[..end].trim(), event, payload)
        {
            out.push_str(&escape(&value));
            rest = &stripped[end + 1..];
        } else {
            out.push_str(&tail[..1]);
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    out
}

/// Slack's mrkdwn escaping.
fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn truncate(s: &str, max_chars: usize) -> String {
    match s.char_indices().nth(max_chars) {
        None => s.to_owned(),
        Some((cut, _)) => {
            let mut t = s[..s[..cut].char_indices().last().map_or(0, |(i, _)| i)].to_owned();
            t.push('…');
            t
        }
    }
}

export_plugin!(SlackFormat);

#[cfg(test)]
mod tests {
    use super::*;

    fn event() -> Event {
        Event::new(
            "client_event",
            r#"{"name":"client_event","channel":"private-ops","data":"{\"user\":{\"name\":\"Ada <admin>\"},\"n\":2}"}"#,
        )
        .with_channel("private-ops")
        .with_id("wh_1")
        .with_app_id("app1")
    }

    #[test]
    fn default_message() {
        let v = SlackFormat::handle(event())
            .unwrap()
            .payload_json()
            .unwrap();
        let text = r#"client_event on private-ops: {"user":{"name":"Ada &lt;admin&gt;"},"n":2}"#;
        assert_eq!(v["text"], text);
        assert_eq!(v["name"], "client_event");
        assert_eq!(v["blocks"][0]["text"]["text"], text);
        assert_eq!(
            v["blocks"][1]["elements"][0]["text"],
            "event `wh_1` · app `app1`"
        );
        assert!(v.get("username").is_none());
    }

    #[test]
    fn template_and_options() {
        let e = event()
            .with_config(
                "template",
                "*{data.user.name}* did {{x}} {n} {data.n} {unknown} in <#C1|{channel}>",
            )
            .with_config("username", "wasmhook")
            .with_config("icon_emoji", ":robot_face:");
        let v = SlackFormat::handle(e).unwrap().payload_json().unwrap();
        assert_eq!(
            v["text"],
            "*Ada &lt;admin&gt;* did {x} {n} 2 {unknown} in <#C1|private-ops>"
        );
        assert_eq!(v["username"], "wasmhook");
        assert_eq!(v["icon_emoji"], ":robot_face:");
    }

    #[test]
    fn no_channel_and_truncation() {
        let long = "é".repeat(5000);
        let e = Event::new("ping", format!(r#"{{"name":"ping","data":"{long}"}}"#));
        let v = SlackFormat::handle(e).unwrap().payload_json().unwrap();
        let text = v["text"].as_str().unwrap();
        assert!(text.starts_with("ping: éé"));
        assert_eq!(text.chars().count(), MAX_TEXT_CHARS);
        assert!(text.ends_with('…'));
    }
}
