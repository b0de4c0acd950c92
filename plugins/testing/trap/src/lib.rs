//! Test plugin `trap`: panics on every call. On wasm32 a panic aborts, so the
//! host sees a trap (after the panic message is written to stderr).
//!
//! Config: `message` (optional): the panic message.

use wasmhook_plugin_sdk::{Decision, Error, Event, Plugin, export_plugin};

struct Trap;

impl Plugin for Trap {
    fn handle(event: Event) -> Result<Decision, Error> {
        let message = event.config_or("message", "trap test plugin: deliberate panic");
        panic!("{message} (event {})", event.id());
    }
}

export_plugin!(Trap);
