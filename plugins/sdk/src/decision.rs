use serde_json::Value;

use crate::bindings::wasmhook::plugin::types as wit;
use crate::event::Event;

/// An HTTP header to add to the outgoing webhook request (name is
/// case-insensitive). Signature and content headers set by the worker cannot be
/// overridden.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub name: String,
    pub value: String,
}

impl Header {
    pub fn new(name: impl Into<String>, value: impl Into<String>) -> Self {
        Header {
            name: name.into(),
            value: value.into(),
        }
    }

    pub(crate) fn from_wit(h: wit::Header) -> Self {
        Header {
            name: h.name,
            value: h.value,
        }
    }

    fn into_wit(self) -> wit::Header {
        wit::Header {
            name: self.name,
            value: self.value,
        }
    }
}

/// A key/value pair (configuration, metadata).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pair {
    pub key: String,
    pub value: String,
}

impl Pair {
    pub fn new(key: impl Into<String>, value: impl Into<String>) -> Self {
        Pair {
            key: key.into(),
            value: value.into(),
        }
    }

    pub(crate) fn from_wit(p: wit::Pair) -> Self {
        Pair {
            key: p.key,
            value: p.value,
        }
    }

    fn into_wit(self) -> wit::Pair {
        wit::Pair {
            key: self.key,
            value: self.value,
        }
    }
}

/// A (possibly modified) event to pass on: payload (JSON text of an object with
/// a string `name`), headers to add, metadata for the next plugins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub payload: String,
    pub headers: Vec<Header>,
    pub metadata: Vec<Pair>,
}

impl Message {
    /// A message with this payload and no headers or metadata.
    pub fn new(payload: &Value) -> Self {
        Message::raw(crate::json::compact(payload))
    }

    /// A message whose payload is already JSON text (passed as is).
    pub fn raw(payload: impl Into<String>) -> Self {
        Message {
            payload: payload.into(),
            headers: Vec::new(),
            metadata: Vec::new(),
        }
    }

    /// The event as it came in: same payload, headers and metadata.
    pub fn from_event(event: &Event) -> Self {
        Message {
            payload: event.payload().to_owned(),
            headers: event.headers().to_vec(),
            metadata: event.metadata().to_vec(),
        }
    }

    /// Sets a header, replacing one of the same name (case-insensitive).
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        let header = Header::new(name, value);
        self.headers
            .retain(|h| !h.name.eq_ignore_ascii_case(&header.name));
        self.headers.push(header);
        self
    }

    /// Sets a metadata entry, replacing one with the same key.
    pub fn with_metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        let pair = Pair::new(key, value);
        self.metadata.retain(|p| p.key != pair.key);
        self.metadata.push(pair);
        self
    }

    /// The payload parsed as JSON (`None` if it is not valid JSON).
    pub fn json(&self) -> Option<Value> {
        serde_json::from_str(&self.payload).ok()
    }

    fn into_wit(self) -> wit::Message {
        wit::Message {
            payload: self.payload,
            headers: self.headers.into_iter().map(Header::into_wit).collect(),
            metadata: self.metadata.into_iter().map(Pair::into_wit).collect(),
        }
    }
}

/// One destination of a [`Decision::Route`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteTarget {
    /// Id of one of the app's endpoints.
    pub endpoint: String,
    /// Its own version of the event; `None` keeps the current one.
    pub message: Option<Message>,
}

impl RouteTarget {
    /// The current event, unchanged, to this endpoint.
    pub fn new(endpoint: impl Into<String>) -> Self {
        RouteTarget {
            endpoint: endpoint.into(),
            message: None,
        }
    }

    /// Sends its own version of the event to this endpoint.
    pub fn with_message(mut self, message: Message) -> Self {
        self.message = Some(message);
        self
    }

    fn into_wit(self) -> wit::RouteTarget {
        wit::RouteTarget {
            endpoint: self.endpoint,
            message: self.message.map(Message::into_wit),
        }
    }
}

impl From<&str> for RouteTarget {
    fn from(endpoint: &str) -> Self {
        RouteTarget::new(endpoint)
    }
}

impl From<String> for RouteTarget {
    fn from(endpoint: String) -> Self {
        RouteTarget::new(endpoint)
    }
}

impl From<&String> for RouteTarget {
    fn from(endpoint: &String) -> Self {
        RouteTarget::new(endpoint.as_str())
    }
}

/// What the plugin decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Pass the event on unchanged.
    Keep,
    /// Pass on this modified event.
    Transform(Message),
    /// Stop here: the event is not delivered; the reason is recorded.
    Drop(String),
    /// Deliver to exactly these endpoints (app-level chain only). An empty
    /// list is the same as a drop.
    Route(Vec<RouteTarget>),
}

impl Decision {
    /// Pass the event on unchanged.
    pub fn keep() -> Self {
        Decision::Keep
    }

    /// Pass on this payload (a JSON object with a string `name`), with no
    /// extra headers or metadata unless added with
    /// [`with_header`](Self::with_header) / [`with_metadata`](Self::with_metadata).
    pub fn transform(payload: Value) -> Self {
        Decision::Transform(Message::new(&payload))
    }

    /// Like [`transform`](Self::transform) with a payload that is already
    /// JSON text.
    pub fn transform_raw(payload: impl Into<String>) -> Self {
        Decision::Transform(Message::raw(payload))
    }

    /// Pass on this message.
    pub fn message(message: Message) -> Self {
        Decision::Transform(message)
    }

    /// Pass on the event's current payload, headers and metadata, typically to
    /// add a header or metadata without touching the payload:
    /// `Decision::pass(&event).with_header("x-tenant", "a")`.
    pub fn pass(event: &Event) -> Self {
        Decision::Transform(Message::from_event(event))
    }

    /// Do not deliver the event; `reason` is recorded and logged.
    pub fn drop(reason: impl Into<String>) -> Self {
        Decision::Drop(reason.into())
    }

    /// Deliver to exactly these endpoints: `Decision::route(["a", "b"])`, or
    /// [`RouteTarget`]s with their own message.
    pub fn route<I>(targets: I) -> Self
    where
        I: IntoIterator,
        I::Item: Into<RouteTarget>,
    {
        Decision::Route(targets.into_iter().map(Into::into).collect())
    }

    /// Sets a header on a transform, or on every route target that carries
    /// its own message. No effect on `Keep` and `Drop` (use
    /// [`Decision::pass`] to add headers without changing the payload).
    pub fn with_header(self, name: impl Into<String>, value: impl Into<String>) -> Self {
        let (name, value) = (name.into(), value.into());
        self.map_messages(|m| m.with_header(name.clone(), value.clone()))
    }

    /// Sets a metadata entry, like [`with_header`](Self::with_header).
    pub fn with_metadata(self, key: impl Into<String>, value: impl Into<String>) -> Self {
        let (key, value) = (key.into(), value.into());
        self.map_messages(|m| m.with_metadata(key.clone(), value.clone()))
    }

    fn map_messages(self, mut f: impl FnMut(Message) -> Message) -> Self {
        match self {
            Decision::Transform(m) => Decision::Transform(f(m)),
            Decision::Route(targets) => Decision::Route(
                targets
                    .into_iter()
                    .map(|t| RouteTarget {
                        endpoint: t.endpoint,
                        message: t.message.map(&mut f),
                    })
                    .collect(),
            ),
            other => other,
        }
    }

    // --- inspection, mainly for tests -----------------------------------

    /// `true` for [`Decision::Keep`].
    pub fn is_keep(&self) -> bool {
        matches!(self, Decision::Keep)
    }

    /// The drop reason, for [`Decision::Drop`].
    pub fn drop_reason(&self) -> Option<&str> {
        match self {
            Decision::Drop(reason) => Some(reason),
            _ => None,
        }
    }

    /// The message of a [`Decision::Transform`].
    pub fn transformed(&self) -> Option<&Message> {
        match self {
            Decision::Transform(message) => Some(message),
            _ => None,
        }
    }

    /// The parsed payload of a [`Decision::Transform`].
    pub fn payload_json(&self) -> Option<Value> {
        self.transformed().and_then(Message::json)
    }

    /// The endpoint ids of a [`Decision::Route`].
    pub fn route_endpoints(&self) -> Option<Vec<&str>> {
        match self {
            Decision::Route(targets) => Some(targets.iter().map(|t| t.endpoint.as_str()).collect()),
            _ => None,
        }
    }

    pub(crate) fn into_wit(self) -> wit::Decision {
        match self {
            Decision::Keep => wit::Decision::Keep,
            Decision::Transform(m) => wit::Decision::Transform(m.into_wit()),
            Decision::Drop(reason) => wit::Decision::Drop(reason),
            Decision::Route(targets) => {
                wit::Decision::Route(targets.into_iter().map(RouteTarget::into_wit).collect())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn builders() {
        assert!(Decision::keep().is_keep());
        assert_eq!(Decision::drop("nope").drop_reason(), Some("nope"));
        let d = Decision::transform(json!({"name": "x"}))
            .with_header("X-A", "1")
            .with_header("x-a", "2")
            .with_metadata("k", "v");
        let m = d.transformed().unwrap();
        assert_eq!(m.payload, r#"{"name":"x"}"#);
        assert_eq!(m.headers, vec![Header::new("x-a", "2")]);
        assert_eq!(m.metadata, vec![Pair::new("k", "v")]);
        // no effect on keep/drop
        assert!(Decision::keep().with_header("a", "b").is_keep());
    }

    #[test]
    fn route() {
        let d = Decision::route(["a", "b"]);
        assert_eq!(d.route_endpoints(), Some(vec!["a", "b"]));
        let d = Decision::route(vec![
            RouteTarget::new("a"),
            RouteTarget::new("b").with_message(Message::raw(r#"{"name":"y"}"#)),
        ])
        .with_header("h", "v");
        let Decision::Route(targets) = &d else {
            panic!()
        };
        assert!(targets[0].message.is_none());
        assert_eq!(targets[1].message.as_ref().unwrap().headers[0].value, "v");
        match d.into_wit() {
            wit::Decision::Route(t) => assert_eq!(t.len(), 2),
            _ => panic!(),
        }
    }

    #[test]
    fn pass_keeps_event_parts() {
        let e = Event::new("x", r#"{"name":"x"}"#)
            .with_header("a", "1")
            .with_metadata("m", "1");
        let d = Decision::pass(&e).with_header("b", "2");
        let m = d.transformed().unwrap();
        assert_eq!(m.payload, e.payload());
        assert_eq!(m.headers.len(), 2);
        assert_eq!(m.metadata, vec![Pair::new("m", "1")]);
    }
}
