//! The wire format of queue entries and dead letters.
//!
//! A stream entry has one field, `job`, holding JSON. Producers that write to
//! Redis directly need only `app_id` and `event`; the rest is filled in:
//!
//! ```text
//! XADD wasmhook:{client_event}:stream * job '{"app_id":"app-1","event":{"name":"client_event","channel":"private-a","data":"{}"}}'
//! ```

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::event::{Attempt, Event, Job};

/// The stream field that holds a job.
pub const JOB_FIELD: &str = "job";
/// The dead-letter stream field that holds a dead letter.
pub const DEAD_FIELD: &str = "dead";

/// A job as read from a queue: either a job, or an entry that is not one
/// (it is dead-lettered with the reason).
#[derive(Debug, Clone)]
pub struct Entry {
    /// The queue's own id for the entry (a stream id on Redis).
    pub id: String,
    pub job: Result<Job, Malformed>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Malformed {
    /// The entry as found, for the dead letter.
    pub raw: String,
    pub reason: String,
}

/// What a producer may write: every field but `app_id` and `event` is optional.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WireJob {
    id: Option<String>,
    app_id: String,
    event: Value,
    created_ms: Option<u64>,
    #[serde(default)]
    attempt: u32,
    endpoint: Option<String>,
    #[serde(default)]
    history: Vec<Attempt>,
    #[serde(default)]
    headers: Vec<(String, String)>,
    #[serde(default)]
    metadata: Vec<(String, String)>,
}

pub fn encode(job: &Job) -> String {
    serde_json::to_string(job).expect("a job always serializes")
}

/// Decodes an entry's `job` field. `queue` and `entry_id` stand in for what a
/// producer left out: a webhook id derived from them (so it is the same on
/// every redelivery of the entry) and the entry's time.
pub fn decode(queue: &str, entry_id: &str, raw: Option<&[u8]>) -> Result<Job, Malformed> {
    let Some(raw) = raw else {
        return Err(Malformed {
            raw: String::new(),
            reason: format!("entry has no `{JOB_FIELD}` field"),
        });
    };
    let malformed = |reason: String| Malformed {
        raw: String::from_utf8_lossy(&raw[..raw.len().min(4096)]).into_owned(),
        reason,
    };
    let wire: WireJob =
        serde_json::from_slice(raw).map_err(|e| malformed(format!("not a job: {e}")))?;
    let event = Event::from_json(wire.event).map_err(|e| malformed(format!("bad event: {e}")))?;
    if wire.app_id.is_empty() {
        return Err(malformed("empty `app_id`".into()));
    }
    let id = match wire.id {
        Some(id) if !id.is_empty() && id.len() <= 200 => id,
        Some(_) => return Err(malformed("`id` must be 1 to 200 characters".into())),
        None => derived_id(queue, entry_id),
    };
    let created_ms = wire
        .created_ms
        .or_else(|| entry_id.split('-').next().and_then(|ms| ms.parse().ok()))
        .unwrap_or_else(crate::event::now_ms);
    Ok(Job {
        id,
        app_id: wire.app_id,
        event,
        created_ms,
        attempt: wire.attempt,
        endpoint: wire.endpoint,
        history: wire.history,
        headers: wire.headers,
        metadata: wire.metadata,
    })
}

fn derived_id(queue: &str, entry_id: &str) -> String {
    let digest = Sha256::digest(format!("{queue}/{entry_id}").as_bytes());
    format!("msg_{}", &hex::encode(digest)[..26])
}

/// A job that will not be delivered, with everything an operator needs to
/// decide what to do with it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub queue: String,
    /// The last error.
    pub reason: String,
    /// The last HTTP status, when there was a response.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// The start of the last response body.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_body: Option<String>,
    pub attempts: u32,
    pub dead_at_ms: u64,
    /// The job, with its history of attempts; None for a malformed entry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<Job>,
    /// A malformed entry as found.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raw: Option<String>,
}

impl DeadLetter {
    pub fn malformed(queue: &str, m: &Malformed, now_ms: u64) -> DeadLetter {
        DeadLetter {
            queue: queue.to_string(),
            reason: format!("malformed entry: {}", m.reason),
            status: None,
            response_body: None,
            attempts: 0,
            dead_at_ms: now_ms,
            job: None,
            raw: Some(m.raw.clone()),
        }
    }
}

/// A dead letter's id as the CLI shows it: `<queue>/<entry id>`.
pub fn dead_letter_id(queue: &str, entry_id: &str) -> String {
    format!("{queue}/{entry_id}")
}

pub fn split_dead_letter_id(id: &str) -> Option<(&str, &str)> {
    let (queue, entry) = id.rsplit_once('/')?;
    (!queue.is_empty() && !entry.is_empty()).then_some((queue, entry))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_producer_needs_only_app_and_event() {
        let raw =
            br#"{"app_id":"app-1","event":{"name":"client_event","channel":"c","data":"{}"}}"#;
        let a = decode("client_event", "1700000000000-3", Some(raw)).unwrap();
        let b = decode("client_event", "1700000000000-3", Some(raw)).unwrap();
        assert_eq!(a.app_id, "app-1");
        assert_eq!(a.created_ms, 1700000000000);
        assert_eq!(a.id, b.id, "the derived id is stable across redeliveries");
        assert_ne!(
            a.id,
            decode("client_event", "1700000000000-4", Some(raw))
                .unwrap()
                .id
        );
        assert_eq!(a.attempt, 0);
    }

    #[test]
    fn round_trips_a_full_job() {
        let mut job = Job::new(
            "a",
            Event::from_json(serde_json::json!({"name": "x", "k": [1]})).unwrap(),
            5,
        );
        job.endpoint = Some("ep".into());
        job.attempt = 2;
        assert_eq!(
            decode("q", "1-0", Some(encode(&job).as_bytes())).unwrap(),
            job
        );
    }

    #[test]
    fn says_why_an_entry_is_malformed() {
        assert!(
            decode("q", "1-0", None)
                .unwrap_err()
                .reason
                .contains("no `job` field")
        );
        let m = decode("q", "1-0", Some(b"{not json")).unwrap_err();
        assert!(m.reason.starts_with("not a job"), "{}", m.reason);
        assert_eq!(m.raw, "{not json");
        let m = decode(
            "q",
            "1-0",
            Some(br#"{"app_id":"a","event":{"channel":"x"}}"#),
        )
        .unwrap_err();
        assert!(m.reason.contains("name"), "{}", m.reason);
    }

    #[test]
    fn dead_letter_ids_split_at_the_last_slash() {
        assert_eq!(
            split_dead_letter_id("client_event/1-0"),
            Some(("client_event", "1-0"))
        );
        assert_eq!(split_dead_letter_id("nope"), None);
        assert_eq!(split_dead_letter_id("/1-0"), None);
    }
}
