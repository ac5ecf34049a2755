//! The router's logs: how they are written (`--log-format text|json`, colour only on a
//! terminal) and the optional access log (`--access-log`, one line per request).
//!
//! Logs go to standard output. ANSI colour codes are written only when standard output
//! is a terminal and `NO_COLOR` is unset, so `router > log` and a container's log
//! collector get plain lines. In `json` each line is one JSON object (timestamp, level,
//! target and the event's fields at the top level), ready for a log pipeline.

mod access;

pub use access::layer as access_layer;

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// How each log line is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Whether to write colour codes: only to a terminal, and never with `NO_COLOR` set.
pub fn use_colour() -> bool {
    std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// Install the process's log subscriber. The level filter comes from `RUST_LOG`
/// (default `info`); with the access log on, its lines are written whatever the level
/// unless `RUST_LOG` names the `access` target itself.
pub fn init(format: LogFormat, access_log: bool) {
    let directives = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".to_owned());
    let mut filter = EnvFilter::try_new(&directives).unwrap_or_else(|_| EnvFilter::new("info"));
    if access_log && !directives.contains("access") {
        filter = filter.add_directive("access=info".parse().expect("a valid directive"));
    }
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stdout);
    match format {
        LogFormat::Text => builder.with_ansi(use_colour()).init(),
        LogFormat::Json => builder
            .with_ansi(false)
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .init(),
    }
}
