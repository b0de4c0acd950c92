//! Test plugin `call-count`: sets `calls` in the payload to the number of
//! calls this instance has served, counting this one: what a test needs to
//! see when the host reuses an instance and when it starts a fresh one.
//!
//! Config:
//! - `panic_at`: panic (a trap) on this call of the instance (default: never);
//! - `hold_mib`: keep this many MiB allocated for the life of the instance
//!   (default 0), to make its linear memory grow.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};

use wasmhook_plugin_sdk::{Decision, Error, Event, Plugin, Value, export_plugin};

static CALLS: AtomicU32 = AtomicU32::new(0);
static HELD: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

struct CallCount;

impl Plugin for CallCount {
    fn handle(event: Event) -> Result<Decision, Error> {
        let calls = CALLS.fetch_add(1, Ordering::Relaxed) + 1;
        let panic_at: u32 = event.config_parse("panic_at", 0)?;
        if calls == panic_at {
            panic!("call-count: told to panic on call {calls}");
        }
        let hold_mib: usize = event.config_parse("hold_mib", 0)?;
        if hold_mib > 0 {
            let mut held = HELD.lock().unwrap_or_else(|p| p.into_inner());
            if held.is_empty() {
                held.push(vec![1u8; hold_mib << 20]);
            }
        }
        let mut payload = event.json()?;
        let Some(fields) = payload.as_object_mut() else {
            return Err(Error::new("call-count: the payload is not a JSON object"));
        };
        fields.insert("calls".into(), Value::from(calls));
        Ok(Decision::transform(payload))
    }
}

export_plugin!(CallCount);
