//! The command line, and the validated configuration it becomes.
//!
//! Each subsystem owns its flags (a clap group with its own help section) and turns them
//! into its own configuration type: `serving`, `fleet` (replicas, simulated ones, P/D),
//! `policy`, `kv_events`, `resilience`, `admission`, `discovery`,
//! `telemetry`. [`Cli::into_config`] composes them into a [`RouterConfig`]; the rules
//! that span groups are in `Cli::check_across_groups`, and nowhere else.
//!
//! Every bad value is refused at start with one line that names it; nothing is
//! discovered to be wrong at the first request.

mod admission;
pub use admission::{KeySource, StateStoreConfig};
mod discovery;
mod fleet;
mod kv_events;
mod policy;
mod resilience;
mod serving;
mod telemetry;
mod values;

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use http::HeaderName;
pub use llm_common::cli::{one_line_error, parse_args};

pub use admission::AdmissionArgs;
pub use discovery::DiscoveryArgs;
pub use fleet::{FleetArgs, PdConfig, PdSide};
pub use kv_events::KvEventsArgs;
pub use policy::{BalanceFactor, PolicyArgs};
pub use resilience::{ErrorRate, ResilienceArgs, Switch};
pub use serving::ServingArgs;
pub use telemetry::{MetricsOn, TelemetryArgs};

use crate::discovery::Discovery;
use crate::policy::cache_index::{FeedConfig, IndexLimits};
use crate::policy::{HashOptions, KvOptions, PolicyKind, PrefixOptions};
use crate::replicas::{HealthConfig, ReplicaUrl, Thresholds};

/// A native LLM router and ingress proxy for vLLM replicas: picks a replica per request
/// and streams its response straight back.
#[derive(Debug, Parser)]
#[command(name = "router", version)]
pub struct Cli {
    #[command(flatten)]
    pub serving: ServingArgs,
    #[command(flatten)]
    pub fleet: FleetArgs,
    #[command(flatten)]
    pub policy: PolicyArgs,
    #[command(flatten)]
    pub kv_events: KvEventsArgs,
    #[command(flatten)]
    pub resilience: ResilienceArgs,
    #[command(flatten)]
    pub admission: AdmissionArgs,
    #[command(flatten)]
    pub discovery: DiscoveryArgs,
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
}

/// The validated configuration the router runs with.
#[derive(Debug, Clone)]
pub struct RouterConfig {
    pub listen: SocketAddr,
    pub replicas: Vec<ReplicaUrl>,
    pub policy: PolicyKind,
    pub hash: HashOptions,
    /// consistent-hash: how the engines' own load is read (`--engine-load-interval`).
    pub engine_load: Option<crate::replicas::engine_load::OverloadBound>,
    pub prefix: PrefixOptions,
    pub kv: KvOptions,
    /// Bounds of the cache-aware policies' memory.
    pub index: IndexLimits,
    /// `kv-aware`: where the replicas' KV events come from (simulated replicas' are
    /// added when they start).
    pub kv_events: Option<FeedConfig>,
    /// `--engine-api`.
    pub engine_api: crate::frontend::EngineApi,
    /// `generate` mode: the model's sampling defaults (`generation_config.json`).
    pub sampling_defaults: crate::frontend::SamplingDefaults,
    /// The tokenizer of `kv-aware` and of `generate` mode (one, shared), loaded.
    pub tokenizer: Option<std::sync::Arc<crate::policy::prompt_tokens::PromptTokenizer>>,
    /// Threads and queue of the tokenizer's pool (`--tokenizer-threads`, `--tokenizer-queue`).
    pub tokenizer_threads: usize,
    pub tokenizer_queue: usize,
    pub session_headers: Vec<HeaderName>,
    pub max_body_bytes: usize,
    /// `--max-buffered-request-bytes`.
    pub max_buffered_request_bytes: usize,
    pub health: HealthConfig,
    pub thresholds: Thresholds,
    pub connect_timeout: Duration,
    pub drain_timeout: Duration,
    /// `--shutdown-delay`.
    pub shutdown_delay: Duration,
    /// Runtime worker threads (`--worker-threads`); None means one per core.
    pub worker_threads: Option<usize>,
    pub timeouts: crate::dispatch::Timeouts,
    pub breaker: crate::replicas::BreakerSettings,
    pub outliers: crate::replicas::OutlierSettings,
    pub retries: crate::dispatch::retry_budget::RetrySettings,
    /// Continuations a broken stream gets (`--continuation`, `--continuation-attempts`);
    /// 0 is off.
    pub continuation_attempts: u32,
    /// (max concurrent, max queued, queue timeout), when limited.
    pub limit: Option<(usize, usize, Duration)>,
    /// How waiting requests are served (`--queue-order`).
    pub queue_order: crate::admission::QueueOrder,
    pub api_keys: Vec<crate::admission::ApiKey>,
    /// Where they came from, to read them again.
    pub key_source: KeySource,
    /// `--state-store`: where the keys' limits are shared; None keeps them per instance.
    pub state_store: Option<StateStoreConfig>,
    /// TLS on the serving listener, and on the admin listener.
    pub tls: Option<crate::ingress::tls::TlsFiles>,
    pub admin_tls: Option<crate::ingress::tls::TlsFiles>,
    pub metrics_on: MetricsOn,
    pub forward_authorization: bool,
    pub trust_client_kv_params: bool,
    /// `/v1/` paths forwarded besides chat and completions.
    pub forward_paths: Vec<String>,
    /// The admin API's bearer token; None disables the API.
    pub admin_token: Option<String>,
    /// A separate address for the admin API.
    pub admin_listen: Option<SocketAddr>,
    pub header_read_timeout: Duration,
    pub body_read_timeout: Duration,
    /// `--client-idle-timeout`.
    pub client_idle_timeout: Duration,
    /// `--client-keep-alive-timeout`.
    pub client_keep_alive_timeout: Duration,
    /// `--max-client-connections`.
    pub max_client_connections: usize,
    /// Simulated replicas to start before routing (`--sim`).
    pub sim: Option<vllm_sim::SimConfig>,
    pub sim_replicas: usize,
    /// P/D mode; `replicas` are then the decode replicas.
    pub pd: Option<PdConfig>,
    /// Log one line per request (`--access-log`).
    pub access_log: bool,
    /// Where replicas are discovered, besides the command line.
    pub discovery: Discovery,
    /// `--explain-routing`.
    pub explain_routing: bool,
    /// `--otlp-endpoint`: span export; None is off.
    pub trace: Option<crate::trace::TraceConfig>,
}

impl RouterConfig {
    /// Defaults for the given replicas, listening on an ephemeral loopback port.
    pub fn new(replicas: Vec<ReplicaUrl>) -> Self {
        Cli::parse_from(["router", "--host", "127.0.0.1", "--port", "0", "--replicas", "http://x:1"])
            .into_config()
            .expect("defaults are valid")
            .with_replicas(replicas)
    }

    fn with_replicas(mut self, replicas: Vec<ReplicaUrl>) -> Self {
        self.replicas = replicas;
        self
    }
}

impl Cli {
    /// Whether the router runs in P/D mode: prefill replicas named, simulated, or to be
    /// discovered.
    fn pd_mode(&self, prefill: &[ReplicaUrl]) -> bool {
        !prefill.is_empty()
            || self.fleet.sim_pd.is_some()
            || self.fleet.pd_discovered
            || !self.discovery.discover_dns_prefill.is_empty()
    }

    /// The rules that span flag groups (clap checks the ones within a flag).
    fn check_across_groups(
        &self,
        discovery: &Discovery,
        replicas: &[ReplicaUrl],
        prefill: &[ReplicaUrl],
        kv_aware: bool,
    ) -> Result<(), String> {
        if self.fleet.pd_discovered && !discovery.is_on() {
            return Err("--pd-discovered needs --replicas-file, --discover-dns or --discover-k8s".into());
        }
        if self.pd_mode(prefill)
            && self.fleet.sim_pd.is_none()
            && !discovery.is_on()
            && (prefill.is_empty() || replicas.is_empty())
        {
            return Err("--pd needs both prefill=URL[,URL...] and decode=URL[,URL...]".into());
        }
        if kv_aware && !self.fleet.simulated() {
            self.kv_events.check_for_engines()?;
        }
        if self.serving.engine_api == crate::frontend::EngineApi::Generate
            && self.kv_events.tokenizer.is_none()
            && !self.fleet.simulated()
        {
            return Err(
                "--engine-api generate needs --tokenizer (the engines' model directory; `builtin` for vllm-sim)".into(),
            );
        }
        if self.telemetry.metrics_on == MetricsOn::Admin && self.admission.admin_listen.is_none() {
            return Err("--metrics-on admin needs --admin-listen (and --admin-token)".into());
        }
        Ok(())
    }

    pub fn into_config(self) -> Result<RouterConfig, String> {
        let sim = self.fleet.sim_config()?;
        let (replicas, prefill) = self.fleet.replica_sets();
        let discovery = self.discovery.discovery()?;
        let pd = self.pd_mode(&prefill).then(|| self.fleet.pd_config(prefill.clone()));
        let policy = if pd.is_some() { self.fleet.decode_policy } else { self.policy.policy };
        let kv_aware = policy == PolicyKind::KvAware
            || pd.as_ref().is_some_and(|p| p.prefill_policy == PolicyKind::KvAware);
        self.check_across_groups(&discovery, &replicas, &prefill, kv_aware)?;
        let (serving, resilience, admission) = (&self.serving, &self.resilience, &self.admission);
        let generate = serving.engine_api == crate::frontend::EngineApi::Generate;
        Ok(RouterConfig {
            listen: serving.listen(),
            replicas,
            policy,
            hash: self.policy.hash_options(),
            engine_load: if pd.is_some() { None } else { self.policy.engine_load() },
            prefix: self.policy.prefix_options(),
            kv: self.kv_events.kv_options(),
            index: IndexLimits {
                blocks_per_replica: if kv_aware {
                    self.kv_events.kv_index_blocks as usize
                } else {
                    self.policy.prefix_index_blocks as usize
                },
                ttl: self.policy.prefix_index_ttl,
            },
            kv_events: kv_aware.then(|| self.kv_events.feed_config()),
            tokenizer: if kv_aware || generate { Some(self.kv_events.load_tokenizer()?) } else { None },
            tokenizer_threads: self
                .kv_events
                .tokenizer_threads
                .map_or_else(|| std::thread::available_parallelism().map_or(2, usize::from), usize::from),
            tokenizer_queue: self.kv_events.tokenizer_queue as usize,
            engine_api: serving.engine_api,
            sampling_defaults: if generate {
                self.kv_events.sampling_defaults()?
            } else {
                Default::default()
            },
            session_headers: self.policy.session_headers.clone(),
            max_body_bytes: serving.max_body_bytes,
            max_buffered_request_bytes: usize::try_from(serving.max_buffered_request_bytes)
                .unwrap_or(usize::MAX),
            health: resilience.health(),
            thresholds: resilience.thresholds(),
            connect_timeout: resilience.connect_timeout,
            drain_timeout: serving.drain_timeout,
            shutdown_delay: serving.shutdown_delay,
            worker_threads: serving.worker_threads.map(usize::from),
            timeouts: resilience.timeouts(),
            breaker: resilience.breaker(),
            outliers: resilience.outliers(),
            retries: resilience.retries(),
            continuation_attempts: resilience.continuation_attempts(),
            limit: admission.limit(),
            queue_order: admission.queue_order,
            api_keys: admission.key_source().load()?,
            key_source: admission.key_source(),
            state_store: admission.state_store()?,
            tls: serving.tls(),
            admin_tls: serving.admin_tls(),
            metrics_on: self.telemetry.metrics_on,
            forward_authorization: serving.forward_authorization,
            trust_client_kv_params: serving.trust_client_kv_params,
            forward_paths: serving.forward_paths(),
            admin_token: admission.admin_token(),
            admin_listen: admission.admin_listen,
            header_read_timeout: serving.header_read_timeout,
            body_read_timeout: serving.body_read_timeout,
            client_idle_timeout: serving.client_idle_timeout,
            client_keep_alive_timeout: serving.client_keep_alive_timeout,
            max_client_connections: serving.max_client_connections as usize,
            sim,
            sim_replicas: self.fleet.sim_replicas(),
            pd,
            access_log: self.telemetry.access_log,
            discovery,
            explain_routing: self.telemetry.explain_routing,
            trace: self.telemetry.trace(),
        })
    }
}

#[cfg(test)]
mod tests;
