//! Test plugin `memory-hog`: allocates 1 MiB chunks forever, writing to every
//! page so the memory is really used. When the host's memory limit refuses to
//! grow linear memory the allocation fails and the plugin aborts (a trap) —
//! unless the host's limiter traps first.
//!
//! Config: `chunk_bytes` (optional, default 1048576).

use std::hint::black_box;

use wasmhook_plugin_sdk::{Decision, Error, Event, Plugin, export_plugin};

struct MemoryHog;

const PAGE: usize = 4096;

impl Plugin for MemoryHog {
    fn handle(event: Event) -> Result<Decision, Error> {
        let chunk_bytes: usize = event.config_parse("chunk_bytes", 1 << 20)?;
        wasmhook_plugin_sdk::info!(
            "memory-hog: allocating {chunk_bytes}-byte chunks until it fails"
        );
        let mut hoard: Vec<Vec<u8>> = Vec::new();
        let mut round: u8 = 0;
        loop {
            round = round.wrapping_add(1);
            let mut chunk = Vec::<u8>::with_capacity(chunk_bytes);
            // Touch every page (non-zero) so nothing can be elided.
            chunk.resize(chunk_bytes, round | 1);
            for i in (0..chunk.len()).step_by(PAGE) {
                chunk[i] = black_box(round);
            }
            hoard.push(black_box(chunk));
            black_box(&hoard);
        }
    }
}

export_plugin!(MemoryHog);
