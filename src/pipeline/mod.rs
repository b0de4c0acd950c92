//! What happens to an event between the queue and signing: the app-level
//! chain of stages (filter, route, transform, for every endpoint at once),
//! then matching to the app's endpoints by their subscriptions; later, per
//! endpoint and per attempt, the endpoint-level chain.
//!
//! A stage is anything that implements [`Stage`]: the WebAssembly plugin host
//! is one. With no stages, an event goes to every endpoint whose
//! `event_types` and `filter` accept it, unchanged.

pub mod route;

use std::collections::HashMap;
use std::sync::Arc;

use crate::app::{App, Endpoint};
use crate::event::{Event, Job};

/// Most request headers the stages of a chain may add to a job, in all.
pub const MAX_HEADERS: usize = 64;
/// Most metadata pairs a job may carry along its chain.
pub const MAX_METADATA: usize = 64;

/// What a stage decided about an event (the WIT `decision`).
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    Keep,
    Transform(Message),
    Drop(String),
    /// Exactly these endpoints, each optionally with its own event. Overrides
    /// the endpoints' subscriptions. App-level chain only.
    Route(Vec<RouteTarget>),
    /// The stage failed and its failure policy passes the event on
    /// unchanged; the reason is logged and the skip counted.
    Skipped(String),
}

/// A modified event, with headers to add to its request and metadata for the
/// rest of the chain. Headers and metadata add to what the job has (a name
/// given again replaces the earlier value).
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub event: Event,
    pub headers: Vec<(String, String)>,
    pub metadata: Vec<(String, String)>,
}

impl Message {
    pub fn event(event: Event) -> Message {
        Message {
            event,
            headers: Vec::new(),
            metadata: Vec::new(),
        }
    }

    /// Puts the message on the job. Refused when the job would carry more
    /// than [`MAX_HEADERS`] headers or [`MAX_METADATA`] metadata pairs.
    fn apply(self, job: &mut Job) -> Result<(), String> {
        merge(&mut job.headers, self.headers, MAX_HEADERS, "headers")?;
        merge(
            &mut job.metadata,
            self.metadata,
            MAX_METADATA,
            "metadata pairs",
        )?;
        job.event = self.event;
        Ok(())
    }
}

/// Adds `from` to `into`; a name given again replaces the earlier value.
/// Linear in the sizes of both.
fn merge(
    into: &mut Vec<(String, String)>,
    from: Vec<(String, String)>,
    max: usize,
    what: &str,
) -> Result<(), String> {
    if from.is_empty() {
        return Ok(());
    }
    let mut at: HashMap<String, usize> = into
        .iter()
        .enumerate()
        .map(|(i, (name, _))| (name.clone(), i))
        .collect();
    for (k, v) in from {
        match at.get(&k) {
            Some(&i) => into[i].1 = v,
            None => {
                if into.len() >= max {
                    return Err(format!("the chain added more than {max} {what}"));
                }
                at.insert(k.clone(), into.len());
                into.push((k, v));
            }
        }
    }
    Ok(())
}

/// `text` cut to at most `max` bytes (at a character boundary), saying how
/// long it was: for text from tenants on its way to logs and dead letters.
pub fn clip(text: String, max: usize) -> String {
    if text.len() <= max {
        return text;
    }
    let mut cut = max;
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}… ({} bytes)", &text[..cut], text.len())
}

#[derive(Debug, Clone, PartialEq)]
pub struct RouteTarget {
    pub endpoint: String,
    pub message: Option<Message>,
}

/// A stage could not decide (it failed, trapped, ran out of time). The job is
/// retried with backoff and dead-lettered with this message in the end.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("stage {stage}: {message}")]
pub struct StageError {
    pub stage: String,
    pub message: String,
}

/// One step of an app's chain.
pub trait Stage: Send + Sync {
    fn name(&self) -> &str;
    /// Decides about a job of `app`.
    fn decide<'a>(&'a self, app: &'a App, job: &'a Job) -> StageFuture<'a>;
}

/// What [`Stage::decide`] returns: a plugin call runs on the async task.
pub type StageFuture<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<Decision, StageError>> + Send + 'a>>;

/// What the app-level chain made of a new event.
#[derive(Debug)]
pub enum Routing {
    /// Deliver to each: the job is aimed at the endpoint and carries the event
    /// as the chain left it.
    Deliver(Vec<(Arc<Endpoint>, Job)>),
    /// A stage dropped it.
    Dropped { stage: String, reason: String },
}

/// What an endpoint's chain made of a job aimed at it.
#[derive(Debug)]
pub enum Prepared {
    Deliver(Job),
    Dropped { stage: String, reason: String },
}

pub type Chain = Vec<Arc<dyn Stage>>;

/// The stages of each app's chain (by app id) and each endpoint's chain (by
/// app id and endpoint id).
#[derive(Default, Clone)]
pub struct Pipeline {
    chains: HashMap<String, Chain>,
    endpoint_chains: HashMap<(String, String), Chain>,
}

impl Pipeline {
    pub fn new(
        chains: HashMap<String, Chain>,
        endpoint_chains: HashMap<(String, String), Chain>,
    ) -> Self {
        Pipeline {
            chains,
            endpoint_chains,
        }
    }

    /// Runs the endpoint's chain over a job aimed at it (on every attempt).
    /// Also returns how many stages were skipped by their failure policy.
    pub async fn prepare(
        &self,
        app: &App,
        endpoint: &Endpoint,
        job: Job,
    ) -> Result<(Prepared, u32), StageError> {
        let Some(chain) = self
            .endpoint_chains
            .get(&(app.id.clone(), endpoint.id.clone()))
        else {
            return Ok((Prepared::Deliver(job), 0));
        };
        let mut job = job;
        let mut skipped = 0;
        for stage in chain {
            match stage.decide(app, &job).await? {
                Decision::Keep => {}
                Decision::Skipped(_) => skipped += 1,
                Decision::Transform(message) => {
                    message.apply(&mut job).map_err(|message| StageError {
                        stage: stage.name().to_string(),
                        message,
                    })?
                }
                Decision::Drop(reason) => {
                    let dropped = Prepared::Dropped {
                        stage: stage.name().to_string(),
                        reason,
                    };
                    return Ok((dropped, skipped));
                }
                Decision::Route(_) => {
                    return Err(StageError {
                        stage: stage.name().to_string(),
                        message: "returned `route` in an endpoint's chain; only the app's chain can route".into(),
                    });
                }
            }
        }
        Ok((Prepared::Deliver(job), skipped))
    }

    /// Runs the app's chain over a new event and picks its endpoints. Also
    /// returns how many stages were skipped by their failure policy.
    pub async fn route(&self, app: &App, job: &Job) -> Result<(Routing, u32), StageError> {
        let mut job = job.clone();
        let mut routed: Option<Vec<RouteTarget>> = None;
        let mut skipped = 0;
        for stage in self.chains.get(&app.id).into_iter().flatten() {
            let dropped = |reason: String| Routing::Dropped {
                stage: stage.name().to_string(),
                reason,
            };
            match stage.decide(app, &job).await? {
                Decision::Keep => {}
                Decision::Skipped(_) => skipped += 1,
                Decision::Transform(message) => {
                    message.apply(&mut job).map_err(|message| StageError {
                        stage: stage.name().to_string(),
                        message,
                    })?
                }
                Decision::Drop(reason) => return Ok((dropped(reason), skipped)),
                Decision::Route(targets) if targets.is_empty() => {
                    return Ok((dropped("routed to no endpoint".into()), skipped));
                }
                Decision::Route(targets) => routed = Some(targets),
            }
        }
        let deliveries = match routed {
            None => app
                .endpoints
                .iter()
                .filter(|e| e.accepts(&job.event.name, job.event.channel.as_deref()))
                .map(|e| (e.clone(), job.for_endpoint(&e.id)))
                .collect(),
            Some(targets) => {
                let mut out = Vec::with_capacity(targets.len());
                for t in targets {
                    let endpoint = app.endpoint(&t.endpoint).ok_or_else(|| StageError {
                        stage: "route".into(),
                        message: format!(
                            "routed to unknown endpoint {:?}",
                            clip(t.endpoint.clone(), 64)
                        ),
                    })?;
                    let mut aimed = job.for_endpoint(&endpoint.id);
                    if let Some(message) = t.message {
                        message.apply(&mut aimed).map_err(|message| StageError {
                            stage: "route".into(),
                            message,
                        })?;
                    }
                    out.push((endpoint.clone(), aimed));
                }
                out
            }
        };
        Ok((Routing::Deliver(deliveries), skipped))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::app::{Scheme, Secret};
    use crate::delivery::retry::RetryPolicy;
    use route::ChannelFilter;
    use serde_json::json;
    use std::time::Duration;

    fn endpoint(id: &str, types: &[&str], prefix: Option<&str>) -> Arc<Endpoint> {
        Arc::new(Endpoint {
            id: id.into(),
            url: "http://127.0.0.1:9/".parse().unwrap(),
            scheme: Scheme::Pusher,
            event_types: types.iter().map(|t| t.to_string()).collect(),
            filter: ChannelFilter {
                starts_with: prefix.map(Into::into),
                ends_with: None,
            },
            headers: vec![],
            timeout: Duration::from_secs(1),
            retry: RetryPolicy::new(vec![Duration::ZERO], 0.0, Duration::ZERO),
            max_in_flight: 16,
            rate_limit: None,
            ordered: false,
            order_by: None,
            batch: None,
            plugins: vec![],
        })
    }

    fn app() -> App {
        App {
            id: "a".into(),
            key: "k".into(),
            secrets: vec![Secret::new("s")],
            ingest_token: Secret::new("t"),
            weight: 1,
            max_in_flight: 128,
            endpoints: vec![
                endpoint("all", &[], None),
                endpoint("occupied", &["channel_occupied"], None),
                endpoint("private", &[], Some("private-")),
            ],
            plugins: vec![],
        }
    }

    fn job(name: &str, channel: &str) -> Job {
        Job::new(
            "a",
            Event::from_json(json!({"name": name, "channel": channel})).unwrap(),
            1,
        )
    }

    fn ids(r: &Routing) -> Vec<&str> {
        match r {
            Routing::Deliver(d) => d
                .iter()
                .map(|(e, j)| {
                    assert_eq!(j.endpoint.as_deref(), Some(e.id.as_str()));
                    e.id.as_str()
                })
                .collect(),
            Routing::Dropped { .. } => vec![],
        }
    }

    #[tokio::test]
    async fn without_stages_subscriptions_decide() {
        let p = Pipeline::default();
        let app = app();
        assert_eq!(
            ids(&p
                .route(&app, &job("channel_occupied", "public-x"))
                .await
                .unwrap()
                .0),
            ["all", "occupied"]
        );
        assert_eq!(
            ids(&p
                .route(&app, &job("member_added", "private-x"))
                .await
                .unwrap()
                .0),
            ["all", "private"]
        );
    }

    struct Fixed(Decision);
    impl Stage for Fixed {
        fn name(&self) -> &str {
            "fixed"
        }
        fn decide<'a>(&'a self, _: &'a App, _: &'a Job) -> StageFuture<'a> {
            let decision = self.0.clone();
            Box::pin(async move { Ok(decision) })
        }
    }

    fn with(decisions: Vec<Decision>) -> Pipeline {
        let stages: Vec<Arc<dyn Stage>> = decisions
            .into_iter()
            .map(|d| Arc::new(Fixed(d)) as Arc<dyn Stage>)
            .collect();
        Pipeline::new(HashMap::from([("a".to_string(), stages)]), HashMap::new())
    }

    #[tokio::test]
    async fn a_drop_stops_the_chain() {
        let p = with(vec![Decision::Drop("no".into()), Decision::Route(vec![])]);
        match p.route(&app(), &job("x", "c")).await.unwrap().0 {
            Routing::Dropped { reason, .. } => assert_eq!(reason, "no"),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_route_picks_exactly_its_endpoints_with_their_own_events() {
        let special = Event::from_json(json!({"name": "special"})).unwrap();
        let p = with(vec![Decision::Route(vec![
            RouteTarget {
                endpoint: "occupied".into(),
                message: Some(Message::event(special.clone())),
            },
            RouteTarget {
                endpoint: "private".into(),
                message: None,
            },
        ])]);
        let r = p
            .route(&app(), &job("member_added", "public-x"))
            .await
            .unwrap()
            .0;
        assert_eq!(ids(&r), ["occupied", "private"]);
        let Routing::Deliver(d) = r else {
            unreachable!()
        };
        assert_eq!(d[0].1.event, special);
        assert_eq!(d[1].1.event.name, "member_added");
    }

    #[tokio::test]
    async fn a_transform_is_what_later_stages_and_endpoints_see() {
        let changed =
            Event::from_json(json!({"name": "channel_occupied", "channel": "private-y"})).unwrap();
        let p = with(vec![
            Decision::Transform(Message::event(changed.clone())),
            Decision::Keep,
        ]);
        let r = p
            .route(&app(), &job("member_added", "public-x"))
            .await
            .unwrap()
            .0;
        assert_eq!(ids(&r), ["all", "occupied", "private"]);
    }

    #[tokio::test]
    async fn skipped_stages_pass_the_event_on_and_are_counted() {
        let p = with(vec![
            Decision::Skipped("trapped".into()),
            Decision::Keep,
            Decision::Skipped("x".into()),
        ]);
        let (r, skipped) = p
            .route(&app(), &job("channel_occupied", "public-x"))
            .await
            .unwrap();
        assert_eq!(skipped, 2);
        assert_eq!(ids(&r), ["all", "occupied"]);
    }

    #[tokio::test]
    async fn routing_to_an_unknown_endpoint_is_an_error() {
        let p = with(vec![Decision::Route(vec![RouteTarget {
            endpoint: "nope".into(),
            message: None,
        }])]);
        assert!(
            p.route(&app(), &job("x", "c"))
                .await
                .unwrap_err()
                .message
                .contains("nope")
        );
    }
}
