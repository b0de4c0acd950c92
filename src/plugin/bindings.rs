//! Host bindings generated from `wit/plugin.wit`.

wasmtime::component::bindgen!({
    path: "wit",
    world: "wasmhook:plugin/plugin",
});

pub use self::Plugin as PluginWorld;
pub use self::PluginPre as PluginWorldPre;
pub use self::wasmhook::plugin::log;
pub use self::wasmhook::plugin::types;
