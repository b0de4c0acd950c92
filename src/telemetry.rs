//! Logging: readable lines on a terminal, JSON lines when asked
//! (`log.format = "json"`, `WASMHOOK_LOG__FORMAT=json` or `--log-format json`).
//! `RUST_LOG` overrides the configured level.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

pub fn init(format: LogFormat, level: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
        LogFormat::Pretty => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
    };
}

/// `text` as one line of at most `cap` bytes: line breaks, tabs, escape
/// sequences and every other control character (C0, DEL, C1, U+2028,
/// U+2029, bidirectional overrides) are written as `\n`, `\r`, `\t` or `\u{..}`, and a backslash as
/// `\\`, so text from outside (a plugin's log call) can neither start a line
/// of its own nor drive the terminal. An escape that would pass the cap is
/// left out with the rest.
pub fn one_line(text: &str, cap: usize) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(text.len().min(cap));
    let mut escaped = String::new();
    for c in text.chars() {
        escaped.clear();
        match c {
            '\n' => escaped.push_str("\\n"),
            '\r' => escaped.push_str("\\r"),
            '\t' => escaped.push_str("\\t"),
            '\\' => escaped.push_str("\\\\"),
            c if c.is_control() || matches!(c, '\u{2028}' | '\u{2029}') || is_bidi(c) => {
                let _ = write!(escaped, "\\u{{{:x}}}", c as u32);
            }
            c => escaped.push(c),
        }
        if out.len() + escaped.len() > cap {
            break;
        }
        out.push_str(&escaped);
    }
    out
}

/// Bidirectional overrides and isolates: they reorder how the rest of a line reads.
fn is_bidi(c: char) -> bool {
    matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

#[cfg(test)]
mod tests {
    use super::one_line;

    #[test]
    fn control_characters_are_escaped_so_one_call_is_one_line() {
        assert_eq!(
            one_line("plain text, ünïcode ✓", 100),
            "plain text, ünïcode ✓"
        );
        let forged = "ok\n2026-01-01T00:00:00Z ERROR forged\r\tx\u{1b}[31mred\u{7}\u{0}\u{7f}\u{85}\u{9b}\u{2028}\u{2029}\u{202e}\\";
        let line = one_line(forged, 1000);
        assert_eq!(
            line,
            "ok\\n2026-01-01T00:00:00Z ERROR forged\\r\\tx\\u{1b}[31mred\\u{7}\\u{0}\\u{7f}\\u{85}\\u{9b}\\u{2028}\\u{2029}\\u{202e}\\\\"
        );
        assert!(
            !line
                .chars()
                .any(|c| c.is_control() || c == '\u{2028}' || c == '\u{2029}')
        );
    }

    #[test]
    fn the_cap_holds_after_escaping_and_cuts_no_character_or_escape() {
        assert_eq!(one_line(&"\n".repeat(100), 9), "\\n\\n\\n\\n");
        assert_eq!(one_line("aé\u{1b}b", 3), "aé");
        assert_eq!(one_line("aé\u{1b}b", 9), "aé\\u{1b}");
        assert!(one_line(&"x".repeat(5000), 2048).len() == 2048);
    }
}
