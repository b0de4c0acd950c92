//! The loaded plugins by name, swapped atomically when a file changes or the
//! config is reloaded, and the pipeline stage that calls one.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::{FailurePolicy, Limits, LoadError, Plugin, PluginEngine, PluginFailure, PluginInput};
use crate::app::App;
use crate::event::Job;
use crate::metrics;
use crate::pipeline::{Decision, Stage, StageError, StageFuture};

/// A plugin as the config defines it.
#[derive(Debug, Clone, PartialEq)]
pub struct PluginSpec {
    pub name: String,
    pub path: PathBuf,
    pub limits: Limits,
    pub policy: FailurePolicy,
}

/// When a file was last seen, to notice it being replaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
}

fn stamp(path: &std::path::Path) -> Option<Stamp> {
    let meta = std::fs::metadata(path).ok()?;
    Some(Stamp {
        modified: meta.modified().ok(),
        len: meta.len(),
    })
}

struct Loaded {
    spec: PluginSpec,
    stamp: Option<Stamp>,
    plugin: Arc<Plugin>,
}

pub struct Registry {
    engine: PluginEngine,
    loaded: RwLock<HashMap<String, Loaded>>,
}

impl Registry {
    /// Loads every plugin; the first that cannot be loaded is the error.
    pub fn load(engine: PluginEngine, specs: &[PluginSpec]) -> Result<Arc<Registry>, LoadError> {
        let mut loaded = HashMap::new();
        for spec in specs {
            loaded.insert(spec.name.clone(), load_one(&engine, spec)?);
        }
        Ok(Arc::new(Registry {
            engine,
            loaded: RwLock::new(loaded),
        }))
    }

    pub fn engine(&self) -> &PluginEngine {
        &self.engine
    }

    /// The current version of a plugin. Callers keep the `Arc` for the call,
    /// so a swap never disturbs a call in flight.
    pub fn get(&self, name: &str) -> Option<Arc<Plugin>> {
        self.loaded
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .map(|l| l.plugin.clone())
    }

    /// Reloads plugins whose file changed. A file that fails to load leaves
    /// the old version running. Returns what was tried.
    pub fn reload_changed(&self) -> Vec<(String, Result<(), String>)> {
        let stale: Vec<PluginSpec> = {
            let loaded = self.loaded.read().unwrap_or_else(|p| p.into_inner());
            loaded
                .values()
                .filter(|l| stamp(&l.spec.path) != l.stamp)
                .map(|l| l.spec.clone())
                .collect()
        };
        stale
            .into_iter()
            .map(|spec| (spec.name.clone(), self.swap(&spec)))
            .collect()
    }

    /// Replaces the definitions (config reload): loads what is new or changed
    /// first, and swaps only if all of it loads.
    pub fn replace(&self, specs: &[PluginSpec]) -> Result<(), LoadError> {
        let mut next = HashMap::new();
        {
            let loaded = self.loaded.read().unwrap_or_else(|p| p.into_inner());
            for spec in specs {
                match loaded.get(&spec.name) {
                    Some(l) if &l.spec == spec && stamp(&spec.path) == l.stamp => {
                        next.insert(
                            spec.name.clone(),
                            Loaded {
                                spec: spec.clone(),
                                stamp: l.stamp,
                                plugin: l.plugin.clone(),
                            },
                        );
                    }
                    _ => {
                        next.insert(spec.name.clone(), load_one(&self.engine, spec)?);
                    }
                }
            }
        }
        *self.loaded.write().unwrap_or_else(|p| p.into_inner()) = next;
        Ok(())
    }

    fn swap(&self, spec: &PluginSpec) -> Result<(), String> {
        match load_one(&self.engine, spec) {
            Ok(fresh) => {
                info!(
                    plugin = spec.name,
                    hash = fresh.plugin.hash,
                    "plugin reloaded"
                );
                self.loaded
                    .write()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(spec.name.clone(), fresh);
                Ok(())
            }
            Err(e) => {
                error!(plugin = spec.name, error = %e, "new plugin version rejected; the previous one keeps running");
                // Remember the stamp so the same bad file is not retried every tick.
                if let Some(l) = self
                    .loaded
                    .write()
                    .unwrap_or_else(|p| p.into_inner())
                    .get_mut(&spec.name)
                {
                    l.stamp = stamp(&spec.path);
                }
                Err(e.to_string())
            }
        }
    }

    /// Watches plugin files until shutdown, reloading any that change.
    pub fn watch(
        self: Arc<Self>,
        every: Duration,
        shutdown: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(every) => {}
                }
                let registry = self.clone();
                // Compiling is CPU work: keep it off the async threads.
                if let Err(e) = tokio::task::spawn_blocking(move || registry.reload_changed()).await
                {
                    warn!(error = %e, "plugin reload task failed");
                }
            }
        })
    }
}

fn load_one(engine: &PluginEngine, spec: &PluginSpec) -> Result<Loaded, LoadError> {
    let before = stamp(&spec.path);
    let plugin = engine.load(&spec.name, &spec.path, spec.limits.clone(), spec.policy)?;
    debug!(plugin = spec.name, hash = plugin.hash, "plugin loaded");
    Ok(Loaded {
        spec: spec.clone(),
        stamp: before,
        plugin: Arc::new(plugin),
    })
}

/// One plugin in an app's or an endpoint's chain, with that app's config for it.
pub struct PluginStage {
    pub registry: Arc<Registry>,
    pub plugin: String,
    pub config: Vec<(String, String)>,
}

impl Stage for PluginStage {
    fn name(&self) -> &str {
        &self.plugin
    }

    fn decide<'a>(&'a self, app: &'a App, job: &'a Job) -> StageFuture<'a> {
        Box::pin(self.run(app, job))
    }
}

impl PluginStage {
    async fn run(&self, app: &App, job: &Job) -> Result<Decision, StageError> {
        let Some(plugin) = self.registry.get(&self.plugin) else {
            metrics::plugin_call(&self.plugin, None, Some("not_loaded"));
            return Err(StageError {
                stage: self.plugin.clone(),
                message: "plugin is not loaded".into(),
            });
        };
        let input = PluginInput {
            id: &job.id,
            app_id: &job.app_id,
            event: &job.event,
            headers: &job.headers,
            metadata: &job.metadata,
            attempt: job.attempt + 1,
            endpoint: job.endpoint.as_deref(),
            endpoints: app.endpoints.len(),
        };
        let called = plugin.call(&input, &self.config).await;
        metrics::plugin_call(
            &self.plugin,
            Some(called.elapsed),
            called.decision.as_ref().err().map(failure_kind),
        );
        let failure = match called.decision {
            Ok(decision) => {
                debug!(
                    plugin = self.plugin,
                    elapsed_us = called.elapsed.as_micros() as u64,
                    "plugin decided"
                );
                return Ok(decision);
            }
            Err(f) => f,
        };
        let message = failure.to_string();
        match plugin.policy {
            FailurePolicy::Fail => Err(StageError {
                stage: self.plugin.clone(),
                message,
            }),
            FailurePolicy::Skip => {
                warn!(
                    plugin = self.plugin,
                    error = message,
                    policy = "skip",
                    "plugin failed; event passed on unchanged"
                );
                Ok(Decision::Skipped(message))
            }
            FailurePolicy::Drop => {
                warn!(
                    plugin = self.plugin,
                    error = message,
                    policy = "drop",
                    "plugin failed; event dropped"
                );
                Ok(Decision::Drop(format!(
                    "plugin failed and its policy drops the event: {message}"
                )))
            }
        }
    }
}

/// The metrics' name for a failure's kind.
fn failure_kind(failure: &PluginFailure) -> &'static str {
    match failure {
        PluginFailure::Rejected(_) => "rejected",
        PluginFailure::Trapped(_) => "trapped",
        PluginFailure::TimedOut(_) => "timed_out",
        PluginFailure::OutOfFuel(_) => "out_of_fuel",
        PluginFailure::OutOfMemory(_) => "out_of_memory",
        PluginFailure::OutputTooLarge { .. } => "output_too_large",
        PluginFailure::BadOutput(_) => "bad_output",
        PluginFailure::Instantiate(_) => "instantiate",
    }
}
