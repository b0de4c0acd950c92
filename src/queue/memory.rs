//! The embedded in-process queue: the same contract as Redis, held in memory.
//! Not durable: whatever waits here is lost when the process stops.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use super::entry::{DeadLetter, Entry};
use super::{Completion, Depth, Effect, Idempotency, QueueError};
use crate::event::{Job, now_ms};

#[derive(Default)]
struct Lane {
    ready: VecDeque<(String, Job)>,
    in_flight: HashMap<String, (Job, Instant)>,
    /// (due ms, sequence) → job.
    delayed: BTreeMap<(u64, u64), Job>,
    dead: Vec<(String, DeadLetter)>,
    stats: BTreeMap<String, u64>,
    notify: Arc<Notify>,
}

enum Claim {
    Pending(Instant),
    Done(String, Instant),
}

#[derive(Default)]
struct State {
    lanes: HashMap<String, Lane>,
    idempotency: HashMap<(String, String), Claim>,
    gone: BTreeSet<String>,
    seq: u64,
}

impl State {
    fn lane(&mut self, queue: &str) -> &mut Lane {
        self.lanes.entry(queue.to_string()).or_default()
    }

    fn next_id(&mut self) -> String {
        self.seq += 1;
        format!("{}-{}", now_ms(), self.seq)
    }

    fn push(&mut self, queue: &str, job: Job) {
        let id = self.next_id();
        let lane = self.lane(queue);
        lane.ready.push_back((id, job));
        lane.notify.notify_waiters();
    }
}

#[derive(Clone, Default)]
pub struct MemoryQueue {
    state: Arc<Mutex<State>>,
    configured: Arc<Vec<String>>,
}

impl MemoryQueue {
    pub fn new(configured: Vec<String>) -> Self {
        MemoryQueue {
            state: Arc::default(),
            configured: Arc::new(configured),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the maps half-updated in a
        // way that matters more than losing the process; keep serving.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(super) async fn enqueue(&self, jobs: &[(String, Job)]) -> Result<(), QueueError> {
        let mut state = self.lock();
        for (queue, job) in jobs {
            state.push(queue, job.clone());
        }
        Ok(())
    }

    pub(super) async fn queues(&self) -> Result<Vec<String>, QueueError> {
        let state = self.lock();
        let mut names: Vec<String> = state
            .lanes
            .keys()
            .cloned()
            .chain(self.configured.iter().cloned())
            .collect();
        names.sort();
        names.dedup();
        Ok(names)
    }

    pub(super) async fn prepare(&self, queue: &str) -> Result<(), QueueError> {
        self.lock().lane(queue);
        Ok(())
    }

    pub(super) fn reader(&self, queue: &str) -> MemoryReader {
        MemoryReader {
            queue: self.clone(),
            name: queue.to_string(),
        }
    }

    pub(super) async fn reclaim(
        &self,
        queue: &str,
        _consumer: &str,
        min_idle: Duration,
        count: usize,
    ) -> Result<Vec<Entry>, QueueError> {
        let mut state = self.lock();
        let lane = state.lane(queue);
        let now = Instant::now();
        let mut out = Vec::new();
        for (id, (job, taken)) in lane.in_flight.iter_mut() {
            if out.len() >= count {
                break;
            }
            if now.duration_since(*taken) >= min_idle {
                *taken = now;
                out.push(Entry {
                    id: id.clone(),
                    job: Ok(job.clone()),
                });
            }
        }
        Ok(out)
    }

    pub(super) async fn commit(
        &self,
        queue: &str,
        completions: &[Completion],
    ) -> Result<(), QueueError> {
        let mut state = self.lock();
        for c in completions {
            for effect in &c.effects {
                match effect {
                    Effect::Enqueue(job) => state.push(queue, job.clone()),
                    Effect::Schedule { job, at_ms } => {
                        state.seq += 1;
                        let seq = state.seq;
                        state.lane(queue).delayed.insert((*at_ms, seq), job.clone());
                    }
                    Effect::DeadLetter(letter) => {
                        let id = state.next_id();
                        state.lane(queue).dead.push((id, letter.clone()));
                    }
                    Effect::Count(stat) => {
                        *state
                            .lane(queue)
                            .stats
                            .entry(stat.name().to_string())
                            .or_default() += 1
                    }
                }
            }
            state.lane(queue).in_flight.remove(&c.entry_id);
        }
        Ok(())
    }

    pub(super) async fn promote_due(
        &self,
        queue: &str,
        now_ms: u64,
        limit: usize,
    ) -> Result<(usize, Option<u64>), QueueError> {
        let mut state = self.lock();
        let mut due = Vec::new();
        {
            let lane = state.lane(queue);
            while due.len() < limit {
                match lane.delayed.first_key_value() {
                    Some((&(at, _), _)) if at <= now_ms => {
                        due.push(lane.delayed.pop_first().expect("checked").1)
                    }
                    _ => break,
                }
            }
        }
        let moved = due.len();
        for job in due {
            state.push(queue, job);
        }
        let next = state
            .lane(queue)
            .delayed
            .first_key_value()
            .map(|(&(at, _), _)| at);
        Ok((moved, next))
    }

    pub(super) async fn dead_letters(
        &self,
        queue: &str,
        count: usize,
    ) -> Result<Vec<(String, DeadLetter)>, QueueError> {
        let mut state = self.lock();
        Ok(state
            .lane(queue)
            .dead
            .iter()
            .take(count)
            .map(|(id, l)| (super::entry::dead_letter_id(queue, id), l.clone()))
            .collect())
    }

    pub(super) async fn dead_letter(
        &self,
        queue: &str,
        entry_id: &str,
    ) -> Result<Option<DeadLetter>, QueueError> {
        let mut state = self.lock();
        Ok(state
            .lane(queue)
            .dead
            .iter()
            .find(|(id, _)| id == entry_id)
            .map(|(_, l)| l.clone()))
    }

    pub(super) async fn replay(
        &self,
        queue: &str,
        entry_id: &str,
        job: &Job,
    ) -> Result<(), QueueError> {
        let mut state = self.lock();
        state.lane(queue).dead.retain(|(id, _)| id != entry_id);
        state.push(queue, job.clone());
        Ok(())
    }

    pub(super) async fn stats(&self, queue: &str) -> Result<BTreeMap<String, u64>, QueueError> {
        Ok(self.lock().lane(queue).stats.clone())
    }

    pub(super) async fn depth(&self, queue: &str) -> Result<Depth, QueueError> {
        let mut state = self.lock();
        let lane = state.lane(queue);
        Ok(Depth {
            ready: lane.ready.len() as u64,
            in_flight: lane.in_flight.len() as u64,
            delayed: lane.delayed.len() as u64,
            dead: lane.dead.len() as u64,
        })
    }

    pub(super) async fn ping(&self) -> Result<(), QueueError> {
        Ok(())
    }

    pub(super) async fn idempotency_begin(
        &self,
        app: &str,
        key: &str,
        ttl: Duration,
    ) -> Result<Idempotency, QueueError> {
        let mut state = self.lock();
        let now = Instant::now();
        state.idempotency.retain(|_, claim| match claim {
            Claim::Pending(at) => now.duration_since(*at) < super::IDEMPOTENCY_CLAIM,
            Claim::Done(_, at) => now.duration_since(*at) < ttl,
        });
        let k = (app.to_string(), key.to_string());
        Ok(match state.idempotency.get(&k) {
            Some(Claim::Pending(_)) => Idempotency::InProgress,
            Some(Claim::Done(answer, _)) => Idempotency::Done(answer.clone()),
            None => {
                state.idempotency.insert(k, Claim::Pending(now));
                Idempotency::New
            }
        })
    }

    pub(super) async fn idempotency_finish(
        &self,
        app: &str,
        key: &str,
        answer: &str,
        _ttl: Duration,
    ) -> Result<(), QueueError> {
        self.lock().idempotency.insert(
            (app.to_string(), key.to_string()),
            Claim::Done(answer.to_string(), Instant::now()),
        );
        Ok(())
    }

    pub(super) async fn idempotency_abort(&self, app: &str, key: &str) -> Result<(), QueueError> {
        self.lock()
            .idempotency
            .remove(&(app.to_string(), key.to_string()));
        Ok(())
    }

    pub(super) async fn gone(&self) -> Result<Vec<String>, QueueError> {
        Ok(self.lock().gone.iter().cloned().collect())
    }

    pub(super) async fn set_gone(&self, endpoint: &str, gone: bool) -> Result<(), QueueError> {
        let mut state = self.lock();
        if gone {
            state.gone.insert(endpoint.to_string());
        } else {
            state.gone.remove(endpoint);
        }
        Ok(())
    }
}

pub struct MemoryReader {
    queue: MemoryQueue,
    name: String,
}

impl MemoryReader {
    pub(super) async fn read(
        &mut self,
        count: usize,
        block: Duration,
    ) -> Result<Vec<Entry>, QueueError> {
        let deadline = tokio::time::Instant::now() + block;
        loop {
            let notify = {
                let mut state = self.queue.lock();
                let lane = state.lane(&self.name);
                let mut out = Vec::new();
                while out.len() < count.max(1) {
                    let Some((id, job)) = lane.ready.pop_front() else {
                        break;
                    };
                    lane.in_flight
                        .insert(id.clone(), (job.clone(), Instant::now()));
                    out.push(Entry { id, job: Ok(job) });
                }
                if !out.is_empty() {
                    return Ok(out);
                }
                lane.notify.clone()
            };
            let notified = notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            // Re-check after registering, so a push between the two is not missed.
            if !self.queue.lock().lane(&self.name).ready.is_empty() {
                continue;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Ok(Vec::new());
            }
        }
    }
}
