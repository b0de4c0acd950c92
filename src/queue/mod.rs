//! The durable job queue: where events wait, where outcomes are recorded,
//! and where the fleet's shared scheduling state lives.
//!
//! Jobs wait in **partitions**: each app has one for its new events (not yet
//! routed) and one per endpoint for jobs aimed at that endpoint (fan-out,
//! retries that fell due, jobs parked because the endpoint was busy, open or
//! rate-limited). Apps with waiting work sit in a round-robin ring; a `take`
//! walks the ring, giving each app a turn of `quantum × weight` jobs, skips
//! partitions the asking worker has no room for, leases what it takes, and
//! leaves idle apps untouched: an app without work costs no reads.
//!
//! Two backends behind one type: Redis (Lua scripts, one hash tag, shared by
//! a fleet) and an in-process queue for the embedded default (not durable).
//! The contract both keep: a leased job is invisible to other workers until
//! its lease is committed or expires (its worker died: it goes back to the
//! front of its partition); a commit records the job's outcome and releases
//! the lease in one atomic step, and only if the lease is still held.

pub mod entry;
pub mod keys;
mod memory;
mod redis;

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;

pub use self::entry::{DeadLetter, Entry, Malformed};
pub use self::keys::Keys;
pub use self::memory::MemoryQueue;
pub use self::redis::{RedisQueue, RedisTarget};
use crate::breaker::{BreakerSettings, Signal, State};
use crate::event::Job;
use crate::ratelimit::RateLimit;

/// The consumer group that reads the inbox stream (raw producers).
pub const GROUP: &str = "workers";

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("redis: {0}")]
    Redis(#[from] ::redis::RedisError),
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    #[error("no dead letter {0}")]
    NoSuchDeadLetter(String),
    #[error("dead letter {0} is a malformed entry; there is no job to replay")]
    NotReplayable(String),
    #[error("bad dead letter id {0:?}: expected a stream id like 1700000000000-0")]
    BadDeadLetterId(String),
    #[error("corrupt record in the queue: {0}")]
    Corrupt(String),
    #[error(
        "Redis refused the login ({0}): check redis.username and the password (redis.url, redis.password or redis.password_file)"
    )]
    LoginRefused(String),
    #[error(
        "redis.shards is {configured}, but the queue in Redis was made with {stored} shards: drain it (or use a new redis.prefix) before changing the number"
    )]
    Layout { configured: usize, stored: usize },
    #[error("only {acked} of {wanted} Redis replicas confirmed the write within {within:?}")]
    NotReplicated {
        wanted: u32,
        acked: u32,
        within: Duration,
    },
}

/// One outcome counter: how jobs left the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Stat {
    Delivered,
    Retried,
    Dead,
    Dropped,
    FannedOut,
    Unrouted,
    /// A routed job waits in its endpoint's partition: the endpoint had no
    /// room on this worker, jobs waiting before it, or was held.
    Parked,
    /// A plugin failed and its policy passed the event on unchanged.
    PluginSkipped,
}

impl Stat {
    pub fn name(self) -> &'static str {
        match self {
            Stat::Delivered => "delivered",
            Stat::Retried => "retried",
            Stat::Dead => "dead",
            Stat::Dropped => "dropped",
            Stat::FannedOut => "fanned_out",
            Stat::Unrouted => "unrouted",
            Stat::Parked => "parked",
            Stat::PluginSkipped => "plugin_skipped",
        }
    }
}

/// Something a commit records.
#[derive(Debug, Clone)]
pub enum Effect {
    /// Put a job at the back of its partition: `job.endpoint`'s, or the app's
    /// new events when None (fan-out, parking).
    Enqueue(Job),
    /// Put a job in its partition after a delay (a retry).
    Schedule {
        job: Job,
        delay_ms: u64,
    },
    /// Put a job back at the front of its partition and hold the partition
    /// for `delay_ms` (a retry on an ordered endpoint, or of an ordered app's
    /// routing: nothing after it goes first); with no delay, no hold (a
    /// batch's events that did not fit go first in the next one).
    Front {
        job: Job,
        delay_ms: u64,
    },
    DeadLetter(DeadLetter),
    Count(Stat),
    /// What an attempt said about an endpoint, for its breaker; recorded even
    /// when the lease was lost.
    Health {
        app: String,
        endpoint: String,
        signal: Signal,
    },
}

/// A job's outcome, recorded and its lease released together.
#[derive(Debug, Clone)]
pub struct Completion {
    pub lease: String,
    pub effects: Vec<Effect>,
}

/// A job a worker has taken.
#[derive(Debug, Clone)]
pub struct Leased {
    /// The lease on this job, for the commit (opaque: Redis makes it
    /// `<lease of the take's group>#<job id>`).
    pub lease: String,
    pub app: String,
    /// The partition it came from: None = the app's new events.
    pub endpoint: Option<String>,
    pub job: Result<Job, Malformed>,
    /// The job as stored: what it is rebuilt from if its task panics.
    pub raw: Option<bytes::Bytes>,
    /// The endpoint is disabled (this reason): dead-letter, do not send.
    pub disabled: Option<String>,
}

/// What a worker asks of `take`: how many jobs, and how much room it has
/// left for apps and endpoints that already have jobs in flight on it (any
/// other app or endpoint has its whole cap).
#[derive(Debug, Clone, Default)]
pub struct TakeRequest {
    pub max: usize,
    pub app_room: Vec<(String, usize)>,
    /// ((app, endpoint), room).
    pub endpoint_room: Vec<((String, String), usize)>,
    /// New events to take at most, for apps with jobs in flight: the room
    /// left at their endpoints (other apps: one endpoint's cap). Taking more
    /// would only park them; while an app's endpoints are full, its new
    /// events wait where they are.
    pub intake_room: Vec<(String, usize)>,
}

#[derive(Debug, Clone, Default)]
pub struct Taken {
    pub jobs: Vec<Leased>,
    /// For each app whose new events were taken: its endpoints that must not
    /// get a delivery straight from routing (jobs already waiting for them,
    /// held by a rate limit or Retry-After, or a breaker not closed). Their
    /// routed jobs are parked in the endpoint's partition instead.
    pub busy: BTreeMap<String, Vec<String>>,
    /// Eligible work was left that this call had no budget for.
    pub more: bool,
    /// Time until the next scheduled change (a retry due, a hold ending, a
    /// lease expiring), if any.
    pub next_due: Option<Duration>,
}

/// Scheduling parameters of apps and endpoints, shared by the fleet (Redis
/// keeps them in the queue, written by every worker at start and reload).
#[derive(Debug, Clone, PartialEq)]
pub struct Tenancy {
    /// Jobs an app gets per turn, times its weight.
    pub quantum: usize,
    pub app_weight: u32,
    /// Jobs of one app in flight on one worker.
    pub app_max_in_flight: usize,
    /// Jobs for one endpoint in flight on one worker.
    pub endpoint_max_in_flight: usize,
    /// Apps with a weight or cap of their own: (app, weight, max in flight).
    pub apps: Vec<(String, u32, usize)>,
    /// Endpoints with a cap or a rate limit of their own.
    pub endpoints: Vec<EndpointTenancy>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct EndpointTenancy {
    pub app: String,
    pub endpoint: String,
    pub max_in_flight: usize,
    pub rate_limit: Option<RateLimit>,
    /// One job in flight fleet-wide, in order; the app's new events are then
    /// taken one at a time, so that routing keeps their order.
    pub ordered: bool,
    /// With `ordered`: one order per job's `order_key` instead of one for
    /// the endpoint.
    pub keyed: bool,
    /// Its jobs are handed out in batches (one job carrying its members).
    pub batch: Option<crate::app::Batching>,
}

/// How the queue behaves, fixed for its life.
#[derive(Debug, Clone)]
pub struct QueueOptions {
    /// A lease not committed within this is handed to another worker.
    pub lease: Duration,
    pub breaker: BreakerSettings,
    /// Longest a Retry-After may hold an endpoint.
    pub max_hold: Duration,
}

/// How much is in the queue.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Depth {
    /// Waiting in partitions.
    pub ready: u64,
    /// Leased by a worker, not yet committed.
    pub in_flight: u64,
    /// Waiting for a retry.
    pub delayed: u64,
    /// Partitions held (rate limit, Retry-After, open breaker).
    pub held: u64,
    /// Apps with eligible work.
    pub active_apps: u64,
    pub dead: u64,
    /// How long the app that has waited longest for a turn has waited (ms):
    /// since its work became eligible, or since its last turn; 0 when no app
    /// has eligible work. A lower bound on the oldest ready job's wait.
    pub oldest_ready_ms: u64,
}

/// An endpoint as the queue sees it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EndpointStatus {
    pub app: String,
    pub endpoint: String,
    pub state: State,
    /// Jobs waiting in its partition.
    pub waiting: u64,
    /// Answers and failures in the breaker's window.
    pub requests: u32,
    pub failures: u32,
    pub consecutive_failures: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failing_since_ms: Option<u64>,
    /// Held (no job is taken) until this unix ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub held_until_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Times a take held it for its rate limit.
    pub rate_limited_waits: u64,
}

/// What a commit did besides recording outcomes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Committed {
    /// Breakers that changed state (for the log).
    pub changes: Vec<StateChange>,
    /// It ended the lease an ordered endpoint (or its app's new events)
    /// waited on: the worker should take again now.
    pub freed: bool,
}

/// A breaker that changed state in a commit (for the log).
#[derive(Debug, Clone, PartialEq)]
pub struct StateChange {
    pub app: String,
    pub endpoint: String,
    pub state: State,
}

/// Where an Idempotency-Key stands. Each key is stored with the fingerprint
/// (a SHA-256) of the request that claimed it; a request with another
/// fingerprint gets `Mismatch`, whatever the key's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Idempotency {
    /// First use: the caller owns the key until it finishes or aborts.
    New,
    /// Another request with this key and fingerprint is being handled.
    InProgress,
    /// Already answered for this fingerprint: the stored answer.
    Done(String),
    /// The key was claimed by a request with another fingerprint.
    Mismatch,
}

/// How long a claimed Idempotency-Key may stay unfinished (its request died).
pub const IDEMPOTENCY_CLAIM: Duration = Duration::from_secs(60);

#[derive(Clone)]
pub enum Queue {
    Redis(RedisQueue),
    Memory(MemoryQueue),
}

/// Wakes an idle worker when work may have arrived.
pub enum Doorbell {
    Redis(self::redis::RedisDoorbell),
    Memory(std::sync::Arc<tokio::sync::Notify>),
}

impl Doorbell {
    /// Returns when the bell rings (or, for Redis, when the subscription had
    /// to be renewed: a spurious wake is harmless).
    pub async fn rung(&mut self) {
        match self {
            Doorbell::Redis(d) => d.rung().await,
            Doorbell::Memory(n) => n.notified().await,
        }
    }
}

macro_rules! dispatch {
    ($self:ident, $q:ident => $e:expr) => {{
        let result = match $self {
            Queue::Redis($q) => $e,
            Queue::Memory($q) => $e,
        };
        count_error(&result);
        result
    }};
}

/// Counts Redis failures for the metrics (where they are handled, they are
/// logged).
fn count_error<T>(result: &Result<T, QueueError>) {
    if let Err(QueueError::Redis(_) | QueueError::Timeout(_)) = result {
        crate::metrics::redis_error();
    }
}

impl Queue {
    pub fn is_durable(&self) -> bool {
        matches!(self, Queue::Redis(_))
    }

    /// Err only when Redis answers and refuses the login.
    pub async fn check_login(&self) -> Result<(), QueueError> {
        match self {
            Queue::Redis(q) => q.check_login().await,
            Queue::Memory(_) => Ok(()),
        }
    }

    /// Err when the queue in Redis was made with another number of shards.
    pub async fn check_layout(&self) -> Result<(), QueueError> {
        match self {
            Queue::Redis(q) => q.check_layout().await,
            Queue::Memory(_) => Ok(()),
        }
    }

    /// Adds one app's jobs to its partitions (`job.endpoint`'s, or new
    /// events); returns when they are stored.
    pub async fn enqueue(&self, app: &str, jobs: &[Job]) -> Result<(), QueueError> {
        if jobs.is_empty() {
            return Ok(());
        }
        dispatch!(self, q => q.enqueue(app, jobs).await)
    }

    /// Stores the apps' and endpoints' weights, caps and rate limits.
    pub async fn configure(&self, tenancy: &Tenancy) -> Result<(), QueueError> {
        dispatch!(self, q => q.configure(tenancy).await)
    }

    /// Takes up to `request.max` jobs, fairly across apps, within the room the
    /// worker has; also moves due retries, ends due holds and takes back
    /// expired leases.
    pub async fn take(&self, request: &TakeRequest) -> Result<Taken, QueueError> {
        dispatch!(self, q => q.take(request).await)
    }

    /// Records outcomes and releases their leases, atomically; says which
    /// breakers changed state and whether ordered work was freed.
    pub async fn commit(&self, completions: &[Completion]) -> Result<Committed, QueueError> {
        if completions.is_empty() {
            return Ok(Committed::default());
        }
        dispatch!(self, q => q.commit(completions).await)
    }

    pub async fn doorbell(&self) -> Result<Doorbell, QueueError> {
        Ok(match self {
            Queue::Redis(q) => Doorbell::Redis(q.doorbell().await?),
            Queue::Memory(q) => Doorbell::Memory(q.doorbell()),
        })
    }

    /// Dead letters, oldest first: (id, letter).
    pub async fn dead_letters(
        &self,
        count: usize,
    ) -> Result<Vec<(String, DeadLetter)>, QueueError> {
        dispatch!(self, q => q.dead_letters(count).await)
    }

    pub async fn dead_letter(&self, id: &str) -> Result<DeadLetter, QueueError> {
        // `<shard>:<stream id>` when the queue has several shards.
        if !entry::is_stream_id(id.split_once(':').map_or(id, |(_, rest)| rest)) {
            return Err(QueueError::BadDeadLetterId(id.into()));
        }
        dispatch!(self, q => q.dead_letter(id).await)?
            .ok_or_else(|| QueueError::NoSuchDeadLetter(id.into()))
    }

    /// Puts a dead letter's job back in its partition with a fresh retry
    /// schedule and the same webhook id, and removes the dead letter,
    /// atomically. A disabled endpoint is enabled again (replaying is the
    /// operator saying it works).
    pub async fn replay(&self, id: &str) -> Result<Job, QueueError> {
        let letter = self.dead_letter(id).await?;
        let Some(mut job) = letter.job else {
            return Err(QueueError::NotReplayable(id.into()));
        };
        job.attempt = 0;
        dispatch!(self, q => q.replay(id, &job).await)?;
        Ok(job)
    }

    pub async fn stats(&self) -> Result<BTreeMap<String, u64>, QueueError> {
        dispatch!(self, q => q.stats().await)
    }

    pub async fn depth(&self) -> Result<Depth, QueueError> {
        dispatch!(self, q => q.depth().await)
    }

    /// Jobs waiting in one app's partitions: new events (None) and each
    /// named endpoint.
    pub async fn app_depth(
        &self,
        app: &str,
        endpoints: &[String],
    ) -> Result<Vec<(Option<String>, u64)>, QueueError> {
        dispatch!(self, q => q.app_depth(app, endpoints).await)
    }

    /// The breaker and hold state of these endpoints: (app, endpoint).
    pub async fn endpoints(
        &self,
        which: &[(String, String)],
    ) -> Result<Vec<EndpointStatus>, QueueError> {
        dispatch!(self, q => q.endpoints(which).await)
    }

    /// Closes the breaker, ends any hold and enables the endpoint again.
    pub async fn reset_endpoint(&self, app: &str, endpoint: &str) -> Result<(), QueueError> {
        dispatch!(self, q => q.reset_endpoint(app, endpoint).await)
    }

    pub async fn ping(&self) -> Result<(), QueueError> {
        dispatch!(self, q => q.ping().await)
    }

    /// Claims `key` for a request with this `fingerprint`, or says where it
    /// stands.
    pub async fn idempotency_begin(
        &self,
        app: &str,
        key: &str,
        fingerprint: &str,
        ttl: Duration,
    ) -> Result<Idempotency, QueueError> {
        dispatch!(self, q => q.idempotency_begin(app, key, fingerprint, ttl).await)
    }

    /// Stores the answer to the request that claimed `key`, with its fingerprint.
    pub async fn idempotency_finish(
        &self,
        app: &str,
        key: &str,
        fingerprint: &str,
        answer: &str,
        ttl: Duration,
    ) -> Result<(), QueueError> {
        dispatch!(self, q => q.idempotency_finish(app, key, fingerprint, answer, ttl).await)
    }

    pub async fn idempotency_abort(&self, app: &str, key: &str) -> Result<(), QueueError> {
        dispatch!(self, q => q.idempotency_abort(app, key).await)
    }
}
