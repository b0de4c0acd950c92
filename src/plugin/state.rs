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
                total: 0,
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

/// Caps linear memory, all of an instance's memories together, and
/// remembers that the cap was hit, so the trap that follows is reported as
/// running out of memory.
pub(crate) struct Limiter {
    max_memory: usize,
    pub(super) hit: bool,
    /// Bytes of linear memory granted, over all of the instance's memories.
    total: usize,
    /// Largest `total` so far, in bytes.
    pub(super) peak: usize,
}

impl ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let total = self.total.saturating_add(desired.saturating_sub(current));
        if total > self.max_memory {
            self.hit = true;
            return Ok(false);
        }
        self.total = total;
        self.peak = self.peak.max(total);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_memory_of_an_instance_counts_toward_one_cap() {
        let mut l = Limiter {
            max_memory: 32 << 20,
            hit: false,
            total: 0,
            peak: 0,
        };
        // Two memories of 20 MiB each: the second is refused.
        assert!(l.memory_growing(0, 20 << 20, None).unwrap());
        assert!(!l.memory_growing(0, 20 << 20, None).unwrap());
        assert!(l.hit);
        // Growing the first by 10 MiB still fits; by another 4 MiB it does not.
        assert!(l.memory_growing(20 << 20, 30 << 20, None).unwrap());
        assert!(!l.memory_growing(30 << 20, 34 << 20, None).unwrap());
        assert_eq!(l.peak, 30 << 20);
    }
}

/// The `log` import and the WASI interfaces a Rust std guest links against.
pub(super) fn add_to_linker(linker: &mut Linker<State>) -> wasmtime::Result<()> {
    wasmtime_wasi::p2::add_to_linker_async(linker)?;
    PluginWorld::add_to_linker::<State, HasSelf<State>>(linker, |s| s)?;
    Ok(())
}
