//! What one call's `Store` holds: a WASI context that grants nothing (no
//! files, network, environment or arguments; stdout discarded, stderr kept
//! for panic messages), the memory limiter, and the tags for log lines.

use std::sync::Arc;

use wasmtime::ResourceLimiter;
use wasmtime::component::{HasSelf, Linker, ResourceTable};
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::bindings::{PluginWorld, log};

/// Most bytes of guest stderr kept.
const STDERR_CAP: usize = 4096;
/// Most log lines one call may write; the rest are dropped.
const LOG_LINES: u32 = 100;
/// Longest log line kept.
const LOG_LINE_CAP: usize = 2048;

pub(crate) struct State {
    wasi: WasiCtx,
    /// What the guest wrote to stderr (panic messages), capped.
    pub(super) stderr: MemoryOutputPipe,
    table: ResourceTable,
    pub(super) limiter: Limiter,
    plugin: Arc<str>,
    /// The one app this store's instance serves.
    pub(super) app: Arc<str>,
    logged: u32,
}

impl State {
    pub(super) fn new(plugin: Arc<str>, app: Arc<str>, max_memory: usize) -> State {
        let stderr = MemoryOutputPipe::new(STDERR_CAP);
        let wasi = WasiCtx::builder()
            .stderr(stderr.clone())
            .insecure_random_seed(0)
            .build();
        State {
            wasi,
            stderr,
            table: ResourceTable::new(),
            limiter: Limiter {
                max_memory,
                hit: false,
                peak: 0,
            },
            plugin,
            app,
            logged: 0,
        }
    }

    /// Resets what is counted per call (a warm instance serves many).
    pub(super) fn begin_call(&mut self) {
        self.limiter.hit = false;
        self.logged = 0;
    }
}

impl WasiView for State {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// Caps linear memory and remembers that the cap was hit, so the trap that
/// follows is reported as running out of memory.
pub(crate) struct Limiter {
    max_memory: usize,
    pub(super) hit: bool,
    /// Largest linear memory granted so far, in bytes.
    pub(super) peak: usize,
}

impl ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.max_memory {
            self.hit = true;
            return Ok(false);
        }
        self.peak = self.peak.max(desired);
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 100_000)
    }
}

impl log::Host for State {
    fn log(&mut self, level: log::Level, message: String) {
        self.logged += 1;
        if self.logged > LOG_LINES {
            return;
        }
        // One call, one line: control characters are escaped (a guest could
        // otherwise forge log lines or drive the terminal), within the cap.
        let message = crate::telemetry::one_line(&message, LOG_LINE_CAP);
        let (plugin, app) = (&*self.plugin, &*self.app);
        match level {
            log::Level::Trace => {
                tracing::trace!(target: "wasmhook::plugin::guest", plugin, app, "{message}")
            }
            log::Level::Debug => {
                tracing::debug!(target: "wasmhook::plugin::guest", plugin, app, "{message}")
            }
            log::Level::Info => {
                tracing::info!(target: "wasmhook::plugin::guest", plugin, app, "{message}")
            }
            log::Level::Warn => {
                tracing::warn!(target: "wasmhook::plugin::guest", plugin, app, "{message}")
            }
            log::Level::Error => {
                tracing::error!(target: "wasmhook::plugin::guest", plugin, app, "{message}")
            }
        }
    }
}

impl super::bindings::types::Host for State {}

/// The `log` import and the WASI interfaces a Rust std guest links against.
pub(super) fn add_to_linker(linker: &mut Linker<State>) -> wasmtime::Result<()> {
    wasmtime_wasi::p2::add_to_linker_async(linker)?;
    PluginWorld::add_to_linker::<State, HasSelf<State>>(linker, |s| s)?;
    Ok(())
}
