//! The circuit breaker of one endpoint, shared by every worker.
//!
//! Closed: requests flow; each answer is counted in a sliding window (ten
//! buckets) and in a run of consecutive failures. When the window holds at
//! least `min_requests` answers and `failure_rate` of them failed, or the
//! run reaches `consecutive_failures`, the breaker opens: the endpoint's jobs
//! wait in its partition, not attempted, their retry schedule untouched.
//! After `cool_down` one probe request goes out (half-open): success closes
//! the breaker, failure reopens it with twice the cool-down (up to
//! `max_cool_down`). An endpoint that has failed without a single success for
//! `disable_after` is disabled: its jobs are dead-lettered with the reason
//! until an operator resets it (`wasmhook endpoints reset`) or replays one of
//! its dead letters.
//!
//! The state lives with the queue: in Redis it is a hash per endpoint updated
//! by the commit script (`queue/lua/common.lua` mirrors [`Breaker::record`]);
//! the embedded queue keeps a [`Breaker`] per endpoint.

use std::time::Duration;

use serde::Serialize;

#[derive(Debug, Clone, PartialEq)]
pub struct BreakerSettings {
    /// Fraction of failed answers in the window that opens the breaker; 0 = off.
    pub failure_rate: f64,
    /// Answers the window must hold before `failure_rate` applies.
    pub min_requests: u32,
    pub window: Duration,
    /// A run of this many failures opens the breaker; 0 = off.
    pub consecutive_failures: u32,
    pub cool_down: Duration,
    pub max_cool_down: Duration,
    /// Failing this long without a success disables the endpoint; zero = never.
    pub disable_after: Duration,
}

/// Buckets in the sliding window.
pub const BUCKETS: u64 = 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum State {
    #[default]
    Closed,
    Open,
    HalfOpen,
    Disabled,
}

impl State {
    pub fn name(self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::Open => "open",
            State::HalfOpen => "half_open",
            State::Disabled => "disabled",
        }
    }

    /// The short form stored in Redis (`""` for closed).
    pub fn parse(stored: &str) -> State {
        match stored {
            "open" => State::Open,
            "half" => State::HalfOpen,
            "disabled" => State::Disabled,
            _ => State::Closed,
        }
    }
}

/// What an attempt told about the endpoint.
#[derive(Debug, Clone, PartialEq)]
pub enum Signal {
    /// It answered (2xx, or a 4xx that is the request's fault).
    Success,
    /// 5xx, 408, timeout, connection error.
    Failure,
    /// 429/503 with `Retry-After`: every worker waits this long.
    SlowDown(Duration),
    /// 410 Gone, or the like: stop until an operator says otherwise.
    Disable(String),
}

/// One endpoint's breaker.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Breaker {
    pub state: State,
    /// (bucket index, successes, failures), newest last, at most BUCKETS.
    pub buckets: Vec<(u64, u32, u32)>,
    pub consecutive: u32,
    /// First failure since the last success (unix ms).
    pub failing_since: Option<u64>,
    /// Current cool-down (ms); 0 while closed.
    pub cool_ms: u64,
    /// Open: when the probe may go (unix ms).
    pub open_until: u64,
    pub reason: Option<String>,
}

impl Breaker {
    fn bucket_ms(s: &BreakerSettings) -> u64 {
        (s.window.as_millis() as u64 / BUCKETS).max(1)
    }

    /// (answers, failures) in the window ending at `now`.
    pub fn window(&self, s: &BreakerSettings, now: u64) -> (u32, u32) {
        let current = now / Self::bucket_ms(s);
        self.buckets
            .iter()
            .filter(|(i, _, _)| *i + BUCKETS > current)
            .fold((0, 0), |(n, f), (_, ok, bad)| (n + ok + bad, f + bad))
    }

    fn count(&mut self, s: &BreakerSettings, now: u64, failed: bool) {
        let current = now / Self::bucket_ms(s);
        self.buckets.retain(|(i, _, _)| *i + BUCKETS > current);
        match self.buckets.last_mut() {
            Some((i, ok, bad)) if *i == current => {
                if failed {
                    *bad += 1
                } else {
                    *ok += 1
                }
            }
            _ => self
                .buckets
                .push((current, u32::from(!failed), u32::from(failed))),
        }
    }

    /// Records an attempt's signal at `now` (unix ms). Returns the new state
    /// when it changed. Mirrors `health` in `queue/lua/common.lua`.
    pub fn record(&mut self, s: &BreakerSettings, signal: &Signal, now: u64) -> Option<State> {
        let before = self.state;
        match signal {
            Signal::Success => {
                self.count(s, now, false);
                self.consecutive = 0;
                self.failing_since = None;
                if matches!(self.state, State::Open | State::HalfOpen) {
                    self.state = State::Closed;
                    self.cool_ms = 0;
                    self.open_until = 0;
                }
            }
            Signal::Failure => {
                self.count(s, now, true);
                self.consecutive += 1;
                let since = *self.failing_since.get_or_insert(now);
                let disable = s.disable_after.as_millis() as u64;
                if self.state != State::Disabled
                    && disable > 0
                    && now.saturating_sub(since) >= disable
                {
                    self.state = State::Disabled;
                    self.reason = Some(format!(
                        "failing without a success for {}",
                        humantime::format_duration(s.disable_after)
                    ));
                    self.open_until = 0;
                } else if self.state == State::HalfOpen {
                    let base = s.cool_down.as_millis() as u64;
                    self.cool_ms = (self.cool_ms * 2)
                        .max(base)
                        .min(s.max_cool_down.as_millis() as u64);
                    self.state = State::Open;
                    self.open_until = now + self.cool_ms;
                } else if self.state == State::Closed && self.should_open(s, now) {
                    self.cool_ms = s.cool_down.as_millis() as u64;
                    self.state = State::Open;
                    self.open_until = now + self.cool_ms;
                }
            }
            Signal::SlowDown(_) => {}
            Signal::Disable(reason) => {
                self.state = State::Disabled;
                self.reason = Some(reason.clone());
                self.open_until = 0;
            }
        }
        (self.state != before).then_some(self.state)
    }

    fn should_open(&self, s: &BreakerSettings, now: u64) -> bool {
        let (n, failed) = self.window(s, now);
        let by_rate = s.failure_rate > 0.0
            && n >= s.min_requests.max(1)
            && failed as f64 >= s.failure_rate * n as f64;
        let by_run = s.consecutive_failures > 0 && self.consecutive >= s.consecutive_failures;
        by_rate || by_run
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> BreakerSettings {
        BreakerSettings {
            failure_rate: 0.5,
            min_requests: 4,
            window: Duration::from_secs(10),
            consecutive_failures: 0,
            cool_down: Duration::from_secs(1),
            max_cool_down: Duration::from_secs(4),
            disable_after: Duration::from_secs(60),
        }
    }

    #[test]
    fn opens_on_the_failure_rate_once_the_window_has_enough_answers() {
        let s = settings();
        let mut b = Breaker::default();
        assert_eq!(b.record(&s, &Signal::Failure, 1000), None);
        assert_eq!(b.record(&s, &Signal::Failure, 1001), None);
        assert_eq!(b.record(&s, &Signal::Success, 1002), None);
        assert_eq!(b.state, State::Closed, "3 answers: below min_requests");
        assert_eq!(b.record(&s, &Signal::Failure, 1003), Some(State::Open));
        assert_eq!(b.open_until, 2003);
    }

    #[test]
    fn old_answers_leave_the_window() {
        let s = settings();
        let mut b = Breaker::default();
        for t in 0..3 {
            b.record(&s, &Signal::Failure, t);
        }
        // 11 s later the three failures are out of the 10 s window.
        assert_eq!(b.record(&s, &Signal::Failure, 11_000), None);
        assert_eq!(b.window(&s, 11_000), (1, 1));
    }

    #[test]
    fn the_probe_closes_or_reopens_with_a_longer_cool_down() {
        let s = settings();
        let mut b = Breaker::default();
        for t in 0..4 {
            b.record(&s, &Signal::Failure, t);
        }
        assert_eq!(b.state, State::Open);
        b.state = State::HalfOpen; // the queue does this when the cool-down ends
        assert_eq!(b.record(&s, &Signal::Failure, 2000), Some(State::Open));
        assert_eq!(b.cool_ms, 2000);
        b.state = State::HalfOpen;
        b.record(&s, &Signal::Failure, 5000);
        assert_eq!(b.cool_ms, 4000);
        b.state = State::HalfOpen;
        b.record(&s, &Signal::Failure, 10_000);
        assert_eq!(b.cool_ms, 4000, "capped at max_cool_down");
        b.state = State::HalfOpen;
        assert_eq!(b.record(&s, &Signal::Success, 15_000), Some(State::Closed));
        assert_eq!((b.consecutive, b.failing_since, b.cool_ms), (0, None, 0));
    }

    #[test]
    fn a_run_of_failures_opens_when_configured_and_a_long_one_disables() {
        let mut s = settings();
        s.failure_rate = 0.0;
        s.consecutive_failures = 3;
        let mut b = Breaker::default();
        b.record(&s, &Signal::Failure, 0);
        b.record(&s, &Signal::Failure, 1);
        assert_eq!(b.record(&s, &Signal::Failure, 2), Some(State::Open));
        assert_eq!(
            b.record(&s, &Signal::Failure, 60_000),
            Some(State::Disabled)
        );
        assert!(
            b.reason.as_deref().unwrap().contains("1m"),
            "{:?}",
            b.reason
        );
        let mut gone = Breaker::default();
        assert_eq!(
            gone.record(&s, &Signal::Disable("answered 410 Gone".into()), 5),
            Some(State::Disabled)
        );
    }
}
