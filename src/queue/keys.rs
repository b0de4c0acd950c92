//! Redis key names. Every key of one queue carries the queue's hash tag
//! (`{queue}`), so the multi-key operations that record a job's outcome stay
//! in one Redis Cluster slot.

use sha2::{Digest, Sha256};

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

    /// Set of queue names producers have used.
    pub fn registry(&self) -> String {
        format!("{}:queues", self.prefix)
    }

    /// The stream jobs wait in; consumer group [`super::GROUP`].
    pub fn stream(&self, queue: &str) -> String {
        format!("{}:{{{queue}}}:stream", self.prefix)
    }

    /// Sorted set of jobs waiting for a retry, scored by due time (unix ms).
    pub fn delayed(&self, queue: &str) -> String {
        format!("{}:{{{queue}}}:delayed", self.prefix)
    }

    /// Stream of dead letters.
    pub fn dlq(&self, queue: &str) -> String {
        format!("{}:{{{queue}}}:dlq", self.prefix)
    }

    /// Hash of outcome counters.
    pub fn stats(&self, queue: &str) -> String {
        format!("{}:{{{queue}}}:stats", self.prefix)
    }

    /// One Idempotency-Key of one app. The key is hashed: any bytes a client
    /// sends make a safe, bounded key name.
    pub fn idempotency(&self, app: &str, key: &str) -> String {
        let digest = hex::encode(Sha256::digest(key.as_bytes()));
        format!("{}:{{idem:{app}}}:{digest}", self.prefix)
    }

    /// Hash of endpoints that answered 410 Gone: `app/endpoint` → unix ms.
    pub fn gone(&self) -> String {
        format!("{}:gone", self.prefix)
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
    fn every_key_of_a_queue_shares_its_hash_tag() {
        let k = Keys::new("wh");
        for key in [
            k.stream("client_event"),
            k.delayed("client_event"),
            k.dlq("client_event"),
            k.stats("client_event"),
        ] {
            assert_eq!(hash_tag(&key), "client_event", "{key}");
            assert!(key.starts_with("wh:"));
        }
        assert_ne!(hash_tag(&k.stream("a")), hash_tag(&k.stream("b")));
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
