//! Test plugin `sleeper`: sleeps (`std::thread::sleep`, a blocking WASI
//! clock and poll call, no guest instructions running) for `ms` milliseconds
//! (config, default 3000), then keeps the event. The host's wall-clock
//! deadline must stop it although the guest never computes.

use std::time::Duration;

use wasmhook_plugin_sdk::{Decision, Error, Event, Plugin, export_plugin};

struct Sleeper;

impl Plugin for Sleeper {
    fn handle(event: Event) -> Result<Decision, Error> {
        let ms = event
            .config("ms")
            .and_then(|v| v.parse().ok())
            .unwrap_or(3000);
        std::thread::sleep(Duration::from_millis(ms));
        Ok(Decision::Keep)
    }
}

export_plugin!(Sleeper);
