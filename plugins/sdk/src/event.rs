use serde_json::Value;

use crate::bindings::wasmhook::plugin::types as wit;
use crate::decision::{Header, Pair};
use crate::errors::Error;

/// One event as the plugin sees it, together with the plugin's configuration.
///
/// Plugins receive it in [`Plugin::handle`](crate::Plugin::handle). For unit
/// tests on the native target, build one with [`Event::new`] and the `with_*`
/// setters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    id: String,
    app_id: String,
    event_type: String,
    channel: Option<String>,
    payload: String,
    headers: Vec<Header>,
    metadata: Vec<Pair>,
    attempt: u32,
    endpoint: Option<String>,
    config: Vec<Pair>,
}

impl Event {
    pub(crate) fn from_wit(event: wit::Event, config: Vec<wit::Pair>) -> Self {
        Event {
            id: event.id,
            app_id: event.app_id,
            event_type: event.event_type,
            channel: event.channel,
            payload: event.payload,
            headers: event.headers.into_iter().map(Header::from_wit).collect(),
            metadata: event.metadata.into_iter().map(Pair::from_wit).collect(),
            attempt: event.attempt,
            endpoint: event.endpoint,
            config: config.into_iter().map(Pair::from_wit).collect(),
        }
    }

    /// A new event (for tests): the payload is the JSON text of the event
    /// object. Id `"test-event"`, app `"test-app"`, attempt 1, no channel, no
    /// endpoint, no headers, metadata or config; change them with the `with_*`
    /// setters.
    pub fn new(event_type: impl Into<String>, payload: impl Into<String>) -> Self {
        Event {
            id: "test-event".to_owned(),
            app_id: "test-app".to_owned(),
            event_type: event_type.into(),
            channel: None,
            payload: payload.into(),
            headers: Vec::new(),
            metadata: Vec::new(),
            attempt: 1,
            endpoint: None,
            config: Vec::new(),
        }
    }

    /// Webhook id: stable across every retry and replay of the delivery.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The app (tenant) that owns the event.
    pub fn app_id(&self) -> &str {
        &self.app_id
    }

    /// Event type, e.g. `client_event`, `member_added` (the event's `name`).
    pub fn event_type(&self) -> &str {
        &self.event_type
    }

    /// The channel, when the event has one.
    pub fn channel(&self) -> Option<&str> {
        self.channel.as_deref()
    }

    /// The event object as JSON text.
    pub fn payload(&self) -> &str {
        &self.payload
    }

    /// The payload parsed as JSON. Fails (with an [`Error`] naming the cause)
    /// only if the worker handed over invalid JSON.
    pub fn json(&self) -> Result<Value, Error> {
        serde_json::from_str(&self.payload)
            .map_err(|e| Error::new(format!("event payload is not valid JSON: {e}")))
    }

    /// The payload's `data` field. Pusher events usually carry `data` as a JSON
    /// *string* holding JSON: when it parses as JSON it is returned parsed,
    /// otherwise as it is (e.g. a plain string). `None` if the payload is not
    /// an object or has no `data`.
    pub fn data(&self) -> Option<Value> {
        let mut payload = self.json().ok()?;
        let data = payload.as_object_mut()?.remove("data")?;
        Some(crate::json::decode_embedded(data))
    }

    /// Extra headers collected so far in the chain.
    pub fn headers(&self) -> &[Header] {
        &self.headers
    }

    /// The value of a collected header (name is case-insensitive; last wins).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .rev()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value.as_str())
    }

    /// Metadata passed along the chain by earlier plugins.
    pub fn metadata(&self) -> &[Pair] {
        &self.metadata
    }

    /// One metadata value (last wins).
    pub fn metadata_value(&self, key: &str) -> Option<&str> {
        find(&self.metadata, key)
    }

    /// Delivery attempt, 1 on the first.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The endpoint id in an endpoint-level chain; `None` in the app-level
    /// chain.
    pub fn endpoint(&self) -> Option<&str> {
        self.endpoint.as_deref()
    }

    /// The plugin's configuration, in the order the worker passed it.
    pub fn config_entries(&self) -> &[Pair] {
        &self.config
    }

    /// One configuration value (if a key is repeated, the last one wins).
    pub fn config(&self, key: &str) -> Option<&str> {
        find(&self.config, key)
    }

    /// One configuration value, or `default` when it is not set.
    pub fn config_or<'a>(&'a self, key: &str, default: &'a str) -> &'a str {
        self.config(key).unwrap_or(default)
    }

    /// A required configuration value: an [`Error`] naming the key when it is
    /// missing or blank.
    pub fn require_config(&self, key: &str) -> Result<&str, Error> {
        match self.config(key) {
            Some(value) if !value.trim().is_empty() => Ok(value),
            _ => Err(Error::new(format!("missing configuration key `{key}`"))),
        }
    }

    /// A comma-separated configuration value as a list: items are trimmed and
    /// empty items skipped. Empty when the key is not set.
    pub fn config_list(&self, key: &str) -> Vec<&str> {
        self.config(key).map(split_list).unwrap_or_default()
    }

    /// A boolean configuration value (`true/false`, `yes/no`, `on/off`,
    /// `1/0`, case-insensitive), `default` when unset, an [`Error`] when it is
    /// something else.
    pub fn config_bool(&self, key: &str, default: bool) -> Result<bool, Error> {
        let Some(value) = self.config(key) else {
            return Ok(default);
        };
        match value.trim().to_ascii_lowercase().as_str() {
            "true" | "yes" | "on" | "1" => Ok(true),
            "false" | "no" | "off" | "0" => Ok(false),
            _ => Err(Error::new(format!(
                "configuration key `{key}` must be true or false, got `{value}`"
            ))),
        }
    }

    /// A configuration value parsed with [`str::parse`], `default` when unset,
    /// an [`Error`] when it doesn't parse.
    pub fn config_parse<T>(&self, key: &str, default: T) -> Result<T, Error>
    where
        T: std::str::FromStr,
        T::Err: std::fmt::Display,
    {
        match self.config(key) {
            None => Ok(default),
            Some(value) => value
                .trim()
                .parse()
                .map_err(|e| Error::new(format!("configuration key `{key}` = `{value}`: {e}"))),
        }
    }

    /// The configuration entries whose key starts with `prefix`, as
    /// `(rest_of_key, value)`, in configuration order. For example with
    /// `type.member_added = a` and prefix `"type."` this yields
    /// `("member_added", "a")`.
    pub fn config_prefixed<'a>(
        &'a self,
        prefix: &'a str,
    ) -> impl Iterator<Item = (&'a str, &'a str)> + 'a {
        self.config.iter().filter_map(move |pair| {
            pair.key
                .strip_prefix(prefix)
                .map(|rest| (rest, pair.value.as_str()))
        })
    }

    // --- setters, mainly for tests -------------------------------------

    /// Sets the webhook id.
    pub fn with_id(mut self, id: impl Into<String>) -> Self {
        self.id = id.into();
        self
    }

    /// Sets the app id.
    pub fn with_app_id(mut self, app_id: impl Into<String>) -> Self {
        self.app_id = app_id.into();
        self
    }

    /// Sets the channel.
    pub fn with_channel(mut self, channel: impl Into<String>) -> Self {
        self.channel = Some(channel.into());
        self
    }

    /// Sets the payload (JSON text).
    pub fn with_payload(mut self, payload: impl Into<String>) -> Self {
        self.payload = payload.into();
        self
    }

    /// Adds a collected header.
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push(Header::new(name, value));
        self
    }

    /// Adds a metadata pair.
    pub fn with_metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.metadata.push(Pair::new(key, value));
        self
    }

    /// Sets the delivery attempt.
    pub fn with_attempt(mut self, attempt: u32) -> Self {
        self.attempt = attempt;
        self
    }

    /// Sets the endpoint (endpoint-level chain).
    pub fn with_endpoint(mut self, endpoint: impl Into<String>) -> Self {
        self.endpoint = Some(endpoint.into());
        self
    }

    /// Adds a configuration entry.
    pub fn with_config(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.config.push(Pair::new(key, value));
        self
    }
}

fn find<'a>(pairs: &'a [Pair], key: &str) -> Option<&'a str> {
    pairs
        .iter()
        .rev()
        .find(|p| p.key == key)
        .map(|p| p.value.as_str())
}

/// Splits a comma-separated list: items trimmed, empty items skipped.
pub(crate) fn split_list(value: &str) -> Vec<&str> {
    value
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event() -> Event {
        Event::new(
            "client_event",
            r#"{"name":"client_event","data":"{\"a\":1}"}"#,
        )
        .with_channel("private-chat")
        .with_config("paths", " a.b , ,c ")
        .with_config("flag", "Yes")
        .with_config("n", "42")
        .with_config("type.x", "e1")
        .with_config("type.y", "e2")
        .with_config("dup", "first")
        .with_config("dup", "second")
        .with_header("X-One", "1")
        .with_metadata("k", "v")
    }

    #[test]
    fn accessors() {
        let e = event();
        assert_eq!(e.event_type(), "client_event");
        assert_eq!(e.channel(), Some("private-chat"));
        assert_eq!(e.endpoint(), None);
        assert_eq!(e.attempt(), 1);
        assert_eq!(e.header("x-one"), Some("1"));
        assert_eq!(e.metadata_value("k"), Some("v"));
        assert_eq!(e.json().unwrap()["name"], "client_event");
        assert_eq!(e.data().unwrap(), serde_json::json!({"a": 1}));
    }

    #[test]
    fn config_helpers() {
        let e = event();
        assert_eq!(e.config_list("paths"), vec!["a.b", "c"]);
        assert!(e.config_list("missing").is_empty());
        assert!(e.config_bool("flag", false).unwrap());
        assert!(!e.config_bool("missing", false).unwrap());
        assert!(e.config_bool("paths", false).is_err());
        assert_eq!(e.config_parse::<u32>("n", 0).unwrap(), 42);
        assert!(e.config_parse::<u32>("flag", 0).is_err());
        assert_eq!(e.config("dup"), Some("second"));
        assert_eq!(e.config_or("missing", "d"), "d");
        assert!(e.require_config("missing").is_err());
        let typed: Vec<_> = e.config_prefixed("type.").collect();
        assert_eq!(typed, vec![("x", "e1"), ("y", "e2")]);
    }

    #[test]
    fn invalid_payload_is_an_error() {
        let e = Event::new("x", "not json");
        assert!(e.json().unwrap_err().message().contains("not valid JSON"));
        assert_eq!(e.data(), None);
    }
}
