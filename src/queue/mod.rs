//! The durable job queue: where events wait, where outcomes are recorded.
//!
//! Two backends behind one type: Redis (streams with a consumer group, a
//! sorted set for retries, a stream of dead letters; durable, shared by a
//! fleet) and an in-process queue for the embedded default (not durable).
//!
//! The contract both keep: a job read by a worker is invisible to others until
//! it is committed; a commit records the job's outcome (its retry, its dead
//! letter, the jobs it fans out to) and acknowledges it in one atomic step; a
//! job never committed (its worker died) is handed out again after the
//! visibility timeout.

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
pub use self::redis::RedisQueue;
use crate::event::Job;

/// The consumer group every worker joins.
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
    #[error("bad dead letter id {0:?}: expected <queue>/<entry id>")]
    BadDeadLetterId(String),
    #[error("corrupt record in the queue: {0}")]
    Corrupt(String),
}

/// One outcome counter: how jobs left a queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Stat {
    Delivered,
    Retried,
    Dead,
    Dropped,
    FannedOut,
    Unrouted,
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
            Stat::PluginSkipped => "plugin_skipped",
        }
    }
}

/// Something a commit records.
#[derive(Debug, Clone)]
pub enum Effect {
    /// Put a job on the same queue now (fan-out to endpoints).
    Enqueue(Job),
    /// Put a job on the same queue at a unix-ms time (a retry).
    Schedule {
        job: Job,
        at_ms: u64,
    },
    DeadLetter(DeadLetter),
    Count(Stat),
}

/// A job's outcome, recorded and acknowledged together.
#[derive(Debug, Clone)]
pub struct Completion {
    pub entry_id: String,
    pub effects: Vec<Effect>,
}

/// How much is in a queue.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Depth {
    /// Waiting to be read.
    pub ready: u64,
    /// Read by a worker, not yet committed.
    pub in_flight: u64,
    /// Waiting for a retry.
    pub delayed: u64,
    pub dead: u64,
}

/// Where an Idempotency-Key stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Idempotency {
    /// First use: the caller owns the key until it finishes or aborts.
    New,
    /// Another request with this key is being handled.
    InProgress,
    /// Already answered: the stored answer.
    Done(String),
}

/// How long a claimed Idempotency-Key may stay unfinished (its request died).
pub const IDEMPOTENCY_CLAIM: Duration = Duration::from_secs(60);

#[derive(Clone)]
pub enum Queue {
    Redis(RedisQueue),
    Memory(MemoryQueue),
}

/// Reads jobs from one queue for one consumer.
pub enum Reader {
    Redis(self::redis::RedisReader),
    Memory(self::memory::MemoryReader),
}

impl Reader {
    /// Up to `count` new jobs, waiting up to `block` for the first.
    pub async fn read(&mut self, count: usize, block: Duration) -> Result<Vec<Entry>, QueueError> {
        match self {
            Reader::Redis(r) => r.read(count, block).await,
            Reader::Memory(r) => r.read(count, block).await,
        }
    }
}

macro_rules! dispatch {
    ($self:ident, $q:ident => $e:expr) => {
        match $self {
            Queue::Redis($q) => $e,
            Queue::Memory($q) => $e,
        }
    };
}

impl Queue {
    pub fn is_durable(&self) -> bool {
        matches!(self, Queue::Redis(_))
    }

    /// Adds jobs, each to its queue; returns when they are stored.
    pub async fn enqueue(&self, jobs: &[(String, Job)]) -> Result<(), QueueError> {
        dispatch!(self, q => q.enqueue(jobs).await)
    }

    /// Every queue that exists: the configured ones and those producers made.
    pub async fn queues(&self) -> Result<Vec<String>, QueueError> {
        dispatch!(self, q => q.queues().await)
    }

    /// Makes sure a queue and its consumer group exist.
    pub async fn prepare(&self, queue: &str) -> Result<(), QueueError> {
        dispatch!(self, q => q.prepare(queue).await)
    }

    pub async fn reader(&self, queue: &str, consumer: &str) -> Result<Reader, QueueError> {
        Ok(match self {
            Queue::Redis(q) => Reader::Redis(q.reader(queue, consumer).await?),
            Queue::Memory(q) => Reader::Memory(q.reader(queue)),
        })
    }

    /// Takes over jobs read by some worker more than `min_idle` ago and never
    /// committed (the worker died).
    pub async fn reclaim(
        &self,
        queue: &str,
        consumer: &str,
        min_idle: Duration,
        count: usize,
    ) -> Result<Vec<Entry>, QueueError> {
        dispatch!(self, q => q.reclaim(queue, consumer, min_idle, count).await)
    }

    /// Records outcomes and acknowledges their jobs, atomically.
    pub async fn commit(&self, queue: &str, completions: &[Completion]) -> Result<(), QueueError> {
        dispatch!(self, q => q.commit(queue, completions).await)
    }

    /// Moves retries that are due onto the queue. Returns how many moved and
    /// when the next one is due (unix ms).
    pub async fn promote_due(
        &self,
        queue: &str,
        now_ms: u64,
        limit: usize,
    ) -> Result<(usize, Option<u64>), QueueError> {
        dispatch!(self, q => q.promote_due(queue, now_ms, limit).await)
    }

    /// Dead letters of a queue, oldest first: (id, letter).
    pub async fn dead_letters(
        &self,
        queue: &str,
        count: usize,
    ) -> Result<Vec<(String, DeadLetter)>, QueueError> {
        dispatch!(self, q => q.dead_letters(queue, count).await)
    }

    pub async fn dead_letter(&self, id: &str) -> Result<DeadLetter, QueueError> {
        let (queue, entry) = entry::split_dead_letter_id(id)
            .ok_or_else(|| QueueError::BadDeadLetterId(id.into()))?;
        dispatch!(self, q => q.dead_letter(queue, entry).await)?
            .ok_or_else(|| QueueError::NoSuchDeadLetter(id.into()))
    }

    /// Puts a dead letter's job back on its queue with a fresh retry schedule
    /// and the same webhook id, and removes the dead letter, atomically. An
    /// endpoint marked gone (410) is unmarked.
    pub async fn replay(&self, id: &str) -> Result<Job, QueueError> {
        let (queue, entry) = entry::split_dead_letter_id(id)
            .ok_or_else(|| QueueError::BadDeadLetterId(id.into()))?;
        let letter = self.dead_letter(id).await?;
        let Some(mut job) = letter.job else {
            return Err(QueueError::NotReplayable(id.into()));
        };
        job.attempt = 0;
        // Replaying is the operator saying the endpoint works again.
        if let Some(endpoint) = &job.endpoint {
            self.set_gone(&job.app_id, endpoint, false).await?;
        }
        dispatch!(self, q => q.replay(queue, entry, &job).await)?;
        Ok(job)
    }

    pub async fn stats(&self, queue: &str) -> Result<BTreeMap<String, u64>, QueueError> {
        dispatch!(self, q => q.stats(queue).await)
    }

    pub async fn depth(&self, queue: &str) -> Result<Depth, QueueError> {
        dispatch!(self, q => q.depth(queue).await)
    }

    pub async fn ping(&self) -> Result<(), QueueError> {
        dispatch!(self, q => q.ping().await)
    }

    pub async fn idempotency_begin(
        &self,
        app: &str,
        key: &str,
        ttl: Duration,
    ) -> Result<Idempotency, QueueError> {
        dispatch!(self, q => q.idempotency_begin(app, key, ttl).await)
    }

    pub async fn idempotency_finish(
        &self,
        app: &str,
        key: &str,
        answer: &str,
        ttl: Duration,
    ) -> Result<(), QueueError> {
        dispatch!(self, q => q.idempotency_finish(app, key, answer, ttl).await)
    }

    pub async fn idempotency_abort(&self, app: &str, key: &str) -> Result<(), QueueError> {
        dispatch!(self, q => q.idempotency_abort(app, key).await)
    }

    /// Endpoints that answered 410 Gone, as `app/endpoint`.
    pub async fn gone(&self) -> Result<Vec<String>, QueueError> {
        dispatch!(self, q => q.gone().await)
    }

    pub async fn set_gone(&self, app: &str, endpoint: &str, gone: bool) -> Result<(), QueueError> {
        dispatch!(self, q => q.set_gone(&format!("{app}/{endpoint}"), gone).await)
    }
}
