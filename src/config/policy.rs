//! Policy flags: which policy chooses a replica, the session key it hashes, and the
//! options of consistent-hash and prefix-aware.

use std::time::Duration;

use http::HeaderName;

use super::values::{parse_fraction, parse_header_name, parse_ratio};
use crate::policy::{HashOptions, PolicyKind, PrefixOptions};

#[derive(Debug, clap::Args)]
#[command(next_help_heading = "Policy")]
pub struct PolicyArgs {
    /// How to choose a replica for each request.
    #[arg(long, value_enum, default_value_t = PolicyKind::PowerOfTwo)]
    pub policy: PolicyKind,

    /// Header carrying the session key for consistent-hash, checked in the order given
    /// (repeat the flag for several). Without a header key the body's `session_id`,
    /// `session_params.session_id`, `user` or `user_id` is used.
    #[arg(long = "session-header", value_name = "NAME", default_value = "x-session-id",
          value_parser = parse_header_name)]
    pub session_headers: Vec<HeaderName>,

    /// Bounded-load factor for consistent-hash: a replica already holding this multiple
    /// of the mean in-flight load passes further requests along the ring to the next
    /// replica under the cap. `off` keeps pure affinity. The default was measured
    /// (bench-scripts/affinity_balance.py): 64 sessions on 4 engines ran at 0.886x direct
    /// with `off`, 0.989x with 1.15, 17.5% of requests leaving their session's owner.
    #[arg(long, value_name = "FACTOR|off", default_value = "1.15", value_parser = parse_balance_factor)]
    pub hash_balance_factor: BalanceFactor,

    /// Virtual nodes per replica on the consistent-hash ring.
    #[arg(long, default_value_t = 160, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub virtual_nodes: u32,

    /// prefix-aware: bytes of prompt text per block (the unit of prefix matching).
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(16..=65_536))]
    pub prefix_block_bytes: u32,

    /// prefix-aware: the fraction of a prompt's blocks a replica must hold to attract it;
    /// below it the request goes to the least loaded replica.
    #[arg(long, default_value_t = 0.3, value_parser = parse_fraction)]
    pub prefix_min_match: f64,

    /// prefix-aware: a replica with more than `min + N` requests in flight (`min` the
    /// least loaded replica's) and more than `--prefix-balance-rel` times `min` is
    /// overloaded: requests its cache would attract go to the next best.
    #[arg(long, default_value_t = 4)]
    pub prefix_balance_abs: u32,

    /// prefix-aware: see `--prefix-balance-abs`.
    #[arg(long, default_value_t = 1.5, value_parser = parse_ratio)]
    pub prefix_balance_rel: f64,

    /// prefix-aware: prompt blocks remembered per replica (least recently used forgotten).
    #[arg(long, default_value_t = 65_536, value_parser = clap::value_parser!(u64).range(1..=1 << 28))]
    pub prefix_index_blocks: u64,

    /// prefix-aware and kv-aware: a remembered block unused for this long is forgotten
    /// (e.g. 10m).
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    pub prefix_index_ttl: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BalanceFactor(pub Option<f64>);

impl PolicyArgs {
    pub fn hash_options(&self) -> HashOptions {
        HashOptions { virtual_nodes: self.virtual_nodes as usize, balance_factor: self.hash_balance_factor.0 }
    }

    pub fn prefix_options(&self) -> PrefixOptions {
        PrefixOptions {
            block_bytes: self.prefix_block_bytes as usize,
            min_match: self.prefix_min_match,
            balance_abs: self.prefix_balance_abs as usize,
            balance_rel: self.prefix_balance_rel,
        }
    }
}

fn parse_balance_factor(text: &str) -> Result<BalanceFactor, String> {
    if text.eq_ignore_ascii_case("off") {
        return Ok(BalanceFactor(None));
    }
    match text.parse::<f64>() {
        Ok(f) if f.is_finite() && f > 1.0 => Ok(BalanceFactor(Some(f))),
        _ => Err(format!("`{text}` is not a factor above 1.0 (e.g. 1.25) or `off`")),
    }
}
