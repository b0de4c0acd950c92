//! The queue entry decoder: any bytes give a job or a malformed entry, never
//! a panic; a decoded job encodes and decodes to the same job.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wasmhook::queue::entry::{decode, encode};

fuzz_target!(|data: &[u8]| {
    // A stream id (its time stands in for a missing `created_ms`) and an id
    // that is not one (the clock does).
    for entry_id in ["1700000000000-0", "not-a-stream-id"] {
        match decode(entry_id, Some(data)) {
            Ok(job) => {
                // The worker numbers the next attempt.
                assert!(job.attempt.checked_add(1).is_some());
                let again =
                    decode("1-0", Some(encode(&job).as_bytes())).expect("an encoded job decodes");
                assert_eq!(again, job);
            }
            Err(m) => {
                assert!(!m.reason.is_empty());
                // The raw part kept for the dead letter is bounded.
                assert!(m.raw.len() <= 4096 * 3);
            }
        }
    }
});
