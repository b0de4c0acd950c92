//! Test harness: a real `redis-server` on a free port, a real HTTP receiver on
//! 127.0.0.1:0 that records what arrives, independent signature checks, and
//! helpers to run wasmhook in-process or as a child process.

#![allow(dead_code)]

use std::collections::{HashMap, VecDeque};
use std::net::TcpListener as StdListener;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio_util::sync::CancellationToken;

pub const WHSEC: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
pub const APP_SECRET: &str = "app-secret";

pub fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A private redis-server, killed on drop.
pub struct RedisServer {
    child: Option<std::process::Child>,
    pub port: u16,
    pub url: String,
    extra: Vec<String>,
    dir: tempfile::TempDir,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        for _ in 0..5 {
            if let Some(server) = RedisServer::spawn(free_port(), &[]) {
                return server;
            }
        }
        panic!("could not start redis-server");
    }

    /// A redis-server on `port` with `extra` arguments, once it answers PING;
    /// None when it does not start (the port was taken meanwhile).
    pub fn spawn(port: u16, extra: &[&str]) -> Option<RedisServer> {
        let mut server = RedisServer {
            child: None,
            port,
            url: format!("redis://127.0.0.1:{port}"),
            extra: extra.iter().map(|a| a.to_string()).collect(),
            dir: tempfile::tempdir().unwrap(),
        };
        server.launch().then_some(server)
    }

    /// Starts the server again after [`Self::stop`], with its files (a
    /// cluster node rejoins its cluster).
    pub fn restart(&mut self) {
        assert!(
            self.launch(),
            "redis-server on port {} did not restart",
            self.port
        );
    }

    fn launch(&mut self) -> bool {
        let child = std::process::Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "no",
            ])
            .args(&self.extra)
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (apt-get install redis-server)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(client) = redis::Client::open(self.url.as_str())
                && let Ok(mut conn) = client.get_connection()
            {
                match redis::cmd("PING").query::<String>(&mut conn) {
                    Ok(_) => return true,
                    // Up, and asking for a password.
                    Err(e) if e.code() == Some("NOAUTH") => return true,
                    Err(_) => {}
                }
            }
            if let Some(Ok(Some(_))) = self.child.as_mut().map(|c| c.try_wait()) {
                break; // port taken meanwhile
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.stop();
        false
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn conn(&self) -> redis::Connection {
        redis::Client::open(self.url.as_str())
            .unwrap()
            .get_connection()
            .unwrap()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A free port for a cluster node: below 55535, with its bus port (+10000)
/// free too.
fn free_cluster_port() -> u16 {
    loop {
        let port = free_port();
        if port < 55535 && StdListener::bind(("127.0.0.1", port + 10000)).is_ok() {
            return port;
        }
        // Outside the range: try a port of our choosing.
        let pick = 20000 + (rand_u16() % 30000);
        if StdListener::bind(("127.0.0.1", pick)).is_ok()
            && StdListener::bind(("127.0.0.1", pick + 10000)).is_ok()
        {
            return pick;
        }
    }
}

fn rand_u16() -> u16 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(Instant::now().elapsed().as_nanos());
    h.finish() as u16
}

/// The queue's shards on a test cluster: spread over more than one primary.
pub const CLUSTER_SHARDS: usize = 3;

/// A private Redis Cluster: 3 primaries and 3 replicas on 127.0.0.1, joined
/// with `redis-cli --cluster create`, torn down on drop.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
    /// The `default` user's password on every node, if any.
    password: Option<String>,
    /// With TLS: each node's TLS port (the one the cluster announces) and
    /// the CA that signed the nodes' certificate.
    tls: Option<(Vec<u16>, PathBuf)>,
}

impl RedisCluster {
    /// `node_timeout`: how long a silent primary takes to be failed over.
    pub fn start(node_timeout: Duration) -> RedisCluster {
        RedisCluster::start_with(node_timeout, None)
    }

    /// As [`Self::start`]; with `password`, every node requires it
    /// (`requirepass`, and `masterauth` for its replica).
    pub fn start_with(node_timeout: Duration, password: Option<&str>) -> RedisCluster {
        RedisCluster::launch(node_timeout, password, None)
    }

    /// A cluster that speaks TLS only to clients and on its bus, with the
    /// certificate files `[ca, cert, key]` (a plain port stays open for the
    /// harness's own commands).
    pub fn start_tls(files: [&std::path::Path; 3]) -> RedisCluster {
        RedisCluster::launch(Duration::from_secs(15), None, Some(files))
    }

    fn launch(
        node_timeout: Duration,
        password: Option<&str>,
        tls: Option<[&std::path::Path; 3]>,
    ) -> RedisCluster {
        let timeout = node_timeout.as_millis().to_string();
        let mut nodes = Vec::new();
        let mut tls_ports = Vec::new();
        while nodes.len() < 6 {
            let port = free_cluster_port();
            let config_file = format!("nodes-{port}.conf");
            let (tls_port, bus_port) = (free_port().to_string(), free_port().to_string());
            let mut args = vec![
                "--cluster-enabled",
                "yes",
                "--cluster-node-timeout",
                &timeout,
                "--cluster-config-file",
                &config_file,
                "--repl-diskless-sync",
                "yes",
                "--repl-diskless-sync-delay",
                "0",
            ];
            if let Some(pw) = password {
                args.extend(["--requirepass", pw, "--masterauth", pw]);
            }
            let files = tls.map(|f| f.map(|p| p.to_str().unwrap().to_string()));
            if let Some([ca, cert, key]) = &files {
                args.extend([
                    "--tls-port",
                    &tls_port,
                    "--cluster-port",
                    &bus_port,
                    "--tls-cluster",
                    "yes",
                    "--tls-replication",
                    "yes",
                    "--tls-auth-clients",
                    "no",
                    "--tls-ca-cert-file",
                    ca,
                    "--tls-cert-file",
                    cert,
                    "--tls-key-file",
                    key,
                ]);
            }
            if let Some(node) = RedisServer::spawn(port, &args) {
                nodes.push(node);
                tls_ports.push(tls_port.parse().unwrap());
            }
        }
        let mut create = std::process::Command::new("redis-cli");
        if let Some(pw) = password {
            create.env("REDISCLI_AUTH", pw);
        }
        let out = create
            .args(["--cluster", "create"])
            .args(nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)))
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .output()
            .expect("redis-cli must be installed");
        assert!(
            out.status.success(),
            "redis-cli --cluster create: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let cluster = RedisCluster {
            nodes,
            password: password.map(String::from),
            tls: tls.map(|[ca, _, _]| (tls_ports, ca.to_path_buf())),
        };
        cluster.wait_until_ok(Duration::from_secs(30));
        cluster
    }

    /// A node's URL with the password, for the harness's own commands.
    fn admin_url(&self, node: &RedisServer) -> String {
        match &self.password {
            Some(pw) => format!("redis://:{pw}@127.0.0.1:{}", node.port),
            None => node.url.clone(),
        }
    }

    /// Every running node says `cluster_state:ok`, sees 3 primaries, and
    /// every replica's link to its primary is up.
    pub fn wait_until_ok(&self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let ok = self.nodes.iter().filter(|n| n.child.is_some()).all(|n| {
                let Ok(mut conn) =
                    redis::Client::open(self.admin_url(n)).and_then(|c| c.get_connection())
                else {
                    return false;
                };
                let info: String = redis::cmd("CLUSTER")
                    .arg("INFO")
                    .query(&mut conn)
                    .unwrap_or_default();
                let repl: String = redis::cmd("INFO")
                    .arg("replication")
                    .query(&mut conn)
                    .unwrap_or_default();
                info.contains("cluster_state:ok")
                    && info.contains("cluster_size:3")
                    && (repl.contains("role:master") || repl.contains("master_link_status:up"))
            });
            if ok {
                return;
            }
            assert!(Instant::now() < deadline, "the cluster did not settle");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The `[redis]` lines that point wasmhook at this cluster.
    pub fn section(&self) -> String {
        let (urls, ca): (Vec<String>, String) = match &self.tls {
            Some((ports, ca)) => (
                ports
                    .iter()
                    .map(|p| format!("rediss://127.0.0.1:{p}"))
                    .collect(),
                format!("ca_file = \"{}\"\n", ca.display()),
            ),
            None => (
                self.nodes.iter().map(|n| n.url.clone()).collect(),
                String::new(),
            ),
        };
        let seeds: Vec<String> = urls[1..].iter().map(|u| format!("\"{u}\"")).collect();
        format!(
            "url = \"{}\"\ncluster = true\nurls = [{}]\nshards = {CLUSTER_SHARDS}\n{ca}",
            urls[0],
            seeds.join(", ")
        )
    }

    pub fn conn(&self) -> redis::cluster::ClusterConnection {
        redis::cluster::ClusterClient::new(
            self.nodes
                .iter()
                .map(|n| self.admin_url(n))
                .collect::<Vec<_>>(),
        )
        .unwrap()
        .get_connection()
        .unwrap()
    }

    /// The index of the node that is the primary of `key`'s slot now.
    pub fn primary_of(&self, key: &str) -> usize {
        let mut conn = self.conn();
        let slot: i64 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query(&mut conn)
            .unwrap();
        let nodes: String = redis::cmd("CLUSTER").arg("NODES").query(&mut conn).unwrap();
        // <id> <ip:port@bus> <flags> <primary> <ping> <pong> <epoch> <link> <slot ranges...>
        let port = nodes
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|f| {
                f.len() > 8
                    && f[2].contains("master")
                    && !f[2].contains("fail")
                    && f[8..].iter().any(|range| {
                        let (lo, hi) = range.split_once('-').unwrap_or((range, range));
                        matches!((lo.parse::<i64>(), hi.parse::<i64>()),
                            (Ok(lo), Ok(hi)) if lo <= slot && slot <= hi)
                    })
            })
            .and_then(|f| f[1].split(['@', ':']).nth(1)?.parse::<u16>().ok())
            .expect("some node is the slot's primary");
        self.nodes.iter().position(|n| n.port == port).unwrap()
    }
}

/// Where a test's Redis lives: one server or a cluster.
pub enum Backend {
    Standalone(RedisServer),
    Cluster(RedisCluster),
}

impl Backend {
    pub fn standalone() -> Backend {
        Backend::Standalone(RedisServer::start())
    }

    /// A cluster whose primaries are not failed over by a busy test box.
    pub fn cluster() -> Backend {
        Backend::Cluster(RedisCluster::start(Duration::from_secs(15)))
    }

    /// The `[redis]` lines (without the prefix).
    pub fn section(&self) -> String {
        match self {
            Backend::Standalone(r) => format!("url = \"{}\"\n", r.url),
            Backend::Cluster(c) => c.section(),
        }
    }

    /// Config text as [`config`] makes it, on this backend.
    pub fn config(&self, prefix: &str, listen: &str, apps: &str) -> String {
        config_with(&self.section(), prefix, listen, apps)
    }

    /// A connection for raw commands (key-routed on a cluster).
    pub fn conn(&self) -> Box<dyn redis::ConnectionLike> {
        match self {
            Backend::Standalone(r) => Box::new(r.conn()),
            Backend::Cluster(c) => Box::new(c.conn()),
        }
    }
}

/// One request as the receiver got it.
#[derive(Debug, Clone)]
pub struct Received {
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// Status the receiver answered.
    pub status: u16,
    /// When the request arrived.
    pub at: Instant,
}

impl Received {
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap()
    }
}

#[derive(Default)]
struct Script {
    /// Statuses to answer, in order; then `fallback`.
    replies: VecDeque<u16>,
    fallback: Option<u16>,
    delay: Duration,
    retry_after: Option<String>,
}

#[derive(Default)]
struct Inner {
    scripts: HashMap<String, Script>,
    received: Vec<Received>,
    /// Requests that have arrived, answered or not.
    arrived: HashMap<String, usize>,
}

/// A real HTTP server on 127.0.0.1:0 that records every request.
#[derive(Clone)]
pub struct Receiver {
    pub base: String,
    inner: Arc<Mutex<Inner>>,
}

async fn receive(
    State(inner): State<Arc<Mutex<Inner>>>,
    Path(path): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> impl IntoResponse {
    let at = Instant::now();
    let (status, delay, retry_after) = {
        let mut i = inner.lock().unwrap();
        *i.arrived.entry(path.clone()).or_default() += 1;
        let s = i.scripts.entry(path.clone()).or_default();
        let status = s.replies.pop_front().or(s.fallback).unwrap_or(200);
        (status, s.delay, s.retry_after.clone())
    };
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    inner.lock().unwrap().received.push(Received {
        path,
        headers,
        body,
        status,
        at,
    });
    let mut response = (StatusCode::from_u16(status).unwrap(), "receiver says hi").into_response();
    if let Some(ra) = retry_after {
        response
            .headers_mut()
            .insert("retry-after", ra.parse().unwrap());
    }
    response
}

impl Receiver {
    pub async fn start() -> Receiver {
        wasmhook::install_crypto_provider();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let inner: Arc<Mutex<Inner>> = Arc::default();
        let app = axum::Router::new()
            .route("/{path}", axum::routing::post(receive))
            .with_state(inner.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Receiver { base, inner }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}/{path}", self.base)
    }

    /// Changes how `path` answers.
    fn edit(&self, path: &str, change: impl FnOnce(&mut Script)) {
        let mut i = self.inner.lock().unwrap();
        change(i.scripts.entry(path.to_string()).or_default());
    }

    /// Answer these statuses in order, then `then`.
    pub fn script(&self, path: &str, replies: &[u16], then: u16) {
        self.edit(path, |s| {
            s.replies = replies.iter().copied().collect();
            s.fallback = Some(then);
        });
    }

    pub fn delay(&self, path: &str, delay: Duration) {
        self.edit(path, |s| s.delay = delay);
    }

    pub fn retry_after(&self, path: &str, value: &str) {
        self.edit(path, |s| s.retry_after = Some(value.to_string()));
    }

    pub fn received(&self, path: &str) -> Vec<Received> {
        self.inner
            .lock()
            .unwrap()
            .received
            .iter()
            .filter(|r| r.path == path)
            .cloned()
            .collect()
    }

    pub fn arrived(&self, path: &str) -> usize {
        self.inner
            .lock()
            .unwrap()
            .arrived
            .get(path)
            .copied()
            .unwrap_or(0)
    }

    /// Waits until `path` has answered at least `n` requests.
    pub async fn wait_for(&self, path: &str, n: usize, timeout: Duration) -> Vec<Received> {
        let deadline = Instant::now() + timeout;
        loop {
            let got = self.received(path);
            if got.len() >= n {
                return got;
            }
            if Instant::now() > deadline {
                panic!(
                    "{path}: {} of {n} requests arrived within {timeout:?}",
                    got.len()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// Checks a Pusher request the way a receiver would, with its own HMAC.
pub fn verify_pusher(r: &Received, key: &str, secret: &str) {
    assert_eq!(r.header("x-pusher-key"), key);
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(&r.body);
    let expected = hex::encode(mac.finalize().into_bytes());
    assert_eq!(
        r.header("x-pusher-signature"),
        expected,
        "Pusher signature does not verify"
    );
    assert_eq!(r.header("content-type"), "application/json");
}

/// Checks a Standard Webhooks request the way a receiver would.
pub fn verify_standard(r: &Received, secret: &str) {
    verify_standard_id(r, secret, "msg_");
}

/// As [`verify_standard`], for a `webhook-id` that starts with `prefix`
/// (`batch_` for a batch).
pub fn verify_standard_id(r: &Received, secret: &str, prefix: &str) {
    let b64 = base64::engine::general_purpose::STANDARD;
    let key = b64.decode(secret.strip_prefix("whsec_").unwrap()).unwrap();
    let id = r.header("webhook-id");
    let ts = r.header("webhook-timestamp");
    assert!(id.starts_with(prefix), "webhook-id {id:?}");
    let ts_num: u64 = ts.parse().expect("webhook-timestamp is unix seconds");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(now.abs_diff(ts_num) < 300, "timestamp within tolerance");
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).unwrap();
    mac.update(format!("{id}.{ts}.").as_bytes());
    mac.update(&r.body);
    let expected = format!("v1,{}", b64.encode(mac.finalize().into_bytes()));
    let signatures: Vec<&str> = r.header("webhook-signature").split(' ').collect();
    assert!(
        signatures.contains(&expected.as_str()),
        "no webhook-signature entry verifies: {signatures:?}"
    );
}

/// Config text for tests: fast schedules, short intervals, Redis at `redis`
/// with its own prefix, loopback allowed by the network guard (receivers
/// are on 127.0.0.1), and the given `[[apps]]` text.
pub fn config(redis: Option<&str>, prefix: &str, listen: &str, apps: &str) -> String {
    let redis = match redis {
        Some(url) => format!("url = \"{url}\"\n"),
        None => String::new(),
    };
    config_with(&redis, prefix, listen, apps)
}

/// As [`config`], with the `[redis]` lines given whole.
pub fn config_with(redis: &str, prefix: &str, listen: &str, apps: &str) -> String {
    format!(
        r#"
[redis]
{redis}prefix = "{prefix}"

[server]
listen = "{listen}"

[queues]
concurrency = 64
visibility_timeout = "3s"
reclaim_interval = "200ms"
idle_poll = "200ms"

[retry]
schedule = ["0ms", "50ms", "100ms"]
jitter = 0.0

[delivery]
timeout = "1s"
allow_networks = ["127.0.0.0/8"]

[log]
level = "wasmhook=debug,warn"

{apps}
"#
    )
}

/// A Redis of its own, a receiver, and the config of one app (`app-1`)
/// whose one `pusher` endpoint is the receiver's `hook` path.
pub async fn one_app(prefix: &str) -> (RedisServer, Receiver, String) {
    let redis = RedisServer::start();
    let rx = Receiver::start().await;
    let text = config(
        Some(&redis.url),
        prefix,
        "127.0.0.1:0",
        &app("app-1", &pusher_endpoint(&rx.url("hook"))),
    );
    (redis, rx, text)
}

/// One app with the given endpoints text (`[[apps.webhooks]]` tables).
pub fn app(id: &str, webhooks: &str) -> String {
    app_table(id, "", webhooks)
}

fn app_table(id: &str, extra: &str, webhooks: &str) -> String {
    format!(
        r#"
[[apps]]
id = "{id}"
key = "{id}-key"
secret = "{APP_SECRET}"
ingest_token = "{id}-token"
{extra}
{webhooks}
"#
    )
}

pub fn pusher_endpoint(url: &str) -> String {
    format!("\n[[apps.webhooks]]\nurl = \"{url}\"\n")
}

pub fn standard_endpoint(url: &str) -> String {
    format!(
        "\n[[apps.webhooks]]\nurl = \"{url}\"\nscheme = \"standard\"\nsecrets = [\"{WHSEC}\"]\n"
    )
}

pub fn settings(text: &str) -> wasmhook::config::Settings {
    wasmhook::config::load_from(
        Some("test.toml".into()),
        Some(text),
        Vec::<(String, String)>::new(),
    )
    .unwrap()
}

pub fn prefix(name: &str) -> String {
    format!("t-{name}-{}", std::process::id())
}

/// wasmhook running in this process (ingest and worker).
pub struct Running {
    pub stop: CancellationToken,
    pub task: tokio::task::JoinHandle<anyhow::Result<()>>,
    pub ingest: String,
}

impl Running {
    pub async fn start(text: &str, mode: wasmhook::service::Mode) -> Running {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ingest = format!("http://{}", listener.local_addr().unwrap());
        let stop = CancellationToken::new();
        let task = tokio::spawn(wasmhook::service::serve(
            settings(text),
            mode,
            Some(listener),
            stop.clone(),
        ));
        Running { stop, task, ingest }
    }

    /// For a config `serve` must refuse: the error it stops with at start.
    pub async fn refused(text: &str) -> String {
        let run = Running::start(text, wasmhook::service::Mode::All).await;
        let result = tokio::time::timeout(Duration::from_secs(20), run.task)
            .await
            .expect("serve stops at start")
            .unwrap();
        format!("{:#}", result.expect_err("serve refuses to start"))
    }

    pub async fn shutdown(self) {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(20), self.task)
            .await
            .expect("stops in time")
            .unwrap()
            .unwrap();
    }
}

pub fn queue(text: &str) -> wasmhook::queue::Queue {
    wasmhook::service::open_queue(&settings(text)).unwrap()
}

/// The wasmhook binary as a child process.
pub fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_wasmhook"))
}

pub fn write_config(dir: &tempfile::TempDir, text: &str) -> PathBuf {
    let path = dir.path().join("wasmhook.toml");
    std::fs::write(&path, text).unwrap();
    path
}

pub fn spawn_serve(config: &std::path::Path, mode: &str) -> tokio::process::Child {
    spawn_serve_logging(config, mode, "wasmhook=info,warn")
}

/// As [`spawn_serve`], logging at `filter` (RUST_LOG syntax).
pub fn spawn_serve_logging(
    config: &std::path::Path,
    mode: &str,
    filter: &str,
) -> tokio::process::Child {
    tokio::process::Command::new(binary())
        .args(["serve", "--mode", mode, "--config"])
        .arg(config)
        .env("RUST_LOG", filter)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

pub async fn run_cli(config: &std::path::Path, args: &[&str]) -> (bool, String, String) {
    let mut all: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    all.push("--config".into());
    all.push(config.display().to_string());
    run_binary(&all).await
}

/// Runs the binary with these arguments: (success, stdout, stderr).
pub async fn run_binary(args: &[String]) -> (bool, String, String) {
    let out = tokio::process::Command::new(binary())
        .args(args)
        .output()
        .await
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub fn signal(child: &tokio::process::Child, sig: i32) {
    let pid = child.id().expect("child still running") as i32;
    assert_eq!(unsafe { libc::kill(pid, sig) }, 0);
}

/// Polls `f` until it returns Some, or panics after `timeout`.
pub async fn eventually<T>(
    what: &str,
    timeout: Duration,
    mut f: impl AsyncFnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub async fn post_events(
    ingest: &str,
    app: &str,
    token: Option<&str>,
    body: impl Into<reqwest::Body>,
) -> (u16, serde_json::Value) {
    wasmhook::install_crypto_provider();
    let mut req = reqwest::Client::new()
        .post(format!("{ingest}/v1/apps/{app}/events"))
        .body(body)
        .header("content-type", "application/json");
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let body = resp.bytes().await.unwrap();
    (
        status,
        serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null),
    )
}

/// The plugin kit's own workspace.
pub fn plugins_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("plugins")
}

/// Runs cargo in `plugins/`, free of this build's flags and target dir.
pub fn plugins_cargo(args: &[&str]) -> std::process::Output {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    std::process::Command::new(cargo)
        .args(args)
        .current_dir(plugins_dir())
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_TARGET_DIR")
        .output()
        .expect("cargo runs")
}

/// A plugin component built from `plugins/` (the whole workspace is built
/// once per test process; cargo's lock serializes concurrent builds).
pub fn plugin(name: &str) -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    let dir = BUILT.get_or_init(|| {
        let out = plugins_cargo(&["build", "--release", "--target", "wasm32-wasip2"]);
        assert!(
            out.status.success(),
            "building plugins/ failed (rustup target add wasm32-wasip2?):\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        plugins_dir().join("target/wasm32-wasip2/release")
    });
    let path = dir.join(format!("{}.wasm", name.replace('-', "_")));
    assert!(path.exists(), "no plugin {name} at {}", path.display());
    path
}

/// `[wasm]` for tests: a compile cache shared by the test run, fast file watching.
pub fn wasm_section(extra: &str) -> String {
    let cache = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("plugin-cache");
    // The cache is used only when private to this user.
    std::fs::create_dir_all(&cache).unwrap();
    std::fs::set_permissions(&cache, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    format!(
        "\n[wasm]\ncache_dir = \"{}\"\nwatch_interval = \"100ms\"\n{extra}\n",
        cache.display()
    )
}

/// `[plugins.NAME]` for a component file.
pub fn plugin_def(name: &str, path: &std::path::Path, extra: &str) -> String {
    format!(
        "\n[plugins.{name}]\npath = \"{}\"\n{extra}\n",
        path.display()
    )
}

/// An app whose own chain is `chain` (TOML array of plugin refs).
pub fn app_with_chain(id: &str, chain: &str, webhooks: &str) -> String {
    app_table(id, &format!("plugins = {chain}"), webhooks)
}

/// Waits until the queue holds at least `n` dead letters, and returns them.
pub async fn dead_letters(
    q: &wasmhook::queue::Queue,
    n: usize,
) -> Vec<(String, wasmhook::queue::DeadLetter)> {
    eventually(
        &format!("{n} dead letter(s)"),
        Duration::from_secs(20),
        async || {
            let letters = q.dead_letters(1000).await.unwrap();
            (letters.len() >= n).then_some(letters)
        },
    )
    .await
}

/// Connections the Redis server has open now.
pub fn redis_clients(redis: &RedisServer) -> usize {
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query(&mut redis.conn())
        .unwrap();
    list.lines().filter(|l| !l.trim().is_empty()).count()
}

/// Commands the Redis server has processed so far.
pub fn commands_processed(redis: &RedisServer) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("stats")
        .query(&mut redis.conn())
        .unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("total_commands_processed:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("INFO stats has total_commands_processed")
}

/// Runs each named `async fn(Backend)` twice: on one redis-server
/// (`<name>::standalone`) and on a Redis Cluster (`<name>::cluster`).
#[macro_export]
macro_rules! on_each_backend {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn standalone() {
                super::$name(super::common::Backend::standalone()).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn cluster() {
                super::$name(super::common::Backend::cluster()).await
            }
        }
    )*};
}
