//! Test plugin `add-header`: a transform that adds one request header and
//! passes the payload on unchanged. The benchmark uses it to measure what
//! the plugin stage itself costs (the guest does next to nothing).
//!
//! Config: `name` (default `x-plugin`) and `value` (default `add-header`).

use wasmhook_plugin_sdk::{Decision, Error, Event, Message, Plugin, export_plugin};

struct AddHeader;

impl Plugin for AddHeader {
    fn handle(event: Event) -> Result<Decision, Error> {
        let name = event.config_or("name", "x-plugin");
        let value = event.config_or("value", "add-header");
        Ok(Decision::message(
            Message::raw(event.payload()).with_header(name, value),
        ))
    }
}

export_plugin!(AddHeader);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adds_the_header_and_keeps_the_payload() {
        let e = Event::new("e", r#"{"name":"e","a":1}"#)
            .with_config("name", "x-tag")
            .with_config("value", "v");
        let d = AddHeader::handle(e).unwrap();
        let m = d.transformed().unwrap();
        assert_eq!(m.payload, r#"{"name":"e","a":1}"#);
        assert_eq!(m.headers[0].name, "x-tag");
        assert_eq!(m.headers[0].value, "v");
    }
}
