//! What the benchmark examples share: the machine, the box's load, the
//! leading `time_ms` of a Pusher body, TOML quoting, letting deliveries reach
//! the loopback sinks, and cleaning up a run's keys. Used as a module
//! (`#[path = "support/mod.rs"]`), not an example.

#![allow(dead_code)]

use std::time::Duration;

/// The sinks listen on loopback, which the network guard blocks by default:
/// the environment layer of the config lets it through.
pub fn allow_loopback() -> [(String, String); 1] {
    [(
        "WASMHOOK_DELIVERY__ALLOW_NETWORKS".into(),
        r#"["127.0.0.0/8"]"#.into(),
    )]
}

pub fn toml_str(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

/// The digits of a body that starts `{"time_ms":<digits>,`, without parsing
/// the rest.
pub fn leading_time_ms(body: &[u8]) -> Option<u64> {
    let rest = body.strip_prefix(br#"{"time_ms":"#)?;
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    if digits == 0 || digits > 19 || rest.get(digits) != Some(&b',') {
        return None;
    }
    Some(
        rest[..digits]
            .iter()
            .fold(0u64, |v, b| v * 10 + u64::from(b - b'0')),
    )
}

/// Serves `app` on `listener` (bound, non-blocking) on a one-thread runtime
/// in an OS thread of its own, so a sink does not share the scheduler of
/// what it measures. Returns once it serves, or with why it cannot.
pub fn serve_on_own_thread(
    name: &str,
    listener: std::net::TcpListener,
    app: axum::Router,
) -> anyhow::Result<()> {
    let (started, outcome) = std::sync::mpsc::channel::<std::io::Result<()>>();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = started.send(Err(e));
                    return;
                }
            };
            rt.block_on(async move {
                let listener = match tokio::net::TcpListener::from_std(listener) {
                    Ok(l) => l,
                    Err(e) => {
                        let _ = started.send(Err(e));
                        return;
                    }
                };
                let _ = started.send(Ok(()));
                if let Err(e) = axum::serve(listener, app).await {
                    eprintln!("sink stopped: {e}");
                }
            });
        })?;
    outcome
        .recv()
        .map_err(|_| anyhow::anyhow!("the sink thread ended before serving"))?
        .map_err(|e| anyhow::anyhow!("starting the sink: {e}"))
}

/// Removes every key of the run: SCAN MATCH <prefix>:* and UNLINK.
pub async fn cleanup(redis_url: &str, prefix: &str) -> anyhow::Result<u64> {
    let client = redis::Client::open(redis_url)?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let pattern = format!("{prefix}:*");
    let mut cursor: u64 = 0;
    let mut removed = 0u64;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut conn)
            .await?;
        if !keys.is_empty() {
            let n: u64 = redis::cmd("UNLINK")
                .arg(&keys)
                .query_async(&mut conn)
                .await?;
            removed += n;
        }
        if next == 0 {
            return Ok(removed);
        }
        cursor = next;
    }
}

/// Fraction of all CPUs busy over `window` (/proc/stat), before anything runs.
pub async fn box_load(window: Duration) -> f64 {
    let read = || {
        let s = std::fs::read_to_string("/proc/stat").ok()?;
        let v: Vec<u64> = s
            .lines()
            .next()?
            .strip_prefix("cpu ")?
            .split_whitespace()
            .filter_map(|x| x.parse().ok())
            .collect();
        let total: u64 = v.iter().take(8).sum();
        Some((total - v.get(3)? - v.get(4)?, total))
    };
    let Some((b0, t0)) = read() else { return 0.0 };
    tokio::time::sleep(window).await;
    let Some((b1, t1)) = read() else { return 0.0 };
    if t1 <= t0 {
        return 0.0;
    }
    b1.saturating_sub(b0) as f64 / (t1 - t0) as f64
}

pub struct Machine {
    pub nproc: usize,
    pub cpu: String,
    pub mem: String,
    pub redis: String,
}

pub async fn machine_summary(redis_url: &str) -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == "model name").then(|| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines().find_map(|l| {
                let kb: u64 = l
                    .strip_prefix("MemTotal:")?
                    .trim()
                    .strip_suffix("kB")?
                    .trim()
                    .parse()
                    .ok()?;
                Some(format!("{:.1} GiB RAM", kb as f64 / 1024.0 / 1024.0))
            })
        })
        .unwrap_or_else(|| "RAM unknown".into());
    let redis = async {
        let client = redis::Client::open(redis_url).ok()?;
        let mut conn = client.get_multiplexed_async_connection().await.ok()?;
        let info: String = redis::cmd("INFO")
            .arg("server")
            .query_async(&mut conn)
            .await
            .ok()?;
        info.lines()
            .find_map(|l| l.strip_prefix("redis_version:"))
            .map(|v| v.trim().to_string())
    }
    .await
    .unwrap_or_else(|| "unknown".into());
    Machine {
        nproc: std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu,
        mem,
        redis,
    }
}

#[cfg(test)]
mod tests {
    use super::leading_time_ms;

    #[test]
    fn reads_the_leading_time_ms() {
        assert_eq!(
            leading_time_ms(br#"{"time_ms":1764201600000,"events":[]}"#),
            Some(1764201600000)
        );
        assert_eq!(leading_time_ms(br#"{"time_ms":,"events":[]}"#), None);
        assert_eq!(leading_time_ms(br#"{"events":[],"time_ms":1}"#), None);
        assert_eq!(leading_time_ms(br#"{"time_ms":12"#), None);
    }
}
