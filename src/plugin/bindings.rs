//! Host bindings generated from `wit/plugin.wit`.

wasmtime::component::bindgen!({
    path: "wit",
    world: "wasmhook:plugin/plugin",
    // Calls run on the worker's async tasks; the deadline interrupts them.
    exports: { default: async },
});

pub use self::Plugin as PluginWorld;
pub use self::PluginPre as PluginWorldPre;
pub use self::wasmhook::plugin::log;
pub use self::wasmhook::plugin::types;
