//! When to try again: the retry schedule, its jitter, and `Retry-After`.

use std::time::{Duration, SystemTime};

use rand::Rng;

/// A schedule of delays, one before each attempt (the first is the initial
/// attempt's, normally zero). When the last attempt fails, the delivery is
/// dead.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    schedule: Vec<Duration>,
    /// Fraction each delay is spread by, either way (0.2 = ±20%).
    jitter: f64,
    /// The most a `Retry-After` header may push the next attempt out.
    max_retry_after: Duration,
}

impl RetryPolicy {
    /// `schedule` must not be empty; `jitter` is within 0..1.
    pub fn new(schedule: Vec<Duration>, jitter: f64, max_retry_after: Duration) -> Self {
        assert!(
            !schedule.is_empty(),
            "a retry schedule has at least the first attempt"
        );
        RetryPolicy {
            schedule,
            jitter: jitter.clamp(0.0, 1.0),
            max_retry_after,
        }
    }

    /// The same limits with another schedule (an endpoint's own).
    pub fn with_schedule(&self, schedule: Vec<Duration>) -> Self {
        RetryPolicy::new(schedule, self.jitter, self.max_retry_after)
    }

    /// The longest a `Retry-After` may push an attempt (or hold an endpoint).
    pub fn max_retry_after(&self) -> Duration {
        self.max_retry_after
    }

    pub fn max_attempts(&self) -> u32 {
        self.schedule.len() as u32
    }

    /// The delay before the next attempt once `attempts_made` have failed, or
    /// None when none is left. A `Retry-After` longer than the schedule's
    /// delay wins, up to `max_retry_after`.
    pub fn next_delay(
        &self,
        attempts_made: u32,
        retry_after: Option<Duration>,
        rng: &mut impl Rng,
    ) -> Option<Duration> {
        let base = *self.schedule.get(attempts_made as usize)?;
        let jittered = if self.jitter > 0.0 && !base.is_zero() {
            base.mul_f64(rng.random_range(1.0 - self.jitter..=1.0 + self.jitter))
        } else {
            base
        };
        Some(match retry_after {
            Some(ra) => jittered.max(ra.min(self.max_retry_after)),
            None => jittered,
        })
    }
}

/// Parses `Retry-After`: delay-seconds or an HTTP date.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    fn standard() -> RetryPolicy {
        let s = |secs: u64| Duration::from_secs(secs);
        RetryPolicy::new(
            vec![
                s(0),
                s(5),
                s(300),
                s(1800),
                s(7200),
                s(18000),
                s(36000),
                s(50400),
                s(72000),
                s(86400),
            ],
            0.2,
            s(3600),
        )
    }

    #[test]
    fn follows_the_schedule_then_stops() {
        let p = RetryPolicy::new(
            vec![
                Duration::ZERO,
                Duration::from_millis(10),
                Duration::from_millis(20),
            ],
            0.0,
            Duration::from_secs(1),
        );
        let mut rng = StdRng::seed_from_u64(1);
        assert_eq!(p.max_attempts(), 3);
        assert_eq!(
            p.next_delay(1, None, &mut rng),
            Some(Duration::from_millis(10))
        );
        assert_eq!(
            p.next_delay(2, None, &mut rng),
            Some(Duration::from_millis(20))
        );
        assert_eq!(p.next_delay(3, None, &mut rng), None);
    }

    #[test]
    fn jitter_stays_within_twenty_percent_and_varies() {
        let p = standard();
        let mut rng = StdRng::seed_from_u64(7);
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..2000 {
            let d = p.next_delay(2, None, &mut rng).unwrap();
            assert!(
                d >= Duration::from_secs(240) && d <= Duration::from_secs(360),
                "{d:?}"
            );
            seen.insert(d.as_millis());
        }
        assert!(seen.len() > 100, "jitter spreads delays");
        assert!(
            *seen.first().unwrap() < 250_000 && *seen.last().unwrap() > 350_000,
            "uses most of the range"
        );
    }

    #[test]
    fn the_default_schedule_has_ten_attempts_ending_at_a_day() {
        let p = standard();
        let mut rng = StdRng::seed_from_u64(3);
        assert_eq!(p.max_attempts(), 10);
        let last = p.next_delay(9, None, &mut rng).unwrap();
        assert!(last >= Duration::from_secs(69120) && last <= Duration::from_secs(103680));
        assert_eq!(p.next_delay(10, None, &mut rng), None);
    }

    #[test]
    fn retry_after_lengthens_but_is_capped() {
        let p = RetryPolicy::new(
            vec![Duration::ZERO, Duration::from_secs(5)],
            0.0,
            Duration::from_secs(60),
        );
        let mut rng = StdRng::seed_from_u64(1);
        assert_eq!(
            p.next_delay(1, Some(Duration::from_secs(30)), &mut rng),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            p.next_delay(1, Some(Duration::from_secs(1)), &mut rng),
            Some(Duration::from_secs(5))
        );
        assert_eq!(
            p.next_delay(1, Some(Duration::from_secs(86400)), &mut rng),
            Some(Duration::from_secs(60))
        );
    }

    #[test]
    fn parses_both_forms_of_retry_after() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_445_412_480); // Wed, 21 Oct 2015 07:28:00 GMT
        assert_eq!(
            parse_retry_after("120", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:30 GMT", now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon", now), None);
    }
}
