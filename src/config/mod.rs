//! Configuration: commented defaults built into the binary, then the config
//! file, then `WASMHOOK_*` environment variables; unknown keys are errors;
//! everything is validated and built into [`Settings`] before any job is
//! taken. Raw (as written) and built types are kept apart.

pub mod raw;
mod settings;

use std::fmt;
use std::path::{Path, PathBuf};

pub use self::raw::{LogFormat, RawConfig};
pub use self::settings::{DeliverySettings, LogSettings, QueueSettings, ServerSettings, Settings};

/// The defaults, as shipped (`wasmhook config defaults` prints them).
pub const DEFAULTS: &str = include_str!("default.toml");
/// The demo app used when there is no config file.
pub const DEMO: &str = include_str!("demo.toml");
/// Environment variables for config keys start with this.
pub const ENV_PREFIX: &str = "WASMHOOK_";
/// Environment variables with this prefix that are command-line options, not keys.
const CLI_ENV: &[&str] = &["WASMHOOK_CONFIG", "WASMHOOK_MODE"];

/// One thing wrong with a config: where, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Key path, e.g. `apps[0].webhooks[1].url`; `<file>` for the file itself.
    pub path: String,
    pub reason: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.reason)
    }
}

/// Everything wrong with a config, each with its key path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub source: String,
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid configuration ({}):", self.source)?;
        for p in &self.problems {
            write!(f, "\n  {p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// Loads the config from a file (or the built-in demo when None) and the
/// process environment.
pub fn load(file: Option<&Path>) -> Result<Settings, ConfigError> {
    let text = match file {
        Some(path) => Some(std::fs::read_to_string(path).map_err(|e| ConfigError {
            source: path.display().to_string(),
            problems: vec![Problem {
                path: "<file>".into(),
                reason: format!("cannot read: {e}"),
            }],
        })?),
        None => None,
    };
    load_from(
        file.map(Path::to_path_buf),
        text.as_deref(),
        std::env::vars(),
    )
}

/// Loads from file text and environment pairs (tests pass both).
pub fn load_from(
    file: Option<PathBuf>,
    text: Option<&str>,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Settings, ConfigError> {
    let source = file
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "built-in defaults and demo app".into());
    let fail = |problems: Vec<Problem>| ConfigError {
        source: source.clone(),
        problems,
    };
    let mut merged: toml::Table = DEFAULTS.parse().expect("built-in defaults parse");
    let layer: toml::Table = match text {
        Some(text) => text.parse().map_err(|e: toml::de::Error| {
            fail(vec![Problem {
                path: "<file>".into(),
                reason: format!("not valid TOML: {}", e.message().trim())
                    + &location(text, e.span()),
            }])
        })?,
        None => DEMO.parse().expect("built-in demo parses"),
    };
    merge(&mut merged, layer);
    let env_problems = overlay_env(&mut merged, env);
    if !env_problems.is_empty() {
        return Err(fail(env_problems));
    }
    let raw: RawConfig =
        serde_path_to_error::deserialize(toml::Value::Table(merged)).map_err(|e| {
            let path = e.path().to_string();
            fail(vec![Problem {
                path: if path == "." { "<root>".into() } else { path },
                reason: without_value(e.into_inner().message().trim()),
            }])
        })?;
    let base_dir = file.as_deref().and_then(Path::parent).map(|d| {
        if d.as_os_str().is_empty() {
            Path::new(".")
        } else {
            d
        }
    });
    settings::build(raw, base_dir).map_err(fail)
}

/// A deserialization message with the offending value left out. serde's
/// messages quote it (`invalid type: string "whsec_…", expected u32`), and a
/// config value may be a secret: only what was found (its kind) and what was
/// expected are kept. Messages that name a key, not a value, stay as they are.
fn without_value(message: &str) -> String {
    const ABOUT_KEYS: [&str; 4] = [
        "unknown field `",
        "missing field `",
        "duplicate field `",
        "invalid length ",
    ];
    /// How serde names the kind of value it found (`serde::de::Unexpected`).
    const KINDS: [&str; 10] = [
        "string",
        "integer",
        "floating point",
        "boolean",
        "sequence",
        "map",
        "unit value",
        "character",
        "byte array",
        "Option value",
    ];
    if ABOUT_KEYS.iter().any(|p| message.starts_with(p)) {
        return message.to_string();
    }
    // The value comes before the last ", expected ": what follows it is the
    // expectation, written by the type being built, not by the config.
    let expected = message
        .rsplit_once(", expected ")
        .map(|(_, e)| e)
        .filter(|e| !e.is_empty());
    let found = message
        .strip_prefix("invalid type: ")
        .and_then(|rest| KINDS.iter().find(|k| rest.starts_with(*k)));
    match (found, expected) {
        (Some(kind), Some(expected)) => {
            format!("wrong type: expected {expected}, found {}", a(kind))
        }
        (None, Some(expected)) => format!("invalid value: expected {expected}"),
        (Some(kind), None) => format!("wrong type: found {}", a(kind)),
        (None, None) => "invalid value".into(),
    }
}

/// "a string", "an integer".
fn a(kind: &str) -> String {
    let article = if kind.starts_with(['a', 'e', 'i', 'o', 'u', 'O']) {
        "an"
    } else {
        "a"
    };
    format!("{article} {kind}")
}

fn location(text: &str, span: Option<std::ops::Range<usize>>) -> String {
    match span {
        Some(span) => {
            let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
            format!(" (line {line})")
        }
        None => String::new(),
    }
}

/// Lays `top` over `base`: tables merge key by key; anything else replaces.
fn merge(base: &mut toml::Table, top: toml::Table) {
    for (key, value) in top {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(b)), toml::Value::Table(t)) => merge(b, t),
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

/// Applies `WASMHOOK_A__B__0__C=value` as `a.b[0].c = value`. A value is taken
/// as a string where the key already holds one, else as TOML when it parses
/// (numbers, booleans, arrays), else as a string.
fn overlay_env(
    root: &mut toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
) -> Vec<Problem> {
    let mut problems = Vec::new();
    let mut vars: Vec<(String, String)> = env
        .into_iter()
        .filter(|(k, _)| k.starts_with(ENV_PREFIX))
        .collect();
    vars.sort();
    for (name, value) in vars {
        if CLI_ENV.contains(&name.as_str()) {
            continue;
        }
        let path: Vec<String> = name[ENV_PREFIX.len()..]
            .split("__")
            .map(str::to_ascii_lowercase)
            .collect();
        if path.len() < 2 || path.iter().any(String::is_empty) {
            problems.push(Problem {
                path: name.clone(),
                reason: "not a config key: levels are separated by `__`, e.g. WASMHOOK_REDIS__URL"
                    .into(),
            });
            continue;
        }
        if let Err(reason) = set_path(root, &path, &value) {
            problems.push(Problem { path: name, reason });
        }
    }
    problems
}

fn set_path(root: &mut toml::Table, path: &[String], raw: &str) -> Result<(), String> {
    let mut slot: &mut toml::Value = root
        .entry(path[0].clone())
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    for segment in &path[1..] {
        slot = match slot {
            toml::Value::Table(t) => t
                .entry(segment.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new())),
            toml::Value::Array(items) => {
                let len = items.len();
                let index: usize = segment
                    .parse()
                    .map_err(|_| format!("`{segment}` is not an index into a list"))?;
                items
                    .get_mut(index)
                    .ok_or_else(|| format!("index {index} is past the end of a list of {len}"))?
            }
            _ => {
                return Err(format!(
                    "`{segment}` is below a key that holds a single value"
                ));
            }
        };
    }
    let value = match slot {
        toml::Value::String(_) => toml::Value::String(raw.to_string()),
        _ => format!("v = {raw}")
            .parse::<toml::Table>()
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or_else(|| toml::Value::String(raw.to_string())),
    };
    // An empty table here means the key did not exist: serde reports it as unknown.
    *slot = value;
    Ok(())
}

#[cfg(test)]
mod tests;
