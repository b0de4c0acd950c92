//! The Redis backend: one stream per queue read through the consumer group
//! [`GROUP`], a sorted set of scheduled retries moved onto the stream by a Lua
//! script, a stream of dead letters, a hash of counters. All of a queue's keys
//! share its hash tag, so a commit is one MULTI/EXEC in one slot.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::streams::{StreamAutoClaimReply, StreamId, StreamRangeReply, StreamReadReply};
use redis::{AsyncConnectionConfig, Client, Script, Value};

use super::entry::{self, DEAD_FIELD, DeadLetter, Entry, JOB_FIELD};
use super::{Completion, Depth, Effect, GROUP, IDEMPOTENCY_CLAIM, Idempotency, Keys, QueueError};
use crate::event::Job;

/// Marks an Idempotency-Key whose request is still being handled.
const PENDING: &str = "\u{0}pending";

/// Moves due retries (score <= now) from the delayed set onto the stream.
/// Returns {moved, next due score or -1}.
const PROMOTE: &str = r#"
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, job in ipairs(due) do
  redis.call('XADD', KEYS[2], '*', 'job', job)
  redis.call('ZREM', KEYS[1], job)
end
local nxt = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if nxt[2] then return {#due, nxt[2]} end
return {#due, '-1'}
"#;

#[derive(Clone)]
pub struct RedisQueue {
    client: Client,
    conn: ConnectionManager,
    keys: Keys,
    configured: Arc<Vec<String>>,
    registered: Arc<Mutex<HashSet<String>>>,
    promote: Arc<Script>,
}

impl RedisQueue {
    /// Connects lazily: a Redis that is down at start is retried on use, so
    /// the ingest can answer 503 and the worker can wait for it.
    pub fn connect(url: &str, keys: Keys, configured: Vec<String>) -> Result<Self, QueueError> {
        let client = Client::open(url)?;
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(Duration::from_secs(5)))
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_number_of_retries(1);
        let conn = client.get_connection_manager_lazy(config)?;
        Ok(RedisQueue {
            client,
            conn,
            keys,
            configured: Arc::new(configured),
            registered: Arc::default(),
            promote: Arc::new(Script::new(PROMOTE)),
        })
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    pub(super) async fn enqueue(&self, jobs: &[(String, Job)]) -> Result<(), QueueError> {
        let mut pipe = redis::pipe();
        let mut new_queues = Vec::new();
        {
            let registered = self.registered.lock().expect("registry lock");
            for (queue, _) in jobs {
                if !registered.contains(queue) && !new_queues.contains(queue) {
                    new_queues.push(queue.clone());
                }
            }
        }
        for queue in &new_queues {
            pipe.sadd(self.keys.registry(), queue).ignore();
        }
        for (queue, job) in jobs {
            pipe.cmd("XADD")
                .arg(self.keys.stream(queue))
                .arg("*")
                .arg(JOB_FIELD)
                .arg(entry::encode(job))
                .ignore();
        }
        pipe.query_async::<()>(&mut self.conn.clone()).await?;
        self.registered
            .lock()
            .expect("registry lock")
            .extend(new_queues);
        Ok(())
    }

    pub(super) async fn queues(&self) -> Result<Vec<String>, QueueError> {
        let mut names: Vec<String> = redis::cmd("SMEMBERS")
            .arg(self.keys.registry())
            .query_async(&mut self.conn.clone())
            .await?;
        names.extend(self.configured.iter().cloned());
        names.sort();
        names.dedup();
        Ok(names)
    }

    pub(super) async fn prepare(&self, queue: &str) -> Result<(), QueueError> {
        let created: Result<(), redis::RedisError> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(self.keys.stream(queue))
            .arg(GROUP)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut self.conn.clone())
            .await;
        match created {
            Err(e) if e.code() != Some("BUSYGROUP") => Err(e.into()),
            _ => Ok(()),
        }
    }

    pub(super) async fn reader(
        &self,
        queue: &str,
        consumer: &str,
    ) -> Result<RedisReader, QueueError> {
        // A blocking read holds its connection: give each reader its own, with
        // no response timeout (the BLOCK argument bounds the wait).
        let config = AsyncConnectionConfig::new()
            .set_response_timeout(None)
            .set_connection_timeout(Some(Duration::from_secs(2)));
        let conn = self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        Ok(RedisReader {
            conn,
            queue: self.clone(),
            name: queue.to_string(),
            stream: self.keys.stream(queue),
            consumer: consumer.to_string(),
        })
    }

    pub(super) async fn reclaim(
        &self,
        queue: &str,
        consumer: &str,
        min_idle: Duration,
        count: usize,
    ) -> Result<Vec<Entry>, QueueError> {
        let stream = self.keys.stream(queue);
        let mut start = "0-0".to_string();
        let mut out = Vec::new();
        loop {
            let reply: Result<StreamAutoClaimReply, redis::RedisError> = redis::cmd("XAUTOCLAIM")
                .arg(&stream)
                .arg(GROUP)
                .arg(consumer)
                .arg(min_idle.as_millis() as u64)
                .arg(&start)
                .arg("COUNT")
                .arg(count.max(1))
                .query_async(&mut self.conn.clone())
                .await;
            let reply = match reply {
                Ok(r) => r,
                Err(e) if e.code() == Some("NOGROUP") => return Ok(out),
                Err(e) => return Err(e.into()),
            };
            out.extend(reply.claimed.into_iter().map(|s| to_entry(queue, s)));
            if reply.next_stream_id == "0-0" || out.len() >= count {
                return Ok(out);
            }
            start = reply.next_stream_id;
        }
    }

    pub(super) async fn commit(
        &self,
        queue: &str,
        completions: &[Completion],
    ) -> Result<(), QueueError> {
        if completions.is_empty() {
            return Ok(());
        }
        let stream = self.keys.stream(queue);
        let mut pipe = redis::pipe();
        pipe.atomic();
        let mut counts: BTreeMap<&'static str, u64> = BTreeMap::new();
        for c in completions {
            for effect in &c.effects {
                match effect {
                    Effect::Enqueue(job) => {
                        pipe.cmd("XADD")
                            .arg(&stream)
                            .arg("*")
                            .arg(JOB_FIELD)
                            .arg(entry::encode(job))
                            .ignore();
                    }
                    Effect::Schedule { job, at_ms } => {
                        pipe.zadd(self.keys.delayed(queue), entry::encode(job), *at_ms)
                            .ignore();
                    }
                    Effect::DeadLetter(letter) => {
                        let json =
                            serde_json::to_string(letter).expect("a dead letter always serializes");
                        pipe.cmd("XADD")
                            .arg(self.keys.dlq(queue))
                            .arg("*")
                            .arg(DEAD_FIELD)
                            .arg(json)
                            .ignore();
                    }
                    Effect::Count(stat) => *counts.entry(stat.name()).or_default() += 1,
                }
            }
        }
        if !counts.is_empty() {
            let stats = self.keys.stats(queue);
            for (name, n) in counts {
                pipe.hincr(&stats, name, n).ignore();
            }
        }
        let ids: Vec<&str> = completions.iter().map(|c| c.entry_id.as_str()).collect();
        pipe.cmd("XACK").arg(&stream).arg(GROUP).arg(&ids).ignore();
        pipe.cmd("XDEL").arg(&stream).arg(&ids).ignore();
        pipe.query_async::<()>(&mut self.conn.clone()).await?;
        Ok(())
    }

    pub(super) async fn promote_due(
        &self,
        queue: &str,
        now_ms: u64,
        limit: usize,
    ) -> Result<(usize, Option<u64>), QueueError> {
        let (moved, next): (usize, String) = self
            .promote
            .key(self.keys.delayed(queue))
            .key(self.keys.stream(queue))
            .arg(now_ms)
            .arg(limit)
            .invoke_async(&mut self.conn.clone())
            .await?;
        let next = next
            .parse::<f64>()
            .ok()
            .filter(|n| *n >= 0.0)
            .map(|n| n as u64);
        Ok((moved, next))
    }

    pub(super) async fn dead_letters(
        &self,
        queue: &str,
        count: usize,
    ) -> Result<Vec<(String, DeadLetter)>, QueueError> {
        let reply: StreamRangeReply = redis::cmd("XRANGE")
            .arg(self.keys.dlq(queue))
            .arg("-")
            .arg("+")
            .arg("COUNT")
            .arg(count)
            .query_async(&mut self.conn.clone())
            .await?;
        reply
            .ids
            .into_iter()
            .map(|s| to_dead_letter(queue, s))
            .collect()
    }

    pub(super) async fn dead_letter(
        &self,
        queue: &str,
        entry_id: &str,
    ) -> Result<Option<DeadLetter>, QueueError> {
        if !is_stream_id(entry_id) {
            return Ok(None);
        }
        let reply: StreamRangeReply = redis::cmd("XRANGE")
            .arg(self.keys.dlq(queue))
            .arg(entry_id)
            .arg(entry_id)
            .query_async(&mut self.conn.clone())
            .await?;
        reply
            .ids
            .into_iter()
            .next()
            .map(|s| to_dead_letter(queue, s).map(|(_, l)| l))
            .transpose()
    }

    pub(super) async fn replay(
        &self,
        queue: &str,
        entry_id: &str,
        job: &Job,
    ) -> Result<(), QueueError> {
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("XADD")
            .arg(self.keys.stream(queue))
            .arg("*")
            .arg(JOB_FIELD)
            .arg(entry::encode(job))
            .ignore()
            .cmd("XDEL")
            .arg(self.keys.dlq(queue))
            .arg(entry_id)
            .ignore();
        pipe.query_async::<()>(&mut self.conn.clone()).await?;
        Ok(())
    }

    pub(super) async fn stats(&self, queue: &str) -> Result<BTreeMap<String, u64>, QueueError> {
        Ok(redis::cmd("HGETALL")
            .arg(self.keys.stats(queue))
            .query_async(&mut self.conn.clone())
            .await?)
    }

    pub(super) async fn depth(&self, queue: &str) -> Result<Depth, QueueError> {
        let mut conn = self.conn.clone();
        let (len, delayed, dead): (u64, u64, u64) = redis::pipe()
            .cmd("XLEN")
            .arg(self.keys.stream(queue))
            .zcard(self.keys.delayed(queue))
            .cmd("XLEN")
            .arg(self.keys.dlq(queue))
            .query_async(&mut conn)
            .await?;
        let pending: Result<Value, redis::RedisError> = redis::cmd("XPENDING")
            .arg(self.keys.stream(queue))
            .arg(GROUP)
            .query_async(&mut conn)
            .await;
        let in_flight = match pending {
            Ok(Value::Array(items)) => items
                .first()
                .and_then(|v| redis::from_redis_value_ref::<u64>(v).ok())
                .unwrap_or(0),
            Ok(_) => 0,
            Err(e) if e.code() == Some("NOGROUP") => 0,
            Err(e) => return Err(e.into()),
        };
        Ok(Depth {
            ready: len.saturating_sub(in_flight),
            in_flight,
            delayed,
            dead,
        })
    }

    pub(super) async fn ping(&self) -> Result<(), QueueError> {
        redis::cmd("PING")
            .query_async::<()>(&mut self.conn.clone())
            .await?;
        Ok(())
    }

    pub(super) async fn idempotency_begin(
        &self,
        app: &str,
        key: &str,
        _ttl: Duration,
    ) -> Result<Idempotency, QueueError> {
        let k = self.keys.idempotency(app, key);
        let mut conn = self.conn.clone();
        for _ in 0..3 {
            let claimed: Option<String> = redis::cmd("SET")
                .arg(&k)
                .arg(PENDING)
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
                Some(v) if v == PENDING => return Ok(Idempotency::InProgress),
                Some(v) => return Ok(Idempotency::Done(v)),
                None => continue, // expired between the two calls
            }
        }
        Ok(Idempotency::InProgress)
    }

    pub(super) async fn idempotency_finish(
        &self,
        app: &str,
        key: &str,
        answer: &str,
        ttl: Duration,
    ) -> Result<(), QueueError> {
        redis::cmd("SET")
            .arg(self.keys.idempotency(app, key))
            .arg(answer)
            .arg("PX")
            .arg(ttl.as_millis() as u64)
            .query_async::<()>(&mut self.conn.clone())
            .await?;
        Ok(())
    }

    pub(super) async fn idempotency_abort(&self, app: &str, key: &str) -> Result<(), QueueError> {
        redis::cmd("DEL")
            .arg(self.keys.idempotency(app, key))
            .query_async::<()>(&mut self.conn.clone())
            .await?;
        Ok(())
    }

    pub(super) async fn gone(&self) -> Result<Vec<String>, QueueError> {
        Ok(redis::cmd("HKEYS")
            .arg(self.keys.gone())
            .query_async(&mut self.conn.clone())
            .await?)
    }

    pub(super) async fn set_gone(&self, endpoint: &str, gone: bool) -> Result<(), QueueError> {
        let mut cmd = if gone {
            redis::cmd("HSET")
        } else {
            redis::cmd("HDEL")
        };
        cmd.arg(self.keys.gone()).arg(endpoint);
        if gone {
            cmd.arg(crate::event::now_ms());
        }
        cmd.query_async::<()>(&mut self.conn.clone()).await?;
        Ok(())
    }
}

pub struct RedisReader {
    conn: MultiplexedConnection,
    queue: RedisQueue,
    name: String,
    stream: String,
    consumer: String,
}

impl RedisReader {
    pub(super) async fn read(
        &mut self,
        count: usize,
        block: Duration,
    ) -> Result<Vec<Entry>, QueueError> {
        let reply: Result<Option<StreamReadReply>, redis::RedisError> = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(GROUP)
            .arg(&self.consumer)
            .arg("COUNT")
            .arg(count.max(1))
            .arg("BLOCK")
            .arg(block.as_millis().max(1) as u64)
            .arg("STREAMS")
            .arg(&self.stream)
            .arg(">")
            .query_async(&mut self.conn)
            .await;
        let reply = match reply {
            Ok(r) => r,
            Err(e) if e.code() == Some("NOGROUP") => {
                // The stream was deleted under us: make it again.
                self.queue.prepare(&self.name).await?;
                return Ok(Vec::new());
            }
            Err(e) => return Err(e.into()),
        };
        Ok(reply
            .into_iter()
            .flat_map(|r| r.keys)
            .flat_map(|k| k.ids)
            .map(|s| to_entry(&self.name, s))
            .collect())
    }
}

/// `<ms>-<seq>`, both decimal.
fn is_stream_id(id: &str) -> bool {
    id.split_once('-').is_some_and(|(ms, seq)| {
        !ms.is_empty()
            && !seq.is_empty()
            && ms.bytes().chain(seq.bytes()).all(|b| b.is_ascii_digit())
    })
}

fn field_bytes(s: &StreamId, field: &str) -> Option<Vec<u8>> {
    match s.map.get(field)? {
        Value::BulkString(b) => Some(b.clone()),
        Value::SimpleString(t) => Some(t.clone().into_bytes()),
        _ => None,
    }
}

fn to_entry(queue: &str, s: StreamId) -> Entry {
    let raw = field_bytes(&s, JOB_FIELD);
    Entry {
        job: entry::decode(queue, &s.id, raw.as_deref()),
        id: s.id,
    }
}

fn to_dead_letter(queue: &str, s: StreamId) -> Result<(String, DeadLetter), QueueError> {
    let raw = field_bytes(&s, DEAD_FIELD).ok_or_else(|| {
        QueueError::Corrupt(format!("dead letter {} has no `{DEAD_FIELD}` field", s.id))
    })?;
    let letter = serde_json::from_slice(&raw)
        .map_err(|e| QueueError::Corrupt(format!("dead letter {}: {e}", s.id)))?;
    Ok((entry::dead_letter_id(queue, &s.id), letter))
}
