//! The worker: takes jobs from every queue, runs them through the pipeline,
//! delivers, and commits each job's outcome before acknowledging it.
//!
//! Per queue: one reader (blocking reads, as many jobs as free permits), one
//! task per job (a permit each: `concurrency` bounds in-flight requests), one
//! committer that records outcomes and acks in batches, one mover for due
//! retries, one reclaimer for jobs abandoned by dead workers.

mod job;

use std::collections::HashSet;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::{Notify, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use crate::app::Apps;
use crate::config::Settings;
use crate::delivery::Deliverer;
use crate::event::now_ms;
use crate::pipeline::Pipeline;
use crate::queue::{Completion, Entry, Queue};

/// Most jobs read at once, and most outcomes committed in one transaction.
const BATCH: usize = 256;
/// How long a read blocks before it looks at shutdown again.
const READ_BLOCK: Duration = Duration::from_millis(500);
/// Longest a mover sleeps without looking for due retries (another worker may
/// have scheduled one).
const MOVER_NAP: Duration = Duration::from_millis(250);
/// How long a stopping worker keeps trying to record outcomes Redis refuses.
const GIVE_UP_WHEN_STOPPING: Duration = Duration::from_secs(10);

/// The apps a worker serves and their plugin chains.
pub struct Tenants {
    pub apps: Apps,
    pub pipeline: Pipeline,
}

/// What every job task needs, shared.
pub struct Context {
    pub queue: Queue,
    /// Apps and their chains; replaced whole on a config reload, while jobs
    /// in flight finish with the version they started with.
    tenants: RwLock<Arc<Tenants>>,
    pub deliverer: Deliverer,
    pub retry: crate::delivery::retry::RetryPolicy,
    /// `app/endpoint` of endpoints that answered 410 Gone.
    gone: RwLock<HashSet<String>>,
}

impl Context {
    pub fn new(settings: &Settings, queue: Queue, pipeline: Pipeline) -> anyhow::Result<Self> {
        Ok(Context {
            queue,
            tenants: RwLock::new(Arc::new(Tenants {
                apps: settings.apps.clone(),
                pipeline,
            })),
            deliverer: Deliverer::new(settings.delivery.max_response_bytes)?,
            retry: settings.retry.clone(),
            gone: RwLock::default(),
        })
    }

    pub fn tenants(&self) -> Arc<Tenants> {
        self.tenants
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Swaps in new apps and chains (config reload).
    pub fn replace_tenants(&self, tenants: Tenants) {
        *self.tenants.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(tenants);
    }

    fn marked_gone(&self, app: &str, endpoint: &str) -> bool {
        let gone = self.gone.read().unwrap_or_else(|p| p.into_inner());
        !gone.is_empty() && gone.contains(&format!("{app}/{endpoint}"))
    }

    /// Whether deliveries to the endpoint are stopped. The local copy answers
    /// the common "no"; a "yes" is confirmed with the queue, since a replay
    /// elsewhere may have cleared it a moment ago.
    async fn is_gone(&self, app: &str, endpoint: &str) -> bool {
        if !self.marked_gone(app, endpoint) {
            return false;
        }
        self.refresh_gone().await;
        self.marked_gone(app, endpoint)
    }

    async fn mark_gone(&self, app: &str, endpoint: &str) {
        self.gone
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(format!("{app}/{endpoint}"));
        if let Err(e) = self.queue.set_gone(app, endpoint, true).await {
            warn!(app, endpoint, error = %e, "could not record that the endpoint is gone");
        }
    }

    async fn refresh_gone(&self) {
        match self.queue.gone().await {
            Ok(list) => {
                *self.gone.write().unwrap_or_else(|p| p.into_inner()) = list.into_iter().collect()
            }
            Err(e) => debug!(error = %e, "could not read gone endpoints"),
        }
    }
}

/// Runs a worker until `shutdown`; then stops reading, finishes and commits
/// every job in flight, and returns.
pub async fn run(
    settings: Arc<Settings>,
    ctx: Arc<Context>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let consumer = consumer_name();
    info!(consumer, durable = ctx.queue.is_durable(), "worker started");
    let tracker = TaskTracker::new();
    let mut running: HashSet<String> = HashSet::new();
    loop {
        match ctx.queue.queues().await {
            Ok(names) => {
                for name in names {
                    if running.contains(&name) {
                        continue;
                    }
                    if let Err(e) = ctx.queue.prepare(&name).await {
                        warn!(queue = name, error = %e, "cannot prepare queue; will try again");
                        continue;
                    }
                    let lane = Lane {
                        name: name.clone(),
                        consumer: consumer.clone(),
                        concurrency: settings.queues.concurrency_for(&name),
                        visibility_timeout: settings.queues.visibility_timeout,
                        reclaim_interval: settings.queues.reclaim_interval,
                    };
                    info!(
                        queue = name,
                        concurrency = lane.concurrency,
                        "reading queue"
                    );
                    tracker.spawn(lane.run(ctx.clone(), shutdown.clone()));
                    running.insert(name);
                }
            }
            Err(e) => warn!(error = %e, "cannot list queues; will try again"),
        }
        ctx.refresh_gone().await;
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(settings.queues.discover_interval) => {}
        }
    }
    info!("worker stopping: finishing jobs in flight");
    tracker.close();
    tracker.wait().await;
    info!("worker stopped");
    Ok(())
}

fn consumer_name() -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "worker".into());
    format!("{host}-{}-{}", std::process::id(), ulid::Ulid::new())
}

/// One queue's share of a worker.
struct Lane {
    name: String,
    consumer: String,
    concurrency: usize,
    visibility_timeout: Duration,
    reclaim_interval: Duration,
}

impl Lane {
    async fn run(self, ctx: Arc<Context>, shutdown: CancellationToken) {
        let lane = self;
        let permits = Arc::new(Semaphore::new(lane.concurrency));
        let (done_tx, done_rx) = mpsc::channel::<Completion>(lane.concurrency.max(BATCH) * 2);
        let scheduled = Arc::new(Notify::new());
        let jobs = TaskTracker::new();

        let committer = tokio::spawn(commit_loop(
            ctx.clone(),
            lane.name.clone(),
            done_rx,
            scheduled.clone(),
            shutdown.clone(),
        ));
        let mover = tokio::spawn(move_loop(
            ctx.clone(),
            lane.name.clone(),
            scheduled,
            shutdown.clone(),
        ));
        lane.read_loop(&ctx, &permits, &done_tx, &jobs, &shutdown)
            .await;

        let _ = mover.await;
        jobs.close();
        jobs.wait().await;
        drop(done_tx);
        let _ = committer.await;
        debug!(queue = lane.name, "queue drained");
    }

    async fn read_loop(
        &self,
        ctx: &Arc<Context>,
        permits: &Arc<Semaphore>,
        done: &mpsc::Sender<Completion>,
        jobs: &TaskTracker,
        shutdown: &CancellationToken,
    ) {
        let mut reader = None;
        let mut backoff = Duration::from_millis(100);
        let mut last_reclaim = tokio::time::Instant::now();
        while !shutdown.is_cancelled() {
            let first = tokio::select! {
                _ = shutdown.cancelled() => return,
                p = permits.clone().acquire_owned() => p.expect("the semaphore is never closed"),
            };
            let mut held = vec![first];
            while held.len() < BATCH {
                match permits.clone().try_acquire_owned() {
                    Ok(p) => held.push(p),
                    Err(_) => break,
                }
            }
            if last_reclaim.elapsed() >= self.reclaim_interval {
                last_reclaim = tokio::time::Instant::now();
                // Jobs a dead worker read and never committed.
                match ctx
                    .queue
                    .reclaim(
                        &self.name,
                        &self.consumer,
                        self.visibility_timeout,
                        held.len(),
                    )
                    .await
                {
                    Ok(entries) => {
                        if !entries.is_empty() {
                            info!(
                                queue = self.name,
                                count = entries.len(),
                                "took over jobs abandoned by a stopped worker"
                            );
                        }
                        for entry in entries {
                            let permit =
                                held.pop().expect("never claim more than the permits held");
                            self.start(ctx, entry, permit, done, jobs);
                        }
                    }
                    Err(e) => warn!(queue = self.name, error = %e, "reclaim failed"),
                }
                if held.is_empty() {
                    continue;
                }
            }
            if reader.is_none() {
                match ctx.queue.reader(&self.name, &self.consumer).await {
                    Ok(r) => reader = Some(r),
                    Err(e) => {
                        warn!(queue = self.name, error = %e, "cannot open queue reader; retrying");
                        drop(held);
                        pause(&mut backoff, shutdown).await;
                        continue;
                    }
                }
            }
            let read = reader
                .as_mut()
                .expect("opened above")
                .read(held.len(), READ_BLOCK)
                .await;
            match read {
                Ok(entries) => {
                    backoff = Duration::from_millis(100);
                    for entry in entries {
                        let permit = held.pop().expect("never read more than the permits held");
                        self.start(ctx, entry, permit, done, jobs);
                    }
                }
                Err(e) => {
                    warn!(queue = self.name, error = %e, "queue read failed; retrying");
                    reader = None;
                    drop(held);
                    pause(&mut backoff, shutdown).await;
                }
            }
        }
    }

    fn start(
        &self,
        ctx: &Arc<Context>,
        entry: Entry,
        permit: tokio::sync::OwnedSemaphorePermit,
        done: &mpsc::Sender<Completion>,
        jobs: &TaskTracker,
    ) {
        let (ctx, done, queue) = (ctx.clone(), done.clone(), self.name.clone());
        jobs.spawn(async move {
            let completion = job::process(&ctx, &queue, entry).await;
            drop(permit);
            // The committer outlives every job task, so this only fails if it
            // panicked; the entry then stays pending and is redelivered.
            let _ = done.send(completion).await;
        });
    }
}

async fn pause(backoff: &mut Duration, shutdown: &CancellationToken) {
    tokio::select! {
        _ = shutdown.cancelled() => {}
        _ = tokio::time::sleep(*backoff) => {}
    }
    *backoff = (*backoff * 2).min(Duration::from_secs(5));
}

/// Records outcomes and acks in batches. Runs until every job task is done;
/// a batch that cannot be committed is retried, never dropped (if the process
/// dies first, its jobs are still pending in the queue and are redelivered).
async fn commit_loop(
    ctx: Arc<Context>,
    queue: String,
    mut done: mpsc::Receiver<Completion>,
    scheduled: Arc<Notify>,
    shutdown: CancellationToken,
) {
    let mut batch = Vec::with_capacity(BATCH);
    let mut backoff = Duration::from_millis(50);
    while done.recv_many(&mut batch, BATCH).await > 0 {
        let mut stopping_since: Option<tokio::time::Instant> = None;
        loop {
            match ctx.queue.commit(&queue, &batch).await {
                Ok(()) => break,
                Err(e) => {
                    // While stopping, give up after a while: the jobs stay
                    // pending in the queue and another worker redelivers them.
                    if shutdown.is_cancelled() {
                        let since = *stopping_since.get_or_insert_with(tokio::time::Instant::now);
                        if since.elapsed() >= GIVE_UP_WHEN_STOPPING {
                            error!(queue, jobs = batch.len(), error = %e, "stopping without recording these outcomes; the jobs will be delivered again");
                            break;
                        }
                    }
                    error!(queue, jobs = batch.len(), error = %e, "cannot record outcomes; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
        backoff = Duration::from_millis(50);
        if batch
            .iter()
            .flat_map(|c| &c.effects)
            .any(|e| matches!(e, crate::queue::Effect::Schedule { .. }))
        {
            scheduled.notify_one();
        }
        batch.clear();
    }
}

/// Moves due retries onto the queue, sleeping until the next is due.
async fn move_loop(
    ctx: Arc<Context>,
    queue: String,
    scheduled: Arc<Notify>,
    shutdown: CancellationToken,
) {
    const LIMIT: usize = 512;
    loop {
        let nap = match ctx.queue.promote_due(&queue, now_ms(), LIMIT).await {
            Ok((moved, _)) if moved == LIMIT => Duration::ZERO,
            Ok((_, Some(next))) => {
                Duration::from_millis(next.saturating_sub(now_ms())).min(MOVER_NAP)
            }
            Ok((_, None)) => MOVER_NAP,
            Err(e) => {
                debug!(queue, error = %e, "cannot move due retries");
                Duration::from_secs(1)
            }
        };
        if nap.is_zero() {
            continue;
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = scheduled.notified() => {}
            _ = tokio::time::sleep(nap) => {}
        }
    }
}
