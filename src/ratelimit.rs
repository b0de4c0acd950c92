//! Per-endpoint rate limits: `rate_limit = "50/s"`, held by the whole fleet
//! together. The limit is a GCRA (generic cell rate algorithm): one stored
//! number per endpoint, its theoretical arrival time (TAT). The Redis queue
//! runs the same arithmetic in Lua (`queue/lua/common.lua`), next to the
//! jobs it admits; the embedded queue runs this one.

use std::fmt;
use std::time::Duration;

/// A rate: `count` requests per `per`, with a burst of `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    pub count: u32,
    pub per: Duration,
    /// Requests that may go at once after a quiet spell (at least 1).
    pub burst: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "expected a rate like \"50/s\", \"600/m\" or \"10000/h\" (a whole number of requests at least 1)"
)]
pub struct BadRate;

impl RateLimit {
    /// Parses `N/s`, `N/m` (or `N/min`), `N/h`. The burst defaults to a tenth
    /// of a second's worth, at least 1.
    pub fn parse(text: &str) -> Result<RateLimit, BadRate> {
        let (n, unit) = text.trim().split_once('/').ok_or(BadRate)?;
        let count: u32 = n.trim().parse().map_err(|_| BadRate)?;
        if count == 0 {
            return Err(BadRate);
        }
        let per = match unit.trim() {
            "s" | "sec" | "second" => Duration::from_secs(1),
            "m" | "min" | "minute" => Duration::from_secs(60),
            "h" | "hour" => Duration::from_secs(3600),
            _ => return Err(BadRate),
        };
        let per_second = count as f64 / per.as_secs_f64();
        let burst = ((per_second / 10.0).ceil() as u32).max(1);
        Ok(RateLimit { count, per, burst })
    }

    /// Milliseconds between two requests at the limit.
    pub fn interval_ms(&self) -> f64 {
        self.per.as_secs_f64() * 1000.0 / self.count as f64
    }

    /// How far ahead of now the TAT may run (the burst allowance), ms.
    pub fn tolerance_ms(&self) -> f64 {
        self.interval_ms() * (self.burst.max(1) - 1) as f64
    }
}

impl fmt::Display for RateLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unit = match self.per.as_secs() {
            1 => "s",
            60 => "m",
            _ => "h",
        };
        write!(f, "{}/{unit}", self.count)
    }
}

/// What the limiter allows now.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Admit {
    /// Requests allowed now (≤ the number asked for).
    pub allowed: u32,
    /// The new TAT to store.
    pub tat: f64,
    /// When asked for more than allowed: when the next one is allowed (ms).
    pub next_at: Option<f64>,
}

/// GCRA: asks for `want` requests at `now` (ms) with the stored `tat` (None:
/// never used). Mirrors `gcra` in `queue/lua/common.lua`.
pub fn admit(interval: f64, tolerance: f64, tat: Option<f64>, now: f64, want: u32) -> Admit {
    let tat = tat.unwrap_or(now).max(now);
    let ahead = tat - now;
    let allowed = if ahead > tolerance {
        0
    } else {
        (((tolerance - ahead) / interval).floor() as u32 + 1).min(want)
    };
    let tat = tat + allowed as f64 * interval;
    let next_at = (allowed < want).then_some(tat - tolerance);
    Admit {
        allowed,
        tat,
        next_at,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_rates_and_refuses_nonsense() {
        let r = RateLimit::parse("50/s").unwrap();
        assert_eq!((r.count, r.per, r.burst), (50, Duration::from_secs(1), 5));
        assert_eq!(r.interval_ms(), 20.0);
        assert_eq!(
            RateLimit::parse("600/m").unwrap().per,
            Duration::from_secs(60)
        );
        assert_eq!(RateLimit::parse("600/min").unwrap().burst, 1);
        assert_eq!(RateLimit::parse("7200/h").unwrap().interval_ms(), 500.0);
        for bad in ["", "50", "0/s", "-1/s", "1.5/s", "50/d", "x/s", "50/"] {
            assert_eq!(RateLimit::parse(bad), Err(BadRate), "{bad:?}");
        }
        assert_eq!(RateLimit::parse("20/s").unwrap().to_string(), "20/s");
    }

    #[test]
    fn a_quiet_limiter_allows_its_burst_then_one_per_interval() {
        // 10/s with a burst of 3: interval 100 ms, tolerance 200 ms.
        let (i, t) = (100.0, 200.0);
        let a = admit(i, t, None, 1000.0, 10);
        assert_eq!(a.allowed, 3);
        assert_eq!(a.tat, 1300.0);
        assert_eq!(a.next_at, Some(1100.0));
        let b = admit(i, t, Some(a.tat), 1050.0, 1);
        assert_eq!(b.allowed, 0, "no token before the next interval");
        assert_eq!(b.next_at, Some(1100.0));
        let c = admit(i, t, Some(a.tat), 1100.0, 5);
        assert_eq!(c.allowed, 1);
        // Over a long run the count never exceeds burst + elapsed / interval.
        let (mut tat, mut sent) = (None, 0u32);
        for step in 0..1000 {
            let now = step as f64 * 7.0;
            let r = admit(i, t, tat, now, 4);
            sent += r.allowed;
            tat = Some(r.tat);
        }
        assert!(sent <= 3 + (999.0 * 7.0 / i) as u32 + 1, "{sent}");
        assert!(sent >= (999.0 * 7.0 / i) as u32, "{sent}");
    }
}
