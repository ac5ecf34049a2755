//! The command line, and the validated configuration it becomes.
//!
//! Every bad value is refused at start with one line that names it; nothing is
//! discovered to be wrong at the first request.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use http::HeaderName;
pub use llm_common::cli::{one_line_error, parse_args};

use crate::discovery::dns::DnsTarget;
use crate::discovery::{Discovery, Role};
use crate::logging::LogFormat;
use crate::policy::cache_index::{FeedConfig, IndexLimits};
use crate::policy::prompt_tokens::TokenizerSpec;
use crate::policy::{HashOptions, KvOptions, PolicyKind, PrefixOptions};
use crate::replicas::{HealthConfig, ReplicaUrl, Thresholds};

/// A native LLM router and ingress proxy for vLLM replicas: picks a replica per request
/// and streams its response straight back.
#[derive(Debug, Parser)]
#[command(name = "router", version)]
pub struct Cli {
    /// Replica base URLs (http://host:port). Give several after one flag, repeat the
    /// flag, or separate them with commas.
    #[arg(long, required_unless_present_any = ["sim", "pd", "sim_pd", "replicas_file", "discover_dns", "discover_k8s"], conflicts_with = "pd", num_args = 1.., value_delimiter = ',', value_name = "URL",
          value_parser = ReplicaUrl::parse)]
    pub replicas: Vec<ReplicaUrl>,

    /// Start N simulated vLLM replicas (vllm-sim) in this process on loopback and route
    /// to them: a working router with no other setup.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=256))]
    pub sim: Option<u16>,

    /// Timing profile of the simulated replicas.
    #[arg(long, default_value = "qwen3-0.6b-fp8-h100")]
    pub sim_profile: String,

    /// Simulated replicas run this many times faster than real time.
    #[arg(long, default_value_t = 1.0)]
    pub sim_time_scale: f64,

    /// How to choose a replica for each request.
    #[arg(long, value_enum, default_value_t = PolicyKind::PowerOfTwo)]
    pub policy: PolicyKind,

    /// Prefill/decode disaggregation: `--pd prefill=URL[,URL...] decode=URL[,URL...]`.
    /// Each inference request is prefilled on a prefill replica and decoded on a decode
    /// replica (vLLM NixlConnector protocol).
    #[arg(long, num_args = 2, value_names = ["prefill=URLS", "decode=URLS"], value_parser = parse_pd_side,
          conflicts_with_all = ["sim", "sim_pd"])]
    pub pd: Vec<PdSide>,

    /// P/D: policy choosing the prefill replica (consistent-hash keeps a session's
    /// prefill where its prefix is cached).
    #[arg(long, value_enum, default_value_t = PolicyKind::PowerOfTwo)]
    pub prefill_policy: PolicyKind,

    /// P/D: policy choosing the decode replica.
    #[arg(long, value_enum, default_value_t = PolicyKind::PowerOfTwo)]
    pub decode_policy: PolicyKind,

    /// P/D: send decode the prompt as text instead of the prefill's token ids (for
    /// comparison; decode then tokenises the prompt again).
    #[arg(long)]
    pub no_tokenize_once: bool,

    /// Start simulated prefill and decode replicas in this process (`P:D`, e.g. 1:1)
    /// and run in P/D mode against them.
    #[arg(long, value_name = "P:D", value_parser = parse_sim_pd, conflicts_with = "sim")]
    pub sim_pd: Option<(u16, u16)>,

    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0")]
    pub host: std::net::IpAddr,

    /// Port to listen on (0 picks a free one).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,

    /// Header carrying the session key for consistent-hash, checked in the order given
    /// (repeat the flag for several). Without a header key the body's `session_id`,
    /// `session_params.session_id`, `user` or `user_id` is used.
    #[arg(long = "session-header", value_name = "NAME", default_value = "x-session-id",
          value_parser = parse_header_name)]
    pub session_headers: Vec<HeaderName>,

    /// Bounded-load factor for consistent-hash: a replica already holding this multiple
    /// of the mean in-flight load passes further requests along the ring to the next
    /// replica under the cap. `off` keeps pure affinity.
    #[arg(long, value_name = "FACTOR|off", default_value = "off", value_parser = parse_balance_factor)]
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

    /// kv-aware: a replica's KV events endpoint, `REPLICA_URL=tcp://HOST:PORT`
    /// (repeatable). Replicas not named here use `--kv-events-port`.
    #[arg(long, value_name = "REPLICA=ENDPOINT", value_parser = parse_kv_endpoint)]
    pub kv_events_endpoint: Vec<(String, String)>,

    /// kv-aware: every replica publishes KV events on `tcp://{its host}:N` (vLLM's
    /// `--kv-events-config` endpoint `tcp://*:N`).
    #[arg(long, value_name = "N")]
    pub kv_events_port: Option<u16>,

    /// kv-aware: the engines' replay endpoint port (vLLM's `replay_endpoint`), used to
    /// fetch missed events after a sequence gap.
    #[arg(long, value_name = "N")]
    pub kv_events_replay_port: Option<u16>,

    /// kv-aware: a replica's replay endpoint, `REPLICA_URL=tcp://HOST:PORT` (repeatable).
    #[arg(long, value_name = "REPLICA=ENDPOINT", value_parser = parse_kv_endpoint)]
    pub kv_events_replay_endpoint: Vec<(String, String)>,

    /// kv-aware: the topic to subscribe to (vLLM's default is empty: everything).
    #[arg(long, default_value = "")]
    pub kv_events_topic: String,

    /// kv-aware: a replica that was sent requests this long ago and has published no
    /// event since is stale: its memory is forgotten and it is routed by load.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub kv_events_silence: Duration,

    /// kv-aware: largest KV event message accepted from a publisher, in bytes; a larger
    /// frame or message closes that publisher's connection (counted, then reconnected).
    #[arg(long, default_value_t = 4 << 20, value_parser = clap::value_parser!(u64).range(1024..=1 << 30))]
    pub kv_events_max_message_bytes: u64,

    /// kv-aware: engine blocks remembered per replica (least recently used forgotten).
    #[arg(long, default_value_t = 1 << 20, value_parser = clap::value_parser!(u64).range(1..=1 << 28))]
    pub kv_index_blocks: u64,

    /// kv-aware: weight of a prompt token the replica would still have to prefill.
    #[arg(long, default_value_t = 1.0, value_parser = parse_weight)]
    pub kv_prefill_weight: f64,

    /// kv-aware: weight of a prompt token of a request in flight on the replica.
    #[arg(long, default_value_t = 1.0, value_parser = parse_weight)]
    pub kv_load_weight: f64,

    /// kv-aware: choose every request by the cost alone (as Dynamo's KV router), instead
    /// of placing new conversations by hash and keeping held ones on their holder until
    /// it is overloaded.
    #[arg(long)]
    pub kv_pure_cost: bool,

    /// kv-aware: how the router tokenises text and chat prompts: `builtin` (the
    /// simulator's o200k_base and chat template, the default with `--sim`) or a Hugging
    /// Face model directory as shipped (or its `tokenizer.json`); the chat template is
    /// found beside it as transformers finds it (`chat_template.jinja`, then
    /// `tokenizer_config.json`), unless `--chat-template` names one.
    #[arg(long, value_parser = TokenizerSpec::parse)]
    pub tokenizer: Option<TokenizerSpec>,

    /// kv-aware: a Jinja chat template file, instead of the one shipped with the tokenizer.
    #[arg(long, value_name = "FILE")]
    pub chat_template: Option<std::path::PathBuf>,

    /// Largest request body accepted, in bytes; larger ones get 413.
    #[arg(long, default_value_t = 32 * 1024 * 1024)]
    pub max_body_bytes: usize,

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

    /// Most requests proxied at once (unlimited if unset); more wait in a queue.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_concurrent_requests: Option<u32>,

    /// Most requests waiting for a slot; beyond it requests get 429 at once.
    #[arg(long, default_value_t = 1024)]
    pub max_queued_requests: usize,

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
    /// `key_sha256 = "<hex>"` instead of the key), read at start, added to --api-key's.
    #[arg(long, value_name = "PATH")]
    pub api_keys_file: Option<std::path::PathBuf>,

    /// Where `/metrics` is served: `serving` (the serving port; behind the API keys when
    /// keys are set) or `admin` (only on --admin-listen, without a key).
    #[arg(long, value_enum, default_value_t = MetricsOn::Serving)]
    pub metrics_on: MetricsOn,

    /// Forward the client's Authorization header to replicas (default: dropped, as it
    /// carries the router's key, not the replicas').
    #[arg(long)]
    pub forward_authorization: bool,

    /// Forward this path too (repeatable; a trailing `*` matches any rest), besides chat,
    /// completions and vLLM's other OpenAI endpoints (embeddings, responses, audio,
    /// score, rerank, classify, tokenize, detokenize). Anything else under /v1/ gets 404:
    /// vLLM's administrative calls (LoRA loading...) are not for the router's clients.
    #[arg(long = "forward-path", value_name = "PATH", value_parser = parse_forward_path)]
    pub forward_paths: Vec<String>,

    /// Pass a client's `kv_transfer_params` on to the engines (by default they are
    /// removed: they tell an engine to pull KV blocks from a host and port the client
    /// names; only the router's P/D stages set them).
    #[arg(long)]
    pub trust_client_kv_params: bool,

    /// Time a client has to send its request headers; slower connections are closed.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub header_read_timeout: Duration,

    /// Longest a client may accept no bytes of a response it is being sent (a full
    /// socket): then its connection is closed, its upstream request cancelled and its
    /// slot freed (HAProxy's `timeout client`).
    #[arg(long, default_value = "60s", value_parser = parse_positive_duration)]
    pub client_idle_timeout: Duration,

    /// Time a client has to send its whole request body; slower uploads get 408.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub body_read_timeout: Duration,

    /// Enable the admin API (`/admin/replicas`: list, add, remove, drain replicas at run
    /// time), guarded by `Authorization: Bearer <token>`. Off when unset.
    #[arg(long, env = "ROUTER_ADMIN_TOKEN", hide_env_values = true, value_name = "TOKEN")]
    pub admin_token: Option<String>,

    /// Serve the admin API on this address instead of the serving port (e.g.
    /// 127.0.0.1:9000).
    #[arg(long, value_name = "ADDR:PORT", requires = "admin_token")]
    pub admin_listen: Option<SocketAddr>,

    /// Threads serving requests (default: one per CPU core).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub worker_threads: Option<u16>,

    /// On SIGTERM/SIGINT, time in-flight requests get to finish before the router exits.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,

    /// How log lines are written: `text`, or `json` (one object per line). Colour codes
    /// only when writing to a terminal (and `NO_COLOR` unset). Levels from `RUST_LOG`.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Log one line per request (target `access`) when its response ends.
    #[arg(long)]
    pub access_log: bool,

    /// A file of replicas, one `[ROLE] URL` per line (ROLE: prefill, decode or replica),
    /// re-read when it changes; a bad file is logged and the last good set kept.
    #[arg(long, value_name = "PATH")]
    pub replicas_file: Option<std::path::PathBuf>,

    /// Every address NAME resolves to is a replica on PORT (a headless Service, Consul,
    /// docker compose), re-resolved every --discovery-interval. Repeatable.
    #[arg(long, value_name = "NAME:PORT")]
    pub discover_dns: Vec<String>,

    /// P/D: every address NAME resolves to is a prefill replica on PORT. Repeatable.
    #[arg(long, value_name = "NAME:PORT")]
    pub discover_dns_prefill: Vec<String>,

    /// Ask this DNS server (IP:PORT) instead of the system's resolvers.
    #[arg(long, value_name = "IP:PORT")]
    pub dns_server: Option<SocketAddr>,

    /// Follow the ready endpoints of the EndpointSlices that --k8s-selector picks, through
    /// the Kubernetes API (in-cluster service account, or the kubeconfig).
    #[arg(long, requires = "k8s_selector")]
    pub discover_k8s: bool,

    /// Label selector of the EndpointSlices to follow (e.g. `app=vllm`).
    #[arg(long, value_name = "SELECTOR")]
    pub k8s_selector: Option<String>,

    /// Namespace of the EndpointSlices (default: the service account's, or the
    /// kubeconfig context's).
    #[arg(long)]
    pub k8s_namespace: Option<String>,

    /// The replicas' port: a number, or the name of the slice's port (default: the
    /// slice's only port, or the one named `http`).
    #[arg(long, value_name = "PORT|NAME", value_parser = crate::discovery::k8s::PortSpec::parse)]
    pub k8s_port: Option<crate::discovery::k8s::PortSpec>,

    /// The EndpointSlice (Service) label naming the P/D role: prefill, decode or replica.
    #[arg(long, default_value = "llm-router/role")]
    pub k8s_role_label: String,

    /// The Kubernetes API server's URL, instead of the in-cluster or kubeconfig one.
    #[arg(long, value_name = "URL")]
    pub k8s_api_server: Option<http::Uri>,

    /// How often the replicas file is re-read and DNS names re-resolved.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub discovery_interval: Duration,

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

    /// Run in P/D mode with prefill and decode replicas that discovery finds (file roles
    /// or the Kubernetes role label), none given on the command line.
    #[arg(long, conflicts_with_all = ["sim", "sim_pd"])]
    pub pd_discovered: bool,
}

/// `--metrics-on`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum MetricsOn {
    Serving,
    Admin,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BalanceFactor(pub Option<f64>);

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ErrorRate(pub Option<f64>);

fn parse_error_rate(text: &str) -> Result<ErrorRate, String> {
    if text.eq_ignore_ascii_case("off") {
        return Ok(ErrorRate(None));
    }
    match text.parse::<f64>() {
        Ok(r) if r > 0.0 && r <= 1.0 => Ok(ErrorRate(Some(r))),
        _ => Err(format!("`{text}` is not a rate in (0, 1] (e.g. 0.5) or `off`")),
    }
}

/// One side of `--pd`.
#[derive(Debug, Clone, PartialEq)]
pub enum PdSide {
    Prefill(Vec<ReplicaUrl>),
    Decode(Vec<ReplicaUrl>),
}

fn parse_pd_side(text: &str) -> Result<PdSide, String> {
    let (side, urls) = text
        .split_once('=')
        .ok_or_else(|| format!("`{text}`: expected prefill=URL[,URL...] or decode=URL[,URL...]"))?;
    let urls =
        urls.split(',').filter(|u| !u.is_empty()).map(ReplicaUrl::parse).collect::<Result<Vec<_>, _>>()?;
    if urls.is_empty() {
        return Err(format!("`{text}`: no URLs"));
    }
    match side {
        "prefill" => Ok(PdSide::Prefill(urls)),
        "decode" => Ok(PdSide::Decode(urls)),
        _ => Err(format!("`{text}`: expected prefill=... or decode=...")),
    }
}

fn parse_sim_pd(text: &str) -> Result<(u16, u16), String> {
    let bad = || format!("`{text}` is not P:D with both at least 1 (e.g. 1:1)");
    let (p, d) = text.split_once(':').ok_or_else(bad)?;
    let (p, d) = (p.parse::<u16>().map_err(|_| bad())?, d.parse::<u16>().map_err(|_| bad())?);
    if p == 0 || d == 0 || p > 128 || d > 128 {
        return Err(bad());
    }
    Ok((p, d))
}

/// Prefill/decode mode: replicas and policies of each stage.
#[derive(Debug, Clone)]
pub struct PdConfig {
    pub prefill: Vec<ReplicaUrl>,
    pub prefill_policy: PolicyKind,
    pub decode_policy: PolicyKind,
    pub tokenize_once: bool,
    /// Simulated prefill replicas to start (`--sim-pd`); decode ones go to `sim_replicas`.
    pub sim_prefill: usize,
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

fn parse_fraction(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(f) if (0.0..=1.0).contains(&f) => Ok(f),
        _ => Err(format!("`{text}` is not a fraction between 0 and 1")),
    }
}

fn parse_ratio(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(f) if f.is_finite() && f >= 1.0 => Ok(f),
        _ => Err(format!("`{text}` is not a ratio of at least 1.0")),
    }
}

fn parse_weight(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(f) if f.is_finite() && f >= 0.0 => Ok(f),
        _ => Err(format!("`{text}` is not a weight of 0 or more")),
    }
}

fn parse_kv_endpoint(text: &str) -> Result<(String, String), String> {
    let (replica, endpoint) =
        text.split_once('=').ok_or_else(|| format!("`{text}` is not REPLICA_URL=tcp://HOST:PORT"))?;
    let replica = ReplicaUrl::parse(replica)?;
    if !endpoint.starts_with("tcp://") || !endpoint[6..].contains(':') {
        return Err(format!("`{endpoint}` is not a tcp://HOST:PORT endpoint"));
    }
    Ok((replica.name().to_owned(), endpoint.to_owned()))
}

fn parse_forward_path(text: &str) -> Result<String, String> {
    let path = text.strip_suffix('*').unwrap_or(text);
    if !path.starts_with("/v1/") || path.contains("..") || path.contains('*') {
        return Err(format!("`{text}` is not a /v1/ path (a trailing * matches any rest)"));
    }
    Ok(text.to_owned())
}

fn parse_positive_duration(text: &str) -> Result<Duration, String> {
    match humantime::parse_duration(text) {
        Ok(d) if !d.is_zero() => Ok(d),
        Ok(_) => Err(format!("`{text}` must be more than zero")),
        Err(e) => Err(format!("`{text}`: {e}")),
    }
}

fn parse_header_name(text: &str) -> Result<HeaderName, String> {
    HeaderName::from_bytes(text.as_bytes()).map_err(|_| format!("`{text}` is not a header name"))
}

/// The validated configuration the router runs with.
#[derive(Debug, Clone)]
pub struct RouterConfig {
    pub listen: SocketAddr,
    pub replicas: Vec<ReplicaUrl>,
    pub policy: PolicyKind,
    pub hash: HashOptions,
    pub prefix: PrefixOptions,
    pub kv: KvOptions,
    /// Bounds of the cache-aware policies' memory.
    pub index: IndexLimits,
    /// `kv-aware`: where the replicas' KV events come from (simulated replicas' are
    /// added when they start).
    pub kv_events: Option<FeedConfig>,
    /// `kv-aware`'s tokenizer, loaded.
    pub tokenizer: Option<std::sync::Arc<crate::policy::prompt_tokens::PromptTokenizer>>,
    pub session_headers: Vec<HeaderName>,
    pub max_body_bytes: usize,
    pub health: HealthConfig,
    pub thresholds: Thresholds,
    pub connect_timeout: Duration,
    pub drain_timeout: Duration,
    /// Runtime worker threads (`--worker-threads`); None means one per core.
    pub worker_threads: Option<usize>,
    pub timeouts: crate::dispatch::Timeouts,
    pub breaker: crate::replicas::BreakerSettings,
    pub outliers: crate::replicas::OutlierSettings,
    pub retries: crate::dispatch::retry_budget::RetrySettings,
    /// (max concurrent, max queued, queue timeout), when limited.
    pub limit: Option<(usize, usize, Duration)>,
    pub api_keys: Vec<crate::admission::ApiKey>,
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
    /// Simulated replicas to start before routing (`--sim`).
    pub sim: Option<vllm_sim::SimConfig>,
    pub sim_replicas: usize,
    /// P/D mode; `replicas` are then the decode replicas.
    pub pd: Option<PdConfig>,
    /// Log one line per request (`--access-log`).
    pub access_log: bool,
    /// Where replicas are discovered, besides the command line.
    pub discovery: Discovery,
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
    pub fn into_config(self) -> Result<RouterConfig, String> {
        let sim = match (self.sim, self.sim_pd) {
            (None, None) => None,
            _ => {
                let args = <vllm_sim::SimArgs as Parser>::try_parse_from([
                    "vllm-sim",
                    "--port",
                    "0",
                    "--profile",
                    &self.sim_profile,
                    "--time-scale",
                    &self.sim_time_scale.to_string(),
                ])
                .map_err(|e| one_line_error(&e))?;
                Some(args.into_config()?)
            }
        };
        let mut replicas = self.replicas;
        let mut prefill = Vec::new();
        for side in self.pd {
            match side {
                PdSide::Prefill(urls) => prefill.extend(urls),
                PdSide::Decode(urls) => replicas.extend(urls),
            }
        }
        let discovery = Discovery {
            file: self.replicas_file.clone(),
            dns: self
                .discover_dns
                .iter()
                .map(|t| DnsTarget::parse(Role::Main, t))
                .chain(self.discover_dns_prefill.iter().map(|t| DnsTarget::parse(Role::Prefill, t)))
                .collect::<Result<_, _>>()?,
            dns_server: self.dns_server,
            k8s: self.discover_k8s.then(|| crate::discovery::k8s::K8sConfig {
                api_server: self.k8s_api_server.clone(),
                namespace: self.k8s_namespace.clone(),
                selector: self.k8s_selector.clone().unwrap_or_default(),
                port: self.k8s_port.clone(),
                role_label: self.k8s_role_label.clone(),
            }),
            interval: self.discovery_interval,
        };
        let pd_mode = !prefill.is_empty()
            || self.sim_pd.is_some()
            || self.pd_discovered
            || !self.discover_dns_prefill.is_empty();
        if self.pd_discovered && !discovery.is_on() {
            return Err("--pd-discovered needs --replicas-file, --discover-dns or --discover-k8s".into());
        }
        if pd_mode
            && self.sim_pd.is_none()
            && !discovery.is_on()
            && (prefill.is_empty() || replicas.is_empty())
        {
            return Err("--pd needs both prefill=URL[,URL...] and decode=URL[,URL...]".into());
        }
        let pd = pd_mode.then(|| PdConfig {
            prefill: dedup(std::mem::take(&mut prefill)),
            prefill_policy: self.prefill_policy,
            decode_policy: self.decode_policy,
            tokenize_once: !self.no_tokenize_once,
            sim_prefill: self.sim_pd.map_or(0, |(p, _)| p as usize),
        });
        let policy = if pd.is_some() { self.decode_policy } else { self.policy };
        let kv_aware = policy == PolicyKind::KvAware
            || pd.as_ref().is_some_and(|p| p.prefill_policy == PolicyKind::KvAware);
        let simulated = self.sim.is_some() || self.sim_pd.is_some();
        if kv_aware && !simulated {
            if self.tokenizer.is_none() {
                return Err(
                    "--policy kv-aware needs --tokenizer (the engines' tokenizer; `builtin` for vllm-sim)"
                        .into(),
                );
            }
            if self.kv_events_port.is_none() && self.kv_events_endpoint.is_empty() {
                return Err("--policy kv-aware needs --kv-events-port N or --kv-events-endpoint REPLICA=tcp://HOST:PORT".into());
            }
        }
        let kv_events = kv_aware.then(|| FeedConfig {
            endpoints: self.kv_events_endpoint.clone(),
            port: self.kv_events_port,
            replay_endpoints: self.kv_events_replay_endpoint.clone(),
            replay_port: self.kv_events_replay_port,
            topic: self.kv_events_topic.clone(),
            silence: self.kv_events_silence,
            max_blocks: self.kv_index_blocks as usize,
            limits: crate::policy::cache_index::zmtp::Limits {
                max_message_bytes: self.kv_events_max_message_bytes as usize,
                ..Default::default()
            },
        });
        if self.metrics_on == MetricsOn::Admin && self.admin_listen.is_none() {
            return Err("--metrics-on admin needs --admin-listen (and --admin-token)".into());
        }
        let mut seen = std::collections::HashSet::new();
        replicas.retain(|r| seen.insert(r.name().to_owned()));
        Ok(RouterConfig {
            listen: SocketAddr::new(self.host, self.port),
            replicas,
            policy,
            hash: HashOptions {
                virtual_nodes: self.virtual_nodes as usize,
                balance_factor: self.hash_balance_factor.0,
            },
            prefix: PrefixOptions {
                block_bytes: self.prefix_block_bytes as usize,
                min_match: self.prefix_min_match,
                balance_abs: self.prefix_balance_abs as usize,
                balance_rel: self.prefix_balance_rel,
            },
            kv: KvOptions {
                prefill_weight: self.kv_prefill_weight,
                load_weight: self.kv_load_weight,
                pure_cost: self.kv_pure_cost,
            },
            index: IndexLimits {
                blocks_per_replica: if kv_aware {
                    self.kv_index_blocks as usize
                } else {
                    self.prefix_index_blocks as usize
                },
                ttl: self.prefix_index_ttl,
            },
            kv_events,
            tokenizer: match (kv_aware, self.tokenizer) {
                (true, spec) => Some(std::sync::Arc::new(
                    spec.unwrap_or(TokenizerSpec::Builtin)
                        .load(self.chat_template.as_deref(), crate::replicas::TOKENIZER_CACHE_TOKENS)?,
                )),
                (false, _) => None,
            },
            session_headers: self.session_headers,
            max_body_bytes: self.max_body_bytes,
            health: HealthConfig { interval: self.health_interval, timeout: self.health_timeout },
            thresholds: Thresholds { unhealthy: self.unhealthy_threshold, healthy: self.healthy_threshold },
            connect_timeout: self.connect_timeout,
            drain_timeout: self.drain_timeout,
            worker_threads: self.worker_threads.map(usize::from),
            timeouts: crate::dispatch::Timeouts {
                response_headers: self.response_timeout,
                stream_idle: self.stream_idle_timeout,
                first_byte: self.first_byte_timeout,
            },
            breaker: crate::replicas::BreakerSettings {
                failures: self.breaker_failures,
                cooldown: self.breaker_cooldown,
                error_rate: self.breaker_error_rate.0,
                window: self.breaker_window,
                min_requests: self.breaker_min_requests,
            },
            outliers: crate::replicas::OutlierSettings {
                max_ejection_percent: self.max_ejection_percent,
                panic_threshold: self.panic_threshold,
            },
            retries: crate::dispatch::retry_budget::RetrySettings {
                ratio: self.retry_ratio.max(0.0),
                floor_per_sec: self.retry_floor.max(0.0),
                backoff: self.retry_backoff,
            },
            limit: self
                .max_concurrent_requests
                .map(|n| (n as usize, self.max_queued_requests, self.queue_timeout)),
            api_keys: {
                let mut keys = crate::admission::ApiKeys::from_flags(&self.api_keys);
                if let Some(path) = &self.api_keys_file {
                    keys.extend(crate::admission::load_api_keys_file(path)?);
                }
                keys
            },
            metrics_on: self.metrics_on,
            forward_authorization: self.forward_authorization,
            trust_client_kv_params: self.trust_client_kv_params,
            forward_paths: crate::ingress::FORWARDED_BY_DEFAULT
                .iter()
                .map(|p| p.to_string())
                .chain(self.forward_paths)
                .collect(),
            admin_token: self.admin_token.filter(|t| !t.is_empty()),
            admin_listen: self.admin_listen,
            header_read_timeout: self.header_read_timeout,
            body_read_timeout: self.body_read_timeout,
            client_idle_timeout: self.client_idle_timeout,
            sim,
            sim_replicas: self.sim_pd.map_or(self.sim.unwrap_or(0), |(_, d)| d) as usize,
            pd,
            access_log: self.access_log,
            discovery,
            trace: self.otlp_endpoint.map(|endpoint| crate::trace::TraceConfig {
                endpoint: endpoint.to_string(),
                service_name: self.otlp_service_name,
                sample_ratio: self.trace_sample_ratio,
            }),
        })
    }
}

fn dedup(mut urls: Vec<ReplicaUrl>) -> Vec<ReplicaUrl> {
    let mut seen = std::collections::HashSet::new();
    urls.retain(|r| seen.insert(r.name().to_owned()));
    urls
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("router").chain(args.iter().copied()))
    }

    #[test]
    fn replicas_accept_lists_commas_and_repeats() {
        let cli = parse(&["--replicas", "http://a:1", "http://b:2,http://c:3", "--replicas", "http://d:4"])
            .unwrap();
        let names: Vec<_> = cli.replicas.iter().map(|r| r.name().to_owned()).collect();
        assert_eq!(names, ["http://a:1", "http://b:2", "http://c:3", "http://d:4"]);
        assert_eq!(cli.policy, PolicyKind::PowerOfTwo);
    }

    #[test]
    fn sim_replaces_replicas_and_checks_its_profile() {
        let config = parse(&["--sim", "3"]).unwrap().into_config().unwrap();
        assert_eq!(config.sim_replicas, 3);
        assert!(config.replicas.is_empty());
        let err = parse(&["--sim", "2", "--sim-profile", "gpt-5"]).unwrap().into_config().unwrap_err();
        assert!(err.contains("gpt-5"), "{err}");
    }

    #[test]
    fn pd_sides_and_sim_pd() {
        let config = parse(&[
            "--pd",
            "prefill=http://p:1,http://p:2",
            "decode=http://d:1",
            "--decode-policy",
            "least-loaded",
        ])
        .unwrap()
        .into_config()
        .unwrap();
        let pd = config.pd.unwrap();
        assert_eq!(pd.prefill.len(), 2);
        assert_eq!(config.replicas.len(), 1);
        assert_eq!(config.policy, PolicyKind::LeastLoaded);
        assert!(pd.tokenize_once);
        let err = parse(&["--pd", "prefill=http://p:1", "middle=http://d:1"]).unwrap_err();
        assert!(one_line_error(&err).contains("middle"));
        let config = parse(&["--sim-pd", "1:2", "--no-tokenize-once"]).unwrap().into_config().unwrap();
        assert_eq!((config.pd.as_ref().unwrap().sim_prefill, config.sim_replicas), (1, 2));
        assert!(!config.pd.unwrap().tokenize_once);
        assert!(parse(&["--sim-pd", "0:1"]).is_err());
        assert!(
            parse(&["--pd", "prefill=http://p:1", "decode=http://d:1", "--replicas", "http://r:1"]).is_err()
        );
    }

    #[test]
    fn discovery_flags() {
        let config = parse(&[
            "--replicas-file",
            "/etc/router/replicas",
            "--discover-dns",
            "vllm.serving.svc:8000",
            "--discover-dns-prefill",
            "vllm-prefill.serving.svc:8000",
            "--discovery-interval",
            "2s",
        ])
        .unwrap()
        .into_config()
        .unwrap();
        assert!(config.discovery.is_on() && config.pd.is_some(), "a prefill name means P/D mode");
        assert_eq!(config.discovery.dns.len(), 2);
        assert_eq!(config.discovery.interval, Duration::from_secs(2));
        let err = parse(&["--pd-discovered", "--replicas", "http://a:1"]).unwrap().into_config().unwrap_err();
        assert!(err.contains("--pd-discovered needs"), "{err}");
        let err = parse(&["--discover-dns", "vllm"]).unwrap().into_config().unwrap_err();
        assert!(err.contains("`vllm` is not NAME:PORT"), "{err}");
        assert!(parse(&["--discover-k8s"]).is_err(), "--discover-k8s needs a selector");
        let config = parse(&["--discover-k8s", "--k8s-selector", "app=vllm", "--k8s-port", "http"])
            .unwrap()
            .into_config()
            .unwrap();
        let k8s = config.discovery.k8s.unwrap();
        assert_eq!((k8s.selector.as_str(), k8s.role_label.as_str()), ("app=vllm", "llm-router/role"));
        assert!(config.pd.is_none());
    }

    #[test]
    fn duplicates_are_dropped() {
        let config = parse(&["--replicas", "http://a:1,http://a:1/"]).unwrap().into_config().unwrap();
        assert_eq!(config.replicas.len(), 1);
    }

    #[test]
    fn bad_values_give_one_line_naming_them() {
        let err = parse(&["--replicas", "http://a:1", "--policy", "fastest"]).unwrap_err();
        let line = one_line_error(&err);
        assert!(line.contains("fastest") && line.contains("consistent-hash"), "{line}");
        let err = parse(&["--replicas", "ftp://a:1"]).unwrap_err();
        let line = one_line_error(&err);
        assert!(line.contains("ftp://a:1"), "{line}");
        let err = parse(&["--replicas", "http://a:1", "--hash-balance-factor", "0.5"]).unwrap_err();
        assert!(one_line_error(&err).contains("0.5"));
    }

    #[test]
    fn hash_options_and_headers() {
        let config = parse(&[
            "--replicas",
            "http://a:1",
            "--policy",
            "consistent-hash",
            "--hash-balance-factor",
            "1.25",
            "--session-header",
            "x-correlation-id",
            "--session-header",
            "x-session-id",
        ])
        .unwrap()
        .into_config()
        .unwrap();
        assert_eq!(config.hash.balance_factor, Some(1.25));
        assert_eq!(config.session_headers, ["x-correlation-id", "x-session-id"]);
    }

    #[test]
    fn prefix_options() {
        let config = parse(&[
            "--replicas",
            "http://a:1",
            "--policy",
            "prefix-aware",
            "--prefix-block-bytes",
            "512",
            "--prefix-min-match",
            "0.5",
            "--prefix-index-ttl",
            "90s",
        ])
        .unwrap()
        .into_config()
        .unwrap();
        assert_eq!(config.policy, PolicyKind::PrefixAware);
        assert_eq!(config.prefix.block_bytes, 512);
        assert_eq!(config.prefix.min_match, 0.5);
        assert_eq!(config.prefix.balance_abs, 4);
        assert_eq!(config.index.ttl, Duration::from_secs(90));
        for bad in
            [["--prefix-min-match", "1.5"], ["--prefix-balance-rel", "0.5"], ["--prefix-block-bytes", "8"]]
        {
            let err = parse(&["--replicas", "http://a:1", bad[0], bad[1]]).unwrap_err();
            assert!(one_line_error(&err).contains(bad[1]), "{}", one_line_error(&err));
        }
    }
}
