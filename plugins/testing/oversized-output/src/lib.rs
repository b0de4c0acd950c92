//! Test plugin `oversized-output`: returns decisions that carry a lot, to
//! test the host's bounds on what a decision may carry.
//!
//! Config:
//! - `bytes` (optional): the size of the big part, default 4194304 (4 MiB).
//! - `part` (optional): what is big, default `payload`:
//!   - `payload`: a transform whose payload is a valid event of about
//!     `bytes` (`data` is a long string);
//!   - `header` / `metadata`: the payload unchanged, one header / metadata
//!     value of `bytes`;
//!   - `headers` / `metadata-pairs`: the payload unchanged, `count` (default
//!     40000) small headers / metadata pairs;
//!   - `routes`: a route to the endpoint `endpoint` (default `a`), named
//!     `count` times (default 100000);
//!   - `error`: the plugin's own error, with a message of `bytes`.

use wasmhook_plugin_sdk::{
    Decision, Error, Event, Header, Message, Pair, Plugin, Value, export_plugin, json,
};

struct OversizedOutput;

impl Plugin for OversizedOutput {
    fn handle(event: Event) -> Result<Decision, Error> {
        let bytes: usize = event.config_parse("bytes", 4 << 20)?;
        let count: usize = event.config_parse("count", 0)?;
        let same = || Message::raw(event.payload());
        Ok(match event.config_or("part", "payload") {
            "header" => Decision::message(same().with_header("x-big", "h".repeat(bytes))),
            "metadata" => Decision::message(same().with_metadata("big", "m".repeat(bytes))),
            "headers" => {
                let n = if count == 0 { 40_000 } else { count };
                let mut m = same();
                m.headers = (0..n)
                    .map(|i| Header::new(format!("x-h{i}"), "v"))
                    .collect();
                Decision::message(m)
            }
            "metadata-pairs" => {
                let n = if count == 0 { 40_000 } else { count };
                let mut m = same();
                m.metadata = (0..n).map(|i| Pair::new(format!("k{i}"), "v")).collect();
                Decision::message(m)
            }
            "routes" => {
                let n = if count == 0 { 100_000 } else { count };
                let endpoint = event.config_or("endpoint", "a").to_string();
                Decision::route(std::iter::repeat_n(endpoint, n))
            }
            "error" => return Err(Error::new("e".repeat(bytes))),
            _ => {
                let mut payload = json!({
                    "name": event.event_type(),
                    "data": "x".repeat(bytes),
                });
                if let Some(channel) = event.channel() {
                    payload["channel"] = Value::String(channel.to_owned());
                }
                Decision::transform(payload)
            }
        })
    }
}

export_plugin!(OversizedOutput);
