//! Enqueueing from Rust without going through HTTP: what the ingest does,
//! for producers that share the Redis.
//!
//! ```no_run
//! # async fn f() -> anyhow::Result<()> {
//! use wasmhook::producer::Producer;
//! let producer = Producer::connect("redis://127.0.0.1:6379", "wasmhook")?;
//! let id = producer.send("app-1", serde_json::json!({"name": "channel_occupied", "channel": "private-a"})).await?;
//! # Ok(()) }
//! ```

use crate::config::QueueKey;
use crate::event::{Event, Job, now_ms};
use crate::queue::{Keys, Queue, RedisQueue};

pub struct Producer {
    queue: Queue,
    key: QueueKey,
}

impl Producer {
    /// Producer for queues keyed by event type (the default).
    pub fn connect(redis_url: &str, prefix: &str) -> anyhow::Result<Self> {
        Self::with_queue_key(redis_url, prefix, QueueKey::EventType)
    }

    pub fn with_queue_key(redis_url: &str, prefix: &str, key: QueueKey) -> anyhow::Result<Self> {
        Ok(Producer {
            queue: Queue::Redis(RedisQueue::connect(
                redis_url,
                Keys::new(prefix),
                Vec::new(),
            )?),
            key,
        })
    }

    /// Enqueues one event (`{"name": ..., "channel": ..., ...}`); returns its
    /// webhook id once it is stored.
    pub async fn send(&self, app_id: &str, event: serde_json::Value) -> anyhow::Result<String> {
        Ok(self.send_many(app_id, vec![event]).await?.remove(0))
    }

    /// Enqueues several events of one app in one round trip.
    pub async fn send_many(
        &self,
        app_id: &str,
        events: Vec<serde_json::Value>,
    ) -> anyhow::Result<Vec<String>> {
        let created_ms = now_ms();
        let mut jobs = Vec::with_capacity(events.len());
        for value in events {
            let event = Event::from_json(value)?;
            let queue = match self.key {
                QueueKey::EventType => event.name.clone(),
                QueueKey::App => format!("app:{app_id}"),
            };
            jobs.push((queue, Job::new(app_id, event, created_ms)));
        }
        self.queue.enqueue(&jobs).await?;
        Ok(jobs.into_iter().map(|(_, j)| j.id).collect())
    }
}
