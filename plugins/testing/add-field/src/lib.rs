//! Test plugin `add-field`: sets one field of the payload from its config.
//!
//! Config:
//! - `field`: dotted path of the field to set (default `added_by`); missing
//!   objects on the way are created, embedded JSON strings are crossed.
//! - `value`: its value, a string (default `add-field`).
//! - `json`: `true` to parse `value` as JSON instead (default `false`).
//! - `log`: a message to write to the host's log (info level) first.

use wasmhook_plugin_sdk::{Decision, Error, Event, Plugin, Value, export_plugin, json};

struct AddField;

impl Plugin for AddField {
    fn handle(event: Event) -> Result<Decision, Error> {
        if let Some(message) = event.config("log") {
            wasmhook_plugin_sdk::log::info(message);
        }
        let field = event.config_or("field", "added_by");
        let raw = event.config_or("value", "add-field");
        let value = if event.config_bool("json", false)? {
            serde_json_parse(raw)?
        } else {
            Value::String(raw.to_owned())
        };
        let mut payload = event.json()?;
        if !json::set(&mut payload, field, value) {
            return Err(Error::new(format!(
                "add-field: cannot set `{field}`: the path runs into a non-object value"
            )));
        }
        Ok(Decision::transform(payload))
    }
}

fn serde_json_parse(raw: &str) -> Result<Value, Error> {
    wasmhook_plugin_sdk::serde_json::from_str(raw)
        .map_err(|e| Error::new(format!("add-field: `value` is not valid JSON: {e}")))
}

export_plugin!(AddField);

#[cfg(test)]
mod tests {
    use super::*;
    use wasmhook_plugin_sdk::json as j;

    #[test]
    fn defaults() {
        let d = AddField::handle(Event::new("e", r#"{"name":"e"}"#)).unwrap();
        assert_eq!(
            d.payload_json().unwrap(),
            j!({"name": "e", "added_by": "add-field"})
        );
    }

    #[test]
    fn configured() {
        let e = Event::new("e", r#"{"name":"e","data":"{\"a\":1}"}"#)
            .with_config("field", "data.b")
            .with_config("value", "[1,2]")
            .with_config("json", "true");
        let d = AddField::handle(e).unwrap();
        assert_eq!(d.payload_json().unwrap()["data"], r#"{"a":1,"b":[1,2]}"#);
    }

    #[test]
    fn bad_path_is_a_plugin_error() {
        let e = Event::new("e", r#"{"name":"e"}"#).with_config("field", "name.x");
        assert!(AddField::handle(e).is_err());
    }
}
