//! `wasmhook plugin test|inspect|new`: run one plugin locally, look inside a
//! component, scaffold a plugin crate.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::Subcommand;
use serde_json::{Value, json};

use crate::config::Settings;
use crate::event::Event;
use crate::pipeline::{Decision, Message};
use crate::plugin::{Limits, PluginEngine, PluginInput};

#[derive(Subcommand, Debug)]
pub enum PluginCommand {
    /// Run a plugin once on an event and print its decision, output and time.
    Test {
        /// The component (.wasm).
        plugin: PathBuf,
        /// JSON file with one event, or a Pusher webhook body (its first
        /// event); `-` reads standard input.
        #[arg(long)]
        event: PathBuf,
        /// Plugin configuration, repeatable: `--config key=value`.
        #[arg(long = "config", value_name = "KEY=VALUE")]
        pairs: Vec<String>,
        #[arg(long, default_value = "app-1")]
        app: String,
        /// Run as in this endpoint's chain (default: the app's chain).
        #[arg(long)]
        endpoint: Option<String>,
        #[arg(long, default_value_t = 1)]
        attempt: u32,
        /// Wall-clock limit (default: wasm.deadline).
        #[arg(long, value_parser = humantime::parse_duration)]
        deadline: Option<Duration>,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show what a component imports and exports, and whether it fits the world.
    Inspect { plugin: PathBuf },
    /// Create a plugin crate that builds as is.
    New {
        name: String,
        /// Where to create it (default: the current directory).
        #[arg(long, default_value = ".")]
        dir: PathBuf,
    },
}

pub async fn run(settings: &Settings, command: PluginCommand) -> anyhow::Result<()> {
    match command {
        PluginCommand::Test {
            plugin,
            event,
            pairs,
            app,
            endpoint,
            attempt,
            deadline,
            json,
        } => {
            test(
                settings,
                &plugin,
                &event,
                &pairs,
                &app,
                endpoint.as_deref(),
                attempt,
                deadline,
                json,
            )
            .await
        }
        PluginCommand::Inspect { plugin } => inspect(settings, &plugin),
        PluginCommand::New { name, dir } => new(&name, &dir),
    }
}

/// An engine like the worker's (same compile cache, so a second run of a
/// large component does not compile it again).
fn engine(settings: &Settings) -> anyhow::Result<PluginEngine> {
    let mut wasm = settings.wasm.clone();
    wasm.max_instances = 4;
    PluginEngine::new(&wasm)
}

fn read_event(path: &Path) -> anyhow::Result<Event> {
    let text = if path == Path::new("-") {
        std::io::read_to_string(std::io::stdin())?
    } else {
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?
    };
    let value: Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?;
    let value = match value.get("events").and_then(Value::as_array) {
        Some(events) if value.get("name").is_none() => {
            events.first().cloned().context("`events` is empty")?
        }
        _ => value,
    };
    Ok(Event::from_json(value)?)
}

#[allow(clippy::too_many_arguments)]
async fn test(
    settings: &Settings,
    plugin: &Path,
    event: &Path,
    pairs: &[String],
    app: &str,
    endpoint: Option<&str>,
    attempt: u32,
    deadline: Option<Duration>,
    as_json: bool,
) -> anyhow::Result<()> {
    let event = read_event(event)?;
    let config: Vec<(String, String)> = pairs
        .iter()
        .map(|p| {
            p.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .with_context(|| format!("--config {p:?}: expected key=value"))
        })
        .collect::<anyhow::Result<_>>()?;
    let limits = Limits {
        deadline: deadline
            .unwrap_or(Duration::from_millis(50))
            .max(Duration::from_millis(1)),
        fuel: None,
        max_memory: settings.wasm.max_memory,
        max_output: 1 << 20,
        max_reuse: 1,
    };
    let loaded =
        engine(settings)?.load("test", plugin, limits, crate::plugin::FailurePolicy::Fail)?;
    let id = crate::event::new_webhook_id();
    let input = PluginInput {
        id: &id,
        app_id: app,
        event: &event,
        headers: &[],
        metadata: &[],
        attempt,
        endpoint,
        // Route targets are bounded by the app's endpoints; an app the config
        // does not have may name as many as a message may carry headers.
        endpoints: settings
            .apps
            .get(app)
            .map_or(crate::pipeline::MAX_HEADERS, |a| a.endpoints.len()),
    };
    let called = loaded.call(&input, &config).await;
    let elapsed_us = called.elapsed.as_micros() as u64;
    let result = match &called.decision {
        Ok(Decision::Keep) => json!({"decision": "keep"}),
        Ok(Decision::Skipped(reason)) => json!({"decision": "skipped", "reason": reason}),
        Ok(Decision::Drop(reason)) => json!({"decision": "drop", "reason": reason}),
        Ok(Decision::Transform(m)) => json!({"decision": "transform", "message": message_json(m)}),
        Ok(Decision::Route(targets)) => json!({
            "decision": "route",
            "targets": targets.iter().map(|t| json!({"endpoint": t.endpoint, "message": t.message.as_ref().map(message_json)})).collect::<Vec<_>>()
        }),
        Err(f) => json!({"decision": "failed", "error": f.to_string()}),
    };
    if as_json {
        let mut out = result.clone();
        out["elapsed_us"] = json!(elapsed_us);
        if !called.stderr.is_empty() {
            out["stderr"] = json!(called.stderr);
        }
        println!("{out}");
    } else {
        println!("decision: {}", result["decision"].as_str().unwrap_or("?"));
        for (k, v) in result
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(k, _)| *k != "decision")
        {
            println!("{k}: {}", serde_json::to_string_pretty(v)?);
        }
        println!(
            "time: {:.3} ms (instantiate + call, fresh instance)",
            elapsed_us as f64 / 1000.0
        );
        if !called.stderr.is_empty() {
            println!("stderr: {}", called.stderr);
        }
    }
    if called.decision.is_err() {
        bail!("the plugin failed");
    }
    Ok(())
}

fn message_json(m: &Message) -> Value {
    json!({
        "payload": m.event,
        "headers": m.headers.iter().cloned().collect::<std::collections::BTreeMap<_, _>>(),
        "metadata": m.metadata.iter().cloned().collect::<std::collections::BTreeMap<_, _>>(),
    })
}

fn inspect(settings: &Settings, plugin: &Path) -> anyhow::Result<()> {
    let bytes = std::fs::read(plugin).with_context(|| format!("reading {}", plugin.display()))?;
    let engine = engine(settings)?;
    let (imports, exports) = engine
        .describe(&bytes)
        .with_context(|| format!("{} is not a WebAssembly component", plugin.display()))?;
    println!("{} ({} bytes)", plugin.display(), bytes.len());
    println!("imports:");
    for i in &imports {
        println!("  {i}");
    }
    println!("exports:");
    for e in &exports {
        println!("  {e}");
    }
    let limits = Limits {
        deadline: Duration::from_millis(50),
        fuel: None,
        max_memory: settings.wasm.max_memory,
        max_output: 1 << 20,
        max_reuse: 1,
    };
    match engine.load_bytes(
        "inspect",
        plugin,
        &bytes,
        limits,
        crate::plugin::FailurePolicy::Fail,
    ) {
        Ok(p) => {
            println!("world wasmhook:plugin/plugin@0.1.0: implemented");
            println!("sha256: {}", p.hash);
            Ok(())
        }
        Err(e) => {
            println!("world wasmhook:plugin/plugin@0.1.0: NOT implemented");
            bail!("{e}")
        }
    }
}

const WIT: &str = include_str!("../../wit/plugin.wit");
const CARGO_TOML: &str = include_str!("template/Cargo.toml.tmpl");
const LIB_RS: &str = include_str!("template/lib.rs.tmpl");
const CARGO_CONFIG: &str = include_str!("template/config.toml.tmpl");

fn new(name: &str, dir: &Path) -> anyhow::Result<()> {
    let valid = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        && name.as_bytes()[0].is_ascii_lowercase();
    if !valid {
        bail!(
            "plugin name {name:?}: use lower-case letters, digits, - and _, starting with a letter"
        );
    }
    let root = dir.join(name);
    if root.exists() {
        bail!("{} already exists", root.display());
    }
    let fill = |t: &str| {
        t.replace("{{name}}", name)
            .replace("{{file}}", &name.replace('-', "_"))
    };
    std::fs::create_dir_all(root.join("src"))?;
    std::fs::create_dir_all(root.join("wit"))?;
    std::fs::create_dir_all(root.join(".cargo"))?;
    std::fs::write(root.join("Cargo.toml"), fill(CARGO_TOML))?;
    std::fs::write(root.join("src/lib.rs"), fill(LIB_RS))?;
    std::fs::write(root.join("wit/plugin.wit"), WIT)?;
    std::fs::write(root.join(".cargo/config.toml"), CARGO_CONFIG)?;
    std::fs::write(root.join(".gitignore"), "/target\n")?;
    println!("created {}", root.display());
    println!(
        "build it: cd {} && cargo build --release --target wasm32-wasip2",
        root.display()
    );
    Ok(())
}
