//! Example plugin `redact`: masks or removes JSON fields of the payload by
//! path, crossing JSON-encoded strings (Pusher's `data`).
//!
//! Config:
//! - `paths` (required): comma-separated dotted paths, e.g.
//!   `data.email,data.card.number`; `*` matches every key/element
//!   (`data.items.*.ssn`), numbers index arrays.
//! - `mode`: `mask` (default: replace the value with the mask string) or
//!   `remove` (delete the key / array element).
//! - `mask`: the replacement string in `mask` mode (default `***`).
//!
//! When no path matches, the event is kept unchanged (not re-serialized).

use wasmhook_plugin_sdk::{Decision, Error, Event, Plugin, Value, export_plugin, json};

struct Redact;

enum Mode {
    Mask(Value),
    Remove,
}

impl Plugin for Redact {
    fn handle(event: Event) -> Result<Decision, Error> {
        let paths = event.config_list("paths");
        if paths.is_empty() {
            return Err(Error::new(
                "redact: config `paths` is required (comma-separated dotted paths)",
            ));
        }
        let mode = match event.config_or("mode", "mask").trim() {
            "mask" => Mode::Mask(Value::String(event.config_or("mask", "***").to_owned())),
            "remove" => Mode::Remove,
            other => {
                return Err(Error::new(format!(
                    "redact: config `mode` must be `mask` or `remove`, got `{other}`"
                )));
            }
        };

        let mut payload = event.json()?;
        let mut changed = 0;
        for path in &paths {
            changed += match &mode {
                Mode::Mask(mask) => json::replace(&mut payload, path, mask),
                Mode::Remove => json::remove(&mut payload, path),
            };
        }
        if changed == 0 {
            return Ok(Decision::keep());
        }
        wasmhook_plugin_sdk::debug!(
            "redact: {changed} field(s) redacted in event {}",
            event.id()
        );
        Ok(Decision::transform(payload))
    }
}

export_plugin!(Redact);

#[cfg(test)]
mod tests {
    use super::*;
    use wasmhook_plugin_sdk::json as j;

    fn event() -> Event {
        Event::new(
            "client_event",
            r#"{"name":"client_event","channel":"private-a","data":"{\"email\":\"a@b.c\",\"card\":{\"number\":\"4111\",\"cvc\":\"123\"}}","user":{"email":"x@y.z"}}"#,
        )
    }

    #[test]
    fn masks_inside_json_string_data() {
        let e = event().with_config("paths", "data.email, data.card.number,user.email");
        let d = Redact::handle(e).unwrap();
        let v = d.payload_json().unwrap();
        assert_eq!(
            v["data"],
            r#"{"email":"***","card":{"number":"***","cvc":"123"}}"#
        );
        assert_eq!(v["user"], j!({"email": "***"}));
        // key order preserved
        let keys: Vec<_> = v.as_object().unwrap().keys().cloned().collect();
        assert_eq!(keys, ["name", "channel", "data", "user"]);
    }

    #[test]
    fn custom_mask_and_remove() {
        let e = event()
            .with_config("paths", "data.card")
            .with_config("mask", "[redacted]");
        let v = Redact::handle(e).unwrap().payload_json().unwrap();
        assert_eq!(v["data"], r#"{"email":"a@b.c","card":"[redacted]"}"#);

        let e = event()
            .with_config("paths", "data.card.cvc,user")
            .with_config("mode", "remove");
        let v = Redact::handle(e).unwrap().payload_json().unwrap();
        assert_eq!(v["data"], r#"{"email":"a@b.c","card":{"number":"4111"}}"#);
        assert!(v.get("user").is_none());
    }

    #[test]
    fn nothing_matched_keeps() {
        let e = event().with_config("paths", "data.nothing,other");
        assert!(Redact::handle(e).unwrap().is_keep());
    }

    #[test]
    fn bad_config_is_a_plugin_error() {
        assert!(Redact::handle(event()).is_err());
        let e = event()
            .with_config("paths", "a")
            .with_config("mode", "shred");
        assert!(Redact::handle(e).unwrap_err().message().contains("mode"));
    }
}
