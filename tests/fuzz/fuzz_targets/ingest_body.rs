//! The ingest body parser: any bytes give events or an error, never a panic;
//! what it accepts is within the batch limit, valid, and reads back the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wasmhook::ingest::parse_events;

/// Small, so the fuzzer reaches the over-the-limit refusal too.
const MAX_BATCH: usize = 8;

fuzz_target!(|data: &[u8]| {
    let events = match parse_events(data, MAX_BATCH) {
        Ok(events) => events,
        Err(e) => {
            assert!(!e.to_string().is_empty());
            return;
        }
    };
    assert!(!events.is_empty() && events.len() <= MAX_BATCH);
    for event in &events {
        assert_eq!(event.validate(), Ok(()));
    }
    // Accepted events, written out as a batch, parse to the same events.
    let body =
        serde_json::to_vec(&serde_json::json!({ "events": events })).expect("events serialize");
    assert_eq!(parse_events(&body, MAX_BATCH).expect("re-parses"), events);
});
