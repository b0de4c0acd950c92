//! Test plugin `plugin-error`: always returns `Err(plugin-error)`.
//!
//! Config: `message` (optional): the error message, default
//! `plugin-error test plugin: deliberate failure`.

use wasmhook_plugin_sdk::{Decision, Error, Event, Plugin, export_plugin};

struct PluginError;

impl Plugin for PluginError {
    fn handle(event: Event) -> Result<Decision, Error> {
        Err(Error::new(event.config_or(
            "message",
            "plugin-error test plugin: deliberate failure",
        )))
    }
}

export_plugin!(PluginError);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors() {
        let e = Event::new("x", "{}").with_config("message", "boom");
        assert_eq!(PluginError::handle(e).unwrap_err().message(), "boom");
    }
}
