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

use crate::event::{Event, Job, now_ms};
use crate::queue::{Keys, Queue, RedisQueue, RedisTarget};

pub struct Producer {
    queue: Queue,
    /// Checked once, before the first enqueue: the queue's number of shards
    /// is this producer's (else its apps' jobs would go to the wrong shard).
    layout: tokio::sync::OnceCell<()>,
}

impl Producer {
    /// A producer for a one-shard queue on one server (see
    /// [`Producer::from_settings`] for shards, a cluster, a login or TLS).
    pub fn connect(redis_url: &str, prefix: &str) -> anyhow::Result<Self> {
        // A producer only enqueues; the queue's options are the built-in ones.
        let defaults = crate::config::load_from(None, Some(""), Vec::<(String, String)>::new())?;
        Ok(Producer {
            queue: Queue::Redis(RedisQueue::connect(
                RedisTarget::single(redis_url)?,
                Keys::new(prefix),
                defaults.queue_options(),
            )?),
            layout: Default::default(),
        })
    }

    /// A producer for the Redis a config names: one server or a cluster,
    /// with its login, TLS and durability settings.
    pub fn from_settings(settings: &crate::config::Settings) -> anyhow::Result<Self> {
        let Some(target) = settings.redis_target()? else {
            anyhow::bail!("redis.url is not set: a producer needs a shared Redis");
        };
        Ok(Producer {
            queue: Queue::Redis(RedisQueue::connect(
                target,
                settings.keys.clone(),
                settings.queue_options(),
            )?),
            layout: Default::default(),
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
        if !crate::event::valid_name(app_id) {
            anyhow::bail!("app id must be 1 to 200 characters of A-Z a-z 0-9 _ - . :");
        }
        let created_ms = now_ms();
        let mut jobs = Vec::with_capacity(events.len());
        for value in events {
            jobs.push(Job::new(app_id, Event::from_json(value)?, created_ms));
        }
        self.layout
            .get_or_try_init(|| self.queue.check_layout())
            .await?;
        self.queue.enqueue(app_id, &jobs).await?;
        Ok(jobs.into_iter().map(|j| j.id).collect())
    }
}
