//! WebAssembly plugins: the one module that uses wasmtime.
//!
//! One [`PluginEngine`] per process (one wasmtime `Engine` with a pooling
//! allocator and epoch interruption, one `Linker` with the `log` import and a
//! denying WASI context). Each plugin is compiled once (or loaded from the
//! on-disk cache), checked against the `plugin` world and pre-instantiated.
//! A call runs in its own `Store` (deadline, memory cap, optional fuel):
//! either a fresh instance, or a warm one that served earlier calls of the
//! same plugin version for the same app (see [`warm`] for what makes that
//! safe). No state ever crosses from one app to another.

mod bindings;
mod cache;
mod output;
mod registry;
mod slots;
mod state;
mod warm;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use wasmtime::component::Linker;
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store, Trap};

/// The WIT types as the host sees them (`wit/plugin.wit`).
pub use self::bindings::types as wit;
use self::bindings::{PluginWorld, PluginWorldPre};
pub use self::output::{DecisionBounds, MAX_REASON, check_decision, check_error};
pub use self::registry::{PluginSpec, PluginStage, Registry};
use self::slots::Slots;
use self::state::State;
use self::warm::{Warm, WarmPool};
use crate::event::Event;
use crate::pipeline::Decision;

/// How often the epoch ticks: the resolution of plugin deadlines.
const TICK: Duration = Duration::from_millis(1);

/// What a plugin may use in one call.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// Wall-clock time per call.
    pub deadline: Duration,
    /// Instruction budget per call (deterministic); None when fuel is off.
    pub fuel: Option<u64>,
    /// Linear memory, in bytes.
    pub max_memory: usize,
    /// Total size of the payloads a decision returns, in bytes.
    pub max_output: usize,
    /// Calls one instance may serve (for one app) before it is replaced;
    /// 1: a fresh instance for every call.
    pub max_reuse: u32,
}

/// What happens to the job when a plugin traps, times out, breaks a limit or
/// returns its own error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FailurePolicy {
    /// The job is retried with backoff, then dead-lettered with the message.
    Fail,
    /// Carry on with the input unchanged (logged).
    Skip,
    /// The event is dropped (logged and counted).
    Drop,
}

/// Why a call did not produce a decision. A plugin's own error (returned
/// through WIT) is `Rejected`; everything else is the host stopping it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PluginFailure {
    #[error("returned an error: {0}")]
    Rejected(String),
    #[error("trapped: {0}")]
    Trapped(String),
    #[error("ran past its deadline of {0:?}")]
    TimedOut(Duration),
    #[error("used up its fuel budget of {0}")]
    OutOfFuel(u64),
    #[error("hit its memory limit of {0} bytes")]
    OutOfMemory(usize),
    #[error("returned {size} bytes, over its output limit of {limit}")]
    OutputTooLarge { size: usize, limit: usize },
    #[error("returned a bad decision: {0}")]
    BadOutput(String),
    #[error("could not be instantiated: {0}")]
    Instantiate(String),
}

/// Why a plugin file could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a WebAssembly component: {reason}")]
    NotAComponent { path: PathBuf, reason: String },
    /// More core instances, memories or tables than `[wasm]
    /// plugin_max_*` allow, or a memory or table larger than the pool's.
    #[error("{path}: holds more than a plugin may hold: {reason}")]
    OverLimits { path: PathBuf, reason: String },
    #[error("{path}: does not implement the wasmhook:plugin/plugin world: {reason}")]
    WrongWorld { path: PathBuf, reason: String },
}

/// Engine-wide settings.
#[derive(Debug, Clone)]
pub struct EngineSettings {
    /// Where precompiled plugins are kept; None: compile on every start.
    pub cache_dir: Option<PathBuf>,
    /// Calls in flight at once (each holds an instance).
    pub max_instances: u32,
    /// Calls one app may have in flight at once, and idle instances it may
    /// keep warm.
    pub app_max_instances: u32,
    /// Idle instances kept warm for reuse, over all plugins and apps; 0: none.
    pub warm_instances: u32,
    /// What one component may hold.
    pub component: ComponentCaps,
    /// Largest memory any plugin may have (the pool's slot size).
    pub max_memory: usize,
    /// Whether fuel metering is on (costs time on every call).
    pub fuel: bool,
}

/// What one component may hold (the pooling allocator's per-component
/// limits); a component over any of them is refused when it is loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ComponentCaps {
    pub core_instances: u32,
    pub memories: u32,
    pub tables: u32,
}

impl Default for ComponentCaps {
    fn default() -> Self {
        ComponentCaps {
            core_instances: 32,
            memories: 2,
            tables: 8,
        }
    }
}

impl Default for EngineSettings {
    fn default() -> Self {
        EngineSettings {
            cache_dir: None,
            max_instances: 64,
            app_max_instances: 16,
            warm_instances: 64,
            component: ComponentCaps::default(),
            max_memory: 32 << 20,
            fuel: false,
        }
    }
}

/// The wasmtime engine, linker and epoch ticker.
#[derive(Clone)]
pub struct PluginEngine {
    engine: Engine,
    linker: Arc<Linker<State>>,
    cache_dir: Option<PathBuf>,
    fuel: bool,
    slots: Arc<Slots>,
    warm: Arc<WarmPool>,
}

impl PluginEngine {
    pub fn new(settings: &EngineSettings) -> anyhow::Result<Self> {
        let mut pool = PoolingAllocationConfig::default();
        let n = settings.max_instances.max(4);
        // Idle warm instances have their own room, so they never hold a slot
        // a call is waiting for.
        let total = n + settings.warm_instances;
        let share = settings.app_max_instances.clamp(1, n) as usize;
        let caps = settings.component;
        pool.total_component_instances(total)
            .max_core_instances_per_component(caps.core_instances)
            .max_memories_per_component(caps.memories)
            .max_tables_per_component(caps.tables)
            .total_core_instances(total * caps.core_instances)
            .total_memories(total * caps.memories)
            .total_tables(total * caps.tables)
            .max_memory_size(settings.max_memory)
            .linear_memory_keep_resident(256 * 1024)
            .table_keep_resident(16 * 1024);
        let mut config = Config::new();
        config
            .wasm_component_model(true)
            .epoch_interruption(true)
            .consume_fuel(settings.fuel)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&config)?;
        let mut linker = Linker::new(&engine);
        state::add_to_linker(&mut linker)?;
        let weak = engine.weak();
        std::thread::Builder::new()
            .name("wasm-epoch".into())
            .spawn(move || {
                while let Some(engine) = weak.upgrade() {
                    engine.increment_epoch();
                    drop(engine);
                    std::thread::sleep(TICK);
                }
            })?;
        Ok(PluginEngine {
            engine,
            linker: Arc::new(linker),
            cache_dir: settings.cache_dir.clone(),
            fuel: settings.fuel,
            slots: Arc::new(Slots::new(n as usize, share)),
            warm: Arc::new(WarmPool::new(settings.warm_instances as usize, share)),
        })
    }

    /// Loads a plugin file: from the cache when this exact file was compiled
    /// by a compatible engine before, else compiled (and cached).
    pub fn load(
        &self,
        name: &str,
        path: &Path,
        limits: Limits,
        policy: FailurePolicy,
    ) -> Result<Plugin, LoadError> {
        let bytes = std::fs::read(path).map_err(|source| LoadError::Read {
            path: path.into(),
            source,
        })?;
        self.load_bytes(name, path, &bytes, limits, policy)
    }

    pub fn load_bytes(
        &self,
        name: &str,
        path: &Path,
        bytes: &[u8],
        limits: Limits,
        policy: FailurePolicy,
    ) -> Result<Plugin, LoadError> {
        let not_component = |reason: String| {
            // The pooling allocator's per-component checks, made when the
            // component is compiled or loaded from the cache.
            if reason.contains("in the pooling allocator")
                || reason.contains("fit in pooling allocator requirements")
            {
                LoadError::OverLimits {
                    path: path.into(),
                    reason,
                }
            } else {
                LoadError::NotAComponent {
                    path: path.into(),
                    reason,
                }
            }
        };
        let (component, hash) = cache::compile(&self.engine, self.cache_dir.as_deref(), bytes)
            .map_err(|e| not_component(format!("{e:#}")))?;
        let wrong_world = |reason: String| LoadError::WrongWorld {
            path: path.into(),
            reason,
        };
        let pre = self
            .linker
            .instantiate_pre(&component)
            .map_err(|e| wrong_world(format!("{e:#}")))?;
        let pre = PluginWorldPre::new(pre).map_err(|e| wrong_world(format!("{e:#}")))?;
        Ok(Plugin {
            uid: NEXT_UID.fetch_add(1, Ordering::Relaxed),
            name: name.into(),
            path: path.into(),
            hash,
            pre,
            limits: Limits {
                fuel: if self.fuel { limits.fuel } else { None },
                max_reuse: limits.max_reuse.max(1),
                ..limits
            },
            policy,
            engine: self.engine.clone(),
            metered: self.fuel,
            slots: self.slots.clone(),
            warm: self.warm.clone(),
        })
    }

    /// Idle warm instances held now, over all plugins and apps.
    pub fn warm_instances(&self) -> usize {
        self.warm.len()
    }

    /// What a component imports and exports, as text (`plugin inspect`).
    pub fn describe(&self, bytes: &[u8]) -> anyhow::Result<(Vec<String>, Vec<String>)> {
        let (component, _) = cache::compile(&self.engine, self.cache_dir.as_deref(), bytes)?;
        let ty = component.component_type();
        let imports = ty
            .imports(&self.engine)
            .map(|(name, _)| name.to_string())
            .collect();
        let exports = ty
            .exports(&self.engine)
            .map(|(name, _)| name.to_string())
            .collect();
        Ok((imports, exports))
    }
}

/// Tells loaded plugin versions apart (warm instances are kept per version).
static NEXT_UID: AtomicU64 = AtomicU64::new(1);

/// A compiled, checked, pre-instantiated plugin.
pub struct Plugin {
    uid: u64,
    pub name: Arc<str>,
    pub path: PathBuf,
    /// SHA-256 of the component file.
    pub hash: String,
    pre: PluginWorldPre<State>,
    pub limits: Limits,
    pub policy: FailurePolicy,
    engine: Engine,
    /// Whether the engine meters fuel.
    metered: bool,
    slots: Arc<Slots>,
    warm: Arc<WarmPool>,
}

impl Drop for Plugin {
    /// A replaced or removed version's warm instances go with it.
    fn drop(&mut self) {
        self.warm.purge(self.uid);
    }
}

/// The event as a plugin sees it.
#[derive(Debug, Clone)]
pub struct PluginInput<'a> {
    pub id: &'a str,
    pub app_id: &'a str,
    pub event: &'a Event,
    pub headers: &'a [(String, String)],
    pub metadata: &'a [(String, String)],
    pub attempt: u32,
    pub endpoint: Option<&'a str>,
    /// The app's endpoint count: the most targets a route may name.
    pub endpoints: usize,
}

/// A decision and what it cost.
#[derive(Debug)]
pub struct Called {
    pub decision: Result<Decision, PluginFailure>,
    pub elapsed: Duration,
    /// What the guest wrote to stderr (panic messages), capped.
    pub stderr: String,
}

impl Plugin {
    /// Runs the plugin once on the calling task, on a warm instance of this
    /// app's if one is idle, else on a fresh one: the guest yields to the
    /// runtime at its epoch checks, and the deadline interrupts it.
    pub async fn call(&self, input: &PluginInput<'_>, config: &[(String, String)]) -> Called {
        // A place in the app's share first, then one of the engine's calls
        // in flight.
        let _share = self.slots.app_permit(input.app_id).await;
        let _slot = self.slots.engine_permit().await;
        // The deadline starts once the slot is ours.
        let started = Instant::now();
        let deadline = tokio::time::Instant::from_std(started + self.limits.deadline);
        let (mut store, instance, calls) = match self.warm.take(self.uid, input.app_id) {
            Some(warm) => (warm.store, Some(warm.instance), warm.calls),
            None => {
                let state = State::new(
                    self.name.clone(),
                    input.app_id.into(),
                    self.limits.max_memory,
                );
                let mut store = Store::new(&self.engine, state);
                store.limiter(|s| &mut s.limiter);
                store.epoch_deadline_trap();
                (store, None, 0)
            }
        };
        store.data_mut().begin_call();
        let ticks = (self.limits.deadline.as_nanos() / TICK.as_nanos()).max(1) as u64;
        store.set_epoch_deadline(ticks + 1);
        if self.metered {
            // A plugin without a budget of its own gets all the fuel there
            // is. Cannot fail: the engine meters fuel.
            let _ = store.set_fuel(self.limits.fuel.unwrap_or(u64::MAX));
        }
        let (instance, decision) = self
            .run(&mut store, instance, input, config, deadline)
            .await;
        let stderr = String::from_utf8_lossy(&store.data().stderr.contents())
            .trim()
            .to_string();
        let decision = decision.map_err(|failure| match failure {
            PluginFailure::Trapped(msg) if !stderr.is_empty() => {
                PluginFailure::Trapped(format!("{msg}: {stderr}"))
            }
            other => other,
        });
        let elapsed = started.elapsed();
        let clean = matches!(decision, Ok(_) | Err(PluginFailure::Rejected(_)));
        let calls = calls + 1;
        if let Some(instance) = instance
            && clean
            && stderr.is_empty()
            && calls < self.limits.max_reuse
            && store.data().limiter.peak <= self.limits.max_memory / 2
        {
            let warm = Warm {
                store,
                instance,
                calls,
            };
            let app = warm.store.data().app.clone();
            self.warm.put(self.uid, app, warm);
        }
        Called {
            decision,
            elapsed,
            stderr,
        }
    }

    /// Instantiates (unless warm) and calls; also gives back the instance
    /// when the call returned. The epoch deadline stops a guest that computes
    /// past `deadline`; the timeout around each step stops one that waits in
    /// a host call (a WASI clock or poll) past it. An instance stopped that
    /// way is not given back.
    async fn run(
        &self,
        store: &mut Store<State>,
        warm: Option<PluginWorld>,
        input: &PluginInput<'_>,
        config: &[(String, String)],
        deadline: tokio::time::Instant,
    ) -> (Option<PluginWorld>, Result<Decision, PluginFailure>) {
        let timed_out = || PluginFailure::TimedOut(self.limits.deadline);
        let instance = match warm {
            Some(instance) => instance,
            None => {
                let instantiated =
                    tokio::time::timeout_at(deadline, self.pre.instantiate_async(&mut *store))
                        .await;
                match instantiated {
                    Ok(Ok(instance)) => instance,
                    Ok(Err(e)) => return (None, Err(self.classify(store, e, true))),
                    Err(_) => return (None, Err(timed_out())),
                }
            }
        };
        let event = wit::Event {
            id: input.id.to_string(),
            app_id: input.app_id.to_string(),
            event_type: input.event.name.clone(),
            channel: input.event.channel.clone(),
            payload: serde_json::to_string(input.event).expect("events always serialize"),
            headers: input
                .headers
                .iter()
                .map(|(name, value)| wit::Header {
                    name: name.clone(),
                    value: value.clone(),
                })
                .collect(),
            metadata: pairs(input.metadata),
            attempt: input.attempt,
            endpoint: input.endpoint.map(str::to_string),
        };
        let config = pairs(config);
        let called =
            tokio::time::timeout_at(deadline, instance.call_handle(&mut *store, &event, &config))
                .await;
        let decision = match called {
            Ok(Ok(Ok(decision))) => check_decision(
                decision,
                &event.payload,
                input.event,
                &DecisionBounds::new(self.limits.max_output, input.endpoints),
            ),
            Ok(Ok(Err(e))) => Err(check_error(e.message, self.limits.max_output)),
            Ok(Err(e)) => Err(self.classify(store, e, false)),
            Err(_) => return (None, Err(timed_out())),
        };
        (Some(instance), decision)
    }

    /// Tells a trap from a timeout, a fuel or memory limit.
    fn classify(
        &self,
        store: &Store<State>,
        error: wasmtime::Error,
        instantiating: bool,
    ) -> PluginFailure {
        if store.data().limiter.hit {
            return PluginFailure::OutOfMemory(self.limits.max_memory);
        }
        match error.downcast_ref::<Trap>() {
            Some(Trap::Interrupt) => PluginFailure::TimedOut(self.limits.deadline),
            Some(Trap::OutOfFuel) => PluginFailure::OutOfFuel(self.limits.fuel.unwrap_or(0)),
            Some(trap) => PluginFailure::Trapped(trap.to_string()),
            None if instantiating => PluginFailure::Instantiate(format!("{error:#}")),
            None => PluginFailure::Trapped(format!("{error:#}")),
        }
    }
}

fn pairs(items: &[(String, String)]) -> Vec<wit::Pair> {
    items
        .iter()
        .map(|(key, value)| wit::Pair {
            key: key.clone(),
            value: value.clone(),
        })
        .collect()
}

/// Loads every configured plugin and builds the app and endpoint chains.
/// No registry (and no engine) when no plugin is configured.
pub fn build_pipeline(
    settings: &crate::config::Settings,
) -> anyhow::Result<(crate::pipeline::Pipeline, Option<Arc<Registry>>)> {
    if settings.plugins.is_empty() {
        return Ok((crate::pipeline::Pipeline::default(), None));
    }
    let registry = Registry::load(PluginEngine::new(&settings.wasm)?, &settings.plugins)?;
    Ok((chains(settings, &registry), Some(registry)))
}

/// The app and endpoint chains of `settings`, calling plugins of `registry`.
pub fn chains(
    settings: &crate::config::Settings,
    registry: &Arc<Registry>,
) -> crate::pipeline::Pipeline {
    use std::collections::HashMap;

    use crate::pipeline::{Chain, Pipeline};

    let chain = |refs: &[crate::app::PluginRef]| -> Chain {
        refs.iter()
            .map(|r| {
                Arc::new(PluginStage {
                    registry: registry.clone(),
                    plugin: r.plugin.clone(),
                    config: r.config.clone(),
                }) as Arc<dyn crate::pipeline::Stage>
            })
            .collect()
    };
    let mut apps = HashMap::new();
    let mut endpoints = HashMap::new();
    for app in settings.apps.iter() {
        if !app.plugins.is_empty() {
            apps.insert(app.id.clone(), chain(&app.plugins));
        }
        for e in &app.endpoints {
            if !e.plugins.is_empty() {
                endpoints.insert((app.id.clone(), e.id.clone()), chain(&e.plugins));
            }
        }
    }
    Pipeline::new(apps, endpoints)
}
