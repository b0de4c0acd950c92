//! The wire format of queue entries and dead letters.
//!
//! A job is JSON. Producers that write to Redis directly add an entry with
//! one field, `job`, to the inbox stream, and need only `app_id` and `event`;
//! the rest is filled in:
//!
//! ```text
//! XADD wasmhook:{0}:inbox * job '{"app_id":"app-1","event":{"name":"client_event","channel":"private-a","data":"{}"}}'
//! ```

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::event::{Attempt, Event, Job};

/// 9999-12-31T23:59:59.999Z: the last time a signature timestamp can show.
pub const MAX_TIME_MS: u64 = 253_402_300_799_999;

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
    /// A batch's member jobs (made by the queue, never by a producer).
    #[serde(default)]
    batch: Vec<Box<serde_json::value::RawValue>>,
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
    order_key: Option<String>,
}

pub fn encode(job: &Job) -> String {
    serde_json::to_string(job).expect("a job always serializes")
}

/// Decodes a job. `entry_id` (an inbox stream id) stands in for what a
/// producer left out: a webhook id derived from it (so it is the same on
/// every redelivery of the entry) and the entry's time.
pub fn decode(entry_id: &str, raw: Option<&[u8]>) -> Result<Job, Malformed> {
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
    if !crate::event::valid_name(&wire.app_id) {
        return Err(malformed(
            "`app_id` must be 1 to 200 characters of A-Z a-z 0-9 _ - . :".into(),
        ));
    }
    if let Some(ep) = &wire.endpoint
        && !crate::event::valid_name(ep)
    {
        return Err(malformed(
            "`endpoint` must be 1 to 200 characters of A-Z a-z 0-9 _ - . :".into(),
        ));
    }
    if wire.attempt == u32::MAX {
        // The worker numbers the next attempt `attempt + 1`.
        return Err(malformed(format!("`attempt` must be below {}", u32::MAX)));
    }
    let id = match wire.id {
        Some(id) if !id.is_empty() && id.len() <= 200 => id,
        Some(_) => return Err(malformed("`id` must be 1 to 200 characters".into())),
        None => derived_id(entry_id),
    };
    let created_ms = wire
        .created_ms
        .or_else(|| entry_id.split('-').next().and_then(|ms| ms.parse().ok()))
        .unwrap_or_else(crate::event::now_ms);
    if created_ms > MAX_TIME_MS {
        return Err(malformed(
            "`created_ms` must be unix milliseconds before the year 10000".into(),
        ));
    }
    let mut batch = Vec::with_capacity(wire.batch.len());
    for member in &wire.batch {
        let job = decode(entry_id, Some(member.get().as_bytes()))
            .map_err(|m| malformed(format!("batch member: {}", m.reason)))?;
        if job.is_batch() || job.app_id != wire.app_id || job.endpoint != wire.endpoint {
            return Err(malformed(
                "a batch member must be one job of the batch's app and endpoint".into(),
            ));
        }
        batch.push(job);
    }
    if !batch.is_empty() && wire.endpoint.is_none() {
        return Err(malformed("a batch needs an `endpoint`".into()));
    }
    Ok(Job {
        batch,
        id,
        app_id: wire.app_id,
        event,
        created_ms,
        attempt: wire.attempt,
        endpoint: wire.endpoint,
        history: wire.history,
        headers: wire.headers,
        metadata: wire.metadata,
        order_key: wire.order_key,
    })
}

fn derived_id(entry_id: &str) -> String {
    let digest = Sha256::digest(format!("inbox/{entry_id}").as_bytes());
    format!("msg_{}", &hex::encode(digest)[..26])
}

/// A job that will not be delivered, with everything an operator needs to
/// decide what to do with it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
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
    pub fn malformed(m: &Malformed, now_ms: u64) -> DeadLetter {
        DeadLetter {
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

/// `<ms>-<seq>`, both decimal: a stream id, the form of dead letter ids.
pub fn is_stream_id(id: &str) -> bool {
    id.split_once('-').is_some_and(|(ms, seq)| {
        !ms.is_empty()
            && !seq.is_empty()
            && ms.len() <= 20
            && seq.len() <= 20
            && ms.bytes().chain(seq.bytes()).all(|b| b.is_ascii_digit())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_producer_needs_only_app_and_event() {
        let raw =
            br#"{"app_id":"app-1","event":{"name":"client_event","channel":"c","data":"{}"}}"#;
        let a = decode("1700000000000-3", Some(raw)).unwrap();
        let b = decode("1700000000000-3", Some(raw)).unwrap();
        assert_eq!(a.app_id, "app-1");
        assert_eq!(a.created_ms, 1700000000000);
        assert_eq!(a.id, b.id, "the derived id is stable across redeliveries");
        assert_ne!(a.id, decode("1700000000000-4", Some(raw)).unwrap().id);
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
        assert_eq!(decode("1-0", Some(encode(&job).as_bytes())).unwrap(), job);
    }

    /// Found by the `queue_entry` fuzz target: a number past f64's
    /// precision changed its last digits on every encode and decode.
    #[test]
    fn numbers_survive_encode_and_decode() {
        let raw = br#"{"app_id":"app0","event":{"name":"clt_edntdnt","chan[el":126707890123912345678901234567890123456789099,"data":"{"}}"#;
        let job = decode("1700000000000-0", Some(raw)).unwrap();
        assert_eq!(decode("1-0", Some(encode(&job).as_bytes())).unwrap(), job);
    }

    #[test]
    fn says_why_an_entry_is_malformed() {
        assert!(
            decode("1-0", None)
                .unwrap_err()
                .reason
                .contains("no `job` field")
        );
        let m = decode("1-0", Some(b"{not json")).unwrap_err();
        assert!(m.reason.starts_with("not a job"), "{}", m.reason);
        assert_eq!(m.raw, "{not json");
        let m = decode("1-0", Some(br#"{"app_id":"a","event":{"channel":"x"}}"#)).unwrap_err();
        assert!(m.reason.contains("name"), "{}", m.reason);
    }

    #[test]
    fn fields_past_their_range_are_refused_right_at_the_limit() {
        // (field, the first value refused, the last accepted): a time past
        // the year 9999; an attempt count with no next attempt.
        for (field, refused, accepted) in [
            ("created_ms", 253402300800000_u64, 253402300799999_u64),
            ("attempt", 4294967295, 4294967294),
        ] {
            let entry =
                |n: u64| format!(r#"{{"app_id":"a","{field}":{n},"event":{{"name":"x"}}}}"#);
            let m = decode("1-0", Some(entry(refused).as_bytes())).unwrap_err();
            assert!(m.reason.contains(field), "{}", m.reason);
            let job = decode("1-0", Some(entry(accepted).as_bytes())).unwrap();
            let kept = serde_json::to_value(&job).unwrap()[field].as_u64();
            assert_eq!(kept, Some(accepted), "{field}");
            assert!(job.attempt.checked_add(1).is_some());
        }
    }

    #[test]
    fn dead_letter_ids_are_stream_ids() {
        assert!(is_stream_id("1700000000000-0"));
        for bad in ["nope", "-1", "1-", "1-x", "client_event/1-0", ""] {
            assert!(!is_stream_id(bad), "{bad}");
        }
    }

    #[test]
    fn a_batch_round_trips_and_holds_only_its_own_apps_jobs() {
        let member = |app: &str| {
            let mut job = Job::new(
                app,
                Event::from_json(serde_json::json!({"name": "x"})).unwrap(),
                5,
            );
            job.endpoint = Some("ep".into());
            job
        };
        let batch = Job::batch_of("batch_1".into(), "ep", vec![member("a"), member("a")], 9);
        let text = encode(&batch);
        assert!(
            text.starts_with(r#"{"batch":["#),
            "the queue knows a batch by its start: {text}"
        );
        let back = decode("1-0", Some(text.as_bytes())).unwrap();
        assert_eq!(back, batch);
        assert!(back.is_batch() && back.app_id == "a");

        let mixed = Job::batch_of("batch_2".into(), "ep", vec![member("a"), member("b")], 9);
        let m = decode("1-0", Some(encode(&mixed).as_bytes())).unwrap_err();
        assert!(m.reason.contains("batch's app"), "{}", m.reason);
        let nested = Job::batch_of("batch_3".into(), "ep", vec![batch.clone()], 9);
        assert!(decode("1-0", Some(encode(&nested).as_bytes())).is_err());
        let mut aimless = batch.clone();
        aimless.endpoint = None;
        aimless.batch.iter_mut().for_each(|m| m.endpoint = None);
        let m = decode("1-0", Some(encode(&aimless).as_bytes())).unwrap_err();
        assert!(m.reason.contains("endpoint"), "{}", m.reason);
        let m = decode("1-0", Some(br#"{"batch":[{"app_id":"a"}],"app_id":"a","endpoint":"ep","event":{"name":"batch"}}"#)).unwrap_err();
        assert!(m.reason.starts_with("batch member"), "{}", m.reason);
    }

    #[test]
    fn app_and_endpoint_ids_must_be_key_safe() {
        let m = decode("1-0", Some(br#"{"app_id":"a|b","event":{"name":"x"}}"#)).unwrap_err();
        assert!(m.reason.contains("app_id"), "{}", m.reason);
        let m = decode(
            "1-0",
            Some(br#"{"app_id":"a","endpoint":"e|f","event":{"name":"x"}}"#),
        )
        .unwrap_err();
        assert!(m.reason.contains("endpoint"), "{}", m.reason);
    }
}
