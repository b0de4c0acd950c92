//! Redis key names. Every key of the queue carries one hash tag (`{0}`), so
//! each Lua script and transaction touches one Redis Cluster slot. App and
//! endpoint ids never contain `|` (they are checked names), so
//! `<app>|<endpoint>` is unambiguous.

use sha2::{Digest, Sha256};

/// The hash tag of the queue's slot.
pub const TAG: &str = "{0}";

#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(prefix: impl Into<String>) -> Self {
        Keys {
            prefix: prefix.into(),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// What every queue key starts with; the Lua scripts append the rest:
    /// `ready` (apps with work, round-robin), `parts:<app>` (its eligible
    /// partitions), `list:<app>|<endpoint>` (a partition's job ids; empty
    /// endpoint = new events), `jobs` (the job bodies), `busy:<app>`,
    /// `ep:<app>|<endpoint>` (breaker, hold, rate), `held`, `delayed`,
    /// `leases` and `lease:<seq>`, `inflight`, `seq`, `vclock`, `count`,
    /// `conf`, `stats`, `dlq` (ARCHITECTURE.md has the table).
    pub fn base(&self) -> String {
        format!("{}:{TAG}:", self.prefix)
    }

    pub fn key(&self, name: &str) -> String {
        format!("{}:{TAG}:{name}", self.prefix)
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
    fn idempotency_keys_are_bounded_and_per_app() {
        let k = Keys::new("wh");
        let long = "x".repeat(10_000);
        assert!(k.idempotency("app-1", &long).len() < 120);
        assert_ne!(k.idempotency("app-1", "k"), k.idempotency("app-2", "k"));
        assert_eq!(hash_tag(&k.idempotency("app-1", "k")), "idem:app-1");
    }
}
