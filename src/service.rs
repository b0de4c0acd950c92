//! `serve`: builds the queue from the settings and runs the ingest, the
//! worker, or both, until shutdown; reloads apps and plugins on SIGHUP.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::Settings;
use crate::ingest::{self, Ingest};
use crate::metrics::scrape;
use crate::plugin::{self, PluginEngine, Registry};
use crate::queue::{MemoryQueue, Queue, RedisQueue};
use crate::worker::{self, Tenants};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Ingest and worker in one process.
    All,
    /// HTTP ingest only.
    Server,
    /// Worker only.
    Worker,
}

/// The queue the settings name: Redis when `redis.url` is set, else the
/// embedded in-memory one.
pub fn open_queue(settings: &Settings) -> anyhow::Result<Queue> {
    let options = settings.queue_options();
    Ok(match settings.redis_target()? {
        Some(target) => Queue::Redis(
            RedisQueue::connect(target, settings.keys.clone(), options)
                .context("connecting to Redis")?,
        ),
        None => Queue::Memory(MemoryQueue::new(options)),
    })
}

/// Runs until `shutdown` is cancelled. `listener` is the ingest's (tests pass
/// one bound to port 0); None binds `server.listen`.
pub async fn serve(
    settings: Settings,
    mode: Mode,
    listener: Option<TcpListener>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    serve_with_reload(settings, mode, listener, shutdown, None).await
}

/// As [`serve`]; with a config file, SIGHUP reloads it: apps, endpoints and
/// plugins are swapped in atomically (jobs in flight finish with what they
/// started with). A config that does not load, or a plugin that does not,
/// is rejected with its reason and the running one stays. Queue, Redis,
/// server and metrics settings need a restart.
pub async fn serve_with_reload(
    settings: Settings,
    mode: Mode,
    listener: Option<TcpListener>,
    shutdown: CancellationToken,
    config_file: Option<PathBuf>,
) -> anyhow::Result<()> {
    let settings = Arc::new(settings);
    let queue = open_queue(&settings)?;
    // A Redis that is down is waited for; one that refuses the login is a
    // config error, said at start.
    if let Err(e) = queue.check_login().await {
        anyhow::bail!("{e}");
    }
    // A queue made with another number of shards would strand its apps' jobs.
    match queue.check_layout().await {
        Err(e @ crate::queue::QueueError::Layout { .. }) => anyhow::bail!("{e}"),
        Err(e) => warn!(error = %e, "could not check the queue's number of shards now"),
        Ok(()) => {}
    }
    if !queue.is_durable() {
        if mode != Mode::All {
            anyhow::bail!(
                "--mode {mode:?} needs a shared queue: set redis.url (the embedded queue lives inside one process)"
            );
        }
        warn!(
            "NOT DURABLE: no redis.url configured, using the embedded in-memory queue; events waiting or scheduled for retry are lost when this process stops"
        );
    }

    // Plugins load (or fail with the file and reason) before any job is taken.
    let (pipeline, registry) = if mode == Mode::Server {
        (Default::default(), None)
    } else {
        plugin::build_pipeline(&settings)?
    };
    if let Some(registry) = &registry {
        registry
            .clone()
            .watch(settings.watch_interval, shutdown.clone());
    }

    let mut tasks = tokio::task::JoinSet::new();
    let mut ingest_state = None;
    if mode != Mode::Worker {
        let listener = match listener {
            Some(l) => l,
            None => TcpListener::bind(settings.server.listen)
                .await
                .with_context(|| format!("binding the ingest to {}", settings.server.listen))?,
        };
        info!(address = %listener.local_addr()?, "ingest listening");
        let state = Arc::new(Ingest {
            queue: queue.clone(),
            apps: settings.apps.clone().into(),
            server: settings.server.clone(),
        });
        ingest_state = Some(state.clone());
        let mut router = ingest::router(state);
        if settings.metrics.on_ingest {
            router = router.merge(scrape::router(queue.clone(), settings.metrics.clone()));
        }
        let stop = shutdown.clone();
        tasks.spawn(async move {
            axum::serve(listener, router)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await
                .context("ingest server failed")
        });
    }
    if let Some(address) = settings.metrics.listen {
        let listener = TcpListener::bind(address)
            .await
            .with_context(|| format!("binding the metrics listener to {address}"))?;
        info!(address = %listener.local_addr()?, "metrics listening");
        let router = scrape::router(queue.clone(), settings.metrics.clone());
        let stop = shutdown.clone();
        tasks.spawn(async move {
            axum::serve(listener, router)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await
                .context("metrics server failed")
        });
    }
    let mut worker_ctx = None;
    if mode != Mode::Server {
        let ctx = Arc::new(worker::Context::new(&settings, queue.clone(), pipeline)?);
        worker_ctx = Some(ctx.clone());
        tasks.spawn(worker::run(settings.clone(), ctx, shutdown.clone()));
    }
    if let Some(path) = config_file {
        let reloader = Reloader {
            path,
            registry,
            worker: worker_ctx,
            ingest: ingest_state,
            shutdown: shutdown.clone(),
        };
        tokio::spawn(reloader.run());
    }

    let mut result = Ok(());
    while let Some(done) = tasks.join_next().await {
        let outcome = done.context("a service task panicked").and_then(|r| r);
        if let Err(e) = outcome {
            // One part failing stops the other: the process exits non-zero.
            shutdown.cancel();
            if result.is_ok() {
                result = Err(e);
            }
        }
    }
    result
}

struct Reloader {
    path: PathBuf,
    registry: Option<Arc<Registry>>,
    worker: Option<Arc<worker::Context>>,
    ingest: Option<Arc<Ingest>>,
    shutdown: CancellationToken,
}

impl Reloader {
    #[cfg(unix)]
    async fn run(mut self) {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            warn!("cannot listen for SIGHUP; config reload is off");
            return;
        };
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                got = hup.recv() => if got.is_none() { return },
            }
            info!(file = %self.path.display(), "SIGHUP: reloading the config");
            let path = self.path.clone();
            let registry = self.registry.clone();
            let loaded = tokio::task::spawn_blocking(move || reload(&path, registry)).await;
            match loaded {
                Ok(Ok((settings, tenants, registry))) => {
                    if let Some(r) = &registry
                        && self.registry.is_none()
                    {
                        r.clone()
                            .watch(settings.watch_interval, self.shutdown.clone());
                    }
                    self.registry = registry;
                    if let Some(ingest) = &self.ingest {
                        *ingest.apps.write().unwrap_or_else(|p| p.into_inner()) =
                            settings.apps.clone();
                    }
                    if let Some(worker) = &self.worker {
                        worker.replace_tenants(&settings, tenants).await;
                    }
                    info!(
                        apps = settings.apps.len(),
                        plugins = settings.plugins.len(),
                        "config reloaded"
                    );
                }
                Ok(Err(e)) => error!(
                    error = format!("{e:#}"),
                    "config reload rejected; the running config stays"
                ),
                Err(e) => error!(error = %e, "config reload failed"),
            }
        }
    }

    #[cfg(not(unix))]
    async fn run(self) {}
}

/// Loads the file and every plugin it names; nothing is swapped unless all of
/// it loads.
fn reload(
    path: &std::path::Path,
    registry: Option<Arc<Registry>>,
) -> anyhow::Result<(Settings, Tenants, Option<Arc<Registry>>)> {
    let settings = crate::config::load(Some(path))?;
    let registry = match registry {
        Some(r) => {
            r.replace(&settings.plugins)?;
            Some(r)
        }
        None if settings.plugins.is_empty() => None,
        None => Some(Registry::load(
            PluginEngine::new(&settings.wasm)?,
            &settings.plugins,
        )?),
    };
    let pipeline = registry
        .as_ref()
        .map(|r| plugin::chains(&settings, r))
        .unwrap_or_default();
    let tenants = Tenants {
        apps: settings.apps.clone(),
        pipeline,
    };
    Ok((settings, tenants, registry))
}

/// Cancels the token on SIGTERM or Ctrl-C.
pub fn shutdown_on_signals(token: CancellationToken) {
    tokio::spawn(async move {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
            tokio::select! {
                _ = term.recv() => info!("SIGTERM: shutting down"),
                _ = tokio::signal::ctrl_c() => info!("interrupted: shutting down"),
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
        token.cancel();
    });
}
