//! Telemetry flags: logs, the access log, where `/metrics` is served, and OTLP traces.

use super::values::parse_fraction;
use crate::logging::LogFormat;
use crate::trace::TraceConfig;

#[derive(Debug, clap::Args)]
#[command(next_help_heading = "Telemetry")]
pub struct TelemetryArgs {
    /// How log lines are written: `text`, or `json` (one object per line). Colour codes
    /// only when writing to a terminal (and `NO_COLOR` unset). Levels from `RUST_LOG`.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Log one line per request (target `access`) when its response ends.
    #[arg(long)]
    pub access_log: bool,

    /// Where `/metrics` is served: `serving` (the serving port; behind the API keys when
    /// keys are set) or `admin` (only on --admin-listen, without a key).
    #[arg(long, value_enum, default_value_t = MetricsOn::Serving)]
    pub metrics_on: MetricsOn,

    /// Export a span per request over OTLP/HTTP to this endpoint (e.g.
    /// http://otel-collector:4318) and continue the client's trace at the replica. Off
    /// when unset.
    #[arg(long, value_name = "URL")]
    pub otlp_endpoint: Option<http::Uri>,

    /// The `service.name` of the exported spans.
    #[arg(long, default_value = "llm-router")]
    pub otlp_service_name: String,

    /// Share of new traces recorded (a client's sampled or unsampled trace is followed).
    #[arg(long, default_value_t = 1.0, value_parser = parse_fraction)]
    pub trace_sample_ratio: f64,

    /// Response headers explaining each routing decision: `x-router-replica`,
    /// `x-router-policy`, `x-router-reason`, and for kv-aware `x-router-cached-tokens`
    /// (prompt tokens believed cached on the chosen replica) and
    /// `x-router-best-cached-tokens` (the most any eligible replica held), also counted
    /// in `router_routing_cached_tokens_total`. They name replicas: off by default.
    #[arg(long)]
    pub explain_routing: bool,
}

/// `--metrics-on`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum MetricsOn {
    Serving,
    Admin,
}

impl TelemetryArgs {
    pub fn trace(&self) -> Option<TraceConfig> {
        self.otlp_endpoint.as_ref().map(|endpoint| TraceConfig {
            endpoint: endpoint.to_string(),
            service_name: self.otlp_service_name.clone(),
            sample_ratio: self.trace_sample_ratio,
        })
    }
}
