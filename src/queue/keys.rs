//! Redis key names. The queue is split into shards (`redis.shards`, 1 by
//! default); every key of a shard carries its hash tag (`{0}`, `{1}`, ...),
//! so each Lua script and transaction touches one Redis Cluster slot, and
//! an app's state lives in one shard ([`shard_of`]). App and endpoint ids
//! never contain `|` (they are checked names), so `<app>|<endpoint>` is
//! unambiguous.

use sha2::{Digest, Sha256};

/// Keys of one shard of the queue (shard 0 unless made with [`Keys::shard`]).
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
    /// `{<shard>}`
    tag: String,
}

/// The shard that holds `app` among `shards`: stable across processes and
/// versions (the first 8 bytes of the SHA-256 of the id).
pub fn shard_of(app: &str, shards: usize) -> usize {
    if shards <= 1 {
        return 0;
    }
    let digest = Sha256::digest(app.as_bytes());
    let mut head = [0u8; 8];
    head.copy_from_slice(&digest[..8]);
    (u64::from_be_bytes(head) % shards as u64) as usize
}

impl Keys {
    pub fn new(prefix: impl Into<String>) -> Self {
        Keys {
            prefix: prefix.into(),
            tag: "{0}".into(),
        }
    }

    /// The keys of shard `n` of the same queue.
    pub fn shard(&self, n: usize) -> Keys {
        Keys {
            prefix: self.prefix.clone(),
            tag: format!("{{{n}}}"),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Where the queue records how many shards it was made with.
    pub fn layout(&self) -> String {
        format!("{}:shards", self.prefix)
    }

    /// What every queue key starts with; the Lua scripts append the rest:
    /// `ready` (apps with work, round-robin), `parts:<app>` (its eligible
    /// partitions), `list:<app>|<endpoint>` (a partition's job ids; empty
    /// endpoint = new events), `jobs` (the job bodies), `busy:<app>`,
    /// `ep:<app>|<endpoint>` (breaker, hold, rate), `held`, `delayed`,
    /// `leases` and `lease:<seq>`, `inflight`, `seq`, `vclock`, `count`,
    /// `conf`, `stats`, `dlq` (ARCHITECTURE.md has the table).
    pub fn base(&self) -> String {
        format!("{}:{}:", self.prefix, self.tag)
    }

    pub fn key(&self, name: &str) -> String {
        format!("{}:{}:{name}", self.prefix, self.tag)
    }

    /// The stream raw producers XADD to (consumer group [`super::GROUP`]).
    pub fn inbox(&self) -> String {
        self.key("inbox")
    }

    pub fn dlq(&self) -> String {
        self.key("dlq")
    }

    /// A partition's list: new events (`endpoint` None) or one endpoint's jobs.
    pub fn list(&self, app: &str, endpoint: Option<&str>) -> String {
        self.key(&format!("list:{app}|{}", endpoint.unwrap_or("")))
    }

    /// Pub/sub channel that wakes idle workers (a hint, never a job).
    pub fn doorbell(&self) -> String {
        format!("{}:doorbell", self.prefix)
    }

    /// One Idempotency-Key of one app. The key is hashed: any bytes a client
    /// sends make a safe, bounded key name.
    pub fn idempotency(&self, app: &str, key: &str) -> String {
        let digest = hex::encode(Sha256::digest(key.as_bytes()));
        format!("{}:{{idem:{app}}}:{digest}", self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The part Redis Cluster hashes: between the first `{` and the next `}`.
    fn hash_tag(key: &str) -> &str {
        let open = key.find('{').unwrap();
        let close = open + key[open..].find('}').unwrap();
        &key[open + 1..close]
    }

    #[test]
    fn every_queue_key_shares_one_hash_tag() {
        let k = Keys::new("wh");
        for key in [
            k.inbox(),
            k.dlq(),
            k.list("app-1", None),
            k.list("app-1", Some("ep")),
            k.key("ready"),
            k.base() + "parts:app-1",
        ] {
            assert_eq!(hash_tag(&key), "0", "{key}");
            assert!(key.starts_with("wh:"));
        }
        assert_ne!(k.list("a:b", None), k.list("a", Some("b")));
    }

    #[test]
    fn shards_have_tags_of_their_own_and_an_app_stays_in_one() {
        let k = Keys::new("wh");
        assert_eq!(hash_tag(&k.shard(3).list("app-1", None)), "3");
        assert_eq!(k.shard(0).key("ready"), k.key("ready"));
        assert_eq!(shard_of("app-1", 1), 0);
        // Stable: the same shard every time, spread over all of them.
        assert_eq!(shard_of("app-1", 16), shard_of("app-1", 16));
        let used: std::collections::HashSet<usize> =
            (0..200).map(|i| shard_of(&format!("app-{i}"), 8)).collect();
        assert_eq!(used.len(), 8);
        assert!((0..200).all(|i| shard_of(&format!("app-{i}"), 8) < 8));
    }

    #[test]
    fn idempotency_keys_are_bounded_and_per_app() {
        let k = Keys::new("wh");
        let long = "x".repeat(10_000);
        assert!(k.idempotency("app-1", &long).len() < 120);
        assert_ne!(k.idempotency("app-1", "k"), k.idempotency("app-2", "k"));
        assert_eq!(hash_tag(&k.idempotency("app-1", "k")), "idem:app-1");
    }
}
