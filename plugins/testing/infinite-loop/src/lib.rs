//! Test plugin `infinite-loop`: never returns. The loop has an observable
//! side effect (`black_box`) so the optimizer cannot remove it; the host must
//! stop it (fuel or epoch deadline).

use std::hint::black_box;

use wasmhook_plugin_sdk::{Decision, Error, Event, Plugin, export_plugin};

struct InfiniteLoop;

impl Plugin for InfiniteLoop {
    fn handle(event: Event) -> Result<Decision, Error> {
        wasmhook_plugin_sdk::info!("infinite-loop: spinning on event {}", event.id());
        let mut counter: u64 = 0;
        loop {
            counter = black_box(counter.wrapping_add(1));
        }
    }
}

export_plugin!(InfiniteLoop);
