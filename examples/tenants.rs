//! Run with: cargo run --release --example tenants -- --redis-url redis://127.0.0.1:6379
//!
//! Tenant isolation and idle cost against a real Redis, with the worker in
//! this process on the DEFAULT queue and delivery settings (the slow scenario
//! only raises `delivery.timeout` above the slow endpoint's answer time, and
//! `queues.visibility_timeout` above that). Scenarios (`--scenario`, default:
//! all three, one after another):
//!
//! - `slow`: app `noisy` has 640 events queued for an endpoint that answers
//!   after `--slow-ms`; once 16 of its requests are in progress, app `quiet`
//!   sends 200 events at 50/s to a fast endpoint. Reports the quiet app's
//!   latency, the most noisy requests in progress at once, and how many noisy
//!   events were delivered by the time the quiet app's last one arrived.
//! - `backlog`: app `bulk` has 200,000 events queued for a fast endpoint; once
//!   1,000 have arrived, `quiet` sends 200 events at 50/s. Reports the quiet
//!   app's latency (also over just the events that arrived before the
//!   backlog was gone, if it was) and how far the bulk backlog had got.
//! - `idle`: 1 app, then `--idle-apps` apps, nothing queued: Redis commands/s
//!   (by command), Redis CPU, this process's CPU and the worker's Redis
//!   connections over `--idle-secs`. Redis's counters are server-wide: a
//!   window in which another client used the Redis is measured again (up to
//!   three times, then reported as disturbed).
//!
//! The sink is a loopback HTTP server on its own one-thread runtime (its own
//! OS thread); paths tell apps apart. Endpoints use the `pusher` scheme, whose
//! body starts `{"time_ms":<enqueue time>,`: latency = arrival - that.
//!
//! Each scenario writes its keys under its own prefix
//! (`wasmhook-tenants-<random hex>`) and removes every `<prefix>:*` key at
//! the end.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use bytes::Bytes;
use clap::{Parser, ValueEnum};
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

#[path = "support/mod.rs"]
mod support;

use support::{allow_loopback, box_load, cleanup, leading_time_ms, machine_summary, toml_str};
use wasmhook::config::Settings;
use wasmhook::event::now_ms;
use wasmhook::producer::Producer;
use wasmhook::service;

/// Events per enqueue call when filling a backlog.
const FILL_BATCH: u64 = 1000;
/// Every wait gives up after this.
const WAIT: Duration = Duration::from_secs(120);
const POLL: Duration = Duration::from_millis(10);
/// Slow requests in progress before the quiet app starts (the default
/// `delivery.max_in_flight`: the endpoint's whole share of the worker).
const SLOW_BUSY: u64 = 16;
/// Bulk deliveries before the quiet app starts.
const BULK_STARTED: u64 = 1000;
/// Commands the worker sends itself; every other command it causes runs
/// inside one of its Lua scripts.
const CLIENT_SENT: &[&str] = &[
    "evalsha",
    "eval",
    "evalsha_ro",
    "eval_ro",
    "fcall",
    "script|load",
    "xreadgroup",
    "xautoclaim",
    "xgroup|create",
    "subscribe",
    "ping",
    "hello",
    "select",
    "client|setinfo",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
    /// A slow endpoint of one app next to a quiet app.
    Slow,
    /// A big backlog of one app next to a quiet app.
    Backlog,
    /// The cost of a worker at rest, 1 app against --idle-apps.
    Idle,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::Slow => "slow",
            Scenario::Backlog => "backlog",
            Scenario::Idle => "idle",
        }
    }
}

#[derive(Debug, Parser)]
#[command(about = "Tenant isolation and idle cost benchmark for wasmhook")]
struct Args {
    /// One scenario (default: all three, one after another).
    #[arg(long, value_enum)]
    scenario: Option<Scenario>,
    #[arg(long, default_value = "redis://127.0.0.1:6379")]
    redis_url: String,
    /// slow: how long the noisy app's endpoint takes to answer.
    #[arg(long, default_value_t = 5000)]
    slow_ms: u64,
    /// slow: noisy events queued before the worker starts.
    #[arg(long, default_value_t = 640)]
    noisy_events: u64,
    /// backlog: bulk events queued before the worker starts.
    #[arg(long, default_value_t = 200_000)]
    bulk_events: u64,
    /// slow, backlog: events the quiet app sends.
    #[arg(long, default_value_t = 200)]
    quiet_events: u64,
    /// slow, backlog: the quiet app's events per second.
    #[arg(long, default_value_t = 50)]
    quiet_rate: u64,
    /// idle: apps configured (compared with 1 app).
    #[arg(long, default_value_t = 10_000)]
    idle_apps: usize,
    /// idle: seconds measured, after 2 s to settle.
    #[arg(long, default_value_t = 20)]
    idle_secs: u64,
    /// Log the service at info level to stderr (quiet by default).
    #[arg(long)]
    log: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.quiet_events == 0 || args.quiet_rate == 0 || args.idle_apps == 0 || args.idle_secs == 0
    {
        bail!("--quiet-events, --quiet-rate, --idle-apps and --idle-secs must be at least 1");
    }
    if args.noisy_events < SLOW_BUSY || args.bulk_events < BULK_STARTED {
        bail!(
            "--noisy-events must be at least {SLOW_BUSY} and --bulk-events at least {BULK_STARTED}"
        );
    }
    if args.log {
        wasmhook::telemetry::init(wasmhook::config::LogFormat::Pretty, "info");
    }
    let m = machine_summary(&args.redis_url).await;
    let machine = format!(
        "{}, {} CPUs, Redis {} at {}",
        m.cpu, m.nproc, m.redis, args.redis_url
    );
    let given: Vec<String> = std::env::args().skip(1).collect();
    println!(
        "command:    cargo run --release --example tenants -- {}",
        given.join(" ")
    );
    let scenarios = match args.scenario {
        Some(s) => vec![s],
        None => vec![Scenario::Slow, Scenario::Backlog, Scenario::Idle],
    };
    let mut failed = Vec::new();
    for s in scenarios {
        let prefix = format!("wasmhook-tenants-{:08x}", rand::random::<u32>());
        let load = box_load(Duration::from_millis(500)).await;
        println!("\n== {} ==", s.name());
        println!(
            "machine:    {machine}; box {:.0}% busy just before",
            load * 100.0
        );
        println!("reproduce:  {}", reproduce(&args, s));
        let run = async {
            match s {
                Scenario::Slow => slow(&args, &prefix).await,
                Scenario::Backlog => backlog(&args, &prefix).await,
                Scenario::Idle => idle(&args, &prefix).await,
            }
        };
        // An interrupt drops the run, which aborts its worker task.
        let outcome = tokio::select! {
            r = run => r,
            _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
        };
        match outcome {
            Ok(problems) if problems.is_empty() => {}
            Ok(problems) => {
                for p in &problems {
                    println!("PROBLEM:    {p}");
                }
                failed.push(s.name());
            }
            Err(e) => {
                println!("FAILED:     {e:#}");
                failed.push(s.name());
            }
        }
        match cleanup(&args.redis_url, &prefix).await {
            Ok(n) => println!("cleanup:    removed {n} keys matching {prefix}:*"),
            Err(e) => println!("cleanup:    FAILED to remove keys matching {prefix}:*: {e:#}"),
        }
    }
    if !failed.is_empty() {
        bail!("scenarios with problems: {}", failed.join(", "));
    }
    Ok(())
}

fn reproduce(a: &Args, s: Scenario) -> String {
    let mut cmd = format!(
        "cargo run --release --example tenants -- --scenario {} --redis-url {}",
        s.name(),
        a.redis_url
    );
    let quiet = format!(
        "--quiet-events {} --quiet-rate {}",
        a.quiet_events, a.quiet_rate
    );
    let _ = match s {
        Scenario::Slow => write!(
            cmd,
            " --slow-ms {} --noisy-events {} {quiet}",
            a.slow_ms, a.noisy_events
        ),
        Scenario::Backlog => write!(cmd, " --bulk-events {} {quiet}", a.bulk_events),
        Scenario::Idle => write!(
            cmd,
            " --idle-apps {} --idle-secs {}",
            a.idle_apps, a.idle_secs
        ),
    };
    cmd
}

// ---------------------------------------------------------------------------
// Scenarios

async fn slow(args: &Args, prefix: &str) -> anyhow::Result<Vec<String>> {
    let answer = Duration::from_millis(args.slow_ms);
    let timeout = (answer * 2).max(Duration::from_secs(10));
    let visibility = timeout * 3;
    let n = args.quiet_events;
    let sink = start_sink(&[("/noisy", answer)], &[("/quiet", n)])?;
    let apps = [
        ("noisy".into(), sink.url("/noisy")),
        ("quiet".into(), sink.url("/quiet")),
    ];
    let extra = format!(
        "[delivery]\ntimeout = \"{}ms\"\n\n[queues]\nvisibility_timeout = \"{}ms\"\n",
        timeout.as_millis(),
        visibility.as_millis()
    );
    let settings = build_settings(&args.redis_url, prefix, &apps, &extra)?;
    let producer = Producer::connect(&args.redis_url, prefix)?;
    let filled = fill(&producer, "noisy", args.noisy_events).await?;

    let worker = Worker::start(settings.clone());
    let measured = async {
        let busy = wait_until("the slow endpoint busy", &worker, || {
            sink.counts("/noisy").arrived >= SLOW_BUSY
        })
        .await?;
        let sent = quiet_phase(&sink, &worker, producer, n, args.quiet_rate).await?;
        anyhow::Ok((busy, sent))
    }
    .await;
    let stopped = worker.stop(timeout + Duration::from_secs(30)).await;
    let ((busy, sent), stopped) = both(measured, stopped)?;

    let noisy = sink.counts("/noisy");
    let at_mark = sink
        .at_mark(("/quiet", n), "/noisy")
        .context("the quiet app's last event was not counted")?;
    println!(
        "setup:      default config + delivery.timeout {timeout:?}, queues.visibility_timeout {visibility:?}"
    );
    println!(
        "            noisy: {} events queued first ({:.2} s), its endpoint answers after {} ms",
        args.noisy_events,
        filled.as_secs_f64(),
        args.slow_ms
    );
    println!(
        "            quiet: {n} events at {}/s (sent in {:.2} s), once {SLOW_BUSY} noisy requests were in progress ({:.2} s after the worker started)",
        args.quiet_rate,
        sent.as_secs_f64(),
        busy.as_secs_f64()
    );
    println!(
        "quiet:      latency {}  (enqueue -> arrival at the sink, 1 ms resolution)",
        latency_line(&sink, "/quiet", None)
    );
    println!(
        "noisy:      at most {} requests in progress at once (counted at the sink on every arrival)",
        noisy.most_in_progress
    );
    println!(
        "            {} of {} delivered ({} arrived) when the quiet app's last event arrived",
        at_mark.answered, args.noisy_events, at_mark.arrived
    );
    println!(
        "worker:     stopped in {:.2} s (it lets the slow requests in flight finish)",
        stopped.as_secs_f64()
    );
    finish(&settings, &sink).await
}

async fn backlog(args: &Args, prefix: &str) -> anyhow::Result<Vec<String>> {
    let n = args.quiet_events;
    let sink = start_sink(&[], &[("/quiet", n), ("/bulk", args.bulk_events)])?;
    let apps = [
        ("bulk".into(), sink.url("/bulk")),
        ("quiet".into(), sink.url("/quiet")),
    ];
    let settings = build_settings(&args.redis_url, prefix, &apps, "")?;
    let producer = Producer::connect(&args.redis_url, prefix)?;
    let filled = fill(&producer, "bulk", args.bulk_events).await?;

    let worker = Worker::start(settings.clone());
    let measured = async {
        let started = wait_until("the bulk deliveries under way", &worker, || {
            sink.counts("/bulk").arrived >= BULK_STARTED
        })
        .await?;
        let at_start = sink.counts("/bulk").arrived;
        let sent = quiet_phase(&sink, &worker, producer, n, args.quiet_rate).await?;
        anyhow::Ok((started, at_start, sent))
    }
    .await;
    let stopped = worker.stop(Duration::from_secs(60)).await;
    let ((started, at_start, sent), stopped) = both(measured, stopped)?;

    let total = args.bulk_events;
    let bulk = sink
        .at_mark(("/quiet", n), "/bulk")
        .context("the quiet app's last event was not counted")?;
    println!("setup:      default config");
    println!(
        "            bulk: {total} events queued first ({:.2} s, {:.0}/s), its endpoint answers at once",
        filled.as_secs_f64(),
        total as f64 / filled.as_secs_f64().max(1e-9)
    );
    println!(
        "            quiet: {n} events at {}/s (sent in {:.2} s), once {at_start} bulk deliveries had arrived ({:.2} s after the worker started)",
        args.quiet_rate,
        sent.as_secs_f64(),
        started.as_secs_f64()
    );
    println!(
        "quiet:      latency {}  (enqueue -> arrival at the sink, 1 ms resolution)",
        latency_line(&sink, "/quiet", None)
    );
    // The quiet events that arrived while bulk deliveries were still going on.
    match sink.at_mark(("/bulk", total), "/quiet") {
        Some(q) if q.arrived == 0 => println!(
            "            NOTE: the backlog was gone before the first quiet event arrived; use a larger --bulk-events"
        ),
        Some(q) if q.arrived < n => println!(
            "            while the backlog lasted ({} of {n} quiet events): latency {}\n            NOTE: the backlog was gone before the quiet app finished; a larger --bulk-events covers the whole run",
            q.arrived,
            latency_line(&sink, "/quiet", Some(q.arrived))
        ),
        _ => println!("            every quiet event arrived while bulk deliveries were going on"),
    }
    let rate = match (bulk.first, bulk.last) {
        (Some(a), Some(b)) if b > a => format!(
            "{:.0} deliveries/s",
            bulk.arrived.saturating_sub(1) as f64 / (b - a).as_secs_f64()
        ),
        _ => "rate n/a".into(),
    };
    println!(
        "bulk:       {} of {total} delivered when the quiet app's last event arrived; {rate} (first to last bulk delivery up to then)",
        bulk.arrived
    );
    let left = total.saturating_sub(sink.counts("/bulk").arrived);
    println!(
        "worker:     stopped in {:.2} s{}",
        stopped.as_secs_f64(),
        if left > 0 {
            format!(", {left} bulk events left undelivered")
        } else {
            String::new()
        }
    );
    finish(&settings, &sink).await
}

/// The queue's counters and the sink's sanity checks, after the worker stopped.
async fn finish(settings: &Settings, sink: &Sink) -> anyhow::Result<Vec<String>> {
    let stats = service::open_queue(settings)?.stats().await?;
    let counters: Vec<String> = stats.iter().map(|(k, v)| format!("{k}={v}")).collect();
    println!("queue:      {}", counters.join(" "));
    let mut problems = Vec::new();
    for k in ["retried", "dead", "dropped", "unrouted"] {
        if let Some(v) = stats.get(k).filter(|v| **v > 0) {
            problems.push(format!("{v} {k}"));
        }
    }
    let bad = sink.bad();
    if bad > 0 {
        problems.push(format!(
            "{bad} requests without a Pusher signature or a leading time_ms"
        ));
    }
    Ok(problems)
}

/// p50 / p99 / max of a path's latencies (its first `first` requests, or all).
fn latency_line(sink: &Sink, path: &str, first: Option<u64>) -> String {
    let h = sink.latency(path, first);
    if h.is_empty() {
        return "n/a (no samples)".into();
    }
    format!(
        "ms p50 {} / p99 {} / max {} over {} events",
        h.value_at_quantile(0.50),
        h.value_at_quantile(0.99),
        h.max(),
        h.len()
    )
}

async fn idle(args: &Args, prefix: &str) -> anyhow::Result<Vec<String>> {
    let sink = start_sink(&[], &[])?;
    let client = redis::Client::open(args.redis_url.as_str())?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let harness: i64 = redis::cmd("CLIENT")
        .arg("ID")
        .query_async(&mut conn)
        .await?;
    let mut sizes = vec![1];
    if args.idle_apps > 1 {
        sizes.push(args.idle_apps);
    }
    let mut columns = Vec::new();
    for apps_n in sizes {
        let apps: Vec<(String, String)> = (0..apps_n)
            .map(|i| (format!("app-{i}"), sink.url(&format!("/idle-{i}"))))
            .collect();
        let settings = build_settings(&args.redis_url, prefix, &apps, "")?;
        let worker = Worker::start(settings);
        let measured = measure_idle(&mut conn, harness, &worker, args.idle_secs).await;
        let stopped = worker.stop(Duration::from_secs(30)).await;
        let (cost, _) = both(measured, stopped).with_context(|| format!("with {apps_n} apps"))?;
        columns.push((apps_n, cost));
    }

    println!(
        "setup:      default config (idle_poll 2s), nothing queued; 2 s to settle, then {} s measured",
        args.idle_secs
    );
    println!(
        "            this process's CPU is counted in clock ticks: {:.2}% of a core is one tick over the window",
        100.0 / clock_ticks_per_second() / args.idle_secs as f64
    );
    let head: Vec<String> = columns
        .iter()
        .map(|(n, _)| format!("{n} app{}", if *n == 1 { "" } else { "s" }))
        .collect();
    let row = |label: &str, f: &dyn Fn(&IdleCost) -> String| {
        let cells: String = columns
            .iter()
            .map(|(_, c)| format!("{:>12}", f(c)))
            .collect();
        println!("  {label:<44}{cells}");
    };
    println!(
        "  {:<44}{}",
        "",
        head.iter().map(|h| format!("{h:>12}")).collect::<String>()
    );
    row("Redis commands/s (incl. inside scripts)", &|c| {
        format!("{:.2}", c.commands)
    });
    row("  of which sent by clients (* below)", &|c| {
        format!("{:.2}", c.client_sent)
    });
    row("Redis CPU, % of one core", &|c| {
        c.redis_cpu.map_or("n/a".into(), |v| format!("{v:.2}"))
    });
    row("this process's CPU, % of one core", &|c| {
        format!("{:.2}", c.process_cpu)
    });
    row("worker's Redis connections (CLIENT LIST)", &|c| {
        c.connections.to_string()
    });
    row("windows measured (others' traffic: again)", &|c| {
        c.attempts.to_string()
    });
    // The busiest commands of any column, in calls/s.
    let mut names: Vec<&str> = Vec::new();
    for (_, c) in &columns {
        for (name, _) in c.calls.iter().take(8) {
            if !names.contains(&name.as_str()) {
                names.push(name);
            }
        }
    }
    println!(
        "  calls/s by command (* = sent by the worker itself; the rest run inside its scripts):"
    );
    for name in names {
        let star = if CLIENT_SENT.contains(&name) { "*" } else { "" };
        row(&format!("  {name}{star}"), &|c| {
            let v = c
                .calls
                .iter()
                .find(|(k, _)| k == name)
                .map_or(0.0, |(_, v)| *v);
            format!("{v:.2}")
        });
    }
    let mut problems = Vec::new();
    let arrived: u64 = sink.total_arrived();
    if arrived > 0 {
        problems.push(format!(
            "{arrived} requests arrived at the sink with nothing queued"
        ));
    }
    for (n, c) in &columns {
        if let Some(why) = &c.disturbed {
            problems.push(format!(
                "with {n} apps, every window was disturbed by other Redis clients ({why}): the Redis figures include their traffic"
            ));
        }
    }
    Ok(problems)
}

struct IdleCost {
    commands: f64,
    client_sent: f64,
    /// (command, calls/s), most first.
    calls: Vec<(String, f64)>,
    redis_cpu: Option<f64>,
    process_cpu: f64,
    connections: usize,
    /// Windows measured: one unless other clients disturbed one.
    attempts: u32,
    /// What other clients did during the last window, if anything.
    disturbed: Option<String>,
}

/// Windows tried before reporting one that other clients disturbed.
const IDLE_ATTEMPTS: u32 = 3;

async fn measure_idle(
    conn: &mut redis::aio::MultiplexedConnection,
    harness: i64,
    worker: &Worker,
    secs: u64,
) -> anyhow::Result<IdleCost> {
    // The worker's connections open as it starts (README: three); give it up
    // to 10 s, then settle.
    let opening = Instant::now();
    while clients(conn, harness).await?.0 < 3 && opening.elapsed() < Duration::from_secs(10) {
        worker.check()?;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Redis's counters are server-wide: a window in which another client was
    // connected, connected anew, or reset the counters (CONFIG RESETSTAT) is
    // measured again.
    for attempt in 1.. {
        worker.check()?;
        let (_, others_before) = clients(conn, harness).await?;
        let a = Snapshot::take(conn).await?;
        tokio::time::sleep(Duration::from_secs(secs)).await;
        let b = Snapshot::take(conn).await?;
        worker.check()?;
        let (connections, others_after) = clients(conn, harness).await?;
        let mut cost = idle_cost(&a, &b, connections);
        cost.attempts = attempt;
        let counter = |s: &Snapshot, k: &str| s.info.get(k).and_then(|v| v.parse::<f64>().ok());
        let delta = |k: &str| Some(counter(&b, k)? - counter(&a, k)?);
        cost.disturbed = if delta("total_commands_processed").is_none_or(|d| d < 0.0) {
            Some("the counters were reset or are missing".into())
        } else if others_before + others_after > 0 {
            Some(format!(
                "{} other clients connected",
                others_before.max(others_after)
            ))
        } else if delta("total_connections_received").is_none_or(|d| d != 0.0) {
            Some("other clients connected and left".into())
        } else {
            None
        };
        match &cost.disturbed {
            Some(why) if attempt < IDLE_ATTEMPTS => {
                eprintln!("idle: window {attempt} disturbed ({why}); measuring again")
            }
            _ => return Ok(cost),
        }
    }
    unreachable!("the loop returns")
}

/// The cost between two snapshots, per second.
fn idle_cost(a: &Snapshot, b: &Snapshot, connections: usize) -> IdleCost {
    let dt = b.at.duration_since(a.at).as_secs_f64();
    let counter = |s: &Snapshot, k: &str| s.info.get(k).and_then(|v| v.parse::<f64>().ok());
    // The first snapshot's own INFO is counted between the two.
    let total = counter(b, "total_commands_processed").unwrap_or(0.0)
        - counter(a, "total_commands_processed").unwrap_or(0.0)
        - 1.0;
    let mut calls: Vec<(String, f64)> = b
        .calls
        .iter()
        .map(|(k, v)| {
            let mut d = v.saturating_sub(a.calls.get(k).copied().unwrap_or(0));
            if k == "info" {
                d = d.saturating_sub(1);
            }
            (k.clone(), d as f64 / dt)
        })
        .filter(|(_, v)| *v > 0.0)
        .collect();
    calls.sort_by(|x, y| y.1.total_cmp(&x.1));
    let client_sent = calls
        .iter()
        .filter(|(k, _)| CLIENT_SENT.contains(&k.as_str()))
        .map(|(_, v)| v)
        .sum();
    let cpu = |s: &Snapshot| Some(counter(s, "used_cpu_sys")? + counter(s, "used_cpu_user")?);
    let redis_cpu = match (cpu(a), cpu(b)) {
        (Some(x), Some(y)) => Some((y - x) / dt * 100.0),
        _ => None,
    };
    IdleCost {
        commands: total.max(0.0) / dt,
        client_sent,
        calls,
        redis_cpu,
        process_cpu: (b.process_cpu - a.process_cpu) / dt * 100.0,
        connections,
        attempts: 1,
        disturbed: None,
    }
}

/// Redis counters (one INFO) and this process's CPU at one moment.
struct Snapshot {
    at: Instant,
    info: HashMap<String, String>,
    /// commandstats: command → calls.
    calls: BTreeMap<String, u64>,
    process_cpu: f64,
}

impl Snapshot {
    async fn take(conn: &mut redis::aio::MultiplexedConnection) -> anyhow::Result<Snapshot> {
        let text: String = redis::cmd("INFO").arg("all").query_async(conn).await?;
        let mut info = HashMap::new();
        let mut calls = BTreeMap::new();
        for line in text.lines() {
            let Some((k, v)) = line.trim_end().split_once(':') else {
                continue;
            };
            match k.strip_prefix("cmdstat_") {
                Some(cmd) => {
                    let n = v
                        .split(',')
                        .find_map(|f| f.strip_prefix("calls="))
                        .and_then(|n| n.parse().ok())
                        .unwrap_or(0);
                    calls.insert(cmd.to_string(), n);
                }
                None => {
                    info.insert(k.to_string(), v.to_string());
                }
            }
        }
        Ok(Snapshot {
            at: Instant::now(),
            info,
            calls,
            process_cpu: process_cpu_seconds(),
        })
    }
}

fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    match unsafe { libc::sysconf(libc::_SC_CLK_TCK) } {
        t if t > 0 => t as f64,
        _ => 100.0,
    }
}

/// This process's CPU seconds, user + system (/proc/self/stat).
fn process_cpu_seconds() -> f64 {
    let tick = clock_ticks_per_second();
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    let Some(close) = stat.rfind(')') else {
        return 0.0;
    };
    // Fields after the name start at field 3; utime and stime are 14 and 15.
    let f: Vec<&str> = stat[close + 1..].split_whitespace().collect();
    let ticks = |i: usize| {
        f.get(i - 3)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    (ticks(14) + ticks(15)) as f64 / tick
}

/// Redis clients (CLIENT LIST) of this process, then of anyone else; the
/// harness's own connection counts in neither. A client is this process's
/// when its port is one of this process's TCP sockets.
async fn clients(
    conn: &mut redis::aio::MultiplexedConnection,
    harness: i64,
) -> anyhow::Result<(usize, usize)> {
    let list: String = redis::cmd("CLIENT").arg("LIST").query_async(conn).await?;
    let ports = own_tcp_ports();
    let (mut ours, mut others) = (0, 0);
    for line in list.lines() {
        let field = |name: &str| line.split(' ').find_map(|f| f.strip_prefix(name));
        if field("id=").and_then(|id| id.parse::<i64>().ok()) == Some(harness) {
            continue;
        }
        let port = field("addr=").and_then(|a| a.rsplit(':').next()?.parse::<u16>().ok());
        match port {
            Some(p) if ports.contains(&p) => ours += 1,
            _ => others += 1,
        }
    }
    Ok((ours, others))
}

/// Local ports of this process's TCP sockets: socket inodes from
/// /proc/self/fd, looked up in /proc/self/net/tcp{,6}.
fn own_tcp_ports() -> HashSet<u16> {
    let inodes: HashSet<String> = std::fs::read_dir("/proc/self/fd")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|fd| {
            let link = std::fs::read_link(fd.path()).ok()?;
            let s = link.to_str()?.strip_prefix("socket:[")?.strip_suffix(']')?;
            Some(s.to_string())
        })
        .collect();
    let mut ports = HashSet::new();
    for table in ["/proc/self/net/tcp", "/proc/self/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            // local_address ("0100007F:1F90") is field 1, the inode field 9.
            let f: Vec<&str> = line.split_whitespace().collect();
            if let (Some(local), Some(inode)) = (f.get(1), f.get(9))
                && inodes.contains(*inode)
                && let Some(port) = local
                    .rsplit(':')
                    .next()
                    .and_then(|p| u16::from_str_radix(p, 16).ok())
            {
                ports.insert(port);
            }
        }
    }
    ports
}

// ---------------------------------------------------------------------------
// Worker, producers, settings

/// The worker (`service::serve` in worker mode) on this process's runtime.
struct Worker {
    token: CancellationToken,
    handle: AbortOnDropHandle<anyhow::Result<()>>,
}

impl Worker {
    fn start(settings: Settings) -> Worker {
        let token = CancellationToken::new();
        let handle = tokio::spawn(service::serve(
            settings,
            service::Mode::Worker,
            None,
            token.clone(),
        ));
        Worker {
            token,
            handle: AbortOnDropHandle::new(handle),
        }
    }

    /// Fails when the worker stopped by itself.
    fn check(&self) -> anyhow::Result<()> {
        if self.handle.is_finished() {
            bail!("the worker stopped on its own (its error follows when it is stopped)");
        }
        Ok(())
    }

    /// Cancels it and waits for it to finish its jobs in flight.
    async fn stop(self, limit: Duration) -> anyhow::Result<Duration> {
        let started = Instant::now();
        self.token.cancel();
        match tokio::time::timeout(limit, self.handle).await {
            Ok(Ok(Ok(()))) => Ok(started.elapsed()),
            Ok(Ok(Err(e))) => Err(e.context("the worker failed")),
            Ok(Err(e)) => bail!("the worker panicked: {e}"),
            Err(_) => bail!("the worker did not stop within {limit:?}"),
        }
    }
}

/// Both results, or every error of the two.
fn both<T, U>(a: anyhow::Result<T>, b: anyhow::Result<U>) -> anyhow::Result<(T, U)> {
    match (a, b) {
        (Ok(a), Ok(b)) => Ok((a, b)),
        (Err(e), Ok(_)) | (Ok(_), Err(e)) => Err(e),
        (Err(e), Err(f)) => Err(anyhow!("{e:#}; stopping the worker: {f:#}")),
    }
}

/// Polls `done` until true; fails when the worker stops or after WAIT.
/// Returns how long it took.
async fn wait_until(
    what: &str,
    worker: &Worker,
    mut done: impl FnMut() -> bool,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    while !done() {
        worker
            .check()
            .with_context(|| format!("waiting for {what}"))?;
        if started.elapsed() > WAIT {
            bail!("gave up waiting for {what} after {WAIT:?}");
        }
        tokio::time::sleep(POLL).await;
    }
    Ok(started.elapsed())
}

fn event(channel: &str, i: u64) -> Value {
    json!({"name": "client_event", "channel": format!("{channel}-{i}"), "data": "{}"})
}

/// Queues `n` events of `app` in batches; returns how long it took.
async fn fill(producer: &Producer, app: &str, n: u64) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let mut sent = 0;
    while sent < n {
        let k = (n - sent).min(FILL_BATCH);
        let events = (sent..sent + k).map(|i| event("c", i)).collect();
        producer
            .send_many(app, events)
            .await
            .with_context(|| format!("queueing {app}'s events"))?;
        sent += k;
    }
    Ok(started.elapsed())
}

/// The quiet app sends `n` events at `rate`/s (one `send` each) while this
/// waits for all of them at the sink; returns how long sending took.
async fn quiet_phase(
    sink: &Sink,
    worker: &Worker,
    producer: Producer,
    n: u64,
    rate: u64,
) -> anyhow::Result<Duration> {
    let mut sender = AbortOnDropHandle::new(tokio::spawn(async move {
        let started = Instant::now();
        let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
        for i in 0..n {
            tick.tick().await;
            producer
                .send("quiet", event("q", i))
                .await
                .context("sending quiet's events")?;
        }
        anyhow::Ok(started.elapsed())
    }));
    let mut took = None;
    let started = Instant::now();
    while sink.counts("/quiet").arrived < n {
        if took.is_none() && sender.is_finished() {
            took = Some((&mut sender).await.context("the quiet sender panicked")??);
        }
        worker
            .check()
            .context("waiting for the quiet app's events")?;
        if started.elapsed() > WAIT {
            bail!("gave up after {WAIT:?} waiting for the quiet app's events");
        }
        tokio::time::sleep(POLL).await;
    }
    match took {
        Some(t) => Ok(t),
        None => sender.await.context("the quiet sender panicked")?,
    }
}

/// Settings from TOML text: the defaults, `extra` and apps (id, endpoint
/// url), each with one `pusher` endpoint.
fn build_settings(
    redis_url: &str,
    prefix: &str,
    apps: &[(String, String)],
    extra: &str,
) -> anyhow::Result<Settings> {
    let mut text = format!(
        "[redis]\nurl = {}\nprefix = {}\n\n{extra}\n",
        toml_str(redis_url),
        toml_str(prefix)
    );
    for (id, url) in apps {
        write!(
            text,
            "[[apps]]\nid = {}\nkey = \"key-{id}\"\nsecret = \"secret-{id}-0123456789abcdef\"\ningest_token = \"token-{id}\"\n\n[[apps.webhooks]]\nurl = {}\nscheme = \"pusher\"\n\n",
            toml_str(id),
            toml_str(url)
        )?;
    }
    wasmhook::config::load_from(None, Some(&text), allow_loopback()).map_err(|e| anyhow!("{e}"))
}

// ---------------------------------------------------------------------------
// The loopback sink

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[derive(Debug, Clone, Copy, Default)]
struct Counts {
    arrived: u64,
    /// Answered 200 (for a delayed path: after the delay).
    answered: u64,
    most_in_progress: u64,
    first: Option<Instant>,
    last: Option<Instant>,
}

struct PathStats {
    counts: Counts,
    /// Enqueue → arrival, ms, in the order of arrival.
    latencies: Vec<u64>,
    /// Without a Pusher signature or a leading time_ms.
    bad: u64,
}

struct SinkState {
    /// Paths that answer after a delay; the rest answer at once.
    delays: HashMap<String, Duration>,
    /// (path, N): when the path's Nth request arrives, every path's counts
    /// are copied into `at_marks`.
    marks: Vec<(String, u64)>,
    at_marks: Mutex<HashMap<(String, u64), HashMap<String, Counts>>>,
    paths: Mutex<HashMap<String, PathStats>>,
}

struct Sink {
    addr: SocketAddr,
    state: Arc<SinkState>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl Sink {
    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn counts(&self, path: &str) -> Counts {
        lock(&self.state.paths)
            .get(path)
            .map(|p| p.counts)
            .unwrap_or_default()
    }

    /// `path`'s counts when the `n`th request of `mark` arrived (None if it
    /// did not).
    fn at_mark(&self, (mark, n): (&str, u64), path: &str) -> Option<Counts> {
        let marks = lock(&self.state.at_marks);
        let counts = marks.get(&(mark.to_string(), n))?;
        Some(counts.get(path).copied().unwrap_or_default())
    }

    /// Latencies of the path's first `first` requests (all when None).
    fn latency(&self, path: &str, first: Option<u64>) -> Histogram<u64> {
        let mut h = new_histogram();
        if let Some(p) = lock(&self.state.paths).get(path) {
            let k = first.map_or(p.latencies.len(), |k| k as usize);
            for v in p.latencies.iter().take(k) {
                h.saturating_record(*v);
            }
        }
        h
    }

    fn bad(&self) -> u64 {
        lock(&self.state.paths).values().map(|p| p.bad).sum()
    }

    fn total_arrived(&self) -> u64 {
        lock(&self.state.paths)
            .values()
            .map(|p| p.counts.arrived)
            .sum()
    }
}

fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_max(3_600_000, 3).expect("valid histogram bounds")
}

/// Binds 127.0.0.1:0 and serves every path on a one-thread runtime in its own
/// OS thread, until the Sink is dropped.
fn start_sink(delays: &[(&str, Duration)], marks: &[(&str, u64)]) -> anyhow::Result<Sink> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("binding the sink")?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let state = Arc::new(SinkState {
        delays: delays.iter().map(|(p, d)| (p.to_string(), *d)).collect(),
        marks: marks.iter().map(|(p, n)| (p.to_string(), *n)).collect(),
        at_marks: Mutex::new(HashMap::new()),
        paths: Mutex::new(HashMap::new()),
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let listener = {
        let _entered = rt.enter();
        tokio::net::TcpListener::from_std(listener)?
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let app = axum::Router::new()
        .fallback(receive)
        .with_state(state.clone());
    std::thread::Builder::new()
        .name("tenants-sink".into())
        .spawn(move || {
            rt.block_on(async move {
                let serve = axum::serve(listener, app).with_graceful_shutdown(async {
                    let _ = stopped.await;
                });
                if let Err(e) = serve.await {
                    eprintln!("sink stopped: {e}");
                }
            });
        })?;
    Ok(Sink {
        addr,
        state,
        _stop: stop,
    })
}

async fn receive(
    State(s): State<Arc<SinkState>>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let now = now_ms();
    let at = Instant::now();
    let path = uri.path();
    {
        let mut paths = lock(&s.paths);
        if !paths.contains_key(path) {
            let fresh = PathStats {
                counts: Counts::default(),
                latencies: Vec::new(),
                bad: 0,
            };
            paths.insert(path.to_string(), fresh);
        }
        let Some(p) = paths.get_mut(path) else {
            return StatusCode::INTERNAL_SERVER_ERROR;
        };
        match leading_time_ms(&body) {
            Some(t) if headers.contains_key("x-pusher-signature") => {
                p.latencies.push(now.saturating_sub(t))
            }
            _ => p.bad += 1,
        }
        let c = &mut p.counts;
        c.arrived += 1;
        c.most_in_progress = c.most_in_progress.max(c.arrived - c.answered);
        c.first.get_or_insert(at);
        c.last = Some(at);
        let arrived = c.arrived;
        if s.marks.iter().any(|(m, n)| m == path && *n == arrived) {
            let counts = paths.iter().map(|(k, v)| (k.clone(), v.counts)).collect();
            lock(&s.at_marks).insert((path.to_string(), arrived), counts);
        }
    }
    if let Some(d) = s.delays.get(path) {
        tokio::time::sleep(*d).await;
    }
    if let Some(p) = lock(&s.paths).get_mut(path) {
        p.counts.answered += 1;
    }
    StatusCode::OK
}

// ---------------------------------------------------------------------------
// Cleanup and the machine
