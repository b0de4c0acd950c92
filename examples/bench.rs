//! Run with: cargo run --release --example bench -- --events 200000 --concurrency 256 --redis-url redis://127.0.0.1:6379
//!
//! End-to-end throughput of the delivery path: the Redis queue (app
//! partitions, fair take) → worker → Pusher-signed HTTP POST → commit (the
//! lease released with the outcome), in one process against a real Redis.
//!
//! Modes:
//! - `burst` (default): enqueue `--events` jobs first (one enqueue script call per batch
//!   of 1,000), then start the worker and time how long it takes to deliver
//!   them all. Latency here includes the time each job waited in the queue.
//! - `steady --rate R`: start the worker, and enqueue at R events/s from a
//!   producer on its own thread; latency is then enqueue → delivery for a
//!   worker that keeps up.
//!
//! The sink is a loopback HTTP server in this process on its own one-thread
//! runtime (its own OS thread), answering 200 and recording, per request, the
//! time since the event was enqueued (the Pusher body's `time_ms`). With
//! `--sink-url` an external receiver is used instead, and progress is read
//! from the queue's `delivered` counter (no latency then).
//!
//! `--ordered` makes every endpoint `ordered = true`: one event in flight
//! per app, in the order sent (with `--apps N`, N orders side by side).
//!
//! `--batch N` batches every endpoint (`max_events = N`): the sink counts
//! the events in each request, and its latency is then from the batch's
//! making (its `time_ms`), not the event's enqueue.
//!
//! `--order-keys N` makes them ordered per channel (`order_by = "channel"`),
//! the events spread over N channels.
//!
//! `--apps N` spreads the events over N apps (one endpoint each, all on the
//! sink), enqueued app by app: the fair scheduler then interleaves them.
//! The endpoint and app caps are lifted to `--concurrency` so one app can use
//! every slot (as before caps existed); `--default-caps` keeps the shipped
//! ones (16 per endpoint, 128 per app per worker).
//!
//! `--plugin PATH [--plugin-config k=v ...]` puts a plugin in the app's chain:
//! its cost per call (fresh instance, ~1 KB event) is measured first, then the
//! run goes through it end to end.
//!
//! Every key the run writes starts with its prefix (`wasmhook-bench-<random>`
//! by default) and is removed at the end.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use bytes::Bytes;
use clap::{Parser, ValueEnum};
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use tokio_util::sync::CancellationToken;

#[path = "support/mod.rs"]
mod support;

use support::{
    Machine, allow_loopback, box_load, cleanup, leading_time_ms, machine_summary,
    serve_on_own_thread, toml_str,
};
use wasmhook::config::Settings;
use wasmhook::event::{Event, Job, now_ms};
use wasmhook::queue::Queue;
use wasmhook::service;

/// The event type of every bench event.
const QUEUE: &str = "client_event";
const APP_ID: &str = "bench";
/// Jobs per enqueue call (one pipelined round trip).
const FILL_BATCH: usize = 1000;
/// No new delivery for this long: the run is declared stuck.
const STALL: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum RunMode {
    /// Enqueue every event first, then run the worker until all are delivered.
    Burst,
    /// Run the worker while a producer enqueues at --rate events/s.
    Steady,
}

#[derive(Debug, Parser)]
#[command(about = "Delivery throughput and latency benchmark for wasmhook")]
struct Args {
    /// Events to deliver.
    #[arg(long, default_value_t = 200_000)]
    events: u64,
    /// queues.concurrency: deliveries in flight at once.
    #[arg(long, default_value_t = 256)]
    concurrency: usize,
    #[arg(long, default_value = "redis://127.0.0.1:6379")]
    redis_url: String,
    /// An external receiver to deliver to instead of the built-in sink
    /// (must answer 2xx; latency is then not measured).
    #[arg(long)]
    sink_url: Option<String>,
    /// Key prefix for this run (default: wasmhook-bench-<random>).
    #[arg(long)]
    prefix: Option<String>,
    #[arg(long, value_enum, default_value_t = RunMode::Burst)]
    mode: RunMode,
    /// Steady mode: events enqueued per second.
    #[arg(long)]
    rate: Option<u64>,
    /// Print deliveries and the largest latency for each second of the run
    /// (built-in sink only).
    #[arg(long)]
    timeline: bool,
    /// Log the service at info level to stderr (quiet by default).
    #[arg(long)]
    log: bool,
    /// A plugin component for the app's chain (e.g. the add-field test
    /// plugin); its cost per call is measured first, then end to end.
    #[arg(long)]
    plugin: Option<std::path::PathBuf>,
    /// The plugin's config, repeatable: `--plugin-config key=value`.
    #[arg(long = "plugin-config", value_name = "KEY=VALUE")]
    plugin_config: Vec<String>,
    /// The plugin's `max_reuse` in the end-to-end run: 1 = a fresh instance
    /// per call (default: the configured default, warm instances).
    #[arg(long = "max-reuse", value_name = "CALLS")]
    max_reuse: Option<u32>,
    /// Apps sharing the events (each with its own endpoint on the sink).
    #[arg(long, default_value_t = 1)]
    apps: usize,
    /// Keep the shipped caps (max_in_flight 16 per endpoint, 128 per app)
    /// instead of lifting them to --concurrency.
    #[arg(long)]
    default_caps: bool,
    /// Make every app's endpoint `ordered = true` (one event in flight per
    /// app, in order).
    #[arg(long)]
    ordered: bool,
    /// Batch every app's endpoint: `batch = { max_events = N, max_wait = "1s" }`
    /// (the sink counts the events in each request).
    #[arg(long)]
    batch: Option<usize>,
    /// With --ordered: `order_by = "channel"`, the events spread over N
    /// channels (burst mode).
    #[arg(long)]
    order_keys: Option<usize>,
    /// The built-in sink answers each request after this many ms (a
    /// receiver's own latency).
    #[arg(long, default_value_t = 0)]
    sink_delay_ms: u64,
}

/// The id of app `i` of `n`.
fn app_id(i: usize, n: usize) -> String {
    if n <= 1 {
        APP_ID.to_string()
    } else {
        format!("{APP_ID}-{i}")
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.log {
        wasmhook::telemetry::init(wasmhook::config::LogFormat::Pretty, "info");
    }
    if args.events == 0 || args.concurrency == 0 || args.apps == 0 {
        bail!("--events, --concurrency and --apps must be at least 1");
    }
    if args.mode == RunMode::Steady && args.rate.unwrap_or(0) == 0 {
        bail!("--mode steady needs --rate R (events per second, at least 1)");
    }
    let prefix = args
        .prefix
        .clone()
        .unwrap_or_else(|| format!("wasmhook-bench-{:08x}", rand::random::<u32>()));
    if prefix.is_empty() || prefix.contains(['{', '}', '*', '?', '[', ']']) {
        bail!("--prefix must be non-empty, without {{ }} or glob characters");
    }

    let machine = machine_summary(&args.redis_url).await;
    let idle_load = box_load(Duration::from_millis(500)).await;
    if idle_load > 0.10 {
        eprintln!(
            "warning: the box is {:.0}% busy before the run starts; other load skews the results",
            idle_load * 100.0
        );
    }
    let outcome = run(&args, &prefix).await;
    let removed = cleanup(&args.redis_url, &prefix).await;

    let report = outcome?;
    report.print(&args, &prefix, &machine);
    println!(
        "background:  box {:.0}% busy in the 0.5 s before the run",
        idle_load * 100.0
    );
    match removed {
        Ok(n) => println!("cleanup:     removed {n} keys matching {prefix}:*"),
        Err(e) => eprintln!("cleanup:     FAILED to remove keys matching {prefix}:*: {e:#}"),
    }
    if !report.problems.is_empty() {
        bail!(
            "the run finished with problems: {}",
            report.problems.join("; ")
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// The run

struct Report {
    mode: RunMode,
    events: u64,
    fill: Option<(u64, Duration)>,
    /// Producer in steady mode: events sent and over how long.
    produced: Option<(u64, Duration)>,
    /// Worker start → last (Nth) delivery.
    elapsed: Duration,
    /// First delivery → last delivery (loopback sink only).
    first_to_last: Option<Duration>,
    /// Latencies in ms (loopback sink only).
    latency: Option<Histogram<u64>>,
    /// Per second: deliveries, largest latency in ms (loopback sink only).
    timeline: Vec<(u64, u64)>,
    stats: std::collections::BTreeMap<String, u64>,
    /// CPU used from worker start to the last delivery.
    cpu: CpuUse,
    shutdown: Duration,
    problems: Vec<String>,
}

async fn run(args: &Args, prefix: &str) -> anyhow::Result<Report> {
    let n = args.events;
    let sink = match &args.sink_url {
        Some(_) => None,
        None => Some(start_sink(n, Duration::from_millis(args.sink_delay_ms))?),
    };
    let sink_url = match (&args.sink_url, &sink) {
        (Some(url), _) => url.clone(),
        (None, Some(s)) => format!("http://{}/hook", s.addr),
        (None, None) => unreachable!(),
    };
    let settings = bench_settings(args, prefix, &sink_url)?;
    measure_plugin(&settings, args, 20_000).await?;
    let queue = service::open_queue(&settings)?;
    queue.ping().await.context("Redis is not answering")?;
    let event = sample_event()?;

    let mut fill = None;
    if args.mode == RunMode::Burst {
        let started = Instant::now();
        let bar = bar(n, "filling");
        let mut sent = 0u64;
        // App by app: each app's share, in batches of at most FILL_BATCH.
        let share = n.div_ceil(args.apps as u64);
        for i in 0..args.apps {
            let mut mine = share.min(n - sent);
            while mine > 0 {
                let k = mine.min(FILL_BATCH as u64) as usize;
                enqueue_batch(&queue, &app_id(i, args.apps), &event, k, args.order_keys).await?;
                sent += k as u64;
                mine -= k as u64;
                bar.set_position(sent);
            }
        }
        bar.finish_and_clear();
        fill = Some((n, started.elapsed()));
    }

    let cpu_before = CpuSnapshot::take(&args.redis_url).await;
    // The producer of steady mode: its own thread and runtime, so the ticks
    // that pace it are not held up by the worker's tasks.
    let stop_producer = Arc::new(AtomicBool::new(false));
    let producer = match args.mode {
        RunMode::Steady => Some(start_producer(
            settings.clone(),
            event.clone(),
            n,
            args.rate.unwrap_or(1),
            args.apps,
            stop_producer.clone(),
        )),
        RunMode::Burst => None,
    };

    let token = CancellationToken::new();
    let started = Instant::now();
    if let Some(s) = &sink {
        let _ = s.state.origin.set(started);
    }
    let mut worker = tokio::spawn(service::serve(
        settings.clone(),
        service::Mode::Worker,
        None,
        token.clone(),
    ));

    let bar = bar(n, "delivered");
    let mut last_progress = (0u64, Instant::now());
    let mut problems = Vec::new();
    let finished_at: Option<Instant> = loop {
        let count = match &sink {
            Some(s) => s.state.count.load(Ordering::Relaxed),
            None => delivered(&queue).await.unwrap_or(last_progress.0),
        };
        bar.set_position(count.min(n));
        if count >= n {
            break Some(match &sink {
                // Set by the Nth request just after it counts itself.
                Some(s) => s.state.last.get().copied().unwrap_or_else(Instant::now),
                None => Instant::now(),
            });
        }
        if count != last_progress.0 {
            last_progress = (count, Instant::now());
        } else if last_progress.1.elapsed() > STALL {
            problems.push(format!(
                "no progress for {STALL:?} at {count} of {n} deliveries"
            ));
            break None;
        }
        let nap = tokio::time::sleep(Duration::from_millis(if sink.is_some() { 100 } else { 50 }));
        tokio::select! {
            _ = nap => {}
            _ = async { sink.as_ref().expect("guarded").state.done.notified().await }, if sink.is_some() => {}
            joined = &mut worker => {
                let why = match joined {
                    Ok(Ok(())) => "the worker stopped on its own".to_string(),
                    Ok(Err(e)) => format!("the worker failed: {e:#}"),
                    Err(e) => format!("the worker panicked: {e}"),
                };
                bar.abandon();
                stop_producer.store(true, Ordering::Relaxed);
                bail!("{why}");
            }
            _ = tokio::signal::ctrl_c() => {
                problems.push("interrupted".into());
                break None;
            }
        }
    };
    let cpu_after = CpuSnapshot::take(&args.redis_url).await;
    bar.finish_and_clear();
    let elapsed = finished_at.map_or(started.elapsed(), |t| t.duration_since(started));
    let mut cpu = cpu_after.since(&cpu_before);

    stop_producer.store(true, Ordering::Relaxed);
    let produced = match producer {
        Some(handle) => match handle.join() {
            Ok(Ok((sent, took, cpu_s))) => {
                cpu.producer_s = cpu_s;
                Some((sent, took))
            }
            Ok(Err(e)) => {
                problems.push(format!("producer failed: {e:#}"));
                None
            }
            Err(_) => {
                problems.push("producer panicked".into());
                None
            }
        },
        None => None,
    };

    // Stop the worker: it finishes and commits what it holds.
    let stopping = Instant::now();
    token.cancel();
    match tokio::time::timeout(Duration::from_secs(60), &mut worker).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => problems.push(format!("worker failed: {e:#}")),
        Ok(Err(e)) => problems.push(format!("worker panicked: {e}")),
        Err(_) => {
            worker.abort();
            problems.push("worker did not stop within 60s".into());
        }
    }
    let shutdown = stopping.elapsed();

    let stats = queue.stats().await.unwrap_or_default();
    let got = |k: &str| stats.get(k).copied().unwrap_or(0);
    if finished_at.is_some() && got("delivered") != n {
        problems.push(format!(
            "the queue counted {} delivered, expected {n}",
            got("delivered")
        ));
    }
    for k in ["retried", "dead", "dropped", "unrouted"] {
        if got(k) > 0 {
            problems.push(format!("{} {k}", got(k)));
        }
    }
    let timeline = sink
        .as_ref()
        .map(|s| {
            s.state
                .timeline
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone()
        })
        .unwrap_or_default();
    let (first_to_last, latency) = match &sink {
        Some(s) => {
            let bad = s.state.bad.load(Ordering::Relaxed);
            if bad > 0 {
                problems.push(format!(
                    "{bad} requests at the sink without a signature or a leading time_ms"
                ));
            }
            let received = s.state.count.load(Ordering::Relaxed);
            if received > n {
                problems.push(format!(
                    "the sink received {received} requests for {n} events (duplicates)"
                ));
            }
            let first_to_last = match (s.state.first.get(), s.state.last.get()) {
                (Some(a), Some(b)) => Some(b.duration_since(*a)),
                _ => None,
            };
            let hist = s
                .state
                .hist
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            (first_to_last, Some(hist))
        }
        None => (None, None),
    };
    Ok(Report {
        mode: args.mode,
        events: n,
        fill,
        produced,
        elapsed,
        first_to_last,
        latency,
        timeline,
        stats,
        cpu,
        shutdown,
        problems,
    })
}

fn bar(len: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template(&format!(
            "{{elapsed_precise}} {what:>9} [{{bar:40}}] {{pos}}/{{len}} ({{per_sec}}, eta {{eta}})"
        ))
        .expect("a valid template")
        .progress_chars("=> "),
    );
    bar
}

async fn delivered(queue: &Queue) -> anyhow::Result<u64> {
    Ok(queue.stats().await?.get("delivered").copied().unwrap_or(0))
}

// ---------------------------------------------------------------------------
// Settings and events

fn plugin_config(args: &Args) -> anyhow::Result<Vec<(String, String)>> {
    args.plugin_config
        .iter()
        .map(|p| {
            p.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .with_context(|| format!("--plugin-config {p:?}: expected key=value"))
        })
        .collect()
}

/// The app's chain (`[[apps]] plugins`, set through the env-free TOML by
/// appending to the app table) and the plugin's definition.
fn plugin_toml(args: &Args) -> anyhow::Result<String> {
    let Some(path) = &args.plugin else {
        return Ok(String::new());
    };
    let path =
        std::fs::canonicalize(path).with_context(|| format!("--plugin {}", path.display()))?;
    let reuse = match args.max_reuse {
        Some(n) => format!("max_reuse = {n}\n"),
        None => String::new(),
    };
    Ok(format!(
        "\n[plugins.bench]\npath = {}\n{reuse}\n",
        toml_str(&path.display().to_string()),
    ))
}

/// The app's chain: the bench plugin with its config (empty without one).
fn plugin_chain(args: &Args) -> anyhow::Result<String> {
    if args.plugin.is_none() {
        return Ok(String::new());
    }
    let config: Vec<String> = plugin_config(args)?
        .iter()
        .map(|(k, v)| format!("{} = {}", toml_str(k), toml_str(v)))
        .collect();
    Ok(format!(
        "\n[[apps.plugins]]\nplugin = \"bench\"\nconfig = {{ {} }}\n",
        config.join(", ")
    ))
}

/// Cost of the plugin stage alone on a ~1 KB event, many calls on this
/// thread: on a fresh instance each time, and on a warm one (reused for the
/// same app, as the worker does unless `max_reuse = 1`).
async fn measure_plugin(settings: &Settings, args: &Args, calls: u32) -> anyhow::Result<()> {
    use wasmhook::plugin::{FailurePolicy, Limits, PluginEngine, PluginInput};
    let Some(path) = &args.plugin else {
        return Ok(());
    };
    let engine = PluginEngine::new(&settings.wasm)?;
    let event = sample_event()?;
    let config = plugin_config(args)?;
    let input = PluginInput {
        id: "msg_bench",
        app_id: APP_ID,
        event: &event,
        headers: &[],
        metadata: &[],
        attempt: 1,
        endpoint: None,
        endpoints: 1,
    };
    for (label, max_reuse) in [
        ("fresh instance + call", 1),
        ("warm instance call", u32::MAX),
    ] {
        let limits = Limits {
            deadline: Duration::from_secs(1),
            fuel: None,
            max_memory: 32 << 20,
            max_output: 1 << 20,
            max_reuse,
        };
        let plugin = engine.load("bench", path, limits, FailurePolicy::Fail)?;
        let mut hist = Histogram::<u64>::new(3)?;
        for i in 0..calls + 200 {
            // Timed from outside: a fresh instance's teardown (its memory
            // reset) is part of what it costs.
            let started = Instant::now();
            let called = plugin.call(&input, &config).await;
            let elapsed = started.elapsed();
            called
                .decision
                .map_err(|e| anyhow::anyhow!("the plugin failed: {e}"))?;
            if i >= 200 {
                hist.record(elapsed.as_nanos() as u64)?;
            }
        }
        println!(
            "plugin:      {} ({} bytes event): {label} p50 {:.1} µs / p99 {:.1} µs / max {:.1} µs over {calls} calls",
            path.display(),
            serde_json::to_vec(&event)?.len(),
            hist.value_at_quantile(0.5) as f64 / 1000.0,
            hist.value_at_quantile(0.99) as f64 / 1000.0,
            hist.max() as f64 / 1000.0,
        );
    }
    Ok(())
}

fn bench_settings(args: &Args, prefix: &str, sink_url: &str) -> anyhow::Result<Settings> {
    let caps = if args.default_caps {
        String::new()
    } else {
        format!(
            "app_max_in_flight = {c}\n\n[delivery]\nmax_in_flight = {c}\n",
            c = args.concurrency
        )
    };
    let chain = plugin_chain(args)?;
    let mut apps = String::new();
    for i in 0..args.apps {
        apps.push_str(&format!(
            r#"
[[apps]]
id = "{id}"
key = "{id}-key"
secret = "bench-secret-0123456789abcdef"
ingest_token = "bench-token"

[[apps.webhooks]]
url = {sink}
scheme = "pusher"
ordered = {ordered}
{order_by}
{batch}
{chain}
"#,
            id = app_id(i, args.apps),
            sink = toml_str(sink_url),
            ordered = args.ordered || args.order_keys.is_some(),
            order_by = if args.order_keys.is_some() {
                "order_by = \"channel\""
            } else {
                ""
            },
            batch = args.batch.map_or(String::new(), |n| format!(
                "batch = {{ max_events = {n}, max_wait = \"1s\" }}"
            )),
        ));
    }
    let text = format!(
        r#"
[redis]
url = {redis}
prefix = {prefix}

[server]
listen = "127.0.0.1:0"
echo = false

[queues]
concurrency = {concurrency}
{caps}
{plugin}
{apps}
"#,
        redis = toml_str(&args.redis_url),
        prefix = toml_str(prefix),
        concurrency = args.concurrency,
        plugin = plugin_toml(args)?,
    );
    wasmhook::config::load_from(None, Some(&text), allow_loopback())
        .map_err(|e| anyhow::anyhow!("{e}"))
}

/// A Pusher client event of about 1 KB as it sits in the queue: channel,
/// event, a JSON-encoded `data` string and the sender's socket id.
fn sample_event() -> anyhow::Result<Event> {
    let text = "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod \
                tempor incididunt ut labore et dolore magna aliqua. Ut enim ad minim veniam, \
                quis nostrud exercitation ullamco laboris nisi ut aliquip ex ea commodo consequat. ";
    let data = serde_json::json!({
        "message_id": "6b3c1f0e-8a4d-4f2b-9c7e-2d5a1b0c9e8f",
        "user": {"id": "user-48213", "name": "Ada Example", "avatar": "https://cdn.example.com/a/48213.png"},
        "text": text.repeat(3),
        "sent_at": "2025-11-27T12:00:00.000Z",
        "reply_to": null,
        "tags": ["support", "priority-normal"],
    });
    let event = Event::from_json(serde_json::json!({
        "name": QUEUE,
        "channel": "private-chat-room-48213",
        "event": "client-message",
        "data": data.to_string(),
        "socket_id": "123456.7890123",
        "user_id": "user-48213",
    }))?;
    Ok(event)
}

async fn enqueue_batch(
    queue: &Queue,
    app: &str,
    event: &Event,
    k: usize,
    keys: Option<usize>,
) -> anyhow::Result<()> {
    let created_ms = now_ms();
    let jobs: Vec<Job> = (0..k)
        .map(|i| {
            let mut event = event.clone();
            if let Some(n) = keys {
                event.channel = Some(format!("ch-{}", i % n.max(1)));
            }
            Job::new(app, event, created_ms)
        })
        .collect();
    queue.enqueue(app, &jobs).await.context("enqueueing")?;
    Ok(())
}

/// Enqueues `n` events at `rate` per second (in small batches every 5 ms),
/// on its own thread and runtime.
fn start_producer(
    settings: Settings,
    event: Event,
    n: u64,
    rate: u64,
    apps: usize,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<anyhow::Result<(u64, Duration, f64)>> {
    std::thread::Builder::new()
        .name("bench-producer".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let queue = service::open_queue(&settings)?;
                let started = Instant::now();
                let mut tick = tokio::time::interval(Duration::from_millis(5));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                let mut sent = 0u64;
                let mut next_app = 0;
                while sent < n && !stop.load(Ordering::Relaxed) {
                    tick.tick().await;
                    let due = ((started.elapsed().as_secs_f64() * rate as f64) as u64).min(n);
                    while sent < due {
                        let k = (due - sent).min(FILL_BATCH as u64) as usize;
                        enqueue_batch(&queue, &app_id(next_app, apps), &event, k, None).await?;
                        next_app = (next_app + 1) % apps;
                        sent += k as u64;
                    }
                }
                Ok((sent, started.elapsed(), thread_cpu_seconds()))
            })
        })
        .expect("spawning the producer thread")
}

// ---------------------------------------------------------------------------
// The loopback sink

struct SinkState {
    target: u64,
    count: AtomicU64,
    /// Requests without a signature or without a leading `time_ms`.
    bad: AtomicU64,
    hist: Mutex<Histogram<u64>>,
    first: OnceLock<Instant>,
    /// When the target-th request arrived.
    last: OnceLock<Instant>,
    done: tokio::sync::Notify,
    /// When the worker started: the timeline counts seconds from here.
    origin: OnceLock<Instant>,
    /// Per second since `origin`: deliveries and the largest latency (ms).
    timeline: Mutex<Vec<(u64, u64)>>,
    /// How long each answer waits.
    delay: Duration,
}

struct Sink {
    addr: SocketAddr,
    state: Arc<SinkState>,
}

/// Binds 127.0.0.1:0 and serves on a one-thread runtime in its own OS thread,
/// so the sink does not share the worker's scheduler.
fn start_sink(target: u64, delay: Duration) -> anyhow::Result<Sink> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("binding the sink")?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let state = Arc::new(SinkState {
        target,
        count: AtomicU64::new(0),
        bad: AtomicU64::new(0),
        hist: Mutex::new(Histogram::new_with_max(3_600_000, 3).expect("valid bounds")),
        first: OnceLock::new(),
        last: OnceLock::new(),
        done: tokio::sync::Notify::new(),
        origin: OnceLock::new(),
        timeline: Mutex::new(Vec::new()),
        delay,
    });
    let app = axum::Router::new()
        .route("/hook", axum::routing::post(receive))
        .with_state(state.clone());
    serve_on_own_thread("bench-sink", listener, app)?;
    Ok(Sink { addr, state })
}

async fn receive(State(s): State<Arc<SinkState>>, headers: HeaderMap, body: Bytes) -> StatusCode {
    if !s.delay.is_zero() {
        tokio::time::sleep(s.delay).await;
    }
    // A batch carries several events, each starting with its name.
    let pattern = format!("{{\"name\":\"{QUEUE}\"");
    let events = body
        .windows(pattern.len())
        .filter(|w| *w == pattern.as_bytes())
        .count()
        .max(1) as u64;
    let now = now_ms();
    let latency = match leading_time_ms(&body) {
        Some(t) if headers.contains_key("x-pusher-signature") => {
            let latency = now.saturating_sub(t);
            s.hist
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .saturating_record(latency);
            latency
        }
        _ => {
            s.bad.fetch_add(1, Ordering::Relaxed);
            0
        }
    };
    if let Some(origin) = s.origin.get() {
        let second = origin.elapsed().as_secs() as usize;
        let mut timeline = s.timeline.lock().unwrap_or_else(|p| p.into_inner());
        if timeline.len() <= second {
            timeline.resize(second + 1, (0, 0));
        }
        timeline[second].0 += events;
        timeline[second].1 = timeline[second].1.max(latency);
    }
    let before = s.count.fetch_add(events, Ordering::Relaxed);
    let seen = before + events;
    if before == 0 {
        let _ = s.first.set(Instant::now());
    }
    if before < s.target && seen >= s.target {
        let _ = s.last.set(Instant::now());
        s.done.notify_one();
    }
    StatusCode::OK
}

// ---------------------------------------------------------------------------
// Cleanup and the machine

// ---------------------------------------------------------------------------
// CPU accounting: this process's threads by name (/proc/self/task), Redis
// (INFO cpu) and the whole box (/proc/stat).

struct CpuSnapshot {
    /// Thread name → CPU seconds (user + system).
    threads: std::collections::HashMap<String, f64>,
    redis_s: Option<f64>,
    /// Busy and total jiffies of the box.
    box_busy: u64,
    box_total: u64,
    /// Clock ticks per second.
    tick: f64,
}

#[derive(Debug, Default)]
struct CpuUse {
    /// The worker's runtime threads and the main thread (which only watches).
    worker_s: f64,
    sink_s: f64,
    producer_s: f64,
    redis_s: Option<f64>,
    /// Fraction of all CPUs busy.
    box_busy: f64,
    /// CPU seconds the whole box was busy.
    box_busy_s: f64,
}

impl CpuUse {
    /// Busy CPU time not used by this process or Redis: other load on the
    /// box during the run, which skews the results.
    fn other_s(&self) -> f64 {
        (self.box_busy_s
            - self.worker_s
            - self.sink_s
            - self.producer_s
            - self.redis_s.unwrap_or(0.0))
        .max(0.0)
    }
}

impl CpuSnapshot {
    async fn take(redis_url: &str) -> CpuSnapshot {
        // SAFETY: sysconf has no preconditions.
        let tick = match unsafe { libc::sysconf(libc::_SC_CLK_TCK) } {
            t if t > 0 => t as f64,
            _ => 100.0,
        };
        let mut threads = std::collections::HashMap::new();
        if let Ok(dir) = std::fs::read_dir("/proc/self/task") {
            for task in dir.flatten() {
                let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
                    continue;
                };
                let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
                    continue;
                };
                let name = stat[open + 1..close].to_string();
                // Fields after the name start at field 3 (state); utime and
                // stime are fields 14 and 15.
                let f: Vec<&str> = stat[close + 1..].split_whitespace().collect();
                let ticks = |i: usize| {
                    f.get(i - 3)
                        .and_then(|v| v.parse::<u64>().ok())
                        .unwrap_or(0)
                };
                *threads.entry(name).or_insert(0.0) += (ticks(14) + ticks(15)) as f64 / tick;
            }
        }
        let (box_busy, box_total) = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|s| {
                let line = s.lines().next()?.strip_prefix("cpu ")?.to_string();
                let v: Vec<u64> = line
                    .split_whitespace()
                    .filter_map(|x| x.parse().ok())
                    .collect();
                // user nice system idle iowait irq softirq steal (guest is in user).
                let total: u64 = v.iter().take(8).sum();
                let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
                Some((total - idle, total))
            })
            .unwrap_or((0, 0));
        CpuSnapshot {
            threads,
            redis_s: redis_cpu(redis_url).await,
            box_busy,
            box_total,
            tick,
        }
    }

    fn since(&self, before: &CpuSnapshot) -> CpuUse {
        let mut use_ = CpuUse::default();
        for (name, secs) in &self.threads {
            let d = (secs - before.threads.get(name).copied().unwrap_or(0.0)).max(0.0);
            match name.as_str() {
                "bench-sink" => use_.sink_s += d,
                // Reported by the producer itself when it exits.
                "bench-producer" => {}
                _ => use_.worker_s += d,
            }
        }
        use_.redis_s = match (self.redis_s, before.redis_s) {
            (Some(a), Some(b)) => Some((a - b).max(0.0)),
            _ => None,
        };
        let total = self.box_total.saturating_sub(before.box_total);
        if total > 0 {
            let busy = self.box_busy.saturating_sub(before.box_busy) as f64;
            use_.box_busy = busy / total as f64;
            use_.box_busy_s = busy / self.tick;
        }
        use_
    }
}

/// CPU seconds the calling thread has used (it is gone from /proc/self/task
/// once it exits, so the producer reports its own).
fn thread_cpu_seconds() -> f64 {
    // SAFETY: getrusage writes into the struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut usage) } != 0 {
        return 0.0;
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

/// Redis's own CPU seconds (main and background threads), from INFO cpu.
async fn redis_cpu(redis_url: &str) -> Option<f64> {
    let client = redis::Client::open(redis_url).ok()?;
    let mut conn = client.get_multiplexed_async_connection().await.ok()?;
    let info: String = redis::cmd("INFO")
        .arg("cpu")
        .query_async(&mut conn)
        .await
        .ok()?;
    let field = |k: &str| {
        info.lines().find_map(|l| {
            l.strip_prefix(k)?
                .strip_prefix(':')?
                .trim()
                .parse::<f64>()
                .ok()
        })
    };
    Some(field("used_cpu_sys")? + field("used_cpu_user")?)
}

// ---------------------------------------------------------------------------
// Output

impl Report {
    fn print(&self, args: &Args, prefix: &str, m: &Machine) {
        let rate = |n: u64, d: Duration| n as f64 / d.as_secs_f64().max(1e-9);
        println!(
            "machine:     {} CPUs, {}, {}, Redis {}",
            m.nproc, m.cpu, m.mem, m.redis
        );
        println!(
            "run:         mode {:?}, {} events, {} app(s), concurrency {}{}, sink {}, prefix {prefix}",
            self.mode,
            self.events,
            args.apps,
            args.concurrency,
            if args.default_caps {
                " (default caps)"
            } else {
                ""
            },
            args.sink_url.as_deref().unwrap_or("built-in loopback"),
        );
        if let Some((n, d)) = self.fill {
            println!(
                "fill:        {n} events in {:.3} s = {:.0} events/s (one enqueue script call per {FILL_BATCH})",
                d.as_secs_f64(),
                rate(n, d)
            );
        }
        if let Some((n, d)) = self.produced {
            println!(
                "producer:    {n} events in {:.3} s = {:.0} events/s (target {}/s)",
                d.as_secs_f64(),
                rate(n, d),
                args.rate.unwrap_or(0)
            );
        }
        println!(
            "elapsed:     {:.3} s from worker start to the last delivery",
            self.elapsed.as_secs_f64()
        );
        println!(
            "throughput:  {:.0} deliveries/s",
            rate(self.events, self.elapsed)
        );
        if let Some(d) = self.first_to_last {
            println!(
                "             {:.0} deliveries/s from first to last delivery ({:.3} s)",
                rate(self.events.saturating_sub(1), d),
                d.as_secs_f64()
            );
        }
        match &self.latency {
            Some(h) if !h.is_empty() => {
                let what = match self.mode {
                    RunMode::Burst => {
                        "enqueue → delivery; burst mode: includes the time spent waiting in the queue (all events are queued before the worker starts)"
                    }
                    RunMode::Steady => "enqueue → delivery at the sink, with the worker running",
                };
                println!(
                    "latency ms:  p50 {} / p99 {} / p99.9 {} / max {}  ({what}; 1 ms resolution)",
                    h.value_at_quantile(0.50),
                    h.value_at_quantile(0.99),
                    h.value_at_quantile(0.999),
                    h.max()
                );
            }
            Some(_) => println!("latency:     no samples"),
            None => println!("latency:     not measured (external sink)"),
        }
        let per = |secs: f64| secs * 1e6 / self.events as f64;
        let c = &self.cpu;
        println!(
            "cpu:         µs per delivery: worker runtime {:.1}, sink {:.1}, producer {:.1}, Redis {}; box {:.0}% busy over {} CPUs",
            per(c.worker_s),
            per(c.sink_s),
            per(c.producer_s),
            c.redis_s
                .map_or("n/a".to_string(), |r| format!("{:.1}", per(r))),
            c.box_busy * 100.0,
            m.nproc,
        );
        let other = c.other_s();
        println!(
            "other load:  {:.2} CPU-seconds used by other processes during the run{}",
            other,
            if other > 0.05 * self.elapsed.as_secs_f64() * m.nproc as f64 {
                " (more than 5% of the box: results are skewed)"
            } else {
                ""
            }
        );
        let counters: Vec<String> = self.stats.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!(
            "queue:       {}; worker stopped in {:.3} s",
            if counters.is_empty() {
                "no counters".to_string()
            } else {
                counters.join(" ")
            },
            self.shutdown.as_secs_f64()
        );
        if args.timeline {
            for (second, (count, max)) in self.timeline.iter().enumerate() {
                println!("  second {second:>3}: {count:>6} deliveries, max latency {max} ms");
            }
        }
        for p in &self.problems {
            println!("PROBLEM:     {p}");
        }
    }
}
