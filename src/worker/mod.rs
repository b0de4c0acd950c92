//! The worker: asks the queue for jobs as slots free up, runs each through
//! the pipeline and delivers it, and commits each job's outcome before its
//! lease is released.
//!
//! One loop takes jobs (fairly across apps, within the room the scheduler
//! reports), one task per job, one committer that records outcomes in
//! batches, a doorbell that wakes the loop when idle apps get work, and (on
//! Redis) an inbox reader for entries raw producers added.

mod job;

use std::sync::{Arc, RwLock};
use std::time::Duration;

use std::panic::AssertUnwindSafe;

use futures_util::FutureExt as _;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use crate::app::Apps;
use crate::breaker::State;
use crate::config::Settings;
use crate::delivery::Deliverer;
use crate::pipeline::Pipeline;
use crate::queue::{Completion, Effect, Queue, RedisQueue, Stat};
use crate::scheduler::{Caps, Scheduler};

/// Most outcomes committed in one call.
const BATCH: usize = 256;
/// Longest the take loop waits for more freed slots before it takes.
const TAKE_LINGER: Duration = Duration::from_millis(1);
/// Longest a small batch of outcomes waits for more before it is committed.
const COMMIT_LINGER: Duration = Duration::from_millis(2);
/// How long a stopping worker keeps trying to record outcomes Redis refuses.
const GIVE_UP_WHEN_STOPPING: Duration = Duration::from_secs(10);
/// How long an inbox read blocks before it looks at shutdown again.
const INBOX_BLOCK: Duration = Duration::from_secs(2);

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
    pub scheduler: Arc<Scheduler>,
}

impl Context {
    pub fn new(settings: &Settings, queue: Queue, pipeline: Pipeline) -> anyhow::Result<Self> {
        Ok(Context {
            queue,
            tenants: RwLock::new(Arc::new(Tenants {
                apps: settings.apps.clone(),
                pipeline,
            })),
            deliverer: Deliverer::new(
                settings.delivery.max_response_bytes,
                &settings.delivery.egress,
            )?,
            retry: settings.retry.clone(),
            scheduler: Scheduler::new(settings.queues.concurrency, caps(settings)),
        })
    }

    pub fn tenants(&self) -> Arc<Tenants> {
        self.tenants
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Swaps in new apps and chains (config reload), with their caps; the
    /// queue gets their weights, caps and rate limits.
    pub async fn replace_tenants(&self, settings: &Settings, tenants: Tenants) {
        *self.tenants.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(tenants);
        self.scheduler.replace_caps(caps(settings));
        if let Err(e) = self.queue.configure(&settings.tenancy()).await {
            warn!(error = %e, "could not store the new scheduling parameters; the worker keeps its own caps");
        }
    }
}

fn caps(settings: &Settings) -> Caps {
    Caps::from_apps(
        &settings.apps,
        settings.queues.app_max_in_flight,
        settings.delivery.max_in_flight,
    )
}

/// Runs a worker until `shutdown`; then stops taking jobs, finishes and
/// commits every job in flight, and returns.
pub async fn run(
    settings: Arc<Settings>,
    ctx: Arc<Context>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let consumer = consumer_name();
    info!(consumer, durable = ctx.queue.is_durable(), "worker started");
    let mut backoff = Duration::from_millis(100);
    while let Err(e) = ctx.queue.configure(&settings.tenancy()).await {
        warn!(error = %e, "cannot store the scheduling parameters; will try again");
        if pause(&mut backoff, &shutdown).await {
            return Ok(());
        }
    }

    let (done_tx, done_rx) = mpsc::channel::<Done>(settings.queues.concurrency * 2 + BATCH);
    let wake = Arc::new(Notify::new());
    let committer = tokio::spawn(commit_loop(
        ctx.clone(),
        done_rx,
        wake.clone(),
        shutdown.clone(),
    ));
    let helpers = TaskTracker::new();
    helpers.spawn(doorbell_loop(ctx.clone(), wake.clone(), shutdown.clone()));
    if let Queue::Redis(redis) = &ctx.queue {
        helpers.spawn(inbox_loop(
            redis.clone(),
            ctx.clone(),
            consumer.clone(),
            settings.queues.reclaim_interval,
            settings.queues.visibility_timeout,
            shutdown.clone(),
        ));
    }

    let jobs = TaskTracker::new();
    take_loop(&ctx, &settings, &wake, &done_tx, &jobs, &shutdown).await;

    info!("worker stopping: finishing jobs in flight");
    jobs.close();
    jobs.wait().await;
    drop(done_tx);
    let _ = committer.await;
    helpers.close();
    helpers.wait().await;
    info!("worker stopped");
    Ok(())
}

/// Takes jobs while there are free slots and eligible work; sleeps until a
/// slot frees, the doorbell rings, something scheduled falls due, or
/// `idle_poll` passes.
async fn take_loop(
    ctx: &Arc<Context>,
    settings: &Settings,
    wake: &Notify,
    done: &mpsc::Sender<Done>,
    jobs: &TaskTracker,
    shutdown: &CancellationToken,
) {
    let mut backoff = Duration::from_millis(100);
    while !shutdown.is_cancelled() {
        let request = ctx.scheduler.request();
        if request.max == 0 {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ctx.scheduler.released() => {
                    gather(&ctx.scheduler, settings.queues.concurrency).await;
                    continue;
                }
            }
        }
        let taken = match ctx.queue.take(&request).await {
            Ok(t) => {
                backoff = Duration::from_millis(100);
                t
            }
            Err(e) => {
                warn!(error = %e, "cannot take jobs; retrying");
                if pause(&mut backoff, shutdown).await {
                    return;
                }
                continue;
            }
        };
        let busy = Arc::new(taken.busy);
        let got = taken.jobs.len();
        for leased in taken.jobs {
            let slot = ctx.scheduler.admit(&leased.app, leased.endpoint.as_deref());
            let (ctx, done, busy) = (ctx.clone(), done.clone(), busy.clone());
            jobs.spawn(async move {
                // A panic is a failure of this job, not of the worker: the job
                // follows its retry schedule like any other failure, so no
                // input makes it come back forever.
                let (lease, raw) = (leased.lease.clone(), leased.raw.clone());
                let urgent = holds_order(&ctx, &leased);
                let completion = AssertUnwindSafe(job::process(&ctx, leased, slot, &busy))
                    .catch_unwind()
                    .await
                    .unwrap_or_else(|panic| job::panicked(&ctx, lease, raw.as_deref(), panic));
                // The committer outlives every job task, so this only fails if
                // it panicked; the lease then expires and the job runs again.
                let _ = done.send(Done { completion, urgent }).await;
            });
        }
        if taken.more && got > 0 {
            continue;
        }
        let nap = taken
            .next_due
            .map_or(settings.queues.idle_poll, |d| {
                d.min(settings.queues.idle_poll)
            })
            .max(Duration::from_millis(1));
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = wake.notified() => {}
            _ = ctx.scheduler.released(), if ctx.scheduler.in_flight() > 0 => {
                gather(&ctx.scheduler, settings.queues.concurrency).await;
            }
            _ = tokio::time::sleep(nap) => {}
        }
    }
}

/// A job's outcome on its way to the committer.
struct Done {
    completion: Completion,
    /// Ordered work waits for this commit: committed without lingering.
    urgent: bool,
}

/// Whether a job holds back ordered work until its commit: a job of an
/// ordered endpoint (the next of its order or key), or a new event of an
/// app with one (its next new event).
fn holds_order(ctx: &Context, leased: &crate::queue::Leased) -> bool {
    let tenants = ctx.tenants();
    let Some(app) = tenants.apps.get(&leased.app) else {
        return false;
    };
    match &leased.endpoint {
        Some(ep) => app.endpoint(ep).is_some_and(|e| e.ordered),
        None => app.endpoints.iter().any(|e| e.ordered),
    }
}

/// Moves what arrived into the batch; whether any of it is urgent.
fn gather_done(incoming: &mut Vec<Done>, batch: &mut Vec<Completion>) -> bool {
    let mut urgent = false;
    for d in incoming.drain(..) {
        urgent |= d.urgent;
        batch.push(d.completion);
    }
    urgent
}

/// After a slot was given back, waits a moment for a few more before taking:
/// a take costs Redis a fixed overhead, and one per freed slot would make
/// tiny takes when an endpoint's cap is the limit.
async fn gather(scheduler: &Scheduler, slots: usize) {
    let enough = (slots / 8).clamp(1, 16);
    let _ = tokio::time::timeout(TAKE_LINGER, async {
        while scheduler.free() < enough && scheduler.in_flight() > 0 {
            scheduler.released().await;
        }
    })
    .await;
}

async fn doorbell_loop(ctx: Arc<Context>, wake: Arc<Notify>, shutdown: CancellationToken) {
    let mut bell = loop {
        match ctx.queue.doorbell().await {
            Ok(b) => break b,
            Err(e) => {
                debug!(error = %e, "no doorbell yet");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    };
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = bell.rung() => wake.notify_one(),
        }
    }
}

/// Reads what raw producers XADD to the inbox and queues it in the apps'
/// partitions (malformed entries and unknown apps are dead-lettered).
async fn inbox_loop(
    queue: RedisQueue,
    ctx: Arc<Context>,
    consumer: String,
    reclaim_interval: Duration,
    visibility: Duration,
    shutdown: CancellationToken,
) {
    let mut backoff = Duration::from_millis(100);
    let mut reader = None;
    let mut last_reclaim = tokio::time::Instant::now();
    while !shutdown.is_cancelled() {
        if reader.is_none() {
            let opened = match queue.prepare_inbox().await {
                Ok(()) => queue.inbox_reader(&consumer).await,
                Err(e) => Err(e),
            };
            match opened {
                Ok(r) => reader = Some(r),
                Err(e) => {
                    warn!(error = %e, "cannot read the inbox; retrying");
                    if pause(&mut backoff, &shutdown).await {
                        return;
                    }
                    continue;
                }
            }
        }
        let Some(r) = reader.as_mut() else { continue };
        let read = if last_reclaim.elapsed() >= reclaim_interval {
            last_reclaim = tokio::time::Instant::now();
            r.reclaim(visibility, BATCH).await
        } else {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                read = r.read(BATCH, INBOX_BLOCK) => read,
            }
        };
        let entries = match read {
            Ok(e) => e,
            Err(e) => {
                warn!(error = %e, "inbox read failed; retrying");
                crate::metrics::redis_error();
                crate::metrics::redis_reconnect();
                reader = None;
                if pause(&mut backoff, &shutdown).await {
                    return;
                }
                continue;
            }
        };
        if entries.is_empty() {
            continue;
        }
        for e in &entries {
            if let Err(m) = &e.job {
                warn!(
                    entry = e.id,
                    reason = m.reason,
                    "malformed inbox entry dead-lettered"
                );
            }
        }
        let tenants = ctx.tenants();
        let count = entries.len();
        match queue
            .admit_inbox(entries, |app| tenants.apps.get(app).is_some())
            .await
        {
            Ok(()) => debug!(count, "inbox entries queued"),
            // They stay pending and are reclaimed after the visibility timeout.
            Err(e) => {
                warn!(error = %e, count, "cannot queue inbox entries; they will be read again")
            }
        }
        backoff = Duration::from_millis(100);
    }
}

fn consumer_name() -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "worker".into());
    format!("{host}-{}-{}", std::process::id(), ulid::Ulid::new())
}

/// Sleeps for the backoff (doubling it, up to 5 s); true when shutting down.
async fn pause(backoff: &mut Duration, shutdown: &CancellationToken) -> bool {
    let stop = tokio::select! {
        _ = shutdown.cancelled() => true,
        _ = tokio::time::sleep(*backoff) => false,
    };
    *backoff = (*backoff * 2).min(Duration::from_secs(5));
    stop
}

/// Records outcomes in batches. Runs until every job task is done; a batch
/// that cannot be committed is retried, never dropped (if the process dies
/// first, its leases expire and the jobs run again).
/// Counts committed outcomes for the metrics.
fn count_outcomes(batch: &[Completion]) {
    for completion in batch {
        for effect in &completion.effects {
            if let Effect::Count(stat) = effect {
                crate::metrics::job_outcome(match stat {
                    Stat::Retried => "retry_scheduled",
                    other => other.name(),
                });
            }
        }
    }
}

async fn commit_loop(
    ctx: Arc<Context>,
    mut done: mpsc::Receiver<Done>,
    wake: Arc<Notify>,
    shutdown: CancellationToken,
) {
    let mut batch = Vec::with_capacity(BATCH);
    let mut incoming = Vec::with_capacity(BATCH);
    let mut backoff = Duration::from_millis(50);
    while done.recv_many(&mut incoming, BATCH).await > 0 {
        let mut urgent = gather_done(&mut incoming, &mut batch);
        // A small batch waits a moment for more: one commit per batch costs
        // Redis a fixed overhead, and slots are already free (only the
        // outcome's recording waits). Not when ordered work waits for it.
        if !urgent && batch.len() < BATCH / 2 {
            let _ = tokio::time::timeout(COMMIT_LINGER, async {
                while batch.len() < BATCH / 2 && !urgent {
                    let room = BATCH - batch.len();
                    if done.recv_many(&mut incoming, room).await == 0 {
                        break;
                    }
                    urgent = gather_done(&mut incoming, &mut batch);
                }
            })
            .await;
        }
        let mut stopping_since: Option<tokio::time::Instant> = None;
        loop {
            match ctx.queue.commit(&batch).await {
                Ok(committed) => {
                    count_outcomes(&batch);
                    // The next job of an ordered endpoint (or new event of
                    // its app) may go: this worker takes it.
                    if committed.freed {
                        wake.notify_one();
                    }
                    for c in committed.changes {
                        crate::metrics::breaker_transition(c.state.name());
                        let what = match c.state {
                            State::Closed => "circuit closed: the endpoint answers again",
                            State::Open => {
                                "circuit opened: the endpoint's jobs wait until a probe succeeds"
                            }
                            State::HalfOpen => "circuit half-open: probing",
                            State::Disabled => {
                                "endpoint disabled: its jobs are dead-lettered until it is reset"
                            }
                        };
                        if c.state == State::Closed {
                            info!(app = c.app, endpoint = c.endpoint, "{what}");
                        } else {
                            warn!(app = c.app, endpoint = c.endpoint, "{what}");
                        }
                    }
                    break;
                }
                Err(e) => {
                    if shutdown.is_cancelled() {
                        let since = *stopping_since.get_or_insert_with(tokio::time::Instant::now);
                        if since.elapsed() >= GIVE_UP_WHEN_STOPPING {
                            error!(jobs = batch.len(), error = %e, "stopping without recording these outcomes; the jobs will be delivered again");
                            break;
                        }
                    }
                    error!(jobs = batch.len(), error = %e, "cannot record outcomes; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
        backoff = Duration::from_millis(50);
        batch.clear();
    }
}
