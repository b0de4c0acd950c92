//! The command line: `serve`, `send`, `dlq`, `queues`, `endpoints`, `config`,
//! `plugin`.

mod plugin;

use std::path::PathBuf;

use anyhow::{Context as _, bail};
use clap::{Args, Parser, Subcommand};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::config::{self, LogFormat, Settings};
use crate::event::{Event, Job, now_ms};
use crate::queue::Queue;
use crate::service::{self, Mode};

#[derive(Parser, Debug)]
#[command(
    name = "wasmhook",
    version,
    about = "Durable, signed webhook delivery with a WebAssembly plugin pipeline"
)]
pub struct Cli {
    /// Log format: overrides `log.format`.
    #[arg(long, global = true, value_parser = ["pretty", "json"])]
    pub log_format: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the HTTP ingest and/or the worker.
    Serve {
        #[arg(long, value_enum, default_value = "all", env = "WASMHOOK_MODE")]
        mode: Mode,
        #[command(flatten)]
        file: ConfigFile,
    },
    /// Enqueue one event (straight into Redis, or through the ingest when no
    /// Redis is configured).
    Send {
        #[command(flatten)]
        args: SendArgs,
        #[command(flatten)]
        file: ConfigFile,
    },
    /// Inspect and replay dead letters.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
        #[command(flatten)]
        file: ConfigFile,
    },
    /// Show the queue's depth and outcome counters, and each app's waiting jobs.
    Queues {
        /// Only this app, with each of its partitions.
        #[arg(long)]
        app: Option<String>,
        #[command(flatten)]
        file: ConfigFile,
    },
    /// Show endpoints' circuit breakers and holds; reset one by hand.
    Endpoints {
        #[command(subcommand)]
        command: Option<EndpointsCommand>,
        /// Only this app's endpoints (all of them, healthy ones too).
        #[arg(long)]
        app: Option<String>,
        /// Every configured endpoint, not only those not closed or with jobs waiting.
        #[arg(long)]
        all: bool,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        file: ConfigFile,
    },
    /// Check or show configuration.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
        #[command(flatten)]
        file: ConfigFile,
    },
    /// Run, inspect or create plugins.
    Plugin {
        #[command(subcommand)]
        command: plugin::PluginCommand,
    },
}

/// `--config FILE`, on the commands that read a config.
#[derive(Args, Debug, Clone, Default)]
pub struct ConfigFile {
    /// Config file (TOML). Without one: built-in defaults and a demo app.
    #[arg(
        long = "config",
        global = true,
        env = "WASMHOOK_CONFIG",
        value_name = "FILE"
    )]
    pub path: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct SendArgs {
    #[arg(long)]
    pub app: String,
    /// The event type (`name`), e.g. client_event.
    #[arg(long)]
    pub event: String,
    #[arg(long)]
    pub channel: Option<String>,
    /// The event's other fields as a JSON object (e.g. '{"event":"client-x","data":"{}"}');
    /// any other JSON value becomes its `data` field.
    #[arg(long, default_value = "{}")]
    pub data: String,
}

#[derive(Subcommand, Debug)]
pub enum DlqCommand {
    /// List dead letters, oldest first.
    List {
        #[arg(long)]
        app: Option<String>,
        #[arg(long)]
        endpoint: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Show one dead letter in full.
    Show { id: String },
    /// Put dead letters back on their queue, keeping their webhook ids.
    Replay {
        /// One dead letter.
        #[arg(conflicts_with_all = ["app", "all"], required_unless_present_any = ["app", "all"])]
        id: Option<String>,
        /// Every dead letter of this app.
        #[arg(long, conflicts_with = "all")]
        app: Option<String>,
        /// Every dead letter.
        #[arg(long)]
        all: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum EndpointsCommand {
    /// Close the breaker, end any hold and enable the endpoint again.
    Reset {
        /// `APP/ENDPOINT`
        endpoint: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum ConfigCommand {
    /// Validate the config; say exactly what is wrong (key path and reason).
    Check,
    /// Print the built-in defaults, with their comments.
    Defaults,
}

/// Runs a parsed command line. Logging is set up here from the config.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    if let Command::Config {
        command: ConfigCommand::Defaults,
        ..
    } = cli.command
    {
        print!("{}", config::DEFAULTS);
        return Ok(());
    }
    let file = match &cli.command {
        Command::Serve { file, .. }
        | Command::Send { file, .. }
        | Command::Dlq { file, .. }
        | Command::Queues { file, .. }
        | Command::Endpoints { file, .. }
        | Command::Config { file, .. } => file.path.clone(),
        // `plugin` runs with the built-in defaults: its --config is the plugin's.
        Command::Plugin { .. } => None,
    };
    let loaded = config::load(file.as_deref());
    if let Command::Config {
        command: ConfigCommand::Check,
        ..
    } = cli.command
    {
        let settings = loaded?;
        // Plugins are part of the config: a file that is missing or does not
        // implement the world is a config error.
        crate::plugin::build_pipeline(&settings)?;
        for warning in &settings.warnings {
            eprintln!("warning: {warning}");
        }
        println!(
            "configuration ok: {} app(s), {} endpoint(s), queue: {}",
            settings.apps.len(),
            settings
                .apps
                .iter()
                .map(|a| a.endpoints.len())
                .sum::<usize>(),
            if settings.redis_url.is_some() {
                "redis"
            } else {
                "embedded (not durable)"
            }
        );
        return Ok(());
    }
    let settings = loaded?;
    let format = match cli.log_format.as_deref() {
        Some("json") => LogFormat::Json,
        Some(_) => LogFormat::Pretty,
        None => settings.log.format,
    };
    crate::telemetry::init(format, &settings.log.level);
    match cli.command {
        Command::Serve { mode, .. } => {
            for warning in &settings.warnings {
                tracing::warn!(%warning, "configuration warning");
            }
            let shutdown = CancellationToken::new();
            service::shutdown_on_signals(shutdown.clone());
            service::serve_with_reload(settings, mode, None, shutdown, file).await
        }
        Command::Send { args, .. } => send(&settings, args).await,
        Command::Dlq { command, .. } => dlq(&settings, command).await,
        Command::Queues { app, .. } => queues(&settings, app).await,
        Command::Endpoints {
            command,
            app,
            all,
            json,
            ..
        } => endpoints(&settings, command, app, all, json).await,
        Command::Plugin { command } => plugin::run(&settings, command).await,
        Command::Config { .. } => unreachable!("handled above"),
    }
}

fn build_event(args: &SendArgs) -> anyhow::Result<Event> {
    let data: Value = serde_json::from_str(&args.data).context("--data is not valid JSON")?;
    let mut event = match data {
        Value::Object(fields) => Value::Object(fields),
        other => json!({ "data": other }),
    };
    event["name"] = json!(args.event);
    if let Some(channel) = &args.channel {
        event["channel"] = json!(channel);
    }
    Ok(Event::from_json(event)?)
}

async fn send(settings: &Settings, args: SendArgs) -> anyhow::Result<()> {
    let app = settings
        .apps
        .get(&args.app)
        .with_context(|| format!("no app {:?} in the config", args.app))?;
    let event = build_event(&args)?;
    if settings.redis_url.is_some() {
        let queue = service::open_queue(settings)?;
        let job = Job::new(app.id.as_str(), event, now_ms());
        queue
            .enqueue(&app.id, std::slice::from_ref(&job))
            .await
            .context("enqueueing")?;
        println!("{} queued for {}", job.id, app.id);
        return Ok(());
    }
    // The embedded queue lives inside the serve process: go through its ingest.
    crate::install_crypto_provider();
    let url = format!(
        "http://{}/v1/apps/{}/events",
        settings.server.listen, app.id
    );
    let response = reqwest::Client::new()
        .post(&url)
        .bearer_auth(app.ingest_token.expose())
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(serde_json::to_vec(&event)?)
        .send()
        .await
        .with_context(|| {
            format!("posting to the ingest at {url} (is `wasmhook serve` running?)")
        })?;
    let status = response.status();
    let body: Value =
        serde_json::from_slice(&response.bytes().await.unwrap_or_default()).unwrap_or(Value::Null);
    if !status.is_success() {
        bail!(
            "the ingest answered {status}: {}",
            body["message"].as_str().unwrap_or("no message")
        );
    }
    println!(
        "{} accepted by the ingest",
        body["ids"][0].as_str().unwrap_or("?")
    );
    Ok(())
}

fn durable_queue(settings: &Settings) -> anyhow::Result<Queue> {
    if settings.redis_url.is_none() {
        bail!(
            "dead letters and queue state live in Redis: set redis.url (the embedded queue exists only inside `wasmhook serve`)"
        );
    }
    service::open_queue(settings)
}

async fn dlq(settings: &Settings, command: DlqCommand) -> anyhow::Result<()> {
    let queue = durable_queue(settings)?;
    match command {
        DlqCommand::List {
            app,
            endpoint,
            limit,
            json,
        } => {
            let filtering = app.is_some() || endpoint.is_some();
            let letters = queue
                .dead_letters(if filtering { usize::MAX / 2 } else { limit })
                .await?;
            let letters = letters
                .into_iter()
                .filter(|(_, l)| {
                    let job = l.job.as_ref();
                    app.as_ref()
                        .is_none_or(|a| job.is_some_and(|j| &j.app_id == a))
                        && endpoint
                            .as_ref()
                            .is_none_or(|e| job.is_some_and(|j| j.endpoint.as_ref() == Some(e)))
                })
                .take(limit);
            if !json {
                println!(
                    "{:<40} {:<12} {:<16} {:<18} {:>8} {:>6}  reason",
                    "id", "app", "endpoint", "event", "attempts", "status"
                );
            }
            for (id, l) in letters {
                if json {
                    println!("{}", json!({"id": id, "dead_letter": l}));
                    continue;
                }
                let job = l.job.as_ref();
                println!(
                    "{:<40} {:<12} {:<16} {:<18} {:>8} {:>6}  {}",
                    id,
                    job.map_or("-", |j| j.app_id.as_str()),
                    job.and_then(|j| j.endpoint.as_deref()).unwrap_or("-"),
                    job.map_or("-", |j| j.event.name.as_str()),
                    l.attempts,
                    l.status.map_or("-".to_string(), |s| s.to_string()),
                    l.reason
                );
            }
        }
        DlqCommand::Show { id } => {
            let letter = queue.dead_letter(&id).await?;
            println!(
                "{}",
                serde_json::to_string_pretty(&json!({"id": id, "dead_letter": letter}))?
            );
        }
        DlqCommand::Replay { id: Some(id), .. } => {
            let job = queue.replay(&id).await?;
            println!("replayed {id} as {}", job.id);
        }
        DlqCommand::Replay { id: None, app, .. } => {
            let letters = queue.dead_letters(usize::MAX / 2).await?;
            let mut replayed = 0;
            for (id, l) in letters {
                let Some(job) = &l.job else { continue };
                if app.as_ref().is_some_and(|a| &job.app_id != a) {
                    continue;
                }
                queue.replay(&id).await?;
                replayed += 1;
            }
            println!("replayed {replayed} dead letter(s)");
        }
    }
    Ok(())
}

async fn queues(settings: &Settings, app: Option<String>) -> anyhow::Result<()> {
    let queue = durable_queue(settings)?;
    if let Some(id) = app {
        let app = settings
            .apps
            .get(&id)
            .with_context(|| format!("no app {id:?} in the config"))?;
        let endpoints: Vec<String> = app.endpoints.iter().map(|e| e.id.clone()).collect();
        println!("{:<32} {:>8}", "partition", "waiting");
        for (part, n) in queue.app_depth(&app.id, &endpoints).await? {
            println!("{:<32} {:>8}", part.as_deref().unwrap_or("(new events)"), n);
        }
        return Ok(());
    }
    let d = queue.depth().await?;
    let stats = queue.stats().await?;
    let counters: Vec<String> = stats.iter().map(|(k, v)| format!("{k}={v}")).collect();
    println!(
        "{:>8} {:>9} {:>8} {:>6} {:>11} {:>6} {:>12}  counters",
        "ready", "in_flight", "delayed", "held", "active_apps", "dead", "oldest_ready"
    );
    println!(
        "{:>8} {:>9} {:>8} {:>6} {:>11} {:>6} {:>12}  {}",
        d.ready,
        d.in_flight,
        d.delayed,
        d.held,
        d.active_apps,
        d.dead,
        format!("{:.3}s", d.oldest_ready_ms as f64 / 1000.0),
        counters.join(" ")
    );
    Ok(())
}

async fn endpoints(
    settings: &Settings,
    command: Option<EndpointsCommand>,
    app: Option<String>,
    all: bool,
    json: bool,
) -> anyhow::Result<()> {
    let queue = durable_queue(settings)?;
    if let Some(EndpointsCommand::Reset { endpoint }) = command {
        let (app, ep) = endpoint
            .split_once('/')
            .with_context(|| format!("{endpoint:?}: expected APP/ENDPOINT"))?;
        let known = settings
            .apps
            .get(app)
            .is_some_and(|a| a.endpoint(ep).is_some());
        if !known {
            bail!("no endpoint {ep:?} of app {app:?} in the config");
        }
        queue.reset_endpoint(app, ep).await?;
        println!("{app}/{ep} reset: breaker closed, hold ended, enabled");
        return Ok(());
    }
    let mut which: Vec<(String, String)> = Vec::new();
    for a in settings.apps.iter() {
        if app.as_ref().is_some_and(|id| id != &a.id) {
            continue;
        }
        which.extend(a.endpoints.iter().map(|e| (a.id.clone(), e.id.clone())));
    }
    if let Some(id) = &app
        && settings.apps.get(id).is_none()
    {
        bail!("no app {id:?} in the config");
    }
    which.sort();
    let statuses = queue.endpoints(&which).await?;
    let everything = all || app.is_some();
    let shown: Vec<_> = statuses
        .into_iter()
        .filter(|s| {
            everything
                || s.state != crate::breaker::State::Closed
                || s.waiting > 0
                || s.held_until_ms.is_some()
        })
        .collect();
    if json {
        for s in &shown {
            println!("{}", serde_json::to_string(s)?);
        }
        return Ok(());
    }
    println!(
        "{:<16} {:<20} {:<10} {:>8} {:>9} {:>8}  held / reason",
        "app", "endpoint", "state", "waiting", "requests", "failures"
    );
    let now = now_ms();
    for s in &shown {
        let held = s
            .held_until_ms
            .map(|t| format!("held {:.1}s", t.saturating_sub(now) as f64 / 1000.0))
            .unwrap_or_default();
        println!(
            "{:<16} {:<20} {:<10} {:>8} {:>9} {:>8}  {} {}",
            s.app,
            s.endpoint,
            s.state.name(),
            s.waiting,
            s.requests,
            s.failures,
            held,
            s.reason.as_deref().unwrap_or("")
        );
    }
    if shown.is_empty() {
        println!(
            "(all {} endpoint(s) closed with nothing waiting; --all lists them)",
            which.len()
        );
    }
    Ok(())
}
