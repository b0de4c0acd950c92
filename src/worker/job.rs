//! One job, start to end: route, sign, deliver, and decide its outcome
//! (delivered / parked / retry at T / dead / dropped), as effects for the
//! committer.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tracing::{Instrument, debug, error, info, info_span, warn};

use super::{Context, Tenants};
use crate::app::{App, Endpoint};
use crate::breaker::Signal;
use crate::delivery::{AttemptResult, Failure, FailureKind};
use crate::event::{Attempt, Job, now_ms};
use crate::metrics;
use crate::pipeline::{Prepared, Routing};
use crate::queue::{Completion, DeadLetter, Effect, Leased, Stat};
use crate::scheduler::Slot;
use crate::signing;

/// Most attempts kept in a job's history (the oldest are dropped).
const HISTORY_CAP: usize = 50;

pub(super) async fn process(
    ctx: &Context,
    leased: Leased,
    mut slot: Slot,
    busy: &BTreeMap<String, Vec<String>>,
) -> Completion {
    let effects = match leased.job {
        Err(malformed) => {
            warn!(
                app = leased.app,
                reason = malformed.reason,
                "malformed job dead-lettered"
            );
            vec![
                Effect::DeadLetter(DeadLetter::malformed(&malformed, now_ms())),
                Effect::Count(Stat::Dead),
            ]
        }
        Ok(job) => {
            let span = info_span!(
                "job",
                app = job.app_id,
                webhook_id = job.id,
                endpoint = job.endpoint.as_deref().unwrap_or("-")
            );
            let busy = busy.get(&job.app_id).map(Vec::as_slice).unwrap_or(&[]);
            match leased.disabled {
                Some(reason) => {
                    let _entered = span.enter();
                    warn!(
                        outcome = "dead",
                        reason, "endpoint disabled; not delivering"
                    );
                    dead(job, format!("endpoint disabled: {reason}"))
                }
                None => run(ctx, job, &mut slot, busy).instrument(span).await,
            }
        }
    };
    drop(slot);
    Completion {
        lease: leased.lease,
        effects: unbatch_letters(effects),
    }
}

async fn run(ctx: &Context, job: Job, slot: &mut Slot, busy: &[String]) -> Vec<Effect> {
    let tenants = ctx.tenants();
    let Some(app) = tenants.apps.get(&job.app_id).cloned() else {
        warn!("job for an unknown app dead-lettered");
        let reason = format!("unknown app {:?}", job.app_id);
        return dead(job, reason);
    };
    match job.endpoint.clone() {
        Some(endpoint_id) => match app.endpoint(&endpoint_id) {
            Some(endpoint) if job.is_batch() => {
                deliver_batch(ctx, &tenants, &app, endpoint.clone(), job).await
            }
            Some(endpoint) => deliver(ctx, &tenants, &app, endpoint.clone(), job).await,
            None => {
                warn!("job for an endpoint no longer configured dead-lettered");
                dead(
                    job,
                    format!(
                        "endpoint {endpoint_id:?} is no longer configured for app {:?}",
                        app.id
                    ),
                )
            }
        },
        None => match tenants.pipeline.route(&app, &job).await {
            Ok((routing, skipped)) => {
                let mut effects = routed(ctx, &tenants, &app, &job, routing, slot, busy).await;
                effects.extend((0..skipped).map(|_| Effect::Count(Stat::PluginSkipped)));
                effects
            }
            Err(e) => {
                let failure = Failure::retryable(e.to_string());
                let attempt = job.attempt + 1;
                routed_in_order(&app, failed(&ctx.retry, job, attempt, failure))
            }
        },
    }
}

/// What a routed new event comes to: dropped, unrouted, delivered at once to
/// its one endpoint when that endpoint has room here, or parked in the
/// endpoints' partitions.
async fn routed(
    ctx: &Context,
    tenants: &Tenants,
    app: &App,
    job: &Job,
    routing: Routing,
    slot: &mut Slot,
    busy: &[String],
) -> Vec<Effect> {
    match routing {
        Routing::Dropped { stage, reason } => {
            info!(
                stage,
                reason,
                outcome = "dropped",
                "event dropped by the pipeline"
            );
            vec![Effect::Count(Stat::Dropped)]
        }
        Routing::Deliver(mut targets) => {
            // Each job for an endpoint with ordering keys carries its key.
            for (endpoint, aimed) in &mut targets {
                if let Some(order_by) = &endpoint.order_by {
                    aimed.order_key = Some(order_by.key_of(aimed));
                }
            }
            match targets.len() {
                0 => {
                    debug!(
                        event_type = job.event.name,
                        outcome = "unrouted",
                        "no endpoint subscribes to this event"
                    );
                    vec![Effect::Count(Stat::Unrouted)]
                }
                1 => {
                    let (endpoint, aimed) = targets.pop().expect("one target");
                    let is_busy = busy.iter().any(|b| b == &endpoint.id);
                    // An ordered endpoint's events go through its partition, one
                    // at a time; a batched endpoint's, to be batched there.
                    if !endpoint.ordered
                        && endpoint.batch.is_none()
                        && slot.try_endpoint(&endpoint.id, is_busy)
                    {
                        deliver(ctx, tenants, app, endpoint, aimed).await
                    } else {
                        debug!(
                            endpoint = endpoint.id,
                            outcome = "parked",
                            "endpoint busy; the job waits in its partition"
                        );
                        vec![Effect::Enqueue(aimed), Effect::Count(Stat::Parked)]
                    }
                }
                n => {
                    debug!(
                        endpoints = n,
                        outcome = "fanned_out",
                        "event fanned out to its endpoints"
                    );
                    let mut effects: Vec<Effect> = targets
                        .into_iter()
                        .map(|(_, aimed)| Effect::Enqueue(aimed))
                        .collect();
                    effects.push(Effect::Count(Stat::FannedOut));
                    effects
                }
            }
        }
    }
}

async fn deliver(
    ctx: &Context,
    tenants: &Tenants,
    app: &App,
    endpoint: Arc<Endpoint>,
    mut job: Job,
) -> Vec<Effect> {
    let attempt = job.attempt + 1;
    let span = info_span!(
        "attempt",
        attempt,
        endpoint = endpoint.id,
        scheme = endpoint.scheme.name()
    );
    async {
        job.endpoint = Some(endpoint.id.clone());
        // The endpoint's chain runs on every attempt; its output is what is
        // signed and sent, while a retry keeps the job as it was before it.
        let (prepared, skipped) = match tenants.pipeline.prepare(app, &endpoint, job.clone()).await
        {
            Ok((Prepared::Deliver(prepared), skipped)) => (prepared, skipped),
            Ok((Prepared::Dropped { stage, reason }, _)) => {
                info!(
                    stage,
                    reason,
                    outcome = "dropped",
                    "event dropped by the endpoint's chain"
                );
                return vec![Effect::Count(Stat::Dropped)];
            }
            Err(e) => {
                let failure = Failure::retryable(e.to_string());
                return in_order(&endpoint, failed(&endpoint.retry, job, attempt, failure));
            }
        };
        let now = now_ms();
        let request = signing::sign(app, &endpoint, &prepared, (now / 1000) as i64);
        let (result, elapsed) = send(ctx, request, endpoint.timeout).await;
        let elapsed_ms = elapsed.as_millis() as u64;
        let health = health_of(app, &endpoint);
        let mut effects = match result {
            AttemptResult::Delivered { status } => {
                info!(status, elapsed_ms, outcome = "delivered", "delivered");
                metrics::delivered_after(Duration::from_millis(
                    now_ms().saturating_sub(job.created_ms),
                ));
                vec![Effect::Count(Stat::Delivered), health(Signal::Success)]
            }
            AttemptResult::Failed(failure) => {
                let signals = signals(&failure);
                let mut effects =
                    in_order(&endpoint, failed(&endpoint.retry, job, attempt, failure));
                effects.extend(signals.into_iter().map(health));
                effects
            }
        };
        effects.extend((0..skipped).map(|_| Effect::Count(Stat::PluginSkipped)));
        effects
    }
    .instrument(span)
    .await
}

/// One attempt of a batch: the endpoint's chain runs on each event (one it
/// drops leaves the batch; one it fails on leaves it for a retry of its
/// own), the events that do not fit `max_batch_bytes` after the chain go
/// back to the front of the partition for the next batch, and the rest go
/// in one request. A failed request retries the batch whole: the same
/// members, the same webhook id.
async fn deliver_batch(
    ctx: &Context,
    tenants: &Tenants,
    app: &App,
    endpoint: Arc<Endpoint>,
    mut batch: Job,
) -> Vec<Effect> {
    let attempt = batch.attempt + 1;
    let span = info_span!(
        "attempt",
        attempt,
        endpoint = endpoint.id,
        scheme = endpoint.scheme.name(),
        events = batch.batch.len()
    );
    async {
        let mut effects = Vec::new();
        let (mut kept, mut prepared) = (Vec::new(), Vec::new());
        for member in std::mem::take(&mut batch.batch) {
            match tenants
                .pipeline
                .prepare(app, &endpoint, member.clone())
                .await
            {
                Ok((Prepared::Deliver(p), skipped)) => {
                    effects.extend((0..skipped).map(|_| Effect::Count(Stat::PluginSkipped)));
                    kept.push(member);
                    prepared.push(p);
                }
                Ok((Prepared::Dropped { stage, reason }, _)) => {
                    info!(
                        stage,
                        reason,
                        webhook_id = member.id,
                        outcome = "dropped",
                        "event dropped by the endpoint's chain"
                    );
                    effects.push(Effect::Count(Stat::Dropped));
                }
                Err(e) => {
                    let failure = Failure::retryable(e.to_string());
                    let attempt = member.attempt + 1;
                    effects.extend(failed(&endpoint.retry, member, attempt, failure));
                }
            }
        }
        if prepared.is_empty() {
            return effects;
        }
        let now = now_ms();
        let max_bytes = endpoint.batch.map_or(usize::MAX, |b| b.max_bytes);
        let mut request =
            signing::sign_batch(app, &endpoint, &batch, &prepared, (now / 1000) as i64);
        while request.body.len() > max_bytes && prepared.len() > 1 {
            let keep = prepared.len() / 2;
            prepared.truncate(keep);
            for job in kept.split_off(keep).into_iter().rev() {
                effects.push(Effect::Front { job, delay_ms: 0 });
            }
            request = signing::sign_batch(app, &endpoint, &batch, &prepared, (now / 1000) as i64);
        }
        let n = kept.len();
        batch.batch = kept;
        let (result, elapsed) = send(ctx, request, endpoint.timeout).await;
        let health = health_of(app, &endpoint);
        match result {
            AttemptResult::Delivered { status } => {
                info!(
                    status,
                    elapsed_ms = elapsed.as_millis() as u64,
                    events = n,
                    outcome = "delivered",
                    "batch delivered"
                );
                for member in &batch.batch {
                    metrics::delivered_after(Duration::from_millis(
                        now_ms().saturating_sub(member.created_ms),
                    ));
                }
                effects.extend((0..n).map(|_| Effect::Count(Stat::Delivered)));
                effects.push(health(Signal::Success));
            }
            AttemptResult::Failed(failure) => {
                let signals = signals(&failure);
                for effect in failed(&endpoint.retry, batch, attempt, failure) {
                    match effect {
                        // Each event of the batch counts.
                        Effect::Count(Stat::Retried) => {
                            effects.extend((0..n).map(|_| Effect::Count(Stat::Retried)))
                        }
                        other => effects.push(other),
                    }
                }
                effects.extend(signals.into_iter().map(health));
            }
        }
        effects
    }
    .instrument(span)
    .await
}

/// Sends one attempt's request and records its metrics.
async fn send(
    ctx: &Context,
    request: signing::SignedRequest,
    timeout: Duration,
) -> (AttemptResult, Duration) {
    let started = std::time::Instant::now();
    let result = ctx.deliverer.send(request, timeout).await;
    let elapsed = started.elapsed();
    metrics::delivery_attempt(
        elapsed,
        match &result {
            AttemptResult::Delivered { status } => Some(*status),
            AttemptResult::Failed(f) => f.status,
        },
    );
    (result, elapsed)
}

/// What an attempt says about the endpoint, as an effect for its breaker.
fn health_of<'a>(app: &'a App, endpoint: &'a Endpoint) -> impl Fn(Signal) -> Effect + 'a {
    move |signal| Effect::Health {
        app: app.id.clone(),
        endpoint: endpoint.id.clone(),
        signal,
    }
}

/// A batch that is dead-lettered leaves one dead letter per event (each can
/// be replayed on its own), saying which batch it was in; each counts.
fn unbatch_letters(effects: Vec<Effect>) -> Vec<Effect> {
    if !effects.iter().any(
        |e| matches!(e, Effect::DeadLetter(DeadLetter { job: Some(job), .. }) if job.is_batch()),
    ) {
        return effects;
    }
    let mut out = Vec::with_capacity(effects.len());
    for effect in effects {
        match effect {
            Effect::DeadLetter(DeadLetter {
                job: Some(mut batch),
                reason,
                status,
                response_body,
                attempts,
                dead_at_ms,
                raw,
            }) if batch.is_batch() => {
                let members = std::mem::take(&mut batch.batch);
                let n = members.len();
                for (i, mut member) in members.into_iter().enumerate() {
                    member.history = batch.history.clone();
                    member.attempt = batch.attempt;
                    out.push(Effect::DeadLetter(DeadLetter {
                        reason: format!("{reason} (in batch {} of {n} events)", batch.id),
                        status,
                        response_body: response_body.clone(),
                        attempts,
                        dead_at_ms,
                        job: Some(member),
                        raw: raw.clone(),
                    }));
                    if i > 0 {
                        out.push(Effect::Count(Stat::Dead));
                    }
                }
            }
            other => out.push(other),
        }
    }
    out
}

/// On an ordered endpoint a retry goes back to the front of its partition,
/// the endpoint held until it is due (nothing after it goes first), and a
/// dead letter says that it broke the order. With ordering keys, a retry
/// waits apart (the queue keeps its key taken, so only the later events of
/// the same key wait for it).
fn in_order(endpoint: &Endpoint, effects: Vec<Effect>) -> Vec<Effect> {
    if !endpoint.ordered {
        return effects;
    }
    match endpoint.order_by {
        None => keep_place(
            effects,
            true,
            " (ordered endpoint: the events after it were delivered without it)",
        ),
        Some(_) => keep_place(
            effects,
            false,
            " (ordered endpoint: the events after it with the same ordering key were delivered without it)",
        ),
    }
}

/// An app with an ordered endpoint routes its new events one at a time, in
/// order: a new event whose routing failed goes back to the front of the
/// app's new events, which wait until its retry is due (nothing after it is
/// routed first), and its dead letter says that it broke the order.
fn routed_in_order(app: &App, effects: Vec<Effect>) -> Vec<Effect> {
    if !app.endpoints.iter().any(|e| e.ordered) {
        return effects;
    }
    keep_place(
        effects,
        true,
        " (app with an ordered endpoint: the events after it were routed without it)",
    )
}

/// Ordered work that failed: with `front`, its retry goes back to the front
/// of its partition (held until due) instead of waiting apart; a dead
/// letter says what went on without it (`note`).
fn keep_place(effects: Vec<Effect>, front: bool, note: &str) -> Vec<Effect> {
    effects
        .into_iter()
        .map(|effect| match effect {
            Effect::Schedule { job, delay_ms } if front => Effect::Front { job, delay_ms },
            Effect::DeadLetter(mut letter) => {
                letter.reason.push_str(note);
                Effect::DeadLetter(letter)
            }
            other => other,
        })
        .collect()
}

/// What a failed attempt says about the endpoint: a failure for its breaker
/// (no answer, 5xx, 408, 3xx), an answer (other 4xx: the request's fault),
/// nothing (429, 425: the receiver is up and asks to wait; a destination
/// the network guard refused: nothing was sent), a slow-down for every
/// worker (429/503 with `Retry-After`), or gone (410).
fn signals(failure: &Failure) -> Vec<Signal> {
    let mut out = Vec::new();
    match (failure.kind, failure.status) {
        (FailureKind::Gone, _) => out.push(Signal::Disable("answered 410 Gone".into())),
        (FailureKind::Permanent, None) => {}
        (FailureKind::Permanent, Some(_)) => out.push(Signal::Success),
        (FailureKind::Retryable, Some(429 | 425)) => {}
        (FailureKind::Retryable, _) => out.push(Signal::Failure),
    }
    if let (Some(429 | 503), Some(wait)) = (failure.status, failure.retry_after)
        && !wait.is_zero()
    {
        out.push(Signal::SlowDown(wait));
    }
    out
}

/// The outcome of a job whose task panicked: a failure like any other, on
/// the job's retry schedule, then a dead letter with the panic's message.
pub(super) fn panicked(
    ctx: &Context,
    lease: String,
    raw: Option<&[u8]>,
    panic: Box<dyn std::any::Any + Send>,
) -> Completion {
    let message = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".into());
    let message: String = message.chars().take(1000).collect();
    error!(
        lease,
        panic = message,
        "job task panicked; treated as a failure"
    );
    let tenants = ctx.tenants();
    let endpoint_of = |job: &Job| {
        job.endpoint
            .as_deref()
            .and_then(|e| tenants.apps.get(&job.app_id)?.endpoint(e))
            .cloned()
    };
    let effects = after_panic(raw, &message, |job| {
        endpoint_of(job).map_or_else(|| ctx.retry.clone(), |e| e.retry.clone())
    });
    // An ordered endpoint's job retries in its place; so does a new event of
    // an app with one.
    let failed_job = effects.iter().find_map(|e| match e {
        Effect::Schedule { job, .. } | Effect::DeadLetter(DeadLetter { job: Some(job), .. }) => {
            Some(job.clone())
        }
        _ => None,
    });
    let effects = match failed_job {
        Some(job) => match (endpoint_of(&job), tenants.apps.get(&job.app_id)) {
            (Some(endpoint), _) => in_order(&endpoint, effects),
            (None, Some(app)) if job.endpoint.is_none() => routed_in_order(app, effects),
            _ => effects,
        },
        None => effects,
    };
    Completion {
        lease,
        effects: unbatch_letters(effects),
    }
}

fn after_panic(
    raw: Option<&[u8]>,
    message: &str,
    policy: impl FnOnce(&Job) -> crate::delivery::retry::RetryPolicy,
) -> Vec<Effect> {
    let reason = format!("job task panicked: {message}");
    match raw.map(|r| crate::queue::entry::decode("0-0", Some(r))) {
        Some(Ok(job)) => {
            let policy = policy(&job);
            let attempt = job.attempt + 1;
            failed(&policy, job, attempt, Failure::retryable(reason))
        }
        _ => {
            let malformed = crate::queue::Malformed {
                raw: String::new(),
                reason,
            };
            vec![
                Effect::DeadLetter(DeadLetter::malformed(&malformed, now_ms())),
                Effect::Count(Stat::Dead),
            ]
        }
    }
}

/// The outcome of a failed attempt: a retry if the failure allows one and the
/// schedule has one left, else a dead letter.
fn failed(
    policy: &crate::delivery::retry::RetryPolicy,
    mut job: Job,
    attempt: u32,
    failure: Failure,
) -> Vec<Effect> {
    record(&mut job, failure.status, Some(failure.message.clone()));
    job.attempt = attempt;
    let next = match failure.kind {
        FailureKind::Retryable => policy.next_delay(attempt, failure.retry_after, &mut rand::rng()),
        FailureKind::Permanent | FailureKind::Gone => None,
    };
    match next {
        Some(delay) => {
            warn!(
                error = failure.message,
                status = failure.status,
                retry_in_ms = delay.as_millis() as u64,
                outcome = "retry",
                "attempt failed; will retry"
            );
            vec![
                Effect::Schedule {
                    delay_ms: delay.as_millis() as u64,
                    job,
                },
                Effect::Count(Stat::Retried),
            ]
        }
        None => {
            let reason = match failure.kind {
                FailureKind::Retryable => {
                    format!("gave up after {attempt} attempts: {}", failure.message)
                }
                FailureKind::Permanent => format!("permanent failure: {}", failure.message),
                FailureKind::Gone => format!("endpoint is gone: {}", failure.message),
            };
            warn!(
                error = failure.message,
                status = failure.status,
                attempts = attempt,
                outcome = "dead",
                "delivery dead-lettered"
            );
            let mut letter = letter(job, reason);
            letter.status = failure.status;
            letter.response_body = failure.body;
            vec![Effect::DeadLetter(letter), Effect::Count(Stat::Dead)]
        }
    }
}

fn record(job: &mut Job, status: Option<u16>, error: Option<String>) {
    if job.history.len() >= HISTORY_CAP {
        job.history.remove(0);
    }
    job.history.push(Attempt {
        at_ms: now_ms(),
        status,
        error,
    });
}

fn letter(job: Job, reason: String) -> DeadLetter {
    DeadLetter {
        reason,
        status: None,
        response_body: None,
        attempts: job.attempt,
        dead_at_ms: now_ms(),
        job: Some(job),
        raw: None,
    }
}

fn dead(job: Job, reason: String) -> Vec<Effect> {
    vec![
        Effect::DeadLetter(letter(job, reason)),
        Effect::Count(Stat::Dead),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn failure(kind: FailureKind, status: Option<u16>, retry_after: Option<u64>) -> Failure {
        Failure {
            kind,
            message: "m".into(),
            status,
            body: None,
            retry_after: retry_after.map(Duration::from_secs),
        }
    }

    #[test]
    fn a_panic_is_retried_on_the_schedule_then_dead_lettered() {
        use crate::delivery::retry::RetryPolicy;
        use crate::event::Event;
        let policy = || RetryPolicy::new(vec![Duration::ZERO; 2], 0.0, Duration::ZERO);
        let mut job = Job::new(
            "a",
            Event::from_json(serde_json::json!({"name": "x"})).unwrap(),
            1,
        );
        let raw = crate::queue::entry::encode(&job);
        let effects = after_panic(Some(raw.as_bytes()), "boom", |_| policy());
        let Some(Effect::Schedule { job: again, .. }) = effects.first() else {
            panic!("a retry: {effects:?}");
        };
        assert_eq!(again.attempt, 1);
        assert!(
            again.history[0]
                .error
                .as_deref()
                .unwrap()
                .contains("panicked: boom")
        );
        job.attempt = 1;
        let raw = crate::queue::entry::encode(&job);
        let effects = after_panic(Some(raw.as_bytes()), "boom", |_| policy());
        let Some(Effect::DeadLetter(letter)) = effects.first() else {
            panic!("a dead letter after the schedule: {effects:?}");
        };
        assert!(
            letter.reason.contains("job task panicked: boom"),
            "{}",
            letter.reason
        );
        let effects = after_panic(None, "boom", |_| policy());
        assert!(matches!(effects.first(), Some(Effect::DeadLetter(_))));
    }

    #[test]
    fn what_an_answer_tells_the_breaker() {
        use FailureKind::*;
        assert_eq!(
            signals(&failure(Retryable, Some(500), None)),
            [Signal::Failure]
        );
        assert_eq!(signals(&failure(Retryable, None, None)), [Signal::Failure]);
        assert_eq!(
            signals(&failure(Permanent, Some(400), None)),
            [Signal::Success]
        );
        assert_eq!(signals(&failure(Permanent, None, None)), []);
        assert_eq!(signals(&failure(Retryable, Some(429), None)), []);
        assert_eq!(
            signals(&failure(Retryable, Some(429), Some(3))),
            [Signal::SlowDown(Duration::from_secs(3))]
        );
        assert_eq!(
            signals(&failure(Retryable, Some(503), Some(2))),
            [Signal::Failure, Signal::SlowDown(Duration::from_secs(2))]
        );
        assert!(matches!(
            signals(&failure(Gone, Some(410), None))[..],
            [Signal::Disable(_)]
        ));
    }
}
