//! Policy flags: which policy chooses a replica, the session key it hashes, and the
//! options of consistent-hash and prefix-aware.

use std::time::Duration;

use http::HeaderName;

use super::values::{parse_fraction, parse_header_name, parse_ratio};
use crate::policy::{HashOptions, PolicyKind, PrefixOptions, SessionSpread};

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
    /// of the mean in-flight load passes further requests to the session's next replica.
    /// Each router instance counts only its own requests in flight, so several
    /// instances move different requests (bench-scripts/fleet_agreement.py: 3
    /// instances, 64 sessions, 1.15: 78.5% of requests on their session's home); `off`
    /// (the default) leaves balance to the even homes of --session-spread and to the
    /// engines' own load (--engine-overload-factor), which every instance shares.
    #[arg(long, value_name = "FACTOR|off", default_value = "off", value_parser = parse_balance_factor)]
    pub hash_balance_factor: BalanceFactor,

    /// consistent-hash: how sessions get their homes. `even`: every instance lays out
    /// the sessions it saw in the last --session-window the same way, no replica holding
    /// more than its share (instances that saw the same sessions agree on every home).
    /// `hash`: each session hashed onto the ring alone (uneven when sessions are few).
    #[arg(long, value_enum, default_value_t = SessionSpread::Even)]
    pub session_spread: SessionSpread,

    /// consistent-hash with `--session-spread even`: a session unseen for this long
    /// leaves the census (its home is planned again when it comes back).
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    pub session_window: Duration,

    /// consistent-hash with `--session-spread even`: a replica may hold this fraction
    /// more than its even share of sessions (0: none). Slack leaves more sessions on
    /// their first choice, so fewer move as sessions come and go, at the cost of
    /// evenness.
    #[arg(long, default_value_t = 0.0, value_parser = parse_fraction)]
    pub session_slack: f64,

    /// consistent-hash and prefix-aware: how often to read the engines' own load from their `/metrics`
    /// (vLLM's running and waiting requests), on the wall clock's multiples so that
    /// router instances read alike; `0s` turns the reading off.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub engine_load_interval: Duration,

    /// consistent-hash and prefix-aware: an engine with more than this multiple of the
    /// engines' mean load plus --engine-overload-abs is overloaded (until it is back
    /// halfway): requests it would get go to the next replica of their order.
    #[arg(long, default_value_t = 1.5, value_parser = parse_ratio)]
    pub engine_overload_factor: f64,

    /// See --engine-overload-factor.
    #[arg(long, default_value_t = 4)]
    pub engine_overload_abs: u32,

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

    /// prefix-aware: the leading blocks of a prompt that decide its own order of the
    /// replicas (a rendezvous hash with their names), where a new prompt goes and how
    /// equal matches are broken: the same on every router instance.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub prefix_affinity_blocks: u32,

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
        HashOptions {
            virtual_nodes: self.virtual_nodes as usize,
            balance_factor: self.hash_balance_factor.0,
            spread: self.session_spread,
            session_window: self.session_window,
            session_slack: self.session_slack,
        }
    }

    /// How the engines' load is read (by consistent-hash and prefix-aware, the policies
    /// that use it); None when off.
    pub fn engine_load(&self) -> Option<crate::replicas::engine_load::OverloadBound> {
        (!self.engine_load_interval.is_zero()).then(|| crate::replicas::engine_load::OverloadBound {
            interval: self.engine_load_interval,
            factor: self.engine_overload_factor,
            abs: f64::from(self.engine_overload_abs),
        })
    }

    pub fn prefix_options(&self) -> PrefixOptions {
        PrefixOptions {
            block_bytes: self.prefix_block_bytes as usize,
            min_match: self.prefix_min_match,
            balance_abs: self.prefix_balance_abs as usize,
            balance_rel: self.prefix_balance_rel,
            affinity_blocks: self.prefix_affinity_blocks as usize,
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
