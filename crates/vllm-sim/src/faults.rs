//! Fault switches for reliability tests: a simulated replica that fails with 500,
//! refuses connections for a while, stalls a stream after K tokens, drops the
//! connection mid-stream after K tokens, ends a stream with an error event after K
//! tokens (as vLLM does when its engine fails), or runs slower.
//!
//! Set at start with `--fault`, at run time with `POST /sim/faults` (JSON with the same
//! fields as `GET /sim/faults` returns), or from Rust through
//! [`RunningSim::faults`](super::RunningSim::faults).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FaultConfig {
    /// Answer every inference request with a 500.
    pub fail_500: bool,
    /// Close the listening socket for this long (connections are refused), then listen
    /// again. Set through the API, it starts when the request is answered.
    pub refuse_connections_ms: u64,
    /// Streams send this many tokens, then nothing more (the connection stays open).
    pub stall_after_tokens: Option<usize>,
    /// Streams send this many tokens, then the connection is cut.
    pub drop_after_tokens: Option<usize>,
    /// Streams send this many tokens, then an error event and `[DONE]`.
    pub error_after_tokens: Option<usize>,
    /// Every engine step takes this many times longer (1.0 = normal).
    pub slowdown: f64,
}

pub enum StreamFault {
    None,
    Stall,
    Drop,
    Error,
}

pub struct Faults {
    config: Mutex<FaultConfig>,
    refuse_until: Mutex<Option<Instant>>,
}

impl Faults {
    pub fn new(config: FaultConfig) -> Self {
        let faults = Faults { config: Mutex::new(FaultConfig::default()), refuse_until: Mutex::new(None) };
        faults.set(config);
        faults
    }

    pub fn get(&self) -> FaultConfig {
        self.config.lock().expect("faults lock").clone()
    }

    pub fn set(&self, mut config: FaultConfig) {
        if config.slowdown <= 0.0 {
            config.slowdown = 1.0;
        }
        *self.refuse_until.lock().expect("faults lock") = (config.refuse_connections_ms > 0)
            .then(|| Instant::now() + Duration::from_millis(config.refuse_connections_ms));
        *self.config.lock().expect("faults lock") = config;
    }

    pub fn fail_500(&self) -> bool {
        self.config.lock().expect("faults lock").fail_500
    }

    pub fn slowdown(&self) -> f64 {
        self.config.lock().expect("faults lock").slowdown
    }

    /// If connections are to be refused now, until when.
    pub fn refusing_until(&self) -> Option<Instant> {
        self.refuse_until.lock().expect("faults lock").filter(|t| *t > Instant::now())
    }

    pub fn drop_armed(&self) -> bool {
        self.config.lock().expect("faults lock").drop_after_tokens.is_some()
    }

    /// What happens to a stream that has just produced its `n`-th token.
    pub fn on_token(&self, n: usize) -> StreamFault {
        let config = self.config.lock().expect("faults lock");
        if config.drop_after_tokens.is_some_and(|k| n > k) {
            StreamFault::Drop
        } else if config.error_after_tokens.is_some_and(|k| n > k) {
            StreamFault::Error
        } else if config.stall_after_tokens.is_some_and(|k| n > k) {
            StreamFault::Stall
        } else {
            StreamFault::None
        }
    }
}

/// Parse `--fault` values: `fail-500`, `refuse-connections=MS`, `stall-after=K`,
/// `drop-after=K`, `error-after=K`, `slowdown=F`.
pub fn parse_fault(text: &str, into: &mut FaultConfig) -> Result<(), String> {
    let (name, value) = text.split_once('=').unwrap_or((text, ""));
    let number = |v: &str| v.parse::<f64>().map_err(|_| format!("`{text}`: `{v}` is not a number"));
    match name {
        "fail-500" => into.fail_500 = true,
        "refuse-connections" => into.refuse_connections_ms = number(value)? as u64,
        "stall-after" => into.stall_after_tokens = Some(number(value)? as usize),
        "drop-after" => into.drop_after_tokens = Some(number(value)? as usize),
        "error-after" => into.error_after_tokens = Some(number(value)? as usize),
        "slowdown" => into.slowdown = number(value)?,
        _ => {
            return Err(format!(
                "unknown fault `{name}` (fail-500, refuse-connections=MS, stall-after=K, drop-after=K, error-after=K, slowdown=F)"
            ));
        }
    }
    Ok(())
}
