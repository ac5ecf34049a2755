//! Admission flags: the concurrency limit and its queue, client API keys, and the admin
//! API's token and address.

use std::net::SocketAddr;
use std::time::Duration;

use crate::admission::{ApiKey, ApiKeys, QueueOrder, load_api_keys_file};

#[derive(Debug, clap::Args)]
#[command(next_help_heading = "Admission")]
pub struct AdmissionArgs {
    /// Most requests proxied at once (unlimited if unset); more wait in a queue.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_concurrent_requests: Option<u32>,

    /// Most requests waiting for a slot; beyond it requests get 429 at once.
    #[arg(long, default_value_t = 1024)]
    pub max_queued_requests: usize,

    /// How waiting requests are served: `fair` (by the key's priority, then each key in
    /// turn) or `fifo` (arrival order, whatever the key).
    #[arg(long, value_enum, default_value_t = QueueOrder::Fair)]
    pub queue_order: QueueOrder,

    /// Longest wait for a slot; then 503 with Retry-After.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub queue_timeout: Duration,

    /// Client API key (repeat for several, or set ROUTER_API_KEYS to a comma-separated
    /// list so keys do not show in `ps`). When keys are set, requests need
    /// `Authorization: Bearer <key>` (401 otherwise); /health stays open.
    #[arg(
        long = "api-key",
        value_name = "KEY",
        env = "ROUTER_API_KEYS",
        hide_env_values = true,
        value_delimiter = ','
    )]
    pub api_keys: Vec<String>,

    /// A TOML file of named client API keys (`[[keys]] name = "..." key = "..."`, or
    /// `key_sha256 = "<hex>"` instead of the key), each with optional
    /// `requests_per_minute`, `tokens_per_minute`, `priority` (high, normal, low) and
    /// `models`; added to --api-key's, read again when it changes or on SIGHUP (a bad
    /// edit keeps the last good set).
    #[arg(long, value_name = "PATH")]
    pub api_keys_file: Option<std::path::PathBuf>,

    /// Enable the admin API (`/admin/replicas`: list, add, remove, drain replicas at run
    /// time), guarded by `Authorization: Bearer <token>`. Off when unset.
    #[arg(long, env = "ROUTER_ADMIN_TOKEN", hide_env_values = true, value_name = "TOKEN")]
    pub admin_token: Option<String>,

    /// Serve the admin API on this address instead of the serving port (e.g.
    /// 127.0.0.1:9000).
    #[arg(long, value_name = "ADDR:PORT", requires = "admin_token")]
    pub admin_listen: Option<SocketAddr>,

    /// Keep the keys' requests- and tokens-per-minute limits in this Redis (or Valkey)
    /// store, shared by every router instance that names it:
    /// `redis://[[USER]:PASSWORD@]HOST[:PORT][/DB]` (env ROUTER_STATE_STORE, so a password
    /// stays out of `ps`). Without it each instance holds each key to its whole limit.
    #[arg(long, value_name = "URL", env = "ROUTER_STATE_STORE", hide_env_values = true)]
    pub state_store: Option<String>,

    /// Longest wait for the store's answer to an admission; then this instance decides
    /// alone, on its share of the limit (see --router-instances).
    #[arg(long, default_value = "100ms", value_parser = humantime::parse_duration, requires = "state_store")]
    pub state_store_timeout: Duration,

    /// Prefix of the store's keys (one hash per API key name), so several fleets can
    /// share one store.
    #[arg(long, default_value = "llm-router:limits:", requires = "state_store")]
    pub state_store_prefix: String,

    /// How many router instances share the store: while it does not answer, each holds
    /// a key to this fraction of its limits, so together they stay near the limit.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub router_instances: u32,
}

/// `--state-store` and its settings.
#[derive(Debug, Clone)]
pub struct StateStoreConfig {
    pub target: crate::state_store::Target,
    pub timeout: Duration,
    pub prefix: String,
    pub instances: u32,
}

impl AdmissionArgs {
    /// (max concurrent, max queued, queue timeout), when limited.
    pub fn limit(&self) -> Option<(usize, usize, Duration)> {
        self.max_concurrent_requests.map(|n| (n as usize, self.max_queued_requests, self.queue_timeout))
    }

    /// Where the keys come from.
    pub fn key_source(&self) -> KeySource {
        KeySource { flags: self.api_keys.clone(), file: self.api_keys_file.clone() }
    }

    pub fn state_store(&self) -> Result<Option<StateStoreConfig>, String> {
        let Some(url) = &self.state_store else { return Ok(None) };
        Ok(Some(StateStoreConfig {
            target: crate::state_store::Target::parse(url)?,
            timeout: self.state_store_timeout,
            prefix: self.state_store_prefix.clone(),
            instances: self.router_instances,
        }))
    }

    pub fn admin_token(&self) -> Option<String> {
        self.admin_token.clone().filter(|t| !t.is_empty())
    }
}

/// `--api-key`'s keys and the keys file, read again on reload.
#[derive(Debug, Clone, Default)]
pub struct KeySource {
    flags: Vec<String>,
    pub file: Option<std::path::PathBuf>,
}

impl KeySource {
    /// Keys from `path` only.
    pub fn from_file(path: std::path::PathBuf) -> Self {
        KeySource { flags: Vec::new(), file: Some(path) }
    }

    /// `--api-key`'s keys, then the keys file's (read now).
    pub fn load(&self) -> Result<Vec<ApiKey>, String> {
        let mut keys = ApiKeys::from_flags(&self.flags);
        if let Some(path) = &self.file {
            keys.extend(load_api_keys_file(path)?);
        }
        Ok(keys)
    }
}
