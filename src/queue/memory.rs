//! The embedded in-process queue: the same contract as the Redis backend,
//! held in memory behind one mutex. Not durable: whatever waits here is lost
//! when the process stops.
//!
//! The model is the one the Lua scripts keep in Redis, so both backends
//! schedule alike:
//!
//! - **Partitions**: each app has a FIFO of new events (`None`) and one per
//!   endpoint (`Some(endpoint)`). A partition is *eligible* when it has jobs
//!   and is not held.
//! - **The ring**: apps with an eligible partition, served round-robin by a
//!   score drawn from one ever-increasing counter (`vclock`): lowest first,
//!   and an app that was served goes to the back. An app's eligible
//!   partitions take turns the same way within its turn.
//! - **Holds**: an endpoint's partition waits until a unix-ms time (open
//!   breaker, half-open probe in flight, rate limit, `Retry-After`).
//! - **Leases**, **delayed** jobs and **holds** are deadlines; each `take`
//!   first settles the ones that passed.
//!
//! The logic lives on [`State`] with the time passed in, so tests drive it
//! with chosen clocks; [`MemoryQueue`] locks it and reads the wall clock.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::ops::Bound;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use super::entry::DeadLetter;
use super::{
    Committed, Completion, Depth, Effect, EndpointStatus, Idempotency, Leased, QueueError,
    QueueOptions, StateChange, TakeRequest, Taken, Tenancy,
};
use crate::app::Batching;
use crate::breaker::{Breaker, Signal, State as BreakerState};
use crate::event::{Job, now_ms};
use crate::ratelimit::{self, RateLimit};

/// Which of an app's partitions: None = its new events, Some = an endpoint's.
type Part = Option<String>;

/// Jobs an app gets per turn (times its weight) until `configure` says.
const DEFAULT_QUANTUM: usize = 8;
/// "No cap", with headroom so sums of rooms cannot overflow.
const UNCAPPED: usize = usize::MAX / 2;

/// The tenancy, indexed for lookups on the take path.
struct Limits {
    quantum: usize,
    app_weight: u32,
    app_cap: usize,
    endpoint_cap: usize,
    /// app → (weight, max in flight).
    apps: HashMap<String, (u32, usize)>,
    /// app → endpoint → (max in flight, rate limit).
    endpoints: HashMap<String, HashMap<String, (usize, Option<RateLimit>)>>,
    /// (app, endpoint) of ordered endpoints.
    ordered: HashSet<(String, String)>,
    /// Apps with an ordered endpoint: their new events one at a time.
    ordered_apps: HashSet<String>,
    /// (app, endpoint) of batched endpoints.
    batched: HashMap<(String, String), Batching>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            quantum: DEFAULT_QUANTUM,
            app_weight: 1,
            app_cap: UNCAPPED,
            endpoint_cap: UNCAPPED,
            apps: HashMap::new(),
            endpoints: HashMap::new(),
            ordered: HashSet::new(),
            ordered_apps: HashSet::new(),
            batched: HashMap::new(),
        }
    }
}

impl Limits {
    fn new(tenancy: &Tenancy) -> Self {
        let mut endpoints: HashMap<String, HashMap<String, _>> = HashMap::new();
        for e in &tenancy.endpoints {
            endpoints
                .entry(e.app.clone())
                .or_default()
                .insert(e.endpoint.clone(), (e.max_in_flight, e.rate_limit));
        }
        let ordered: HashSet<(String, String)> = tenancy
            .endpoints
            .iter()
            .filter(|e| e.ordered && !e.keyed)
            .map(|e| (e.app.clone(), e.endpoint.clone()))
            .collect();
        let ordered_apps = tenancy
            .endpoints
            .iter()
            .filter(|e| e.ordered)
            .map(|e| e.app.clone())
            .collect();
        Limits {
            quantum: tenancy.quantum,
            app_weight: tenancy.app_weight,
            app_cap: tenancy.app_max_in_flight,
            endpoint_cap: tenancy.endpoint_max_in_flight,
            apps: tenancy
                .apps
                .iter()
                .map(|(app, weight, cap)| (app.clone(), (*weight, *cap)))
                .collect(),
            endpoints,
            ordered,
            ordered_apps,
            batched: tenancy
                .endpoints
                .iter()
                .filter_map(|e| Some(((e.app.clone(), e.endpoint.clone()), e.batch?)))
                .collect(),
        }
    }

    fn is_ordered(&self, app: &str, endpoint: &str) -> bool {
        self.ordered
            .contains(&(app.to_string(), endpoint.to_string()))
    }

    /// Jobs per turn and max in flight.
    fn app(&self, app: &str) -> (usize, usize) {
        let (weight, cap) = self
            .apps
            .get(app)
            .copied()
            .unwrap_or((self.app_weight, self.app_cap));
        // A zero from a bad configuration would starve the app for good; one
        // job per turn keeps it moving.
        let turn = self.quantum.max(1).saturating_mul(weight.max(1) as usize);
        (turn, cap)
    }

    fn endpoint(&self, app: &str, endpoint: &str) -> (usize, Option<RateLimit>) {
        self.endpoints
            .get(app)
            .and_then(|eps| eps.get(endpoint))
            .copied()
            .unwrap_or((self.endpoint_cap, None))
    }
}

/// What the queue knows of one endpoint besides its waiting jobs.
#[derive(Default)]
struct Endpoint {
    breaker: Breaker,
    /// Unix ms until which its partition is not eligible; 0 = not held.
    hold_until: u64,
    /// The lease of the half-open probe in flight.
    probe: Option<String>,
    /// Ordered: the lease of its one job in flight.
    order_lease: Option<String>,
    /// Batched: when the jobs waiting go even if they are fewer than a batch
    /// (set by the take that first found them waiting).
    batch_due: Option<u64>,
    /// Ordering keys: the job out of each key (by webhook id: it keeps it on
    /// a retry), and each key's later jobs, waiting for it.
    key_out: HashMap<String, String>,
    keys_out: HashSet<String>,
    key_waiting: HashMap<String, VecDeque<Job>>,
    /// The rate limiter's theoretical arrival time.
    tat: Option<f64>,
    /// Times a take held it for its rate limit.
    rate_limited_waits: u64,
}

#[derive(Default)]
struct App {
    /// Only partitions with jobs are kept.
    parts: HashMap<Part, VecDeque<Job>>,
    /// Eligible partitions by round-robin score, and the score of each.
    eligible: BTreeSet<(u64, Part)>,
    scores: HashMap<Part, u64>,
    /// Its score in the ring, while it has an eligible partition.
    turn: Option<u64>,
    /// Unix ms since it waits for a turn: since it joined the ring, or since
    /// its last turn (for the metrics).
    waiting_since: u64,
    endpoints: HashMap<String, Endpoint>,
    /// With an ordered endpoint: the lease of its one new event in flight.
    intake_lease: Option<String>,
}

struct Lease {
    app: String,
    part: Part,
    job: Job,
    /// Unix ms. The wall clock rather than `Instant`, so that one clock
    /// orders every deadline (`next_due` compares them) and tests can set it.
    expires: u64,
}

/// An Idempotency-Key: claimed or answered, with the request's fingerprint.
enum Claim {
    Pending(Instant, String),
    Done(String, String, Instant),
}

#[derive(Default)]
struct State {
    apps: HashMap<String, App>,
    /// (score, app) of every app with an eligible partition.
    ring: BTreeSet<(u64, String)>,
    vclock: u64,
    /// Lease id (decimal) → lease.
    leases: HashMap<u64, Lease>,
    /// (expiry, lease id): which leases lapse first.
    lease_expiry: BTreeSet<(u64, u64)>,
    /// (due, seq) → job.
    delayed: BTreeMap<(u64, u64), Job>,
    /// (hold until, app, endpoint): mirrors every nonzero `hold_until`.
    holds: BTreeSet<(u64, String, String)>,
    /// Orders delayed jobs and names leases and dead letters.
    seq: u64,
    dead: Vec<(String, DeadLetter)>,
    stats: BTreeMap<String, u64>,
    limits: Limits,
    idempotency: HashMap<(String, String), Claim>,
    /// An app joined the ring since the doorbell last rang.
    joined: bool,
    /// A commit ended the lease an ordered endpoint or new events waited on.
    freed: bool,
}

/// Room left for this take, per app and per endpoint: what the request said,
/// else the cap; spent as jobs are taken.
struct Rooms {
    apps: HashMap<String, usize>,
    endpoints: HashMap<(String, String), usize>,
    /// New events an app may still give (only apps the worker named).
    intake: HashMap<String, usize>,
}

impl Rooms {
    fn new(request: &TakeRequest) -> Self {
        Rooms {
            apps: request.app_room.iter().cloned().collect(),
            endpoints: request.endpoint_room.iter().cloned().collect(),
            intake: request.intake_room.iter().cloned().collect(),
        }
    }

    fn app(&mut self, app: &str, cap: usize) -> &mut usize {
        self.apps.entry(app.to_string()).or_insert(cap)
    }

    fn endpoint(&mut self, app: &str, endpoint: &str, cap: usize) -> &mut usize {
        self.endpoints
            .entry((app.to_string(), endpoint.to_string()))
            .or_insert(cap)
    }
}

/// The partition an endpoint name holds: "" is the new events'.
fn part_of(endpoint: &str) -> Part {
    (!endpoint.is_empty()).then(|| endpoint.to_string())
}

/// The first entry of a round-robin set after `cursor` (from the start when
/// None).
fn after<K: Ord + Clone>(set: &BTreeSet<K>, cursor: &Option<K>) -> Option<K> {
    match cursor {
        None => set.first(),
        Some(c) => set.range((Bound::Excluded(c), Bound::Unbounded)).next(),
    }
    .cloned()
}

fn tick(vclock: &mut u64) -> u64 {
    *vclock += 1;
    *vclock
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl State {
    fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    fn endpoint_mut(&mut self, app: &str, endpoint: &str) -> &mut Endpoint {
        self.apps
            .entry(app.to_string())
            .or_default()
            .endpoints
            .entry(endpoint.to_string())
            .or_default()
    }

    fn waiting(&self, app: &str, part: &Part) -> usize {
        self.apps
            .get(app)
            .and_then(|a| a.parts.get(part))
            .map_or(0, VecDeque::len)
    }

    /// Brings the partition's place in the app's rotation, and the app's in
    /// the ring, in line with whether it has jobs and is held. A partition
    /// (or app) that joins goes to the back; one already in keeps its place.
    fn refresh(&mut self, app: &str, part: &Part) {
        let Some(a) = self.apps.get_mut(app) else {
            return;
        };
        let waiting = a.parts.get(part).is_some_and(|q| !q.is_empty());
        // The new events' partition is held under the endpoint name "" (an
        // ordered app's routing retry).
        let held = a
            .endpoints
            .get(part.as_deref().unwrap_or(""))
            .is_some_and(|e| e.hold_until != 0);
        match (waiting && !held, a.scores.get(part).copied()) {
            (true, None) => {
                let score = tick(&mut self.vclock);
                a.scores.insert(part.clone(), score);
                a.eligible.insert((score, part.clone()));
                if a.turn.is_none() {
                    let turn = tick(&mut self.vclock);
                    a.turn = Some(turn);
                    a.waiting_since = now_ms();
                    self.ring.insert((turn, app.to_string()));
                    self.joined = true;
                }
            }
            (false, Some(score)) => {
                a.scores.remove(part);
                a.eligible.remove(&(score, part.clone()));
                if a.eligible.is_empty()
                    && let Some(turn) = a.turn.take()
                {
                    self.ring.remove(&(turn, app.to_string()));
                }
            }
            _ => {}
        }
    }

    /// Sends an eligible partition to the back of its app's rotation.
    fn partition_to_back(&mut self, app: &str, part: &Part) {
        if let Some(a) = self.apps.get_mut(app)
            && let Some(old) = a.scores.get(part).copied()
        {
            a.eligible.remove(&(old, part.clone()));
            let score = tick(&mut self.vclock);
            a.scores.insert(part.clone(), score);
            a.eligible.insert((score, part.clone()));
        }
    }

    /// Sends an app still in the ring to its back.
    fn app_to_back(&mut self, app: &str) {
        if let Some(a) = self.apps.get_mut(app)
            && let Some(old) = a.turn
        {
            self.ring.remove(&(old, app.to_string()));
            let turn = tick(&mut self.vclock);
            a.turn = Some(turn);
            a.waiting_since = now_ms();
            self.ring.insert((turn, app.to_string()));
        }
    }

    fn push_back(&mut self, app: &str, job: Job) {
        let part = job.endpoint.clone();
        let a = self.apps.entry(app.to_string()).or_default();
        a.parts.entry(part.clone()).or_default().push_back(job);
        self.refresh(app, &part);
    }

    fn push_front(&mut self, app: &str, part: Part, job: Job) {
        let a = self.apps.entry(app.to_string()).or_default();
        a.parts.entry(part.clone()).or_default().push_front(job);
        self.refresh(app, &part);
    }

    /// A take held the endpoint for its rate limit.
    fn count_rate_limited(&mut self, app: &str, endpoint: &str) {
        self.endpoint_mut(app, endpoint).rate_limited_waits += 1;
        *self.stats.entry("rate_limited".to_string()).or_default() += 1;
    }

    /// Holds the endpoint's partition until `until`, replacing any hold.
    fn set_hold(&mut self, app: &str, endpoint: &str, until: u64) {
        // 0 means "not held"; a hold ending at the epoch still has to hold.
        let until = until.max(1);
        let e = self.endpoint_mut(app, endpoint);
        let old = std::mem::replace(&mut e.hold_until, until);
        if old != 0 {
            self.holds
                .remove(&(old, app.to_string(), endpoint.to_string()));
        }
        self.holds
            .insert((until, app.to_string(), endpoint.to_string()));
        self.refresh(app, &part_of(endpoint));
    }

    fn end_hold(&mut self, app: &str, endpoint: &str) {
        let Some(e) = self
            .apps
            .get_mut(app)
            .and_then(|a| a.endpoints.get_mut(endpoint))
        else {
            return;
        };
        let old = std::mem::take(&mut e.hold_until);
        if old != 0 {
            self.holds
                .remove(&(old, app.to_string(), endpoint.to_string()));
        }
        self.refresh(app, &part_of(endpoint));
    }

    fn lease_expiry(&self, lease: &str) -> Option<u64> {
        let id = lease.parse::<u64>().ok()?;
        self.leases.get(&id).map(|l| l.expires)
    }

    /// Replaces the tenancy; what is queued keeps its place.
    fn configure(&mut self, tenancy: &Tenancy) {
        self.limits = Limits::new(tenancy);
    }

    fn enqueue(&mut self, app: &str, jobs: &[Job]) {
        for job in jobs {
            self.push_back(app, job.clone());
        }
    }

    /// Settles the deadlines that passed: lapsed leases, due retries, holds.
    fn maintain(&mut self, now: u64) {
        let mut lapsed = Vec::new();
        while let Some(&(expires, id)) = self.lease_expiry.first()
            && expires <= now
        {
            self.lease_expiry.pop_first();
            lapsed.push(id);
        }
        // Each goes to the front of its partition: the newest first, so that
        // jobs taken together return in their original order.
        lapsed.sort_unstable_by(|a, b| b.cmp(a));
        for id in lapsed {
            let Some(lease) = self.leases.remove(&id) else {
                continue;
            };
            if let Some(ep) = &lease.part {
                let e = self.endpoint_mut(&lease.app, ep);
                if e.probe.as_deref() == Some(id.to_string().as_str()) {
                    e.probe = None;
                }
            }
            self.push_front(&lease.app, lease.part, lease.job);
        }

        while let Some(entry) = self.delayed.first_entry()
            && entry.key().0 <= now
        {
            let job = entry.remove();
            let app = job.app_id.clone();
            self.push_back(&app, job);
        }

        while let Some(first) = self.holds.first()
            && first.0 <= now
        {
            let Some((_, app, endpoint)) = self.holds.pop_first() else {
                break;
            };
            let e = self.endpoint_mut(&app, &endpoint);
            e.hold_until = 0;
            // The cool-down is over: the next job is the probe.
            if e.breaker.state == BreakerState::Open {
                e.breaker.state = BreakerState::HalfOpen;
            }
            self.refresh(&app, &part_of(&endpoint));
        }
    }

    fn take(&mut self, options: &QueueOptions, request: &TakeRequest, now: u64) -> Taken {
        self.maintain(now);
        let mut taken = Taken::default();
        let mut rooms = Rooms::new(request);
        let mut remaining = request.max;
        // Apps served go to the back of the ring, behind the cursor, and come
        // round again; an app that gave nothing stays behind it (nothing it
        // lacked comes back during this call). The walk ends when nothing is
        // left after the cursor: a pass that gave nothing.
        let mut cursor: Option<(u64, String)> = None;
        let mut stuck: HashSet<String> = HashSet::new();
        let mut took_new_events: BTreeSet<String> = BTreeSet::new();
        // When the batch is large against the apps waiting, every turn grows
        // alike (weights kept): one app alone takes a whole batch in one turn.
        // As the Redis script: from the first max + 1 apps of the ring.
        let total_turns: usize = self
            .ring
            .iter()
            .take(request.max.saturating_add(1))
            .map(|(_, app)| self.limits.app(app).0)
            .sum();
        let scale = (request.max / total_turns.max(1)).max(1);
        while remaining > 0 {
            let Some((score, app)) = after(&self.ring, &cursor) else {
                break;
            };
            cursor = Some((score, app.clone()));
            let (per_turn, cap) = self.limits.app(&app);
            let room = *rooms.app(&app, cap);
            let (gave, new_events) = if room == 0 {
                (0, 0)
            } else {
                let budget = per_turn.saturating_mul(scale).min(room).min(remaining);
                self.turn(options, &app, budget, &mut rooms, now, &mut taken.jobs)
            };
            if gave == 0 {
                stuck.insert(app);
                continue;
            }
            remaining -= gave;
            *rooms.app(&app, cap) -= gave;
            if new_events > 0 {
                took_new_events.insert(app.clone());
            }
            self.app_to_back(&app);
        }
        // Computed once all turns are done, as the Redis script does: what
        // routing must respect is the state after this whole take.
        for app in took_new_events {
            let busy = self.busy(&app, now);
            taken.busy.insert(app, busy);
        }
        taken.more = remaining == 0 && self.ring.iter().any(|(_, app)| !stuck.contains(app));
        if taken.more {
            // Work is left that this worker has no budget for: wake another.
            self.joined = true;
        }
        taken.next_due = self.next_due(now);
        taken
    }

    /// One app's turn: its eligible partitions in rotation until `budget`
    /// jobs are taken. Returns (jobs taken, of which new events).
    fn turn(
        &mut self,
        options: &QueueOptions,
        app: &str,
        budget: usize,
        rooms: &mut Rooms,
        now: u64,
        out: &mut Vec<Leased>,
    ) -> (usize, usize) {
        let mut left = budget;
        let mut new_events = 0;
        let mut cursor: Option<(u64, Part)> = None;
        while left > 0 {
            let Some(a) = self.apps.get(app) else {
                break;
            };
            let Some((score, part)) = after(&a.eligible, &cursor) else {
                break;
            };
            cursor = Some((score, part.clone()));
            let n = match &part {
                None => {
                    // An app the worker has nothing of in flight: one
                    // endpoint's cap.
                    let endpoint_cap = self.limits.endpoint_cap;
                    let room = rooms.intake.entry(app.to_string()).or_insert(endpoint_cap);
                    let mut want = (*room).min(left);
                    // An app with an ordered endpoint: one new event at a
                    // time, so that routing keeps their order.
                    let ordered = self.limits.ordered_apps.contains(app);
                    if ordered {
                        let held = self.apps.get(app).and_then(|a| a.intake_lease.clone());
                        want = match held.and_then(|l| self.lease_expiry(&l)) {
                            Some(_) => 0,
                            None => want.min(1),
                        };
                    }
                    let n = self.lease_out(options, app, &part, want, None, now, out);
                    if let Some(r) = rooms.intake.get_mut(app) {
                        *r -= n;
                    }
                    if ordered && n > 0 {
                        let lease = out.last().map(|l| l.lease.clone());
                        self.apps.entry(app.to_string()).or_default().intake_lease = lease;
                    }
                    new_events += n;
                    n
                }
                Some(ep) => self.take_endpoint(options, app, ep, left, rooms, now, out),
            };
            if n > 0 {
                left -= n;
                self.partition_to_back(app, &part);
            }
        }
        (budget - left, new_events)
    }

    /// Takes from an endpoint's partition what its room, breaker and rate
    /// limit allow, holding the partition when they say to wait.
    #[allow(clippy::too_many_arguments)]
    fn take_endpoint(
        &mut self,
        options: &QueueOptions,
        app: &str,
        endpoint: &str,
        budget: usize,
        rooms: &mut Rooms,
        now: u64,
        out: &mut Vec<Leased>,
    ) -> usize {
        let (cap, limit) = self.limits.endpoint(app, endpoint);
        let room = *rooms.endpoint(app, endpoint, cap);
        if room == 0 {
            return 0;
        }
        let part = Some(endpoint.to_string());
        // Never ask the rate limiter for more than waits: it would charge for
        // requests that are not sent.
        let mut want = budget.min(room).min(self.waiting(app, &part));
        let batching = self
            .limits
            .batched
            .get(&(app.to_string(), endpoint.to_string()))
            .copied();
        if let Some(b) = batching {
            let e = self.endpoint_mut(app, endpoint);
            // Full batches go at once; fewer events `max_wait` after a take
            // first found them waiting (or to a probe, or to be dead-lettered
            // by a disabled endpoint); a stored batch goes at once.
            let flush = !matches!(e.breaker.state, BreakerState::Closed)
                || e.batch_due.is_some_and(|d| d <= now);
            let due = e.batch_due;
            let head_is_batch = self
                .apps
                .get(app)
                .and_then(|a| a.parts.get(&part)?.front())
                .is_some_and(Job::is_batch);
            if !flush && !head_is_batch && self.waiting(app, &part) < b.max_events {
                let due = due.unwrap_or_else(|| now.saturating_add(millis(b.max_wait)));
                self.endpoint_mut(app, endpoint).batch_due = Some(due);
                self.set_hold(app, endpoint, due);
                return 0;
            }
            want = want.min(self.form_batches(app, endpoint, want, b, now, flush));
        }
        let ordered = self.limits.is_ordered(app, endpoint);
        if ordered {
            // One job in flight fleet-wide; held until its outcome is in.
            let held = self.endpoint_mut(app, endpoint).order_lease.clone();
            if let Some(expires) = held.and_then(|l| self.lease_expiry(&l)) {
                self.set_hold(app, endpoint, expires);
                return 0;
            }
            want = want.min(1);
        }
        let e = self.endpoint_mut(app, endpoint);
        let state = e.breaker.state;
        let n = match state {
            BreakerState::Disabled => {
                let reason = e
                    .breaker
                    .reason
                    .clone()
                    .unwrap_or_else(|| "endpoint disabled".to_string());
                self.lease_out(options, app, &part, want, Some(&reason), now, out)
            }
            BreakerState::HalfOpen | BreakerState::Open => {
                let probe = e.probe.clone();
                if let Some(expires) = probe.and_then(|p| self.lease_expiry(&p)) {
                    self.set_hold(app, endpoint, expires);
                    0
                } else {
                    let n = self.lease_out(options, app, &part, want.min(1), None, now, out);
                    if n > 0 {
                        let lease = out.last().map(|l| l.lease.clone());
                        let e = self.endpoint_mut(app, endpoint);
                        e.probe = lease;
                        // An open breaker whose hold was ended early (not by
                        // its cool-down) is probed all the same.
                        e.breaker.state = BreakerState::HalfOpen;
                        // No more jobs until the probe's outcome is in; if it
                        // never is, the lease lapses with this hold.
                        let until = now.saturating_add(millis(options.lease));
                        self.set_hold(app, endpoint, until);
                    }
                    n
                }
            }
            BreakerState::Closed => match limit {
                Some(limit) => {
                    let admit = ratelimit::admit(
                        limit.interval_ms(),
                        limit.tolerance_ms(),
                        e.tat,
                        now as f64,
                        u32::try_from(want).unwrap_or(u32::MAX),
                    );
                    e.tat = Some(admit.tat);
                    let n =
                        self.lease_out(options, app, &part, admit.allowed as usize, None, now, out);
                    if let Some(next) = admit.next_at {
                        self.set_hold(app, endpoint, next.ceil() as u64);
                        self.count_rate_limited(app, endpoint);
                    }
                    n
                }
                None => self.lease_out(options, app, &part, want, None, now, out),
            },
        };
        if ordered && n > 0 {
            let lease = out.last().map(|l| l.lease.clone());
            self.endpoint_mut(app, endpoint).order_lease = lease;
            self.set_hold(app, endpoint, now.saturating_add(millis(options.lease)));
        }
        if batching.is_some() && self.waiting(app, &part) == 0 {
            self.endpoint_mut(app, endpoint).batch_due = None;
        }
        *rooms.endpoint(app, endpoint, cap) -= n;
        n
    }

    /// Makes up to `n` batches at the front of a batched endpoint's
    /// partition (as the Redis script does) and returns how many there are: a
    /// stored batch stays as it is; else the jobs at the front, up to
    /// `max_events` and `max_bytes` (as stored, each counted 64 bytes
    /// longer), become one, unless they are fewer than `max_events` and not
    /// to be flushed.
    fn form_batches(
        &mut self,
        app: &str,
        endpoint: &str,
        n: usize,
        b: Batching,
        now: u64,
        flush: bool,
    ) -> usize {
        let part = Some(endpoint.to_string());
        let Some(queue) = self.apps.get_mut(app).and_then(|a| a.parts.get_mut(&part)) else {
            return 0;
        };
        let mut formed = Vec::new();
        while formed.len() < n {
            match queue.front() {
                None => break,
                Some(job) if job.is_batch() => {
                    formed.extend(queue.pop_front());
                    continue;
                }
                Some(_) if !flush && queue.len() < b.max_events => break,
                Some(_) => {}
            }
            let (mut members, mut size) = (Vec::new(), 256);
            while members.len() < b.max_events
                && let Some(next) = queue.front()
                && !next.is_batch()
            {
                let len = super::entry::encode(next).len() + 64;
                if !members.is_empty() && size + len > b.max_bytes {
                    break;
                }
                size += len;
                members.extend(queue.pop_front());
            }
            let id = format!("batch_{}", ulid::Ulid::new());
            formed.push(Job::batch_of(id, endpoint, members, now));
        }
        let count = formed.len();
        for job in formed.into_iter().rev() {
            queue.push_front(job);
        }
        count
    }

    /// Pops up to `n` jobs from the front of a partition and leases them.
    #[allow(clippy::too_many_arguments)]
    fn lease_out(
        &mut self,
        options: &QueueOptions,
        app: &str,
        part: &Part,
        n: usize,
        disabled: Option<&str>,
        now: u64,
        out: &mut Vec<Leased>,
    ) -> usize {
        let expires = now.saturating_add(millis(options.lease));
        let Some(queue) = self.apps.get_mut(app).and_then(|a| a.parts.get_mut(part)) else {
            return 0;
        };
        let mut count = 0;
        while count < n
            && let Some(job) = queue.pop_front()
        {
            self.seq += 1;
            let id = self.seq;
            out.push(Leased {
                lease: id.to_string(),
                app: app.to_string(),
                endpoint: part.clone(),
                raw: Some(bytes::Bytes::from(super::entry::encode(&job))),
                job: Ok(job.clone()),
                disabled: disabled.map(str::to_string),
            });
            self.leases.insert(
                id,
                Lease {
                    app: app.to_string(),
                    part: part.clone(),
                    job,
                    expires,
                },
            );
            self.lease_expiry.insert((expires, id));
            count += 1;
        }
        if queue.is_empty() {
            if let Some(a) = self.apps.get_mut(app) {
                a.parts.remove(part);
            }
            self.refresh(app, part);
        }
        count
    }

    /// The app's endpoints that routing must not send to directly: jobs wait
    /// for them, they are held, or their breaker is not closed.
    fn busy(&self, app: &str, now: u64) -> Vec<String> {
        let Some(a) = self.apps.get(app) else {
            return Vec::new();
        };
        let waiting = a
            .parts
            .iter()
            .filter(|(_, q)| !q.is_empty())
            .filter_map(|(part, _)| part.as_ref());
        let troubled = a
            .endpoints
            .iter()
            .filter(|(ep, _)| !ep.is_empty())
            .filter(|(_, e)| e.hold_until > now || e.breaker.state != BreakerState::Closed)
            .map(|(ep, _)| ep);
        let busy: BTreeSet<&String> = waiting.chain(troubled).collect();
        busy.into_iter().cloned().collect()
    }

    fn next_due(&self, now: u64) -> Option<Duration> {
        let retry = self.delayed.first_key_value().map(|(&(due, _), _)| due);
        let hold = self.holds.first().map(|(until, _, _)| *until);
        let lease = self.lease_expiry.first().map(|(expires, _)| *expires);
        [retry, hold, lease]
            .into_iter()
            .flatten()
            .min()
            .map(|at| Duration::from_millis(at.saturating_sub(now)))
    }

    fn commit(
        &mut self,
        options: &QueueOptions,
        completions: &[Completion],
        now: u64,
    ) -> Vec<StateChange> {
        let mut changes = Vec::new();
        for completion in completions {
            let lease = completion
                .lease
                .parse::<u64>()
                .ok()
                .and_then(|id| Some((id, self.leases.remove(&id)?)));
            let lease = lease.map(|(id, l)| {
                self.lease_expiry.remove(&(l.expires, id));
                l
            });
            // Its end frees the next job of an ordered endpoint or the next
            // new event (before its effects, which may hold it again).
            if let Some(l) = &lease {
                self.release_order(&l.app, &l.part, &completion.lease);
            }
            for effect in &completion.effects {
                match effect {
                    // What the endpoint said is true whoever holds the lease.
                    Effect::Health {
                        app,
                        endpoint,
                        signal,
                    } => self.health(options, app, endpoint, signal, now, &mut changes),
                    // A lapsed lease: the job went back to its partition and
                    // another worker owns it now.
                    _ if lease.is_none() => {}
                    Effect::Enqueue(job) => self.enqueue_aimed(job.clone()),
                    Effect::Schedule { job, delay_ms } => {
                        let seq = self.next_seq();
                        self.delayed
                            .insert((now.saturating_add(*delay_ms), seq), job.clone());
                    }
                    Effect::Front { job, delay_ms } => {
                        let app = job.app_id.clone();
                        self.push_front(&app, job.endpoint.clone(), job.clone());
                        // No delay: no hold, and any other hold stays.
                        if *delay_ms > 0 {
                            let ep = job.endpoint.as_deref().unwrap_or("");
                            self.set_hold(&app, ep, now.saturating_add(*delay_ms));
                        }
                    }
                    Effect::DeadLetter(letter) => {
                        let id = format!("{now}-{}", self.next_seq());
                        self.dead.push((id, letter.clone()));
                    }
                    Effect::Count(stat) => {
                        *self.stats.entry(stat.name().to_string()).or_default() += 1;
                    }
                }
            }
            // A job of an ordering key that does not come back (as a retry)
            // lets the key's next job go.
            if let Some(Lease {
                app,
                part: Some(endpoint),
                job,
                ..
            }) = &lease
            {
                let back = completion.effects.iter().any(|e| match e {
                    Effect::Schedule { job: again, .. } | Effect::Front { job: again, .. } => {
                        again.id == job.id && again.endpoint.as_deref() == Some(endpoint)
                    }
                    _ => false,
                });
                if !back {
                    self.release_key(app, endpoint, &job.id);
                }
            }
            if let Some(Lease {
                app,
                part: Some(endpoint),
                ..
            }) = &lease
            {
                let e = self.endpoint_mut(app, endpoint);
                if e.probe.as_deref() == Some(completion.lease.as_str()) {
                    e.probe = None;
                    // The probe came back without a verdict (it was parked or
                    // dropped): let the next take send another.
                    if e.breaker.state == BreakerState::HalfOpen {
                        self.end_hold(app, endpoint);
                    }
                }
            }
        }
        changes
    }

    /// A routed job: with an ordering key on an endpoint, it waits behind
    /// the key's job out, if there is one.
    fn enqueue_aimed(&mut self, job: Job) {
        let app = job.app_id.clone();
        if let (Some(ep), Some(key)) = (&job.endpoint, &job.order_key) {
            let (ep, key) = (ep.clone(), key.clone());
            let e = self.endpoint_mut(&app, &ep);
            if !e.keys_out.insert(key.clone()) {
                e.key_waiting.entry(key).or_default().push_back(job);
                return;
            }
            e.key_out.insert(job.id.clone(), key);
        }
        self.push_back(&app, job);
    }

    /// A job of an ordering key has ended (not to come back): the key's next
    /// job goes.
    fn release_key(&mut self, app: &str, endpoint: &str, webhook_id: &str) {
        let e = self.endpoint_mut(app, endpoint);
        let Some(key) = e.key_out.remove(webhook_id) else {
            return;
        };
        let next = e.key_waiting.get_mut(&key).and_then(VecDeque::pop_front);
        if e.key_waiting.get(&key).is_some_and(VecDeque::is_empty) {
            e.key_waiting.remove(&key);
        }
        match next {
            Some(next) => {
                e.key_out.insert(next.id.clone(), key);
                self.push_back(app, next);
            }
            None => {
                e.keys_out.remove(&key);
            }
        }
    }

    fn release_order(&mut self, app: &str, part: &Part, lease: &str) {
        match part {
            None => {
                if let Some(a) = self.apps.get_mut(app)
                    && a.intake_lease.as_deref() == Some(lease)
                {
                    a.intake_lease = None;
                    self.freed = true;
                }
            }
            Some(ep) => {
                let e = self.endpoint_mut(app, ep);
                if e.order_lease.as_deref() == Some(lease) {
                    e.order_lease = None;
                    self.end_hold(app, ep);
                    self.freed = true;
                }
            }
        }
    }

    fn health(
        &mut self,
        options: &QueueOptions,
        app: &str,
        endpoint: &str,
        signal: &Signal,
        now: u64,
        changes: &mut Vec<StateChange>,
    ) {
        if let Signal::SlowDown(wait) = signal {
            let until = now.saturating_add(millis((*wait).min(options.max_hold)));
            let current = self.endpoint_mut(app, endpoint).hold_until;
            self.set_hold(app, endpoint, current.max(until));
            return;
        }
        let e = self.endpoint_mut(app, endpoint);
        let change = e.breaker.record(&options.breaker, signal, now);
        match change {
            Some(BreakerState::Open) => {
                let until = e.breaker.open_until;
                self.set_hold(app, endpoint, until);
            }
            Some(BreakerState::Closed | BreakerState::Disabled) => {
                e.probe = None;
                self.end_hold(app, endpoint);
            }
            _ => {}
        }
        if let Some(state) = change {
            changes.push(StateChange {
                app: app.to_string(),
                endpoint: endpoint.to_string(),
                state,
            });
        }
    }

    /// Back to a closed breaker with no history, hold, probe or rate state.
    fn reset_endpoint(&mut self, app: &str, endpoint: &str) {
        if let Some(e) = self
            .apps
            .get_mut(app)
            .and_then(|a| a.endpoints.remove(endpoint))
            && e.hold_until != 0
        {
            self.holds
                .remove(&(e.hold_until, app.to_string(), endpoint.to_string()));
        }
        self.refresh(app, &Some(endpoint.to_string()));
    }

    fn replay(&mut self, id: &str, job: &Job) -> Result<(), QueueError> {
        let Some(at) = self.dead.iter().position(|(d, _)| d == id) else {
            return Err(QueueError::NoSuchDeadLetter(id.to_string()));
        };
        self.dead.remove(at);
        let app = job.app_id.clone();
        self.push_back(&app, job.clone());
        // Replaying is the operator saying a disabled endpoint works again.
        if let Some(endpoint) = &job.endpoint
            && self
                .apps
                .get(&app)
                .and_then(|a| a.endpoints.get(endpoint))
                .is_some_and(|e| e.breaker.state == BreakerState::Disabled)
        {
            self.reset_endpoint(&app, endpoint);
        }
        Ok(())
    }

    fn depth(&self, now: u64) -> Depth {
        Depth {
            ready: self
                .apps
                .values()
                .flat_map(|a| a.parts.values())
                .map(|q| q.len() as u64)
                .sum::<u64>()
                + self
                    .apps
                    .values()
                    .flat_map(|a| a.endpoints.values())
                    .flat_map(|e| e.key_waiting.values())
                    .map(|q| q.len() as u64)
                    .sum::<u64>(),
            in_flight: self.leases.len() as u64,
            delayed: self.delayed.len() as u64,
            held: self
                .holds
                .iter()
                .filter(|(until, _, _)| *until > now)
                .count() as u64,
            active_apps: self.ring.len() as u64,
            dead: self.dead.len() as u64,
            oldest_ready_ms: self
                .ring
                .iter()
                .filter_map(|(_, app)| self.apps.get(app))
                .map(|a| a.waiting_since)
                .min()
                .map_or(0, |since| now.saturating_sub(since)),
        }
    }

    fn app_depth(&self, app: &str, endpoints: &[String]) -> Vec<(Option<String>, u64)> {
        std::iter::once(None)
            .chain(endpoints.iter().cloned().map(Some))
            .map(|part| {
                let n = self.waiting(app, &part) as u64;
                (part, n)
            })
            .collect()
    }

    fn endpoints(
        &self,
        options: &QueueOptions,
        which: &[(String, String)],
        now: u64,
    ) -> Vec<EndpointStatus> {
        let unknown = Endpoint::default();
        which
            .iter()
            .map(|(app, endpoint)| {
                let e = self
                    .apps
                    .get(app)
                    .and_then(|a| a.endpoints.get(endpoint))
                    .unwrap_or(&unknown);
                let (requests, failures) = e.breaker.window(&options.breaker, now);
                EndpointStatus {
                    app: app.clone(),
                    endpoint: endpoint.clone(),
                    state: e.breaker.state,
                    waiting: (self.waiting(app, &Some(endpoint.clone()))
                        + e.key_waiting.values().map(VecDeque::len).sum::<usize>())
                        as u64,
                    requests,
                    failures,
                    consecutive_failures: e.breaker.consecutive,
                    failing_since_ms: e.breaker.failing_since,
                    held_until_ms: (e.hold_until > now).then_some(e.hold_until),
                    reason: e.breaker.reason.clone(),
                    rate_limited_waits: e.rate_limited_waits,
                }
            })
            .collect()
    }
}

#[derive(Clone)]
pub struct MemoryQueue {
    state: Arc<Mutex<State>>,
    options: Arc<QueueOptions>,
    doorbell: Arc<Notify>,
}

impl MemoryQueue {
    pub fn new(options: QueueOptions) -> Self {
        MemoryQueue {
            state: Arc::default(),
            options: Arc::new(options),
            doorbell: Arc::new(Notify::new()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the maps half-updated in a
        // way that matters more than losing the process; keep serving.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Wakes idle workers: every one waiting now, and the next to wait, in
    /// case it was between its take and its wait. A spare wake costs one
    /// empty take.
    fn ring(&self) {
        self.doorbell.notify_waiters();
        self.doorbell.notify_one();
    }

    fn ring_if_joined(&self, state: &mut State) {
        if std::mem::take(&mut state.joined) {
            self.ring();
        }
    }

    pub(super) async fn enqueue(&self, app: &str, jobs: &[Job]) -> Result<(), QueueError> {
        let mut state = self.lock();
        state.enqueue(app, jobs);
        state.joined = false;
        self.ring();
        Ok(())
    }

    pub(super) async fn configure(&self, tenancy: &Tenancy) -> Result<(), QueueError> {
        self.lock().configure(tenancy);
        Ok(())
    }

    pub(super) async fn take(&self, request: &TakeRequest) -> Result<Taken, QueueError> {
        let mut state = self.lock();
        let taken = state.take(&self.options, request, now_ms());
        self.ring_if_joined(&mut state);
        Ok(taken)
    }

    pub(super) async fn commit(&self, completions: &[Completion]) -> Result<Committed, QueueError> {
        let mut state = self.lock();
        let changes = state.commit(&self.options, completions, now_ms());
        self.ring_if_joined(&mut state);
        Ok(Committed {
            changes,
            freed: std::mem::take(&mut state.freed),
        })
    }

    pub(super) fn doorbell(&self) -> Arc<Notify> {
        self.doorbell.clone()
    }

    pub(super) async fn dead_letters(
        &self,
        count: usize,
    ) -> Result<Vec<(String, DeadLetter)>, QueueError> {
        Ok(self.lock().dead.iter().take(count).cloned().collect())
    }

    pub(super) async fn dead_letter(&self, id: &str) -> Result<Option<DeadLetter>, QueueError> {
        Ok(self
            .lock()
            .dead
            .iter()
            .find(|(d, _)| d == id)
            .map(|(_, letter)| letter.clone()))
    }

    pub(super) async fn replay(&self, id: &str, job: &Job) -> Result<(), QueueError> {
        let mut state = self.lock();
        state.replay(id, job)?;
        state.joined = false;
        self.ring();
        Ok(())
    }

    pub(super) async fn stats(&self) -> Result<BTreeMap<String, u64>, QueueError> {
        Ok(self.lock().stats.clone())
    }

    pub(super) async fn depth(&self) -> Result<Depth, QueueError> {
        Ok(self.lock().depth(now_ms()))
    }

    pub(super) async fn app_depth(
        &self,
        app: &str,
        endpoints: &[String],
    ) -> Result<Vec<(Option<String>, u64)>, QueueError> {
        Ok(self.lock().app_depth(app, endpoints))
    }

    pub(super) async fn endpoints(
        &self,
        which: &[(String, String)],
    ) -> Result<Vec<EndpointStatus>, QueueError> {
        Ok(self.lock().endpoints(&self.options, which, now_ms()))
    }

    pub(super) async fn reset_endpoint(&self, app: &str, endpoint: &str) -> Result<(), QueueError> {
        let mut state = self.lock();
        state.reset_endpoint(app, endpoint);
        state.joined = false;
        self.ring();
        Ok(())
    }

    pub(super) async fn ping(&self) -> Result<(), QueueError> {
        Ok(())
    }

    pub(super) async fn idempotency_begin(
        &self,
        app: &str,
        key: &str,
        fingerprint: &str,
        ttl: Duration,
    ) -> Result<Idempotency, QueueError> {
        let mut state = self.lock();
        let now = Instant::now();
        state.idempotency.retain(|_, claim| match claim {
            Claim::Pending(at, _) => now.duration_since(*at) < super::IDEMPOTENCY_CLAIM,
            Claim::Done(_, _, at) => now.duration_since(*at) < ttl,
        });
        let k = (app.to_string(), key.to_string());
        Ok(match state.idempotency.get(&k) {
            Some(Claim::Pending(_, fp) | Claim::Done(_, fp, _)) if fp != fingerprint => {
                Idempotency::Mismatch
            }
            Some(Claim::Pending(..)) => Idempotency::InProgress,
            Some(Claim::Done(answer, ..)) => Idempotency::Done(answer.clone()),
            None => {
                state
                    .idempotency
                    .insert(k, Claim::Pending(now, fingerprint.to_string()));
                Idempotency::New
            }
        })
    }

    pub(super) async fn idempotency_finish(
        &self,
        app: &str,
        key: &str,
        fingerprint: &str,
        answer: &str,
        _ttl: Duration,
    ) -> Result<(), QueueError> {
        self.lock().idempotency.insert(
            (app.to_string(), key.to_string()),
            Claim::Done(answer.to_string(), fingerprint.to_string(), Instant::now()),
        );
        Ok(())
    }

    pub(super) async fn idempotency_abort(&self, app: &str, key: &str) -> Result<(), QueueError> {
        self.lock()
            .idempotency
            .remove(&(app.to_string(), key.to_string()));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::breaker::BreakerSettings;
    use crate::event::Event;
    use crate::queue::{EndpointTenancy, Stat};

    /// An arbitrary wall-clock time to start from.
    const T0: u64 = 1_700_000_000_000;

    fn options() -> QueueOptions {
        QueueOptions {
            lease: Duration::from_secs(30),
            breaker: BreakerSettings {
                failure_rate: 0.0,
                min_requests: 10,
                window: Duration::from_secs(300),
                consecutive_failures: 1,
                cool_down: Duration::from_secs(1),
                max_cool_down: Duration::from_secs(8),
                disable_after: Duration::ZERO,
            },
            max_hold: Duration::from_secs(60),
        }
    }

    /// Job `n` of an app's partition, with an id that says which.
    fn job(app: &str, endpoint: Option<&str>, n: usize) -> Job {
        let event = Event::from_json(serde_json::json!({"name": "e"})).unwrap();
        let mut job = Job::new(app, event, 0);
        job.id = format!("{app}/{}/{n}", endpoint.unwrap_or("new"));
        job.endpoint = endpoint.map(str::to_string);
        job
    }

    /// Job `n` as its retry carries it (attempt 1).
    fn retried(app: &str, endpoint: Option<&str>, n: usize) -> Job {
        Job {
            attempt: 1,
            ..job(app, endpoint, n)
        }
    }

    fn jobs(app: &str, endpoint: Option<&str>, count: usize) -> Vec<Job> {
        (0..count).map(|n| job(app, endpoint, n)).collect()
    }

    fn tenancy(quantum: usize) -> Tenancy {
        Tenancy {
            quantum,
            app_weight: 1,
            app_max_in_flight: 1000,
            endpoint_max_in_flight: 1000,
            apps: Vec::new(),
            endpoints: Vec::new(),
        }
    }

    fn take(state: &mut State, max: usize, now: u64) -> Taken {
        let request = TakeRequest {
            max,
            ..TakeRequest::default()
        };
        state.take(&options(), &request, now)
    }

    fn ids(taken: &Taken) -> Vec<String> {
        taken
            .jobs
            .iter()
            .map(|l| l.job.as_ref().unwrap().id.clone())
            .collect()
    }

    fn commit(state: &mut State, lease: &str, effects: Vec<Effect>, now: u64) -> Vec<StateChange> {
        let completion = Completion {
            lease: lease.to_string(),
            effects,
        };
        state.commit(&options(), &[completion], now)
    }

    fn health(app: &str, endpoint: &str, signal: Signal) -> Effect {
        Effect::Health {
            app: app.into(),
            endpoint: endpoint.into(),
            signal,
        }
    }

    fn change(app: &str, endpoint: &str, state: BreakerState) -> StateChange {
        StateChange {
            app: app.into(),
            endpoint: endpoint.into(),
            state,
        }
    }

    fn status(state: &State, app: &str, endpoint: &str, now: u64) -> EndpointStatus {
        let which = [(app.to_string(), endpoint.to_string())];
        state.endpoints(&options(), &which, now).remove(0)
    }

    fn letter(job: &Job) -> DeadLetter {
        DeadLetter {
            reason: "answered 410".into(),
            status: Some(410),
            response_body: None,
            attempts: 1,
            dead_at_ms: T0,
            job: Some(job.clone()),
            raw: None,
        }
    }

    #[test]
    fn a_partition_is_first_in_first_out() {
        let mut s = State::default();
        s.enqueue("a", &jobs("a", None, 3));
        s.enqueue("a", &jobs("a", Some("e"), 2));
        let t = take(&mut s, 10, T0);
        assert_eq!(ids(&t), ["a/new/0", "a/new/1", "a/new/2", "a/e/0", "a/e/1"]);
        assert_eq!(t.jobs[0].endpoint, None);
        assert_eq!(t.jobs[3].endpoint.as_deref(), Some("e"));
        assert!(t.jobs.iter().all(|l| l.app == "a" && l.disabled.is_none()));
        let leases: BTreeSet<&str> = t.jobs.iter().map(|l| l.lease.as_str()).collect();
        assert_eq!(leases.len(), 5, "every lease is its own");
        assert!(!t.more);
    }

    #[test]
    fn apps_take_turns_of_a_quantum() {
        let mut s = State::default();
        s.configure(&tenancy(2));
        s.enqueue("a", &jobs("a", None, 100));
        s.enqueue("b", &jobs("b", None, 1));
        let t = take(&mut s, 4, T0);
        assert_eq!(ids(&t), ["a/new/0", "a/new/1", "b/new/0", "a/new/2"]);
        assert!(t.more);
        assert_eq!(t.busy.keys().collect::<Vec<_>>(), ["a", "b"]);
    }

    #[test]
    fn a_weight_multiplies_the_turn() {
        let mut s = State::default();
        let mut t = tenancy(1);
        t.apps = vec![("a".into(), 3, 1000)];
        s.configure(&t);
        s.enqueue("a", &jobs("a", None, 100));
        s.enqueue("b", &jobs("b", None, 100));
        let taken = take(&mut s, 4, T0);
        let apps: String = taken.jobs.iter().map(|l| l.app.as_str()).collect();
        assert_eq!(apps, "aaab");
        // A batch twice a round's size: both turns double, weights kept.
        let taken = take(&mut s, 8, T0);
        let apps: String = taken.jobs.iter().map(|l| l.app.as_str()).collect();
        assert_eq!(apps, "aaaaaabb");
    }

    #[test]
    fn new_events_wait_while_the_apps_endpoints_are_full() {
        let mut s = State::default();
        s.enqueue("a", &jobs("a", None, 10));
        s.enqueue("b", &jobs("b", None, 10));
        let request = TakeRequest {
            max: 20,
            intake_room: vec![("a".into(), 2)],
            ..TakeRequest::default()
        };
        let t = s.take(&options(), &request, T0);
        let a = t.jobs.iter().filter(|l| l.app == "a").count();
        let b = t.jobs.iter().filter(|l| l.app == "b").count();
        assert_eq!((a, b), (2, 10), "a gives only its room; b is not held back");
    }

    #[test]
    fn an_app_alone_takes_a_whole_batch_in_one_turn() {
        let mut s = State::default();
        s.configure(&tenancy(2));
        s.enqueue("a", &jobs("a", None, 100));
        let taken = take(&mut s, 50, T0);
        assert_eq!(taken.jobs.len(), 50);
        let vclock = s.vclock;
        take(&mut s, 50, T0);
        assert!(
            s.vclock - vclock <= 3,
            "one turn, not 25: {}",
            s.vclock - vclock
        );
    }

    #[test]
    fn an_endpoint_without_room_is_skipped_and_others_still_flow() {
        let mut s = State::default();
        s.enqueue("a", &jobs("a", Some("e"), 3));
        s.enqueue("b", &jobs("b", None, 2));
        let request = TakeRequest {
            max: 2,
            endpoint_room: vec![(("a".into(), "e".into()), 0)],
            ..TakeRequest::default()
        };
        let t = s.take(&options(), &request, T0);
        assert_eq!(ids(&t), ["b/new/0", "b/new/1"]);
        assert!(!t.more, "what is left, this worker has no room for");
        assert_eq!(
            s.depth(T0).active_apps,
            1,
            "skipped, not held: a stays in the ring"
        );
        assert_eq!(s.depth(T0).held, 0);
        assert_eq!(ids(&take(&mut s, 10, T0)), ["a/e/0", "a/e/1", "a/e/2"]);
    }

    #[test]
    fn room_caps_an_app_and_an_endpoint() {
        let mut s = State::default();
        let mut t = tenancy(8);
        t.app_max_in_flight = 2;
        t.apps = vec![("b".into(), 1, 3)];
        t.endpoints = vec![EndpointTenancy {
            app: "c".into(),
            endpoint: "e".into(),
            max_in_flight: 1,
            rate_limit: None,
            ordered: false,
            keyed: false,
            batch: None,
        }];
        s.configure(&t);
        for app in ["a", "b"] {
            s.enqueue(app, &jobs(app, None, 5));
        }
        s.enqueue("c", &jobs("c", Some("e"), 5));
        s.enqueue("c", &jobs("c", Some("f"), 5));
        let request = TakeRequest {
            max: 100,
            app_room: vec![("c".into(), 4)],
            ..TakeRequest::default()
        };
        let taken = s.take(&options(), &request, T0);
        let count = |app: &str| taken.jobs.iter().filter(|l| l.app == app).count();
        assert_eq!((count("a"), count("b"), count("c")), (2, 3, 4));
        let from_e = taken
            .jobs
            .iter()
            .filter(|l| l.endpoint.as_deref() == Some("e"))
            .count();
        assert_eq!(from_e, 1, "the endpoint's own cap");
        assert!(!taken.more);
    }

    #[test]
    fn a_lapsed_lease_returns_to_the_front_and_its_late_commit_counts_only_health() {
        let mut s = State::default();
        s.enqueue("a", &jobs("a", None, 2));
        let first = take(&mut s, 2, T0);
        assert_eq!(first.next_due, Some(Duration::from_secs(30)));
        s.enqueue("a", &[job("a", None, 2)]);
        assert!(ids(&take(&mut s, 10, T0 + 29_999)).contains(&"a/new/2".to_string()));

        let again = take(&mut s, 10, T0 + 30_000);
        assert_eq!(ids(&again), ["a/new/0", "a/new/1"], "in their order");
        let late = commit(
            &mut s,
            &first.jobs[0].lease,
            vec![
                Effect::Count(Stat::Delivered),
                Effect::Enqueue(job("a", Some("e"), 9)),
                Effect::DeadLetter(letter(&job("a", None, 0))),
                health("a", "e", Signal::Failure),
            ],
            T0 + 30_001,
        );
        assert_eq!(late, [change("a", "e", BreakerState::Open)]);
        assert!(s.stats.is_empty());
        let depth = s.depth(T0 + 30_001);
        assert_eq!((depth.ready, depth.in_flight, depth.dead), (0, 3, 0));

        // The current holder's commit is the one that counts.
        commit(
            &mut s,
            &again.jobs[0].lease,
            vec![Effect::Count(Stat::Delivered)],
            T0 + 30_002,
        );
        assert_eq!(s.stats.get("delivered"), Some(&1));
        assert_eq!(s.depth(T0 + 30_002).in_flight, 2);
    }

    #[test]
    fn a_scheduled_job_comes_back_when_due() {
        let mut s = State::default();
        s.enqueue("a", &[job("a", Some("e"), 0)]);
        let t = take(&mut s, 1, T0);
        let retry = retried("a", Some("e"), 0);
        commit(
            &mut s,
            &t.jobs[0].lease,
            vec![
                Effect::Schedule {
                    job: retry,
                    delay_ms: 5000,
                },
                Effect::Count(Stat::Retried),
            ],
            T0,
        );
        assert_eq!(s.depth(T0).delayed, 1);
        let early = take(&mut s, 10, T0 + 4999);
        assert!(early.jobs.is_empty());
        assert_eq!(early.next_due, Some(Duration::from_millis(1)));
        let due = take(&mut s, 10, T0 + 5000);
        assert_eq!(ids(&due), ["a/e/0"]);
        assert_eq!(due.jobs[0].job.as_ref().unwrap().attempt, 1);
        assert_eq!(s.depth(T0 + 5000).delayed, 0);
    }

    #[test]
    fn ordering_keys_have_one_job_out_each_and_do_not_wait_for_each_other() {
        let mut s = State::default();
        let mut t = ordered("a", "e");
        t.endpoints[0].keyed = true;
        s.configure(&t);
        let keyed = |n: usize, key: &str| {
            let mut j = job("a", Some("e"), n);
            j.order_key = Some(key.into());
            j
        };
        for (n, key) in [(0, "x"), (1, "x"), (2, "y"), (3, "x"), (4, "y"), (5, "z")] {
            s.enqueue_aimed(keyed(n, key));
        }
        assert_eq!(
            s.depth(T0).ready,
            6,
            "the keys' later jobs count as waiting"
        );
        assert_eq!(status(&s, "a", "e", T0).waiting, 6);
        // The first of each key, all at once.
        let t = take(&mut s, 10, T0);
        assert_eq!(ids(&t), ["a/e/0", "a/e/2", "a/e/5"]);
        let lease = |t: &Taken, id: &str| {
            let l = t.jobs.iter().find(|l| l.job.as_ref().unwrap().id == id);
            l.unwrap().lease.clone()
        };
        // x's job fails and waits for its retry: y and z go on.
        let mut retry = keyed(0, "x");
        retry.attempt = 1;
        commit(
            &mut s,
            &lease(&t, "a/e/0"),
            vec![Effect::Schedule {
                job: retry,
                delay_ms: 5000,
            }],
            T0,
        );
        commit(
            &mut s,
            &lease(&t, "a/e/2"),
            vec![Effect::Count(Stat::Delivered)],
            T0,
        );
        let t2 = take(&mut s, 10, T0 + 1);
        assert_eq!(ids(&t2), ["a/e/4"], "y's next; x waits for its retry");
        // The retry, then x's next ones in order.
        let t3 = take(&mut s, 10, T0 + 5000);
        assert_eq!(ids(&t3), ["a/e/0"]);
        commit(
            &mut s,
            &t3.jobs[0].lease,
            vec![Effect::Count(Stat::Delivered)],
            T0 + 5000,
        );
        let t4 = take(&mut s, 10, T0 + 5001);
        assert_eq!(ids(&t4), ["a/e/1"]);
        // A dead letter ends its key's turn too.
        commit(
            &mut s,
            &t4.jobs[0].lease,
            vec![Effect::DeadLetter(letter(&keyed(1, "x")))],
            T0 + 5001,
        );
        assert_eq!(ids(&take(&mut s, 10, T0 + 5002)), ["a/e/3"]);
    }

    fn batched(app: &str, endpoint: &str, max_events: usize, max_bytes: usize) -> Tenancy {
        let mut t = tenancy(8);
        t.endpoints = vec![EndpointTenancy {
            app: app.into(),
            endpoint: endpoint.into(),
            max_in_flight: 1000,
            rate_limit: None,
            ordered: false,
            keyed: false,
            batch: Some(Batching {
                max_events,
                max_wait: Duration::from_secs(1),
                max_bytes,
            }),
        }];
        t
    }

    fn members(taken: &Taken) -> Vec<Vec<String>> {
        taken
            .jobs
            .iter()
            .map(|l| {
                let job = l.job.as_ref().unwrap();
                job.batch.iter().map(|m| m.id.clone()).collect()
            })
            .collect()
    }

    #[test]
    fn a_batched_endpoint_waits_for_a_batch_or_its_max_wait() {
        let mut s = State::default();
        s.configure(&batched("a", "e", 3, 1 << 20));
        s.enqueue("a", &jobs("a", Some("e"), 2));
        // Fewer than a batch: held until max_wait after this take.
        let t = take(&mut s, 10, T0);
        assert!(t.jobs.is_empty());
        assert_eq!(t.next_due, Some(Duration::from_secs(1)));
        // A third makes a batch: still held (the hold ends it), then all go.
        s.enqueue("a", &[job("a", Some("e"), 2)]);
        assert!(take(&mut s, 10, T0 + 999).jobs.is_empty());
        let t = take(&mut s, 10, T0 + 1000);
        assert_eq!(members(&t), [["a/e/0", "a/e/1", "a/e/2"]]);
        let batch = t.jobs[0].job.as_ref().unwrap();
        assert!(batch.id.starts_with("batch_"));
        assert_eq!(batch.endpoint.as_deref(), Some("e"));
        // Seven more: two full batches at once, the last one waits.
        s.enqueue(
            "a",
            &(3..10).map(|n| job("a", Some("e"), n)).collect::<Vec<_>>(),
        );
        let t = take(&mut s, 10, T0 + 1001);
        assert_eq!(
            members(&t),
            [["a/e/3", "a/e/4", "a/e/5"], ["a/e/6", "a/e/7", "a/e/8"]]
        );
        assert!(take(&mut s, 10, T0 + 1002).jobs.is_empty());
        assert_eq!(members(&take(&mut s, 10, T0 + 2002)), [["a/e/9"]]);
    }

    #[test]
    fn a_failed_batch_comes_back_whole_and_a_lapsed_one_too() {
        let mut s = State::default();
        s.configure(&batched("a", "e", 2, 1 << 20));
        s.enqueue("a", &jobs("a", Some("e"), 3));
        let t = take(&mut s, 1, T0);
        let mut first = t.jobs[0].job.clone().unwrap();
        assert_eq!(first.batch.len(), 2);
        first.attempt = 1;
        commit(
            &mut s,
            &t.jobs[0].lease,
            vec![Effect::Schedule {
                job: first.clone(),
                delay_ms: 10,
            }],
            T0,
        );
        // Due again behind a/e/2: it goes as it was, not merged with it.
        let t = take(&mut s, 10, T0 + 1000);
        let again = t
            .jobs
            .iter()
            .find(|l| l.job.as_ref().unwrap().id == first.id);
        let again = again
            .expect("the batch again, under its own id")
            .job
            .clone()
            .unwrap();
        assert_eq!(again.batch, first.batch);
        assert_eq!(again.attempt, 1);
        assert_eq!(members(&t).concat().len(), 3, "{:?}", members(&t));
        // Its worker dies: after the lease the same batch goes again.
        let lapsed = take(&mut s, 10, T0 + 1000 + 30_000);
        assert!(
            lapsed
                .jobs
                .iter()
                .any(|l| l.job.as_ref().unwrap().id == first.id)
        );
    }

    #[test]
    fn a_batch_stops_at_its_byte_limit() {
        let mut s = State::default();
        let one = super::super::entry::encode(&job("a", Some("e"), 0)).len() + 64;
        // Room for two jobs (and the envelope's 256), not three.
        s.configure(&batched("a", "e", 100, 256 + 2 * one + 10));
        s.enqueue("a", &jobs("a", Some("e"), 5));
        let t = take(&mut s, 10, T0 + 5000);
        assert!(t.jobs.is_empty(), "fewer than max_events: held first");
        let t = take(&mut s, 10, T0 + 6000);
        assert_eq!(
            members(&t),
            [
                vec!["a/e/0", "a/e/1"],
                vec!["a/e/2", "a/e/3"],
                vec!["a/e/4"]
            ]
        );
        // An event larger than the limit goes alone, never stuck.
        let mut s = State::default();
        s.configure(&batched("a", "e", 2, 1024));
        let mut big = job("a", Some("e"), 0);
        big.event
            .fields
            .insert("pad".into(), "x".repeat(4000).into());
        s.enqueue("a", &[big, job("a", Some("e"), 1)]);
        let t = take(&mut s, 10, T0);
        assert_eq!(members(&t), [vec!["a/e/0"]]);
        // The one left is fewer than a batch: it waits for max_wait.
        assert!(take(&mut s, 10, T0 + 1).jobs.is_empty());
        assert_eq!(members(&take(&mut s, 10, T0 + 1001)), [vec!["a/e/1"]]);
    }

    fn ordered(app: &str, endpoint: &str) -> Tenancy {
        let mut t = tenancy(8);
        t.endpoints = vec![EndpointTenancy {
            app: app.into(),
            endpoint: endpoint.into(),
            max_in_flight: 1000,
            rate_limit: None,
            ordered: true,
            keyed: false,
            batch: None,
        }];
        t
    }

    #[test]
    fn an_ordered_endpoint_has_one_job_out_and_a_retry_keeps_its_place() {
        let mut s = State::default();
        s.configure(&ordered("a", "e"));
        s.enqueue("a", &jobs("a", Some("e"), 3));
        let first = take(&mut s, 10, T0);
        assert_eq!(ids(&first), ["a/e/0"], "one at a time");
        assert!(
            take(&mut s, 10, T0).jobs.is_empty(),
            "nothing while it is out"
        );

        // A retry goes back to the front; the endpoint waits until it is due.
        let again = retried("a", Some("e"), 0);
        commit(
            &mut s,
            &first.jobs[0].lease,
            vec![Effect::Front {
                job: again,
                delay_ms: 100,
            }],
            T0,
        );
        assert!(
            std::mem::take(&mut s.freed),
            "the commit says it freed the endpoint"
        );
        assert!(take(&mut s, 10, T0 + 50).jobs.is_empty(), "held until due");
        let retry = take(&mut s, 10, T0 + 100);
        assert_eq!(ids(&retry), ["a/e/0"], "the failed job first, again");
        assert_eq!(retry.jobs[0].job.as_ref().unwrap().attempt, 1);

        // Its dead letter lets the next one go at once.
        commit(&mut s, &retry.jobs[0].lease, vec![], T0 + 100);
        assert_eq!(ids(&take(&mut s, 10, T0 + 100)), ["a/e/1"]);

        // A lapsed lease: the same job again, still first.
        let lapsed = take(&mut s, 10, T0 + 100 + 30_000);
        assert_eq!(ids(&lapsed), ["a/e/1"]);
    }

    #[test]
    fn an_app_with_an_ordered_endpoint_routes_its_new_events_one_at_a_time() {
        let mut s = State::default();
        s.configure(&ordered("a", "e"));
        s.enqueue("a", &jobs("a", None, 3));
        s.enqueue("b", &jobs("b", None, 3));
        let first = take(&mut s, 10, T0);
        assert_eq!(ids(&first), ["a/new/0", "b/new/0", "b/new/1", "b/new/2"]);
        assert!(take(&mut s, 10, T0).jobs.is_empty());
        let lease = &first.jobs[0].lease;
        commit(
            &mut s,
            lease,
            vec![Effect::Enqueue(job("a", Some("e"), 0))],
            T0,
        );
        assert!(s.freed, "the commit says it freed the app's new events");
        let mut next = ids(&take(&mut s, 10, T0));
        next.sort();
        assert_eq!(
            next,
            ["a/e/0", "a/new/1"],
            "the routed job and the next new event"
        );
    }

    #[test]
    fn an_ordered_apps_routing_retry_holds_its_new_events_until_due() {
        let mut s = State::default();
        s.configure(&ordered("a", "e"));
        s.enqueue("a", &jobs("a", None, 3));
        let first = take(&mut s, 10, T0);
        assert_eq!(ids(&first), ["a/new/0"]);
        let again = retried("a", None, 0);
        commit(
            &mut s,
            &first.jobs[0].lease,
            vec![Effect::Front {
                job: again,
                delay_ms: 500,
            }],
            T0,
        );
        let early = take(&mut s, 10, T0 + 499);
        assert!(early.jobs.is_empty(), "nothing after it goes first");
        assert_eq!(early.next_due, Some(Duration::from_millis(1)));
        let due = take(&mut s, 10, T0 + 500);
        assert_eq!(ids(&due), ["a/new/0"]);
        assert_eq!(due.jobs[0].job.as_ref().unwrap().attempt, 1);
        assert!(
            due.busy.get("a").is_some_and(Vec::is_empty),
            "the held new events are no endpoint: {:?}",
            due.busy
        );
    }

    #[test]
    fn a_half_open_endpoint_gets_one_probe_until_its_outcome() {
        let mut s = State::default();
        s.enqueue("a", &jobs("a", Some("e"), 4));
        let first = take(&mut s, 1, T0);
        let opened = commit(
            &mut s,
            &first.jobs[0].lease,
            vec![health("a", "e", Signal::Failure)],
            T0,
        );
        assert_eq!(opened, [change("a", "e", BreakerState::Open)]);
        assert_eq!(status(&s, "a", "e", T0).held_until_ms, Some(T0 + 1000));

        let cooling = take(&mut s, 10, T0 + 500);
        assert!(cooling.jobs.is_empty());
        assert_eq!(cooling.next_due, Some(Duration::from_millis(500)));

        let probe = take(&mut s, 10, T0 + 1000);
        assert_eq!(ids(&probe), ["a/e/1"], "one probe");
        assert_eq!(
            status(&s, "a", "e", T0 + 1000).state,
            BreakerState::HalfOpen
        );
        assert!(take(&mut s, 10, T0 + 2000).jobs.is_empty());

        let closed = commit(
            &mut s,
            &probe.jobs[0].lease,
            vec![health("a", "e", Signal::Success)],
            T0 + 2000,
        );
        assert_eq!(closed, [change("a", "e", BreakerState::Closed)]);
        assert_eq!(ids(&take(&mut s, 10, T0 + 2000)), ["a/e/2", "a/e/3"]);
    }

    #[test]
    fn a_failed_probe_reopens_for_longer_and_one_without_a_verdict_is_sent_again() {
        let mut s = State::default();
        s.enqueue("a", &jobs("a", Some("e"), 3));
        // Health counts without a lease: what the endpoint said is true.
        commit(&mut s, "none", vec![health("a", "e", Signal::Failure)], T0);

        let probe = take(&mut s, 10, T0 + 1000);
        assert_eq!(ids(&probe), ["a/e/0"]);
        commit(
            &mut s,
            &probe.jobs[0].lease,
            vec![Effect::Count(Stat::Dropped)],
            T0 + 1100,
        );
        assert_eq!(
            status(&s, "a", "e", T0 + 1100).state,
            BreakerState::HalfOpen
        );
        let second = take(&mut s, 10, T0 + 1100);
        assert_eq!(ids(&second), ["a/e/1"], "the next probe, at once");

        let reopened = commit(
            &mut s,
            &second.jobs[0].lease,
            vec![health("a", "e", Signal::Failure)],
            T0 + 1200,
        );
        assert_eq!(reopened, [change("a", "e", BreakerState::Open)]);
        assert_eq!(
            status(&s, "a", "e", T0 + 1200).held_until_ms,
            Some(T0 + 3200)
        );
        assert!(take(&mut s, 10, T0 + 3199).jobs.is_empty());
        assert_eq!(ids(&take(&mut s, 10, T0 + 3200)), ["a/e/2"]);
    }

    #[test]
    fn a_lapsed_probe_is_sent_again() {
        let mut s = State::default();
        s.enqueue("a", &jobs("a", Some("e"), 2));
        commit(&mut s, "none", vec![health("a", "e", Signal::Failure)], T0);
        let probe = take(&mut s, 10, T0 + 1000);
        assert_eq!(ids(&probe), ["a/e/0"]);
        assert_eq!(probe.next_due, Some(Duration::from_secs(30)));
        let again = take(&mut s, 10, T0 + 31_000);
        assert_eq!(ids(&again), ["a/e/0"], "the same job, alone");
    }

    #[test]
    fn a_rate_limit_admits_its_burst_then_holds() {
        let mut s = State::default();
        let mut t = tenancy(8);
        t.endpoints = vec![EndpointTenancy {
            app: "a".into(),
            endpoint: "e".into(),
            max_in_flight: 1000,
            rate_limit: Some(RateLimit {
                count: 10,
                per: Duration::from_secs(1),
                burst: 1,
            }),
            ordered: false,
            keyed: false,
            batch: None,
        }];
        s.configure(&t);
        s.enqueue("a", &jobs("a", Some("e"), 5));
        let first = take(&mut s, 10, 0);
        assert_eq!(ids(&first), ["a/e/0"]);
        assert_eq!(first.next_due, Some(Duration::from_millis(100)));
        assert_eq!(status(&s, "a", "e", 0).held_until_ms, Some(100));
        assert!(take(&mut s, 10, 50).jobs.is_empty());
        assert_eq!(ids(&take(&mut s, 10, 100)), ["a/e/1"]);
        // Each hold for the limit is counted, per endpoint and in the stats.
        assert_eq!(status(&s, "a", "e", 100).rate_limited_waits, 2);
        assert_eq!(s.stats.get("rate_limited"), Some(&2));
    }

    #[test]
    fn the_oldest_ready_age_counts_from_joining_or_the_last_turn() {
        let mut s = State::default();
        assert_eq!(s.depth(now_ms()).oldest_ready_ms, 0);
        s.enqueue("a", &jobs("a", None, 2));
        let at = now_ms() + 5_000;
        let before = s.depth(at).oldest_ready_ms;
        assert!(before >= 5_000);
        // A turn that leaves work: the wait starts again from the turn.
        take(&mut s, 1, T0);
        let after = s.depth(at).oldest_ready_ms;
        assert!(after <= before && after <= 5_000);
        // Nothing left ready: no wait.
        take(&mut s, 10, T0);
        assert_eq!(s.depth(at).oldest_ready_ms, 0);
    }

    #[test]
    fn slow_down_holds_the_endpoint_no_longer_than_max_hold() {
        let mut s = State::default();
        s.enqueue("a", &jobs("a", Some("e"), 3));
        let t = take(&mut s, 1, T0);
        let changes = commit(
            &mut s,
            &t.jobs[0].lease,
            vec![health("a", "e", Signal::SlowDown(Duration::from_secs(5)))],
            T0,
        );
        assert!(changes.is_empty());
        // A shorter wait does not shorten the hold.
        commit(
            &mut s,
            "none",
            vec![health("a", "e", Signal::SlowDown(Duration::from_secs(1)))],
            T0,
        );
        assert_eq!(status(&s, "a", "e", T0).held_until_ms, Some(T0 + 5000));
        assert_eq!(s.depth(T0).held, 1);
        assert!(take(&mut s, 10, T0 + 4999).jobs.is_empty());
        assert_eq!(ids(&take(&mut s, 1, T0 + 5000)), ["a/e/1"]);

        commit(
            &mut s,
            "none",
            vec![health(
                "a",
                "e",
                Signal::SlowDown(Duration::from_secs(3600)),
            )],
            T0 + 5000,
        );
        assert_eq!(
            status(&s, "a", "e", T0 + 5000).held_until_ms,
            Some(T0 + 65_000)
        );
    }

    #[test]
    fn a_disabled_endpoints_jobs_come_out_marked() {
        let mut s = State::default();
        s.enqueue("a", &jobs("a", Some("e"), 3));
        let t = take(&mut s, 1, T0);
        let changes = commit(
            &mut s,
            &t.jobs[0].lease,
            vec![health(
                "a",
                "e",
                Signal::Disable("answered 410 Gone".into()),
            )],
            T0,
        );
        assert_eq!(changes, [change("a", "e", BreakerState::Disabled)]);
        let rest = take(&mut s, 10, T0);
        assert_eq!(ids(&rest), ["a/e/1", "a/e/2"]);
        assert!(
            rest.jobs
                .iter()
                .all(|l| l.disabled.as_deref() == Some("answered 410 Gone"))
        );
    }

    #[test]
    fn busy_names_the_endpoints_routing_must_not_send_to() {
        let mut s = State::default();
        s.enqueue("a", &[job("a", None, 0)]);
        s.enqueue("a", &[job("a", Some("waiting"), 0)]);
        commit(
            &mut s,
            "none",
            vec![
                health("a", "held", Signal::SlowDown(Duration::from_secs(5))),
                health("a", "open", Signal::Failure),
                health("a", "fine", Signal::Success),
                health("b", "other", Signal::Failure),
            ],
            T0,
        );
        let request = TakeRequest {
            max: 10,
            endpoint_room: vec![(("a".into(), "waiting".into()), 0)],
            ..TakeRequest::default()
        };
        let t = s.take(&options(), &request, T0);
        assert_eq!(ids(&t), ["a/new/0"]);
        assert_eq!(t.busy.len(), 1);
        assert_eq!(t.busy["a"], ["held", "open", "waiting"]);
    }

    #[test]
    fn depth_counts_every_place_a_job_can_be() {
        let mut s = State::default();
        s.enqueue("a", &jobs("a", None, 2));
        s.enqueue("a", &jobs("a", Some("e"), 3));
        s.enqueue("b", &jobs("b", Some("f"), 1));
        let t = take(&mut s, 1, T0);
        assert_eq!(s.depth(T0).in_flight, 1);
        commit(
            &mut s,
            &t.jobs[0].lease,
            vec![
                Effect::Schedule {
                    job: job("a", None, 0),
                    delay_ms: 1000,
                },
                Effect::DeadLetter(letter(&job("a", None, 0))),
            ],
            T0,
        );
        commit(
            &mut s,
            "none",
            vec![health("b", "f", Signal::SlowDown(Duration::from_secs(10)))],
            T0,
        );
        let depth = s.depth(T0);
        assert_eq!(
            depth,
            Depth {
                ready: 5,
                in_flight: 0,
                delayed: 1,
                held: 1,
                active_apps: 1,
                dead: 1,
                oldest_ready_ms: 0,
            }
        );
        assert_eq!(
            s.app_depth("a", &["e".into(), "unknown".into()]),
            [
                (None, 1),
                (Some("e".into()), 3),
                (Some("unknown".into()), 0)
            ]
        );
        let e = status(&s, "a", "unknown", T0);
        assert_eq!(
            (e.state, e.waiting, e.held_until_ms),
            (BreakerState::Closed, 0, None)
        );
    }

    #[test]
    fn replay_enables_only_a_disabled_endpoint() {
        let mut s = State::default();
        commit(
            &mut s,
            "none",
            vec![
                health("a", "off", Signal::Disable("gone".into())),
                health("a", "open", Signal::Failure),
            ],
            T0,
        );
        for ep in ["off", "open"] {
            s.dead
                .push((format!("{T0}-{ep}"), letter(&job("a", Some(ep), 0))));
            s.replay(&format!("{T0}-{ep}"), &job("a", Some(ep), 0))
                .unwrap();
        }
        assert_eq!(status(&s, "a", "off", T0).state, BreakerState::Closed);
        assert_eq!(status(&s, "a", "open", T0).state, BreakerState::Open);
        assert_eq!(ids(&take(&mut s, 10, T0)), ["a/off/0"]);
    }

    #[tokio::test]
    async fn replay_puts_the_job_back_and_enables_the_endpoint() {
        let q = MemoryQueue::new(options());
        let bell = q.doorbell();
        q.enqueue("a", &[job("a", Some("e"), 0)]).await.unwrap();
        tokio::time::timeout(Duration::from_secs(1), bell.notified())
            .await
            .expect("an enqueue rings the doorbell");

        let request = TakeRequest {
            max: 10,
            ..TakeRequest::default()
        };
        let t = q.take(&request).await.unwrap();
        let failed = t.jobs[0].job.clone().unwrap();
        let changes = q
            .commit(&[Completion {
                lease: t.jobs[0].lease.clone(),
                effects: vec![
                    health("a", "e", Signal::Disable("answered 410 Gone".into())),
                    Effect::DeadLetter(letter(&failed)),
                    Effect::Count(Stat::Dead),
                ],
            }])
            .await
            .unwrap();
        assert_eq!(changes.changes, [change("a", "e", BreakerState::Disabled)]);
        assert_eq!(q.stats().await.unwrap().get("dead"), Some(&1));

        let dead = q.dead_letters(10).await.unwrap();
        assert_eq!(dead.len(), 1);
        let id = dead[0].0.clone();
        assert!(super::super::entry::is_stream_id(&id), "{id}");
        assert_eq!(q.dead_letter(&id).await.unwrap(), Some(dead[0].1.clone()));

        q.replay(&id, &failed).await.unwrap();
        assert!(q.dead_letters(10).await.unwrap().is_empty());
        assert!(matches!(
            q.replay(&id, &failed).await,
            Err(QueueError::NoSuchDeadLetter(_))
        ));
        let which = [("a".to_string(), "e".to_string())];
        let e = q.endpoints(&which).await.unwrap().remove(0);
        assert_eq!(
            (e.state, e.waiting, e.reason),
            (BreakerState::Closed, 1, None)
        );
        let again = q.take(&request).await.unwrap();
        assert_eq!(again.jobs.len(), 1);
        assert_eq!(again.jobs[0].job.as_ref().unwrap().id, failed.id);
        assert_eq!(again.jobs[0].disabled, None);
        assert_eq!(q.depth().await.unwrap().in_flight, 1);
    }

    #[tokio::test]
    async fn reset_endpoint_ends_a_hold_and_rings() {
        let q = MemoryQueue::new(options());
        q.enqueue("a", &jobs("a", Some("e"), 2)).await.unwrap();
        q.commit(&[Completion {
            lease: "none".into(),
            effects: vec![health("a", "e", Signal::Failure)],
        }])
        .await
        .unwrap();
        let request = TakeRequest {
            max: 10,
            ..TakeRequest::default()
        };
        assert!(
            q.take(&request).await.unwrap().jobs.is_empty(),
            "open: held"
        );
        let bell = q.doorbell();
        let rung = bell.notified();
        tokio::pin!(rung);
        rung.as_mut().enable();
        q.reset_endpoint("a", "e").await.unwrap();
        tokio::time::timeout(Duration::from_secs(1), rung)
            .await
            .expect("a reset rings the doorbell");
        assert_eq!(q.take(&request).await.unwrap().jobs.len(), 2);
        assert_eq!(
            q.app_depth("a", &["e".into()]).await.unwrap(),
            [(None, 0), (Some("e".into()), 0)]
        );
        q.ping().await.unwrap();
    }

    #[tokio::test]
    async fn an_idempotency_key_answers_only_the_request_it_was_used_with() {
        let q = MemoryQueue::new(options());
        let ttl = Duration::from_secs(60);
        let begin =
            |key: &'static str, fp: &'static str| q.idempotency_begin("app-1", key, fp, ttl);
        assert_eq!(begin("k", "body-a").await.unwrap(), Idempotency::New);
        assert_eq!(begin("k", "body-a").await.unwrap(), Idempotency::InProgress);
        assert_eq!(begin("k", "body-b").await.unwrap(), Idempotency::Mismatch);
        q.idempotency_finish("app-1", "k", "body-a", "{\"ids\":[\"m1\"]}", ttl)
            .await
            .unwrap();
        assert_eq!(
            begin("k", "body-a").await.unwrap(),
            Idempotency::Done("{\"ids\":[\"m1\"]}".into())
        );
        assert_eq!(begin("k", "body-b").await.unwrap(), Idempotency::Mismatch);
        // Keys are per app.
        assert_eq!(
            q.idempotency_begin("app-2", "k", "body-b", ttl)
                .await
                .unwrap(),
            Idempotency::New
        );
    }
}
