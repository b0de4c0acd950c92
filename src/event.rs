//! What flows through the system: an `Event` as producers send it, and a `Job`,
//! the unit of work on a queue (one event of one app, before fan-out; or one
//! event for one endpoint, after it).

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Longest accepted event type or channel name.
pub const MAX_NAME_LEN: usize = 200;

/// An event as Pusher and soketi put it in a webhook's `events` array: a type
/// (`name`), an optional `channel`, and any other fields the producer sends
/// (`event`, `data`, `socket_id`, `user_id`, ...), kept as they are.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<String>,
    #[serde(flatten)]
    pub fields: Map<String, Value>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventError {
    #[error("an event must be a JSON object")]
    NotAnObject,
    #[error("an event needs a string `name` (its type, e.g. \"client_event\")")]
    MissingName,
    #[error("`name` must be 1 to 200 characters of A-Z a-z 0-9 _ - . :")]
    BadName,
    #[error("`channel` must be a string of at most 200 characters")]
    BadChannel,
}

impl Event {
    /// Builds an event from producer JSON, checking what routing relies on.
    pub fn from_json(value: Value) -> Result<Event, EventError> {
        let Value::Object(mut fields) = value else {
            return Err(EventError::NotAnObject);
        };
        let name = match fields.remove("name") {
            Some(Value::String(name)) => name,
            _ => return Err(EventError::MissingName),
        };
        let channel = match fields.remove("channel") {
            None | Some(Value::Null) => None,
            Some(Value::String(c)) => Some(c),
            Some(_) => return Err(EventError::BadChannel),
        };
        let event = Event {
            name,
            channel,
            fields,
        };
        event.validate()?;
        Ok(event)
    }

    pub fn validate(&self) -> Result<(), EventError> {
        if !valid_name(&self.name) {
            return Err(EventError::BadName);
        }
        if self
            .channel
            .as_ref()
            .is_some_and(|c| c.len() > MAX_NAME_LEN)
        {
            return Err(EventError::BadChannel);
        }
        Ok(())
    }
}

/// Names that can be part of a Redis key and a queue name.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':'))
}

/// One delivery attempt, kept in the job so a dead letter shows them all.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Attempt {
    /// Unix milliseconds when the attempt finished.
    pub at_ms: u64,
    /// HTTP status, when a response came back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// Why it failed; absent for a success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The unit of work on a queue.
///
/// A **batch** is a job too: the events of one app for one batched endpoint,
/// sent in one request. Its `batch` holds the member jobs (each with its own
/// webhook id); its own `id` is the batch's webhook id, its `attempt` and
/// `history` are the batch's, and its `event` is a placeholder named
/// [`BATCH_EVENT`]. The queue makes batches when it hands out a batched
/// endpoint's jobs; a batch keeps its members on every retry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    /// First when serialized: the queue recognises a stored batch by its
    /// first bytes (`{"batch":[`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub batch: Vec<Job>,
    /// The webhook id (`webhook-id`): stable across every retry and replay.
    pub id: String,
    pub app_id: String,
    pub event: Event,
    /// Unix milliseconds when the event was accepted; the `time_ms` Pusher
    /// bodies carry, so the signed bytes are the same on every retry.
    pub created_ms: u64,
    /// Attempts made so far for `endpoint`.
    #[serde(default)]
    pub attempt: u32,
    /// None: a new event, to be routed to every endpoint that wants it.
    /// Some: the event was routed already; deliver to this endpoint only
    /// (fan-out, retry, replay).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<Attempt>,
    /// Extra request headers added by plugins (lower-case names).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<(String, String)>,
    /// Metadata plugins pass along a chain.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub metadata: Vec<(String, String)>,
    /// On an endpoint with `order_by`: the event's ordering key (one job of
    /// a key in flight at a time, in order).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order_key: Option<String>,
}

/// The placeholder event name of a batch job.
pub const BATCH_EVENT: &str = "batch";

impl Job {
    /// A new job with a fresh webhook id.
    pub fn new(app_id: impl Into<String>, event: Event, created_ms: u64) -> Job {
        Job {
            batch: Vec::new(),
            id: new_webhook_id(),
            app_id: app_id.into(),
            event,
            created_ms,
            attempt: 0,
            endpoint: None,
            history: Vec::new(),
            headers: Vec::new(),
            metadata: Vec::new(),
            order_key: None,
        }
    }

    /// A batch of `members` (jobs of one app for one endpoint), with the
    /// webhook id `id`, made at `created_ms`.
    pub fn batch_of(id: String, endpoint: &str, members: Vec<Job>, created_ms: u64) -> Job {
        let app_id = members
            .first()
            .map(|m| m.app_id.clone())
            .unwrap_or_default();
        Job {
            batch: members,
            endpoint: Some(endpoint.to_string()),
            id,
            ..Job::new(
                app_id,
                Event {
                    name: BATCH_EVENT.to_string(),
                    channel: None,
                    fields: Map::new(),
                },
                created_ms,
            )
        }
    }

    /// Whether this job is a batch of others.
    pub fn is_batch(&self) -> bool {
        !self.batch.is_empty()
    }

    /// The same delivery aimed at one endpoint.
    pub fn for_endpoint(&self, endpoint: &str) -> Job {
        Job {
            endpoint: Some(endpoint.to_string()),
            ..self.clone()
        }
    }
}

/// `msg_` followed by a ULID: unique, sortable by time.
pub fn new_webhook_id() -> String {
    format!("msg_{}", ulid::Ulid::new())
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn keeps_every_producer_field() {
        let e = Event::from_json(json!({"name": "client_event", "channel": "private-a", "event": "client-x", "data": "{\"a\":1}", "socket_id": "1.2"})).unwrap();
        assert_eq!(e.name, "client_event");
        assert_eq!(e.channel.as_deref(), Some("private-a"));
        assert_eq!(e.fields["socket_id"], "1.2");
        let back = serde_json::to_value(&e).unwrap();
        assert_eq!(back["data"], "{\"a\":1}");
        assert_eq!(back["name"], "client_event");
    }

    #[test]
    fn rejects_what_routing_cannot_use() {
        assert_eq!(Event::from_json(json!([1])), Err(EventError::NotAnObject));
        assert_eq!(
            Event::from_json(json!({"channel": "a"})),
            Err(EventError::MissingName)
        );
        assert_eq!(
            Event::from_json(json!({"name": 3})),
            Err(EventError::MissingName)
        );
        assert_eq!(
            Event::from_json(json!({"name": "a b"})),
            Err(EventError::BadName)
        );
        assert_eq!(
            Event::from_json(json!({"name": "{x}"})),
            Err(EventError::BadName)
        );
        assert_eq!(
            Event::from_json(json!({"name": "a", "channel": 5})),
            Err(EventError::BadChannel)
        );
    }

    #[test]
    fn webhook_ids_are_unique() {
        assert_ne!(new_webhook_id(), new_webhook_id());
        assert!(new_webhook_id().starts_with("msg_"));
    }
}
