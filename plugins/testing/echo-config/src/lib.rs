//! Test plugin `echo-config`: returns the payload with an added `plugin`
//! field describing what the plugin saw, for tenant-isolation and config
//! tests:
//!
//! ```json
//! "plugin": {"config": {"k": "v", ...}, "app_id": "...", "event_id": "...",
//!            "event_type": "...", "channel": "..." | null, "attempt": 1,
//!            "endpoint": "..." | null,
//!            "headers": {"name": "value", ...}, "metadata": {"k": "v", ...}}
//! ```
//!
//! Config: anything (echoed). A repeated key keeps its last value.
//! It also sets metadata `echo-config.app_id` on the message.

use wasmhook_plugin_sdk::{Decision, Error, Event, Map, Plugin, Value, export_plugin, json};

struct EchoConfig;

fn object<'a>(pairs: impl Iterator<Item = (&'a str, &'a str)>) -> Value {
    let mut map = Map::new();
    for (k, v) in pairs {
        map.insert(k.to_owned(), Value::String(v.to_owned()));
    }
    Value::Object(map)
}

impl Plugin for EchoConfig {
    fn handle(event: Event) -> Result<Decision, Error> {
        let mut payload = event.json()?;
        let Some(fields) = payload.as_object_mut() else {
            return Err(Error::new("echo-config: the payload is not a JSON object"));
        };
        let config = object(
            event
                .config_entries()
                .iter()
                .map(|p| (p.key.as_str(), p.value.as_str())),
        );
        let headers = object(
            event
                .headers()
                .iter()
                .map(|h| (h.name.as_str(), h.value.as_str())),
        );
        let metadata = object(
            event
                .metadata()
                .iter()
                .map(|p| (p.key.as_str(), p.value.as_str())),
        );
        fields.insert(
            "plugin".to_owned(),
            json!({
                "config": config,
                "app_id": event.app_id(),
                "event_id": event.id(),
                "event_type": event.event_type(),
                "channel": event.channel(),
                "attempt": event.attempt(),
                "endpoint": event.endpoint(),
                "headers": headers,
                "metadata": metadata,
            }),
        );
        Ok(Decision::transform(payload).with_metadata("echo-config.app_id", event.app_id()))
    }
}

export_plugin!(EchoConfig);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echoes() {
        let e = Event::new("e", r#"{"name":"e","data":"x"}"#)
            .with_app_id("tenant-a")
            .with_attempt(3)
            .with_endpoint("ep1")
            .with_config("secret", "a-only");
        let d = EchoConfig::handle(e).unwrap();
        let v = d.payload_json().unwrap();
        assert_eq!(v["data"], "x");
        assert_eq!(v["plugin"]["config"], json!({"secret": "a-only"}));
        assert_eq!(v["plugin"]["app_id"], "tenant-a");
        assert_eq!(v["plugin"]["attempt"], 3);
        assert_eq!(v["plugin"]["endpoint"], "ep1");
        assert_eq!(v["plugin"]["channel"], Value::Null);
        assert_eq!(d.transformed().unwrap().metadata[0].value, "tenant-a");
    }
}
