//! Resilience flags: health checks, upstream timeouts, outlier ejection and panic
//! routing, the retry budget, and circuit breakers.

use std::time::Duration;

use super::values::parse_positive_duration;
use crate::dispatch::Timeouts;
use crate::dispatch::retry_budget::RetrySettings;
use crate::replicas::{BreakerSettings, HealthConfig, OutlierSettings, Thresholds};

#[derive(Debug, clap::Args)]
#[command(next_help_heading = "Resilience")]
pub struct ResilienceArgs {
    /// Time between health checks of each replica (e.g. 5s, 500ms).
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub health_interval: Duration,

    /// Time a health check may take before it counts as failed.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub health_timeout: Duration,

    /// Consecutive failed checks that take a replica out of rotation.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    pub unhealthy_threshold: u32,

    /// Consecutive successful checks that bring it back.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..))]
    pub healthy_threshold: u32,

    /// Time allowed to open a connection to a replica.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    pub connect_timeout: Duration,

    /// Time a replica may take to send response headers (retried once on another replica,
    /// then 504). A non-streaming response's headers come when generation ends, so this
    /// also bounds a whole non-streaming request.
    #[arg(long, default_value = "600s", value_parser = humantime::parse_duration)]
    pub response_timeout: Duration,

    /// Longest silence within a response body; a stream that goes quiet this long is
    /// ended with an SSE error event and `[DONE]`, and its replica taken out of rotation.
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    pub stream_idle_timeout: Duration,

    /// Longest wait from a response's headers to its first body byte (vLLM sends a
    /// stream's headers before the request is scheduled): then the stream ends with an
    /// error event, and the replica, busy rather than broken, is not ejected.
    #[arg(long, default_value = "600s", value_parser = parse_positive_duration)]
    pub first_byte_timeout: Duration,

    /// Most replicas of a stage out of rotation for errors at once (ejected after a
    /// failed stream, or with an open circuit breaker), in percent, rounded down.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u8).range(0..=100))]
    pub max_ejection_percent: u8,

    /// When fewer than this percentage of the replicas serving a model are in rotation,
    /// route to every one not known to be down (panic routing); 0 turns it off.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u8).range(0..=100))]
    pub panic_threshold: u8,

    /// Retries earned per request (retry budget): 0.2 allows one retry per five requests.
    #[arg(long, default_value_t = 0.2)]
    pub retry_ratio: f64,

    /// Retries per second allowed whatever the traffic (retry budget floor).
    #[arg(long, default_value_t = 10.0)]
    pub retry_floor: f64,

    /// Mean backoff before a retry (jittered 0.5x to 1.5x).
    #[arg(long, default_value = "20ms", value_parser = humantime::parse_duration)]
    pub retry_backoff: Duration,

    /// Consecutive failed attempts (refused, 5xx, timeouts) that open a replica's circuit
    /// breaker: it gets no requests for the cool-down, then one attempt decides.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    pub breaker_failures: u32,

    /// How long an open circuit breaker keeps a replica out.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub breaker_cooldown: Duration,

    /// Failed fraction of a replica's attempts, within --breaker-window, that opens its
    /// breaker (catches a replica failing often but not every time); `off` disables it.
    #[arg(long, value_name = "RATE|off", default_value = "0.5", value_parser = parse_error_rate)]
    pub breaker_error_rate: ErrorRate,

    /// Window over which the breaker's error rate is counted.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub breaker_window: Duration,

    /// Attempts a window needs before its error rate can open the breaker.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..))]
    pub breaker_min_requests: u32,

    /// Mid-stream continuation: when a streamed chat or completion breaks after it has
    /// started, ask another replica for the rest (the prompt with what was sent, vLLM's
    /// `continue_final_message` for chat) and splice it into the client's stream.
    #[arg(long, value_enum, default_value_t = Switch::On)]
    pub continuation: Switch,

    /// Most continuations of one request.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=16))]
    pub continuation_attempts: u32,
}

/// `on` or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Switch {
    On,
    Off,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ErrorRate(pub Option<f64>);

impl ResilienceArgs {
    pub fn health(&self) -> HealthConfig {
        HealthConfig { interval: self.health_interval, timeout: self.health_timeout }
    }

    pub fn thresholds(&self) -> Thresholds {
        Thresholds { unhealthy: self.unhealthy_threshold, healthy: self.healthy_threshold }
    }

    pub fn timeouts(&self) -> Timeouts {
        Timeouts {
            response_headers: self.response_timeout,
            stream_idle: self.stream_idle_timeout,
            first_byte: self.first_byte_timeout,
        }
    }

    pub fn breaker(&self) -> BreakerSettings {
        BreakerSettings {
            failures: self.breaker_failures,
            cooldown: self.breaker_cooldown,
            error_rate: self.breaker_error_rate.0,
            window: self.breaker_window,
            min_requests: self.breaker_min_requests,
        }
    }

    pub fn outliers(&self) -> OutlierSettings {
        OutlierSettings {
            max_ejection_percent: self.max_ejection_percent,
            panic_threshold: self.panic_threshold,
        }
    }

    /// Continuations a broken stream gets; 0 when off.
    pub fn continuation_attempts(&self) -> u32 {
        match self.continuation {
            Switch::On => self.continuation_attempts,
            Switch::Off => 0,
        }
    }

    pub fn retries(&self) -> RetrySettings {
        RetrySettings {
            ratio: self.retry_ratio.max(0.0),
            floor_per_sec: self.retry_floor.max(0.0),
            backoff: self.retry_backoff,
        }
    }
}

fn parse_error_rate(text: &str) -> Result<ErrorRate, String> {
    if text.eq_ignore_ascii_case("off") {
        return Ok(ErrorRate(None));
    }
    match text.parse::<f64>() {
        Ok(r) if r > 0.0 && r <= 1.0 => Ok(ErrorRate(Some(r))),
        _ => Err(format!("`{text}` is not a rate in (0, 1] (e.g. 0.5) or `off`")),
    }
}
