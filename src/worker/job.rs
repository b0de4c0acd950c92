//! One job, start to end: route, sign, deliver, and decide its outcome
//! (delivered / retry at T / dead / dropped), as effects for the committer.

use std::sync::Arc;

use tracing::{Instrument, debug, info, info_span, warn};

use super::{Context, Tenants};
use crate::app::{App, Endpoint};
use crate::delivery::{AttemptResult, Failure, FailureKind};
use crate::event::{Attempt, Job, now_ms};
use crate::pipeline::{Prepared, Routing};
use crate::queue::{Completion, DeadLetter, Effect, Entry, Stat};
use crate::signing;

/// Most attempts kept in a job's history (the oldest are dropped).
const HISTORY_CAP: usize = 50;

pub(super) async fn process(ctx: &Context, queue: &str, entry: Entry) -> Completion {
    let effects = match entry.job {
        Err(malformed) => {
            warn!(
                queue,
                entry = entry.id,
                reason = malformed.reason,
                "malformed queue entry dead-lettered"
            );
            vec![
                Effect::DeadLetter(DeadLetter::malformed(queue, &malformed, now_ms())),
                Effect::Count(Stat::Dead),
            ]
        }
        Ok(job) => {
            let span = info_span!(
                "job",
                queue,
                app = job.app_id,
                webhook_id = job.id,
                endpoint = job.endpoint.as_deref().unwrap_or("-")
            );
            run(ctx, queue, job).instrument(span).await
        }
    };
    Completion {
        entry_id: entry.id,
        effects,
    }
}

async fn run(ctx: &Context, queue: &str, job: Job) -> Vec<Effect> {
    let tenants = ctx.tenants();
    let Some(app) = tenants.apps.get(&job.app_id).cloned() else {
        warn!("job for an unknown app dead-lettered");
        let reason = format!("unknown app {:?}", job.app_id);
        return dead(queue, job, reason);
    };
    match job.endpoint.clone() {
        Some(endpoint_id) => match app.endpoint(&endpoint_id) {
            Some(endpoint) => deliver(ctx, &tenants, queue, &app, endpoint.clone(), job).await,
            None => {
                warn!("job for an endpoint no longer configured dead-lettered");
                dead(
                    queue,
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
                let mut effects = routed(ctx, &tenants, queue, &app, &job, routing).await;
                effects.extend((0..skipped).map(|_| Effect::Count(Stat::PluginSkipped)));
                effects
            }
            Err(e) => {
                let failure = Failure::retryable(e.to_string());
                let attempt = job.attempt + 1;
                failed(queue, &ctx.retry, job, attempt, failure)
            }
        },
    }
}

/// What a routed new event comes to: dropped, unrouted, delivered inline to
/// its one endpoint, or fanned out into one job per endpoint.
async fn routed(
    ctx: &Context,
    tenants: &Tenants,
    queue: &str,
    app: &App,
    job: &Job,
    routing: Routing,
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
        Routing::Deliver(mut targets) => match targets.len() {
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
                deliver(ctx, tenants, queue, app, endpoint, aimed).await
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
        },
    }
}

async fn deliver(
    ctx: &Context,
    tenants: &Tenants,
    queue: &str,
    app: &App,
    endpoint: Arc<Endpoint>,
    mut job: Job,
) -> Vec<Effect> {
    if ctx.is_gone(&app.id, &endpoint.id).await {
        warn!(
            outcome = "dead",
            "endpoint answered 410 Gone before; not delivering"
        );
        return dead(queue, job, "endpoint answered 410 Gone earlier; deliveries to it are stopped until a dead letter of it is replayed".into());
    }
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
                return failed(queue, &endpoint.retry, job, attempt, failure);
            }
        };
        let now = now_ms();
        let request = signing::sign(app, &endpoint, &prepared, (now / 1000) as i64);
        let result = ctx.deliverer.send(request, endpoint.timeout).await;
        let elapsed_ms = now_ms().saturating_sub(now);
        let mut effects = match result {
            AttemptResult::Delivered { status } => {
                info!(status, elapsed_ms, outcome = "delivered", "delivered");
                vec![Effect::Count(Stat::Delivered)]
            }
            AttemptResult::Failed(failure) => {
                if failure.kind == FailureKind::Gone {
                    ctx.mark_gone(&app.id, &endpoint.id).await;
                }
                failed(queue, &endpoint.retry, job, attempt, failure)
            }
        };
        effects.extend((0..skipped).map(|_| Effect::Count(Stat::PluginSkipped)));
        effects
    }
    .instrument(span)
    .await
}

/// The outcome of a failed attempt: a retry if the failure allows one and the
/// schedule has one left, else a dead letter.
fn failed(
    queue: &str,
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
                    at_ms: now_ms() + delay.as_millis() as u64,
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
            let mut letter = letter(queue, job, reason);
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

fn letter(queue: &str, job: Job, reason: String) -> DeadLetter {
    DeadLetter {
        queue: queue.to_string(),
        reason,
        status: None,
        response_body: None,
        attempts: job.attempt,
        dead_at_ms: now_ms(),
        job: Some(job),
        raw: None,
    }
}

fn dead(queue: &str, job: Job, reason: String) -> Vec<Effect> {
    vec![
        Effect::DeadLetter(letter(queue, job, reason)),
        Effect::Count(Stat::Dead),
    ]
}
