//! `serve`: builds the queue from the settings and runs the ingest, the
//! worker, or both, until shutdown.

use std::sync::Arc;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::Settings;
use crate::ingest::{self, Ingest};
use crate::pipeline::Pipeline;
use crate::queue::{MemoryQueue, Queue, RedisQueue};
use crate::worker;

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
    let known = settings.queues.known_queues(&settings.apps);
    Ok(match &settings.redis_url {
        Some(url) => Queue::Redis(
            RedisQueue::connect(url, settings.keys.clone(), known)
                .context("connecting to Redis")?,
        ),
        None => Queue::Memory(MemoryQueue::new(known)),
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
    let settings = Arc::new(settings);
    let queue = open_queue(&settings)?;
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
        (Pipeline::default(), None)
    } else {
        crate::plugin::build_pipeline(&settings)?
    };
    if let Some(registry) = &registry {
        registry
            .clone()
            .watch(settings.watch_interval, shutdown.clone());
    }

    let mut tasks = tokio::task::JoinSet::new();
    if mode != Mode::Worker {
        let listener = match listener {
            Some(l) => l,
            None => TcpListener::bind(settings.server.listen)
                .await
                .with_context(|| format!("binding the ingest to {}", settings.server.listen))?,
        };
        info!(address = %listener.local_addr()?, "ingest listening");
        let app = ingest::router(Arc::new(Ingest {
            queue: queue.clone(),
            apps: settings.apps.clone(),
            queues: settings.queues.clone(),
            server: settings.server.clone(),
        }));
        let stop = shutdown.clone();
        tasks.spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await
                .context("ingest server failed")
        });
    }
    if mode != Mode::Server {
        let ctx = Arc::new(worker::Context::new(&settings, queue.clone(), pipeline)?);
        tasks.spawn(worker::run(settings.clone(), ctx, shutdown.clone()));
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
