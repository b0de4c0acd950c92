//! The Redis backend. The scheduling state and the jobs live under one hash
//! tag; every operation that changes them is one Lua script (`lua/`), so it
//! is atomic and touches one Redis Cluster slot. Raw producers XADD to an
//! inbox stream that workers read through the consumer group [`GROUP`].
//!
//! Connections (`link`): one multiplexed connection for every command, one
//! for the doorbell subscription, and one for the blocking inbox read: the
//! same three whatever the number of apps (and one more for durable writes
//! when replicas are waited for). The same code runs on one server and on a
//! Redis Cluster.

mod link;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use redis::streams::{StreamAutoClaimReply, StreamId, StreamRangeReply, StreamReadReply};
use redis::{Script, Value};

pub use self::link::RedisTarget;
use self::link::{Conn, Link};

use super::entry::{self, DEAD_FIELD, DeadLetter, Entry, JOB_FIELD};
use super::keys::shard_of;
use super::{
    Committed, Completion, Depth, Effect, EndpointStatus, GROUP, IDEMPOTENCY_CLAIM, Idempotency,
    Keys, Leased, QueueError, QueueOptions, StateChange, TakeRequest, Taken, Tenancy,
};
use crate::breaker::{Signal, State};
use crate::event::Job;

/// Marks an Idempotency-Key whose request is still being handled; the
/// request's fingerprint follows it.
const PENDING: &str = "\u{0}pending";

const COMMON: &str = include_str!("../lua/common.lua");

struct Scripts {
    admit: Script,
    take: Script,
    commit: Script,
    configure: Script,
    replay: Script,
    reset: Script,
    status: Script,
}

impl Scripts {
    fn new() -> Scripts {
        let s = |body: &str| Script::new(&format!("{COMMON}\n{body}"));
        Scripts {
            admit: s(include_str!("../lua/admit.lua")),
            take: s(include_str!("../lua/take.lua")),
            commit: s(include_str!("../lua/commit.lua")),
            configure: s(include_str!("../lua/configure.lua")),
            replay: s(include_str!("../lua/replay.lua")),
            reset: s(include_str!("../lua/reset.lua")),
            status: s(include_str!("../lua/status.lua")),
        }
    }
}

#[derive(Clone)]
pub struct RedisQueue {
    link: Arc<Link>,
    /// Shard 0's: also the inbox, the doorbell and idempotency keys.
    keys: Keys,
    /// Every shard's, by number.
    shards: Arc<Vec<Keys>>,
    /// The shard the next take starts at.
    next_shard: Arc<AtomicUsize>,
    options: Arc<QueueOptions>,
    scripts: Arc<Scripts>,
}

impl RedisQueue {
    /// Connects lazily: a Redis that is down at start is retried on use, so
    /// the ingest can answer 503 and the worker can wait for it.
    pub fn connect(
        target: RedisTarget,
        keys: Keys,
        options: QueueOptions,
    ) -> Result<Self, QueueError> {
        let shards = (0..target.shards.max(1) as usize)
            .map(|n| keys.shard(n))
            .collect();
        Ok(RedisQueue {
            link: Arc::new(Link::open(target)?),
            keys,
            shards: Arc::new(shards),
            next_shard: Arc::new(AtomicUsize::new(0)),
            options: Arc::new(options),
            scripts: Arc::new(Scripts::new()),
        })
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// The keys of the shard that holds `app`.
    fn keys_of(&self, app: &str) -> &Keys {
        &self.shards[shard_of(app, self.shards.len())]
    }

    /// Refuses a queue made with another number of shards: its apps' jobs
    /// would be looked for in the wrong place. The first process records it.
    pub async fn check_layout(&self) -> Result<(), QueueError> {
        let n = self.shards.len();
        let mut conn = self.conn();
        let _: () = redis::cmd("SET")
            .arg(self.keys.layout())
            .arg(n)
            .arg("NX")
            .query_async(&mut conn)
            .await?;
        let stored: Option<usize> = redis::cmd("GET")
            .arg(self.keys.layout())
            .query_async(&mut conn)
            .await?;
        match stored {
            Some(m) if m != n => Err(QueueError::Layout {
                configured: n,
                stored: m,
            }),
            _ => Ok(()),
        }
    }

    fn conn(&self) -> Conn {
        self.link.conn()
    }

    /// Logs in once: Err only when Redis answers and refuses the
    /// credentials (a Redis that cannot be reached now is retried on use).
    pub async fn check_login(&self) -> Result<(), QueueError> {
        let login = self.link.ping_a_node();
        let refused = |why: &str| Err(QueueError::LoginRefused(why.to_string()));
        match tokio::time::timeout(Duration::from_secs(5), login).await {
            Ok(Err(e)) if e.kind() == redis::ErrorKind::AuthenticationFailed => {
                refused("WRONGPASS: the user or the password is wrong")
            }
            Ok(Err(e)) if e.code() == Some("WRONGPASS") => {
                refused("WRONGPASS: the user or the password is wrong")
            }
            Ok(Err(e)) if e.code() == Some("NOAUTH") => {
                refused("NOAUTH: Redis needs a password and none was given")
            }
            Ok(Err(e)) if e.code() == Some("NOPERM") => {
                refused("NOPERM: the user may not run the commands wasmhook needs")
            }
            _ => Ok(()),
        }
    }

    fn invoke<'a>(&'a self, script: &'a Script, keys: &Keys) -> redis::ScriptInvocation<'a> {
        let mut inv = script.prepare_invoke();
        // The one key names the shard's slot; the scripts build the others
        // from its prefix.
        inv.key(keys.key("ready"))
            .arg(keys.base())
            .arg(self.keys.doorbell());
        inv
    }

    pub(super) async fn enqueue(&self, app: &str, jobs: &[Job]) -> Result<(), QueueError> {
        let encoded: Vec<(String, String)> = jobs
            .iter()
            .map(|j| (j.endpoint.clone().unwrap_or_default(), entry::encode(j)))
            .collect();
        // Accepted events are acknowledged to their producer: stored on as
        // many replicas as the config asks before that.
        let jobs = app_jobs(app, &encoded);
        let keys = self.keys_of(app);
        self.link
            .durable_write(&keys.key("ready"), async |conn| {
                self.admit(conn, keys, jobs, &[], &[]).await
            })
            .await
    }

    /// Queues jobs `(app, partition, json)`, dead-letters letters, and acks
    /// inbox entries, in one step, in the shard of `keys` (inbox entries:
    /// shard 0's only).
    async fn admit(
        &self,
        conn: &mut Conn,
        keys: &Keys,
        jobs: Vec<(&str, &str, &str)>,
        dead: &[String],
        inbox_ids: &[String],
    ) -> Result<(), QueueError> {
        let mut inv = self.invoke(&self.scripts.admit, keys);
        inv.arg(if inbox_ids.is_empty() {
            String::new()
        } else {
            self.keys.inbox()
        });
        inv.arg(jobs.len());
        for (app, part, job) in jobs {
            inv.arg(app).arg(part).arg(job);
        }
        inv.arg(dead.len());
        for d in dead {
            inv.arg(d);
        }
        inv.arg(inbox_ids.len());
        for id in inbox_ids {
            inv.arg(id);
        }
        inv.invoke_async::<()>(conn).await?;
        Ok(())
    }

    pub(super) async fn configure(&self, t: &Tenancy) -> Result<(), QueueError> {
        for keys in self.shards.iter() {
            self.configure_shard(keys, t).await?;
        }
        Ok(())
    }

    async fn configure_shard(&self, keys: &Keys, t: &Tenancy) -> Result<(), QueueError> {
        let mut inv = self.invoke(&self.scripts.configure, keys);
        inv.arg(format!(
            "{} {} {} {}",
            t.quantum.max(1),
            t.app_weight.max(1),
            t.app_max_in_flight,
            t.endpoint_max_in_flight
        ));
        for (app, weight, cap) in &t.apps {
            inv.arg(format!("a:{app}"))
                .arg(format!("{} {cap}", weight.max(&1)));
        }
        let mut ordered_apps = std::collections::BTreeSet::new();
        for e in &t.endpoints {
            let (interval, tolerance) = e
                .rate_limit
                .map_or((0.0, 0.0), |r| (r.interval_ms(), r.tolerance_ms()));
            let (events, wait, bytes) = e.batch.map_or((0, 0, 0), |b| {
                (b.max_events, b.max_wait.as_millis() as u64, b.max_bytes)
            });
            // Ordered: '1' one order for the endpoint, 'k' one per key (the
            // keys live in the commit script), '0' none.
            let order = match (e.ordered, e.keyed) {
                (true, true) => "k",
                (true, false) => "1",
                (false, _) => "0",
            };
            inv.arg(format!("e:{}|{}", e.app, e.endpoint)).arg(format!(
                "{} {interval} {tolerance} {order} {events} {wait} {bytes}",
                e.max_in_flight,
            ));
            if e.ordered {
                ordered_apps.insert(&e.app);
            }
        }
        // Apps whose new events are taken one at a time (routing keeps their
        // order for their ordered endpoints).
        for app in ordered_apps {
            inv.arg(format!("o:{app}")).arg("1");
        }
        inv.invoke_async::<()>(&mut self.conn()).await?;
        Ok(())
    }

    /// Takes from the shards in turn, starting one further each call, until
    /// `r.max` jobs are taken or every shard was asked.
    pub(super) async fn take(&self, r: &TakeRequest) -> Result<Taken, QueueError> {
        let n = self.shards.len();
        if n == 1 {
            return self.take_shard(0, r).await;
        }
        let start = self.next_shard.fetch_add(1, Ordering::Relaxed) % n;
        let mut all = Taken::default();
        let mut request = r.clone();
        for i in 0..n {
            let shard = (start + i) % n;
            if request.max == 0 {
                // Work may be left in the shards not asked.
                all.more = true;
                break;
            }
            let taken = self.take_shard(shard, &request).await?;
            request.max -= taken.jobs.len().min(request.max);
            all.jobs.extend(taken.jobs);
            all.busy.extend(taken.busy);
            all.more |= taken.more;
            all.next_due = match (all.next_due, taken.next_due) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
        Ok(all)
    }

    async fn take_shard(&self, shard: usize, r: &TakeRequest) -> Result<Taken, QueueError> {
        let keys = &self.shards[shard];
        let mut inv = self.invoke(&self.scripts.take, keys);
        inv.arg(r.max)
            .arg(self.options.lease.as_millis() as u64)
            .arg(r.app_room.len());
        for (app, room) in &r.app_room {
            inv.arg(app).arg(room);
        }
        inv.arg(r.endpoint_room.len());
        for ((app, ep), room) in &r.endpoint_room {
            inv.arg(format!("{app}|{ep}")).arg(room);
        }
        inv.arg(r.intake_room.len());
        for (app, room) in &r.intake_room {
            inv.arg(app).arg(room);
        }
        let reply: Vec<Value> = inv.invoke_async(&mut self.conn()).await?;
        let (mut taken, leases) = parse_taken(reply, shard)?;
        if leases.is_empty() {
            return Ok(taken);
        }
        // The jobs themselves, read outside the script: they never pass
        // through Lua on the way out.
        let mut cmd = redis::cmd("HMGET");
        cmd.arg(keys.key("jobs"));
        for (_, _, job_id, _) in &leases {
            cmd.arg(job_id);
        }
        let bodies: Vec<Option<Vec<u8>>> = cmd.query_async(&mut self.conn()).await?;
        if bodies.len() != leases.len() {
            return Err(QueueError::Corrupt("job bodies reply".into()));
        }
        for ((lease, (app, part), job_id, disabled), body) in leases.into_iter().zip(bodies) {
            let raw = body.map(bytes::Bytes::from);
            let job = match &raw {
                Some(raw) => entry::decode(&format!("0-{job_id}"), Some(raw)),
                None => Err(entry::Malformed {
                    raw: String::new(),
                    reason: format!("job {job_id} has no stored body"),
                }),
            };
            taken.jobs.push(Leased {
                lease,
                app,
                endpoint: (!part.is_empty()).then_some(part),
                job,
                raw,
                disabled,
            });
        }
        Ok(taken)
    }

    /// Commits each shard's completions (a lease names its shard) with one
    /// script call per shard.
    pub(super) async fn commit(&self, completions: &[Completion]) -> Result<Committed, QueueError> {
        let mut by_shard: BTreeMap<usize, Vec<(&str, &Completion)>> = BTreeMap::new();
        for c in completions {
            // A lease that names no shard of ours was never handed out: shard
            // 0's script records nothing for it (but the breaker signal).
            let (shard, lease) = split_lease(&c.lease)
                .filter(|(shard, _)| *shard < self.shards.len())
                .unwrap_or((0, c.lease.as_str()));
            by_shard.entry(shard).or_default().push((lease, c));
        }
        let mut all = Committed::default();
        for (shard, part) in by_shard {
            let one = self.commit_shard(&self.shards[shard], &part).await?;
            all.changes.extend(one.changes);
            all.freed |= one.freed;
        }
        Ok(all)
    }

    async fn commit_shard(
        &self,
        keys: &Keys,
        completions: &[(&str, &Completion)],
    ) -> Result<Committed, QueueError> {
        let b = &self.options.breaker;
        let mut inv = self.invoke(&self.scripts.commit, keys);
        inv.arg(format!(
            "{} {} {} {} {} {} {}",
            b.failure_rate,
            b.min_requests,
            b.window.as_millis(),
            b.consecutive_failures,
            b.cool_down.as_millis(),
            b.max_cool_down.as_millis(),
            b.disable_after.as_millis()
        ))
        .arg(format!(
            "failing without a success for {}",
            humantime::format_duration(b.disable_after)
        ))
        .arg(self.options.max_hold.as_millis() as u64)
        .arg(completions.len());
        for (lease, _) in completions {
            inv.arg(*lease);
        }
        // Successes are counted per endpoint, not per job: a run of them is
        // sent as one signal, before the endpoint's next other signal or at
        // the end.
        let mut successes: BTreeMap<(&str, &str), u64> = BTreeMap::new();
        for (_, c) in completions {
            let stats: Vec<&str> = c
                .effects
                .iter()
                .filter_map(|e| match e {
                    Effect::Count(stat) => Some(stat.name()),
                    _ => None,
                })
                .collect();
            let mut sent: Vec<Vec<String>> = Vec::new();
            for effect in &c.effects {
                match effect {
                    Effect::Count(_) => {}
                    Effect::Health {
                        app,
                        endpoint,
                        signal: Signal::Success,
                    } => *successes.entry((app, endpoint)).or_default() += 1,
                    Effect::Health {
                        app,
                        endpoint,
                        signal,
                    } => {
                        if let Some(n) = successes.remove(&(app.as_str(), endpoint.as_str())) {
                            sent.push(health_args(app, endpoint, "ok", n.to_string()));
                        }
                        let (name, arg) = match signal {
                            Signal::Success => ("ok", "1".to_string()),
                            Signal::Failure => ("fail", String::new()),
                            Signal::SlowDown(d) => ("slow", d.as_millis().to_string()),
                            Signal::Disable(reason) => ("off", reason.clone()),
                        };
                        sent.push(health_args(app, endpoint, name, arg));
                    }
                    Effect::Enqueue(job) => sent.push(vec![
                        "E".into(),
                        job.app_id.clone(),
                        job.endpoint.clone().unwrap_or_default(),
                        // An ordering key: the job waits behind its key's.
                        job.order_key
                            .as_ref()
                            .filter(|_| job.endpoint.is_some())
                            .map_or_else(String::new, |k| format!("k{k}")),
                        entry::encode(job),
                    ]),
                    Effect::Schedule { job, delay_ms } => sent.push(later("S", *delay_ms, job)),
                    Effect::Front { job, delay_ms } => sent.push(later("F", *delay_ms, job)),
                    Effect::DeadLetter(letter) => {
                        sent.push(vec!["D".into(), encode_letter(letter)])
                    }
                }
            }
            inv.arg(stats.join(",")).arg(sent.len());
            for args in sent {
                inv.arg(args);
            }
        }
        inv.arg(successes.len());
        for ((app, endpoint), n) in successes {
            inv.arg(app).arg(endpoint).arg(n);
        }
        let reply: Vec<String> = inv.invoke_async(&mut self.conn()).await?;
        let Some((freed, reply)) = reply.split_first() else {
            return Err(QueueError::Corrupt("empty commit reply".into()));
        };
        let changes = reply
            .chunks_exact(3)
            .map(|c| StateChange {
                app: c[0].clone(),
                endpoint: c[1].clone(),
                state: if c[2] == "closed" {
                    State::Closed
                } else {
                    State::parse(&c[2])
                },
            })
            .collect();
        Ok(Committed {
            changes,
            freed: freed == "1",
        })
    }

    pub(super) async fn doorbell(&self) -> Result<RedisDoorbell, QueueError> {
        Ok(RedisDoorbell {
            link: self.link.clone(),
            channel: self.keys.doorbell(),
            sub: None,
            turn: 0,
        })
    }

    /// Dead letters of every shard, oldest first. With more than one shard
    /// an id names its shard: `<shard>:<stream id>`.
    pub(super) async fn dead_letters(
        &self,
        count: usize,
    ) -> Result<Vec<(String, DeadLetter)>, QueueError> {
        let mut all: Vec<((u64, u64), String, StreamId)> = Vec::new();
        for (shard, keys) in self.shards.iter().enumerate() {
            let reply: StreamRangeReply = redis::cmd("XRANGE")
                .arg(keys.dlq())
                .arg("-")
                .arg("+")
                .arg("COUNT")
                .arg(count.max(1))
                .query_async(&mut self.conn())
                .await?;
            for s in reply.ids {
                let order = stream_order(&s.id);
                all.push((order, self.dlq_id(shard, &s.id), s));
            }
        }
        all.sort_by_key(|a| a.0);
        all.into_iter()
            .take(count.max(1))
            .map(|(_, id, s)| to_dead_letter(s).map(|(_, letter)| (id, letter)))
            .collect()
    }

    /// A dead letter's id as shown: the stream id, with its shard when
    /// there is more than one.
    fn dlq_id(&self, shard: usize, stream_id: &str) -> String {
        if self.shards.len() == 1 {
            stream_id.to_string()
        } else {
            format!("{shard}:{stream_id}")
        }
    }

    /// The shard's keys and the stream id of a dead letter id.
    fn dlq_shard<'a>(&self, id: &'a str) -> Result<(&Keys, &'a str), QueueError> {
        let (shard, stream_id) = match id.split_once(':') {
            Some((shard, rest)) => (shard.parse::<usize>().ok(), rest),
            None => (Some(0), id),
        };
        match shard.and_then(|n| self.shards.get(n)) {
            Some(keys) => Ok((keys, stream_id)),
            None => Err(QueueError::NoSuchDeadLetter(id.into())),
        }
    }

    pub(super) async fn dead_letter(&self, id: &str) -> Result<Option<DeadLetter>, QueueError> {
        let (keys, stream_id) = self.dlq_shard(id)?;
        let reply: StreamRangeReply = redis::cmd("XRANGE")
            .arg(keys.dlq())
            .arg(stream_id)
            .arg(stream_id)
            .query_async(&mut self.conn())
            .await?;
        reply
            .ids
            .into_iter()
            .next()
            .map(|s| to_dead_letter(s).map(|(_, l)| l))
            .transpose()
    }

    /// Replays in the dead letter's shard (an app's letters are in its own).
    pub(super) async fn replay(&self, id: &str, job: &Job) -> Result<(), QueueError> {
        let (keys, stream_id) = self.dlq_shard(id)?;
        let mut inv = self.invoke(&self.scripts.replay, keys);
        inv.arg(stream_id)
            .arg(&job.app_id)
            .arg(job.endpoint.as_deref().unwrap_or(""))
            .arg(entry::encode(job));
        let done: i64 = inv.invoke_async(&mut self.conn()).await?;
        if done == 0 {
            return Err(QueueError::NoSuchDeadLetter(id.into()));
        }
        Ok(())
    }

    /// Outcome counters, summed over the shards.
    pub(super) async fn stats(&self) -> Result<BTreeMap<String, u64>, QueueError> {
        let mut sum = BTreeMap::new();
        for keys in self.shards.iter() {
            let one: BTreeMap<String, u64> = redis::cmd("HGETALL")
                .arg(keys.key("stats"))
                .query_async(&mut self.conn())
                .await?;
            for (k, v) in one {
                *sum.entry(k).or_insert(0) += v;
            }
        }
        Ok(sum)
    }

    /// The queue's depth, summed over the shards (the oldest wait: the
    /// longest of them). One pipeline per shard, whatever the number of apps.
    pub(super) async fn depth(&self) -> Result<Depth, QueueError> {
        let mut sum = Depth::default();
        for keys in self.shards.iter() {
            let d = self.shard_depth(keys).await?;
            sum.ready += d.ready;
            sum.in_flight += d.in_flight;
            sum.delayed += d.delayed;
            sum.held += d.held;
            sum.active_apps += d.active_apps;
            sum.dead += d.dead;
            sum.oldest_ready_ms = sum.oldest_ready_ms.max(d.oldest_ready_ms);
        }
        Ok(sum)
    }

    async fn shard_depth(&self, keys: &Keys) -> Result<Depth, QueueError> {
        let k = |n: &str| keys.key(n);
        type Reply = (
            Option<i64>,
            Option<i64>,
            u64,
            u64,
            u64,
            u64,
            Vec<(String, f64)>,
            (u64, u64),
        );
        let (ready, in_flight, delayed, held, active_apps, dead, waiting, now): Reply =
            redis::pipe()
                .get(k("count"))
                .get(k("inflight"))
                .zcard(k("delayed"))
                .zcard(k("held"))
                .zcard(k("ready"))
                .cmd("XLEN")
                .arg(k("dlq"))
                .zrange_withscores(k("waiting"), 0, 0)
                .cmd("TIME")
                .query_async(&mut self.conn())
                .await?;
        Ok(Depth {
            ready: ready.unwrap_or(0).max(0) as u64,
            in_flight: in_flight.unwrap_or(0).max(0) as u64,
            delayed,
            held,
            active_apps,
            dead,
            oldest_ready_ms: waiting.first().map_or(0, |(_, since)| {
                // Redis's clock, as the scripts use it.
                let now_ms = now.0 * 1000 + now.1 / 1000;
                now_ms.saturating_sub(since.max(0.0) as u64)
            }),
        })
    }

    pub(super) async fn app_depth(
        &self,
        app: &str,
        endpoints: &[String],
    ) -> Result<Vec<(Option<String>, u64)>, QueueError> {
        let parts: Vec<Option<String>> = std::iter::once(None)
            .chain(endpoints.iter().cloned().map(Some))
            .collect();
        let keys = self.keys_of(app);
        let mut pipe = redis::pipe();
        for p in &parts {
            pipe.llen(keys.list(app, p.as_deref()));
        }
        let lens: Vec<u64> = pipe.query_async(&mut self.conn()).await?;
        Ok(parts.into_iter().zip(lens).collect())
    }

    /// Endpoint states, asked of each app's shard; in the order asked.
    pub(super) async fn endpoints(
        &self,
        which: &[(String, String)],
    ) -> Result<Vec<EndpointStatus>, QueueError> {
        // Per shard: (place in `which`, (app, endpoint)).
        type Asked = Vec<(usize, (String, String))>;
        let mut by_shard: BTreeMap<usize, Asked> = BTreeMap::new();
        for (i, pair) in which.iter().enumerate() {
            by_shard
                .entry(shard_of(&pair.0, self.shards.len()))
                .or_default()
                .push((i, pair.clone()));
        }
        let mut out: Vec<Option<EndpointStatus>> = vec![None; which.len()];
        for (shard, asked) in by_shard {
            let pairs: Vec<(String, String)> = asked.iter().map(|(_, p)| p.clone()).collect();
            let states = self.shard_endpoints(&self.shards[shard], &pairs).await?;
            for ((i, _), state) in asked.into_iter().zip(states) {
                out[i] = Some(state);
            }
        }
        Ok(out.into_iter().flatten().collect())
    }

    async fn shard_endpoints(
        &self,
        keys: &Keys,
        which: &[(String, String)],
    ) -> Result<Vec<EndpointStatus>, QueueError> {
        let mut out = Vec::with_capacity(which.len());
        for chunk in which.chunks(500) {
            let mut inv = self.invoke(&self.scripts.status, keys);
            inv.arg(self.options.breaker.window.as_millis() as u64)
                .arg(chunk.len());
            for (app, ep) in chunk {
                inv.arg(app).arg(ep);
            }
            let reply: Vec<Value> = inv.invoke_async(&mut self.conn()).await?;
            if reply.len() != chunk.len() * 9 {
                return Err(QueueError::Corrupt("endpoint status reply".into()));
            }
            for ((app, ep), f) in chunk.iter().zip(reply.chunks_exact(9)) {
                let text = |v: &Value| redis::from_redis_value_ref::<String>(v).unwrap_or_default();
                let num =
                    |v: &Value| redis::from_redis_value_ref::<i64>(v).unwrap_or(0).max(0) as u64;
                let opt = |n: u64| (n > 0).then_some(n);
                let reason = text(&f[7]);
                out.push(EndpointStatus {
                    app: app.clone(),
                    endpoint: ep.clone(),
                    state: State::parse(&text(&f[0])),
                    waiting: num(&f[1]),
                    requests: num(&f[2]) as u32,
                    failures: num(&f[3]) as u32,
                    consecutive_failures: num(&f[4]) as u32,
                    failing_since_ms: opt(num(&f[5])),
                    held_until_ms: opt(num(&f[6])),
                    reason: (!reason.is_empty()).then_some(reason),
                    rate_limited_waits: num(&f[8]),
                });
            }
        }
        Ok(out)
    }

    pub(super) async fn reset_endpoint(&self, app: &str, endpoint: &str) -> Result<(), QueueError> {
        let mut inv = self.invoke(&self.scripts.reset, self.keys_of(app));
        inv.arg(app).arg(endpoint);
        inv.invoke_async::<()>(&mut self.conn()).await?;
        Ok(())
    }

    pub(super) async fn ping(&self) -> Result<(), QueueError> {
        redis::cmd("PING")
            .query_async::<()>(&mut self.conn())
            .await?;
        Ok(())
    }

    /// Makes sure the inbox stream and its consumer group exist.
    pub async fn prepare_inbox(&self) -> Result<(), QueueError> {
        let created: Result<(), redis::RedisError> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(self.keys.inbox())
            .arg(GROUP)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut self.conn())
            .await;
        match created {
            Err(e) if e.code() != Some("BUSYGROUP") => Err(e.into()),
            _ => Ok(()),
        }
    }

    /// A reader of the inbox with a connection of its own (a blocking read
    /// holds it).
    pub async fn inbox_reader(&self, consumer: &str) -> Result<InboxReader, QueueError> {
        Ok(InboxReader {
            conn: self.link.own().await?,
            queue: self.clone(),
            consumer: consumer.to_string(),
        })
    }

    /// Queues what was read from the inbox: jobs of known apps go to their
    /// partitions; malformed entries and jobs for unknown apps are
    /// dead-lettered with the reason; the entries are acknowledged in the
    /// same step.
    pub async fn admit_inbox(
        &self,
        entries: Vec<Entry>,
        known_app: impl Fn(&str) -> bool,
    ) -> Result<(), QueueError> {
        let now = crate::event::now_ms();
        let mut jobs = Vec::new();
        let mut dead = Vec::new();
        let ids: Vec<String> = entries.iter().map(|e| e.id.clone()).collect();
        for e in entries {
            match e.job {
                Ok(job) if known_app(&job.app_id) => {
                    let part = job.endpoint.clone().unwrap_or_default();
                    jobs.push((job.app_id.clone(), part, entry::encode(&job)));
                }
                Ok(job) => {
                    let reason = format!("unknown app {:?}", job.app_id);
                    dead.push(encode_letter(&DeadLetter {
                        reason,
                        status: None,
                        response_body: None,
                        attempts: job.attempt,
                        dead_at_ms: now,
                        job: Some(job),
                        raw: None,
                    }));
                }
                Err(m) => dead.push(encode_letter(&DeadLetter::malformed(&m, now))),
            }
        }
        // Other shards' jobs first; then shard 0's with the dead letters and
        // the acks. A crash in between reads the entries again: at least once.
        let mut by_shard: BTreeMap<usize, Vec<(&str, &str, &str)>> = BTreeMap::new();
        for (a, p, j) in &jobs {
            by_shard
                .entry(shard_of(a, self.shards.len()))
                .or_default()
                .push((a.as_str(), p.as_str(), j.as_str()));
        }
        let own = by_shard.remove(&0).unwrap_or_default();
        for (shard, refs) in by_shard {
            self.admit(&mut self.conn(), &self.shards[shard], refs, &[], &[])
                .await?;
        }
        self.admit(&mut self.conn(), &self.keys, own, &dead, &ids)
            .await
    }

    pub(super) async fn idempotency_begin(
        &self,
        app: &str,
        key: &str,
        fingerprint: &str,
        _ttl: Duration,
    ) -> Result<Idempotency, QueueError> {
        let k = self.keys.idempotency(app, key);
        let mut conn = self.conn();
        for _ in 0..3 {
            let claimed: Option<String> = redis::cmd("SET")
                .arg(&k)
                .arg(format!("{PENDING}:{fingerprint}"))
                .arg("NX")
                .arg("PX")
                .arg(IDEMPOTENCY_CLAIM.as_millis() as u64)
                .query_async(&mut conn)
                .await?;
            if claimed.is_some() {
                return Ok(Idempotency::New);
            }
            let current: Option<String> = redis::cmd("GET").arg(&k).query_async(&mut conn).await?;
            match current {
                Some(v) => return Ok(idempotency_state(&v, fingerprint)),
                None => continue, // expired between the two calls
            }
        }
        Ok(Idempotency::InProgress)
    }

    pub(super) async fn idempotency_finish(
        &self,
        app: &str,
        key: &str,
        fingerprint: &str,
        answer: &str,
        ttl: Duration,
    ) -> Result<(), QueueError> {
        redis::cmd("SET")
            .arg(self.keys.idempotency(app, key))
            .arg(format!("{fingerprint}\n{answer}"))
            .arg("PX")
            .arg(ttl.as_millis() as u64)
            .query_async::<()>(&mut self.conn())
            .await?;
        Ok(())
    }

    pub(super) async fn idempotency_abort(&self, app: &str, key: &str) -> Result<(), QueueError> {
        redis::cmd("DEL")
            .arg(self.keys.idempotency(app, key))
            .query_async::<()>(&mut self.conn())
            .await?;
        Ok(())
    }
}

/// An Idempotency-Key's stored value, for a request with `fingerprint`:
/// `<PENDING>:<fingerprint>` while claimed, `<fingerprint>\n<answer>` once
/// answered. Values stored without a fingerprint (a bare `<PENDING>`, or an
/// answer, which is a JSON object) are taken as the same request.
fn idempotency_state(value: &str, fingerprint: &str) -> Idempotency {
    let (stored, answer) = match value.strip_prefix(PENDING) {
        Some(rest) => (rest.strip_prefix(':'), None),
        None => match value.split_once('\n') {
            Some((fp, answer)) if !fp.starts_with('{') => (Some(fp), Some(answer)),
            _ => (None, Some(value)),
        },
    };
    match (stored, answer) {
        (Some(fp), _) if fp != fingerprint => Idempotency::Mismatch,
        (_, None) => Idempotency::InProgress,
        (_, Some(answer)) => Idempotency::Done(answer.to_string()),
    }
}

fn app_jobs<'a>(app: &'a str, jobs: &'a [(String, String)]) -> Vec<(&'a str, &'a str, &'a str)> {
    jobs.iter()
        .map(|(part, job)| (app, part.as_str(), job.as_str()))
        .collect()
}

/// `<shard>/<lease>` -> (shard, lease as the scripts know it).
fn split_lease(lease: &str) -> Option<(usize, &str)> {
    let (shard, rest) = lease.split_once('/')?;
    Some((shard.parse().ok()?, rest))
}

/// A stream id's place in time: (ms, seq); unparsable ids last.
fn stream_order(id: &str) -> (u64, u64) {
    id.split_once('-')
        .and_then(|(ms, seq)| Some((ms.parse().ok()?, seq.parse().ok()?)))
        .unwrap_or((u64::MAX, u64::MAX))
}

/// A job stored again after a delay: `kind` delay app part job.
fn later(kind: &str, delay_ms: u64, job: &Job) -> Vec<String> {
    vec![
        kind.into(),
        delay_ms.to_string(),
        job.app_id.clone(),
        job.endpoint.clone().unwrap_or_default(),
        entry::encode(job),
    ]
}

fn health_args(app: &str, endpoint: &str, signal: &str, arg: String) -> Vec<String> {
    vec!["H".into(), app.into(), endpoint.into(), signal.into(), arg]
}

fn encode_letter(letter: &DeadLetter) -> String {
    serde_json::to_string(letter).expect("a dead letter always serializes")
}

/// A job as the take script hands it out: (lease, (app, partition), job id,
/// disabled reason). The worker's lease is `<shard>/<lease>#<job id>`.
type RawLease = (String, (String, String), String, Option<String>);

fn parse_taken(reply: Vec<Value>, shard: usize) -> Result<(Taken, Vec<RawLease>), QueueError> {
    let bad = || QueueError::Corrupt("unexpected reply from the take script".into());
    let mut it = reply.into_iter();
    let num = |it: &mut std::vec::IntoIter<Value>| -> Result<i64, QueueError> {
        let v = it.next().ok_or_else(bad)?;
        redis::from_redis_value::<i64>(v).map_err(|_| bad())
    };
    let text = |it: &mut std::vec::IntoIter<Value>| -> Result<String, QueueError> {
        let v = it.next().ok_or_else(bad)?;
        redis::from_redis_value::<String>(v).map_err(|_| bad())
    };
    let more = num(&mut it)? == 1;
    let next_due = num(&mut it)?;
    let groups = num(&mut it)?;
    let mut leases = Vec::new();
    for _ in 0..groups {
        let lease = text(&mut it)?;
        let app = text(&mut it)?;
        let part = text(&mut it)?;
        let disabled = text(&mut it)?;
        let disabled = (!disabled.is_empty()).then_some(disabled);
        for _ in 0..num(&mut it)? {
            let job_id = text(&mut it)?;
            leases.push((
                format!("{shard}/{lease}#{job_id}"),
                (app.clone(), part.clone()),
                job_id,
                disabled.clone(),
            ));
        }
    }
    let mut busy = BTreeMap::new();
    let apps = num(&mut it)?;
    for _ in 0..apps {
        let app = text(&mut it)?;
        let k = num(&mut it)?;
        let mut eps = Vec::with_capacity(k.max(0) as usize);
        for _ in 0..k {
            eps.push(text(&mut it)?);
        }
        eps.sort();
        busy.insert(app, eps);
    }
    let taken = Taken {
        jobs: Vec::with_capacity(leases.len()),
        busy,
        more,
        next_due: (next_due >= 0).then(|| Duration::from_millis(next_due as u64)),
    };
    Ok((taken, leases))
}

/// The doorbell: a pub/sub subscription of its own. A hint only: a lost
/// message costs an idle worker at most its idle poll.
pub struct RedisDoorbell {
    link: Arc<Link>,
    channel: String,
    sub: Option<redis::aio::PubSub>,
    /// Which cluster node to subscribe at next.
    turn: usize,
}

impl RedisDoorbell {
    pub(super) async fn rung(&mut self) {
        if self.sub.is_none() {
            match self.link.subscribe(&self.channel, self.turn).await {
                Ok(sub) => self.sub = Some(sub),
                Err(e) => {
                    self.turn += 1;
                    crate::metrics::redis_error();
                    tracing::debug!(error = %e, "cannot subscribe to the doorbell")
                }
            }
            if self.sub.is_none() {
                tokio::time::sleep(Duration::from_secs(1)).await;
                return;
            }
        }
        let Some(sub) = self.sub.as_mut() else { return };
        if sub.on_message().next().await.is_none() {
            // The connection closed: subscribe again on the next call.
            crate::metrics::redis_reconnect();
            self.sub = None;
            self.turn += 1;
        }
    }
}

pub struct InboxReader {
    conn: Conn,
    queue: RedisQueue,
    consumer: String,
}

impl InboxReader {
    /// Up to `count` new entries, waiting up to `block` for the first.
    pub async fn read(&mut self, count: usize, block: Duration) -> Result<Vec<Entry>, QueueError> {
        let reply: Result<Option<StreamReadReply>, redis::RedisError> = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(GROUP)
            .arg(&self.consumer)
            .arg("COUNT")
            .arg(count.max(1))
            .arg("BLOCK")
            .arg(block.as_millis().max(1) as u64)
            .arg("STREAMS")
            .arg(self.queue.keys.inbox())
            .arg(">")
            .query_async(&mut self.conn)
            .await;
        let reply = match reply {
            Ok(r) => r,
            Err(e) if e.code() == Some("NOGROUP") => {
                // The stream was deleted under us: make it again.
                self.queue.prepare_inbox().await?;
                return Ok(Vec::new());
            }
            Err(e) => return Err(e.into()),
        };
        Ok(reply
            .into_iter()
            .flat_map(|r| r.keys)
            .flat_map(|k| k.ids)
            .map(to_entry)
            .collect())
    }

    /// Entries some reader took more than `min_idle` ago and never queued
    /// (it died).
    pub async fn reclaim(
        &mut self,
        min_idle: Duration,
        count: usize,
    ) -> Result<Vec<Entry>, QueueError> {
        let reply: Result<StreamAutoClaimReply, redis::RedisError> = redis::cmd("XAUTOCLAIM")
            .arg(self.queue.keys.inbox())
            .arg(GROUP)
            .arg(&self.consumer)
            .arg(min_idle.as_millis() as u64)
            .arg("0-0")
            .arg("COUNT")
            .arg(count.max(1))
            .query_async(&mut self.queue.conn())
            .await;
        match reply {
            Ok(r) => Ok(r.claimed.into_iter().map(to_entry).collect()),
            Err(e) if e.code() == Some("NOGROUP") => Ok(Vec::new()),
            Err(e) => Err(e.into()),
        }
    }
}

fn field_bytes(s: &StreamId, field: &str) -> Option<Vec<u8>> {
    match s.map.get(field)? {
        Value::BulkString(b) => Some(b.clone()),
        Value::SimpleString(t) => Some(t.clone().into_bytes()),
        _ => None,
    }
}

fn to_entry(s: StreamId) -> Entry {
    let raw = field_bytes(&s, JOB_FIELD);
    Entry {
        job: entry::decode(&s.id, raw.as_deref()),
        id: s.id,
    }
}

fn to_dead_letter(s: StreamId) -> Result<(String, DeadLetter), QueueError> {
    let raw = field_bytes(&s, DEAD_FIELD).ok_or_else(|| {
        QueueError::Corrupt(format!("dead letter {} has no `{DEAD_FIELD}` field", s.id))
    })?;
    let letter = serde_json::from_slice(&raw)
        .map_err(|e| QueueError::Corrupt(format!("dead letter {}: {e}", s.id)))?;
    Ok((s.id, letter))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_idempotency_value_answers_only_its_own_fingerprint() {
        let pending = format!("{PENDING}:aa");
        assert_eq!(idempotency_state(&pending, "aa"), Idempotency::InProgress);
        assert_eq!(idempotency_state(&pending, "bb"), Idempotency::Mismatch);
        let done = "aa\n{\"ids\":[\"msg_1\"]}";
        assert_eq!(
            idempotency_state(done, "aa"),
            Idempotency::Done("{\"ids\":[\"msg_1\"]}".into())
        );
        assert_eq!(idempotency_state(done, "bb"), Idempotency::Mismatch);
        // Stored before fingerprints were kept.
        assert_eq!(idempotency_state(PENDING, "aa"), Idempotency::InProgress);
        assert_eq!(
            idempotency_state("{\"ids\":[]}", "aa"),
            Idempotency::Done("{\"ids\":[]}".into())
        );
    }
}
