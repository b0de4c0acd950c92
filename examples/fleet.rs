//! Run with: cargo build --release && cargo run --release --example fleet -- --events 40000 --rounds 3
//!
//! Throughput of a fleet: 1, 2 and 4 worker processes (`wasmhook serve
//! --mode worker`, the release binary) draining one backlog, against one
//! standalone redis-server and against a local Redis Cluster (3 primaries +
//! 3 replicas, `redis-cli --cluster create`), both started here on free
//! ports and stopped at the end.
//!
//! Each run: a fresh prefix; `--events` jobs over `--apps` apps (one Pusher
//! endpoint each, all on a loopback sink) are enqueued first; then the
//! workers start and the run is timed from the first delivery to the last.
//! Over the same span it reads the CPU time of every redis-server (`INFO
//! cpu`) and of every worker (/proc/<pid>/stat), and reports, per delivery:
//! the CPU of the busiest Redis node (the primary that holds the queue, or
//! with `redis.shards` the one that holds most of its shards), of all Redis
//! nodes, and of the workers. From those: how many workers one Redis
//! primary core can feed = worker CPU per delivery / busiest node's CPU per
//! delivery. Variants: standalone, cluster (one shard), and cluster with
//! `--shards` shards.
//!
//! Variants run in interleaved rounds (standalone 1, cluster 1, standalone
//! 2, ...) so that the box's noise falls on all of them alike. On a small
//! box the workers, the sink and Redis share the cores: throughput then
//! measures the box, and the CPU per delivery is the figure to carry to a
//! bigger one.

use std::net::TcpListener as StdListener;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use axum::http::StatusCode;
use clap::Parser;

#[path = "support/mod.rs"]
mod support;

use support::{allow_loopback, box_load, machine_summary, serve_on_own_thread};
use wasmhook::event::{Event, Job, now_ms};

#[derive(Debug, Parser)]
#[command(about = "Fleet throughput: worker processes against standalone Redis and a cluster")]
struct Args {
    /// Events per run.
    #[arg(long, default_value_t = 40_000)]
    events: u64,
    /// Apps the events are spread over.
    #[arg(long, default_value_t = 10)]
    apps: usize,
    /// Rounds of every variant.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Worker counts to run.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    workers: Vec<usize>,
    /// The wasmhook binary the workers run.
    #[arg(long, default_value = "target/release/wasmhook")]
    binary: PathBuf,
    /// Jobs each worker runs at once (`queues.concurrency`).
    #[arg(long, default_value_t = 128)]
    concurrency: usize,
    /// `redis.shards` of the sharded cluster variant.
    #[arg(long, default_value_t = 3)]
    shards: usize,
}

/// A redis-server of this run, killed on drop.
struct Node {
    port: u16,
    child: std::process::Child,
    _dir: tempfile::TempDir,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Node {
    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn start(extra: &[String]) -> anyhow::Result<Node> {
        for _ in 0..20 {
            let port = free_port();
            let dir = tempfile::tempdir()?;
            let child = std::process::Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
                .args(extra)
                .arg("--dir")
                .arg(dir.path())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("redis-server must be installed")?;
            let mut node = Node {
                port,
                child,
                _dir: dir,
            };
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if node.cmd::<String>(&redis::cmd("PING")).is_ok() {
                    return Ok(node);
                }
                if let Ok(Some(_)) = node.child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        bail!("could not start redis-server")
    }

    fn cmd<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> anyhow::Result<T> {
        let mut conn = redis::Client::open(self.url())?.get_connection()?;
        Ok(cmd.query(&mut conn)?)
    }

    /// CPU seconds the server has used (user + system).
    fn cpu(&self) -> f64 {
        let info: String = self.cmd(redis::cmd("INFO").arg("cpu")).unwrap_or_default();
        info.lines()
            .filter_map(|l| {
                let (k, v) = l.split_once(':')?;
                matches!(k, "used_cpu_sys" | "used_cpu_user")
                    .then(|| v.trim().parse::<f64>().ok())?
            })
            .sum()
    }
}

/// A free port below 55535 whose cluster bus port (+10000) is free too.
fn free_port() -> u16 {
    loop {
        let port = StdListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap_or(0);
        if port > 0 && port < 55535 && StdListener::bind(("127.0.0.1", port + 10000)).is_ok() {
            return port;
        }
        let pick = 20000 + (now_ms() % 30000) as u16;
        if StdListener::bind(("127.0.0.1", pick)).is_ok()
            && StdListener::bind(("127.0.0.1", pick + 10000)).is_ok()
        {
            return pick;
        }
    }
}

struct Topology {
    name: &'static str,
    nodes: Vec<Node>,
    cluster: bool,
}

impl Topology {
    fn standalone() -> anyhow::Result<Topology> {
        Ok(Topology {
            name: "standalone",
            nodes: vec![Node::start(&[])?],
            cluster: false,
        })
    }

    fn cluster() -> anyhow::Result<Topology> {
        let mut nodes = Vec::new();
        for _ in 0..6 {
            let port_file = format!("nodes-{}.conf", nodes.len());
            nodes.push(Node::start(&[
                "--cluster-enabled".into(),
                "yes".into(),
                "--cluster-node-timeout".into(),
                "15000".into(),
                "--cluster-config-file".into(),
                port_file,
            ])?);
        }
        let out = std::process::Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)))
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .output()
            .context("redis-cli must be installed")?;
        if !out.status.success() {
            bail!(
                "redis-cli --cluster create failed: {}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ok = nodes.iter().all(|n| {
                let info: String = n.cmd(redis::cmd("CLUSTER").arg("INFO")).unwrap_or_default();
                let repl: String = n
                    .cmd(redis::cmd("INFO").arg("replication"))
                    .unwrap_or_default();
                info.contains("cluster_state:ok")
                    && (repl.contains("role:master") || repl.contains("master_link_status:up"))
            });
            if ok {
                break;
            }
            if Instant::now() > deadline {
                bail!("the cluster did not settle");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(Topology {
            name: "cluster",
            nodes,
            cluster: true,
        })
    }

    fn redis_section(&self, shards: usize) -> String {
        let urls: Vec<String> = self.nodes[1..]
            .iter()
            .map(|n| format!("\"{}\"", n.url()))
            .collect();
        if self.cluster {
            format!(
                "url = \"{}\"\ncluster = true\nurls = [{}]\nshards = {shards}\n",
                self.nodes[0].url(),
                urls.join(", ")
            )
        } else {
            format!("url = \"{}\"\n", self.nodes[0].url())
        }
    }
}

/// Counts POSTs; answers 200.
fn start_sink() -> anyhow::Result<(u16, Arc<AtomicU64>)> {
    let listener = StdListener::bind("127.0.0.1:0")?;
    listener.set_nonblocking(true)?;
    let port = listener.local_addr()?.port();
    let count = Arc::new(AtomicU64::new(0));
    let shared = count.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move || {
            shared.fetch_add(1, Ordering::Relaxed);
            async { StatusCode::OK }
        }),
    );
    serve_on_own_thread("fleet-sink", listener, app)?;
    Ok((port, count))
}

fn config_text(v: &Variant, prefix: &str, sink: u16, args: &Args) -> String {
    let mut apps = String::new();
    for a in 0..args.apps {
        apps.push_str(&format!(
            "\n[[apps]]\nid = \"app-{a}\"\nkey = \"key-{a}\"\nsecret = \"secret-{a}\"\ningest_token = \"token-{a}\"\n\n[[apps.webhooks]]\nurl = \"http://127.0.0.1:{sink}/hook\"\n"
        ));
    }
    format!(
        "[redis]\n{}prefix = \"{prefix}\"\n\n[queues]\nconcurrency = {}\napp_max_in_flight = {}\n\n[delivery]\nmax_in_flight = {}\n\n[metrics]\nenabled = false\n\n[log]\nlevel = \"warn\"\n{apps}",
        v.topology.redis_section(v.shards),
        args.concurrency,
        args.concurrency,
        args.concurrency,
    )
}

/// CPU seconds a process has used (utime + stime).
fn process_cpu(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which is in parentheses).
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|&i| f.get(i)?.parse::<f64>().ok())
        .sum();
    // USER_HZ is 100 on Linux.
    ticks / 100.0
}

/// A topology and the number of shards the queue is spread over.
struct Variant<'a> {
    name: String,
    topology: &'a Topology,
    shards: usize,
}

struct RunResult {
    per_s: f64,
    primary_us: f64,
    redis_us: f64,
    worker_us: f64,
}

async fn run_once(
    v: &Variant<'_>,
    workers: usize,
    args: &Args,
    dir: &Path,
) -> anyhow::Result<RunResult> {
    let (sink, count) = start_sink()?;
    let topology = v.topology;
    let prefix = format!("fleet-{}-{}", topology.name, now_ms());
    let text = config_text(v, &prefix, sink, args);
    let file = dir.join(format!("{prefix}.toml"));
    std::fs::write(&file, &text)?;
    let settings = wasmhook::config::load_from(Some(file.clone()), Some(&text), allow_loopback())?;
    let queue = wasmhook::service::open_queue(&settings)?;

    // The backlog, app by app in batches.
    let per_app = args.events / args.apps as u64;
    let total = per_app * args.apps as u64;
    for a in 0..args.apps {
        let app = format!("app-{a}");
        let mut left = per_app;
        while left > 0 {
            let n = left.min(1000);
            let jobs: Vec<Job> = (0..n)
                .map(|i| {
                    let event = Event::from_json(serde_json::json!({
                        "name": "client_event", "channel": format!("private-{i}"),
                        "event": "client-x", "data": "{\"n\":1}"
                    }))?;
                    Ok(Job::new(&app, event, now_ms()))
                })
                .collect::<anyhow::Result<_>>()?;
            queue.enqueue(&app, &jobs).await?;
            left -= n;
        }
    }

    let mut children = Vec::new();
    for _ in 0..workers {
        children.push(
            tokio::process::Command::new(&args.binary)
                .args(["serve", "--mode", "worker", "--config"])
                .arg(&file)
                .envs(allow_loopback())
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("starting {}", args.binary.display()))?,
        );
    }
    let pids: Vec<u32> = children.iter().filter_map(|c| c.id()).collect();
    // Timed from the first delivery.
    let deadline = Instant::now() + Duration::from_secs(60);
    while count.load(Ordering::Relaxed) == 0 {
        if Instant::now() > deadline {
            bail!("no delivery within 60 s");
        }
        for c in &mut children {
            if let Ok(Some(status)) = c.try_wait() {
                bail!("a worker exited before delivering: {status}");
            }
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let start = Instant::now();
    let first = count.load(Ordering::Relaxed);
    let redis0: Vec<f64> = topology.nodes.iter().map(Node::cpu).collect();
    let workers0: f64 = pids.iter().map(|&p| process_cpu(p)).sum();
    let deadline = Instant::now() + Duration::from_secs(300);
    while count.load(Ordering::Relaxed) < total {
        if Instant::now() > deadline {
            bail!("stuck at {} of {total}", count.load(Ordering::Relaxed));
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let redis1: Vec<f64> = topology.nodes.iter().map(Node::cpu).collect();
    let workers1: f64 = pids.iter().map(|&p| process_cpu(p)).sum();
    for c in &mut children {
        let _ = c.kill().await;
    }
    let delivered = (count.load(Ordering::Relaxed) - first).max(1) as f64;
    let used: Vec<f64> = redis1.iter().zip(&redis0).map(|(b, a)| b - a).collect();
    Ok(RunResult {
        per_s: delivered / elapsed,
        // The busiest node: the primary of the queue's slot, or with shards
        // the primary that carries most of them.
        primary_us: used.iter().cloned().fold(0.0, f64::max) * 1e6 / delivered,
        redis_us: used.iter().sum::<f64>() * 1e6 / delivered,
        worker_us: (workers1 - workers0) * 1e6 / delivered,
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return 0.0;
    }
    v[v.len() / 2]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if !args.binary.exists() {
        bail!(
            "{} not found: run `cargo build --release` first",
            args.binary.display()
        );
    }
    let dir = tempfile::tempdir()?;
    let standalone = Topology::standalone()?;
    let cluster = Topology::cluster()?;
    let machine = machine_summary(&standalone.nodes[0].url()).await;
    println!(
        "machine: {} × {}, {}, Redis {}; other load before the run: {:.0}% of the box",
        machine.nproc,
        machine.cpu,
        machine.mem,
        machine.redis,
        box_load(Duration::from_secs(1)).await * 100.0
    );
    println!(
        "{} events over {} apps per run, concurrency {} per worker, {} round(s)\n",
        args.events, args.apps, args.concurrency, args.rounds
    );
    println!(
        "{:>5} {:>11} {:>7} {:>12} {:>16} {:>17} {:>16}",
        "round",
        "redis",
        "workers",
        "deliveries/s",
        "busiest µs/deliv",
        "all redis µs/deliv",
        "workers µs/deliv"
    );
    let variants = [
        Variant {
            name: "standalone".into(),
            topology: &standalone,
            shards: 1,
        },
        Variant {
            name: "cluster".into(),
            topology: &cluster,
            shards: 1,
        },
        Variant {
            name: format!("cluster/{}", args.shards),
            topology: &cluster,
            shards: args.shards,
        },
    ];
    let mut results: Vec<(String, usize, RunResult)> = Vec::new();
    for round in 1..=args.rounds {
        for &w in &args.workers {
            for v in &variants {
                let r = run_once(v, w, &args, dir.path()).await?;
                println!(
                    "{round:>5} {:>11} {w:>7} {:>12.0} {:>16.1} {:>17.1} {:>16.1}",
                    v.name, r.per_s, r.primary_us, r.redis_us, r.worker_us
                );
                results.push((v.name.clone(), w, r));
            }
        }
    }
    println!("\nmedians:");
    println!(
        "{:>11} {:>7} {:>12} {:>16} {:>17} {:>16} {:>22}",
        "redis",
        "workers",
        "deliveries/s",
        "busiest µs/deliv",
        "all redis µs/deliv",
        "workers µs/deliv",
        "workers per primary"
    );
    for &w in &args.workers {
        for name in variants.iter().map(|v| v.name.as_str()) {
            let runs: Vec<&RunResult> = results
                .iter()
                .filter(|(n, k, _)| n == name && *k == w)
                .map(|(_, _, r)| r)
                .collect();
            let m = |f: fn(&RunResult) -> f64| median(runs.iter().map(|r| f(r)).collect());
            let (primary, worker) = (m(|r| r.primary_us), m(|r| r.worker_us));
            println!(
                "{name:>11} {w:>7} {:>12.0} {primary:>16.1} {:>17.1} {worker:>16.1} {:>22.1}",
                m(|r| r.per_s),
                m(|r| r.redis_us),
                if primary > 0.0 { worker / primary } else { 0.0 }
            );
        }
    }
    Ok(())
}
