//! The config loader: any file text gives settings or an error naming what is
//! wrong, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let env: Vec<(String, String)> = Vec::new();
    if let Err(e) = wasmhook::config::load_from(Some("fuzz.toml".into()), Some(text), env) {
        assert!(!e.problems.is_empty());
        assert!(!e.to_string().is_empty());
    }
});
