//! Test plugin `oversized-output`: returns a transform whose payload is a valid
//! event object of about 4 MiB (`data` is a long string), to test the host's
//! output size limit.
//!
//! Config: `bytes` (optional): the size of `data`, default 4194304 (4 MiB).

use wasmhook_plugin_sdk::{Decision, Error, Event, Plugin, Value, export_plugin, json};

struct OversizedOutput;

impl Plugin for OversizedOutput {
    fn handle(event: Event) -> Result<Decision, Error> {
        let bytes: usize = event.config_parse("bytes", 4 << 20)?;
        let mut payload = json!({
            "name": event.event_type(),
            "data": "x".repeat(bytes),
        });
        if let Some(channel) = event.channel() {
            payload["channel"] = Value::String(channel.to_owned());
        }
        Ok(Decision::transform(payload))
    }
}

export_plugin!(OversizedOutput);
