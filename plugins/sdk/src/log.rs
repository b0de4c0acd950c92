//! Structured logging into the worker's log (the host `log` import), tagged
//! there with plugin and app.
//!
//! Functions: `log::info("text")`. Macros with `format!` syntax, exported at the
//! crate root and re-exported here: `wasmhook_plugin_sdk::info!("x = {x}")` or
//! `wasmhook_plugin_sdk::log::info!(...)`.
//!
//! On a non-wasm target (native unit tests) lines go to stderr instead.

pub use crate::bindings::wasmhook::plugin::log::Level;

/// Writes one log line at `level`.
pub fn write(level: Level, message: &str) {
    #[cfg(target_arch = "wasm32")]
    crate::bindings::wasmhook::plugin::log::log(level, message);
    #[cfg(not(target_arch = "wasm32"))]
    eprintln!("[plugin {level:?}] {message}");
}

/// Writes a line at trace level.
pub fn trace(message: impl AsRef<str>) {
    write(Level::Trace, message.as_ref());
}

/// Writes a line at debug level.
pub fn debug(message: impl AsRef<str>) {
    write(Level::Debug, message.as_ref());
}

/// Writes a line at info level.
pub fn info(message: impl AsRef<str>) {
    write(Level::Info, message.as_ref());
}

/// Writes a line at warn level.
pub fn warn(message: impl AsRef<str>) {
    write(Level::Warn, message.as_ref());
}

/// Writes a line at error level.
pub fn error(message: impl AsRef<str>) {
    write(Level::Error, message.as_ref());
}

pub use crate::{debug, error, info, trace, warn};

/// `trace!("fmt", args..)`: a trace-level line to the worker's log.
#[macro_export]
macro_rules! trace {
    ($($arg:tt)+) => { $crate::log::trace(::std::format!($($arg)+)) };
}

/// `debug!("fmt", args..)`: a debug-level line to the worker's log.
#[macro_export]
macro_rules! debug {
    ($($arg:tt)+) => { $crate::log::debug(::std::format!($($arg)+)) };
}

/// `info!("fmt", args..)`: an info-level line to the worker's log.
#[macro_export]
macro_rules! info {
    ($($arg:tt)+) => { $crate::log::info(::std::format!($($arg)+)) };
}

/// `warn!("fmt", args..)`: a warn-level line to the worker's log.
#[macro_export]
macro_rules! warn {
    ($($arg:tt)+) => { $crate::log::warn(::std::format!($($arg)+)) };
}

/// `error!("fmt", args..)`: an error-level line to the worker's log.
#[macro_export]
macro_rules! error {
    ($($arg:tt)+) => { $crate::log::error(::std::format!($($arg)+)) };
}
