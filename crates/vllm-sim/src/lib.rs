//! `vllm-sim`: a vLLM engine simulator that behaves like vLLM's OpenAI server on the wire
//! and, through a continuous-batching model with a timing profile, in time.
//!
//! No machine here can run vLLM, so every router test and benchmark talks to this
//! instead. The pieces, one file each:
//! [`server`] (HTTP endpoints, fault switches, request log) ->
//! [`request`] (vLLM's validation) -> [`api_server`] (the API-server process's queue:
//! intake) -> [`engine`] (scheduler loop: chunked prefill, [`kv_cache`] blocks and prefix
//! cache, preemption, P/D handoffs via [`pd`]) timed by a [`profile`] -> [`api_server`]
//! again (each step's outputs) -> [`responses`] (vLLM's JSON and SSE shapes). Text is tokenised for real
//! ([`tokenizer`], o200k_base) and generation is deterministic ([`sampler`]).
//!
//! It runs as the `vllm-sim` binary or in-process ([`start`]), which is how
//! `router --sim N` and the tests use it.

pub mod api_server;
pub mod engine;
pub mod events;
pub mod faults;
pub mod generate;
pub mod kv_cache;
pub mod kv_events;
pub mod metrics;
pub mod pd;
pub mod profile;
pub mod request;
pub mod request_log;
pub mod responses;
pub mod sampler;
pub mod server;
pub use llm_common::tokenizer;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};
use tokio::task::JoinHandle;

use api_server::ApiServer;
use engine::{Engine, EngineConfig};
use faults::{FaultConfig, Faults};
use metrics::SimMetrics;
use profile::Profile;
use server::SimState;

/// Which side of prefill/decode disaggregation this replica plays (vLLM's `kv_role`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Role {
    Prefill,
    Decode,
    Both,
}

/// The simulator's command line (also used, with defaults, by `router --sim`).
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "vllm-sim",
    version,
    about = "A vLLM OpenAI-server simulator: vLLM's API and timing, no GPU"
)]
pub struct SimArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: std::net::IpAddr,
    /// Port to listen on (0 picks a free one).
    #[arg(long, default_value_t = 8100)]
    pub port: u16,
    /// Timing profile (model on GPU, with the engine settings it was calibrated with).
    #[arg(long, default_value = "qwen3-0.6b-fp8-h100", value_parser = parse_profile)]
    pub profile: Profile,
    /// Change one of the profile's constants (repeatable), e.g. `base=2ms`,
    /// `api.per_request=10ms`, `hbm_bytes_per_sec=2e12`.
    #[arg(long = "profile-set", value_name = "NAME=VALUE")]
    pub profile_set: Vec<String>,
    /// The API server tokenises with vLLM 0.22's fastokens backend (`VLLM_USE_FASTOKENS=1`,
    /// ~25x faster than HF's tokenizer; the study set it for its agentic runs).
    #[arg(long)]
    pub fastokens: bool,
    /// No API-server costs: requests reach the engine and tokens leave it at once.
    #[arg(long)]
    pub no_api_server_costs: bool,
    /// Model name served (default: the profile's model).
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// Context length limit (default: the profile's).
    #[arg(long)]
    pub max_model_len: Option<usize>,
    /// Most sequences in one batch (default: the profile's).
    #[arg(long)]
    pub max_num_seqs: Option<usize>,
    /// Most tokens computed in one step, chunked prefill (default: the profile's).
    #[arg(long)]
    pub max_num_batched_tokens: Option<usize>,
    /// KV cache blocks of 16 tokens (default: the profile's GPU capacity).
    #[arg(long)]
    pub num_gpu_blocks: Option<usize>,
    /// Run this many times faster than real time.
    #[arg(long, default_value_t = 1.0)]
    pub time_scale: f64,
    /// P/D role.
    #[arg(long, value_enum, default_value_t = Role::Both)]
    pub role: Role,
    /// KV transfer bandwidth for P/D handoffs, bytes per second (default: the profile's).
    #[arg(long)]
    pub kv_bandwidth: Option<f64>,
    /// Requests kept for `GET /sim/requests`.
    #[arg(long, default_value_t = 256)]
    pub request_log_size: usize,
    /// Fault to inject from the start (repeatable): fail-500, refuse-connections=MS,
    /// stall-after=K, drop-after=K, slowdown=F.
    #[arg(long = "fault", value_name = "FAULT")]
    pub faults: Vec<String>,
    /// Publish KV cache events on a ZMQ PUB socket on this port, as vLLM does with
    /// `--kv-events-config '{"enable_kv_cache_events": true, "publisher": "zmq"}'`
    /// (0 picks a free port). Off when not given.
    #[arg(long)]
    pub kv_events_port: Option<u16>,
    /// Topic of the KV events messages (vLLM's default is empty).
    #[arg(long, default_value = "")]
    pub kv_events_topic: String,
    /// Serve vLLM's scale-out endpoints (`POST /inference/v1/generate`: token ids in,
    /// token ids out); without it they answer 403, as vLLM's do.
    #[arg(long)]
    pub enable_scale_out: bool,
}

fn parse_profile(name: &str) -> Result<Profile, String> {
    Profile::by_name(name)
        .ok_or_else(|| format!("unknown profile `{name}` (known: {})", Profile::names().join(", ")))
}

/// The resolved configuration of one simulated replica.
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub listen: SocketAddr,
    pub profile: Profile,
    pub served_model_name: String,
    pub max_model_len: usize,
    pub max_num_seqs: usize,
    pub max_num_batched_tokens: usize,
    pub num_gpu_blocks: usize,
    pub time_scale: f64,
    pub role: Role,
    pub kv_bandwidth: f64,
    pub request_log_size: usize,
    pub faults: FaultConfig,
    /// KV events publisher, when on.
    pub kv_events: Option<kv_events::PublisherConfig>,
    /// `--enable-scale-out`: serve `/inference/v1/generate`.
    pub enable_scale_out: bool,
}

/// How much faster vLLM 0.22's fastokens backend tokenises than HF's tokenizer, as the
/// study's `bench/run_agentic_8x.sh` states it ("~25x faster").
pub const FASTOKENS_SPEEDUP: u32 = 25;

impl SimArgs {
    pub fn into_config(self) -> Result<SimConfig, String> {
        let mut faults = FaultConfig::default();
        for f in &self.faults {
            faults::parse_fault(f, &mut faults)?;
        }
        if !(self.time_scale.is_finite() && self.time_scale > 0.0) {
            return Err(format!("--time-scale must be positive, got {}", self.time_scale));
        }
        if self.max_num_seqs == Some(0) || self.max_num_batched_tokens == Some(0) {
            return Err("--max-num-seqs and --max-num-batched-tokens must be at least 1".into());
        }
        let mut p = self.profile;
        for assignment in &self.profile_set {
            p.set(assignment).map_err(|e| format!("--profile-set {e}"))?;
        }
        if self.fastokens {
            p.api.per_prompt_token /= FASTOKENS_SPEEDUP;
        }
        if self.no_api_server_costs {
            p.api = profile::ApiCosts::NONE;
        }
        let kv_bandwidth = self.kv_bandwidth.unwrap_or(p.kv_transfer_bytes_per_sec);
        if !(kv_bandwidth.is_finite() && kv_bandwidth > 0.0) {
            return Err(format!("--kv-bandwidth must be positive, got {kv_bandwidth}"));
        }
        Ok(SimConfig {
            listen: SocketAddr::new(self.host, self.port),
            served_model_name: self.served_model_name.unwrap_or_else(|| p.model.to_owned()),
            max_model_len: self.max_model_len.unwrap_or(p.max_model_len),
            num_gpu_blocks: self.num_gpu_blocks.unwrap_or(p.num_gpu_blocks),
            max_num_seqs: self.max_num_seqs.unwrap_or(p.max_num_seqs),
            max_num_batched_tokens: self.max_num_batched_tokens.unwrap_or(p.max_num_batched_tokens),
            profile: p,
            time_scale: self.time_scale,
            role: self.role,
            kv_bandwidth,
            request_log_size: self.request_log_size,
            faults,
            kv_events: self
                .kv_events_port
                .map(|port| kv_events::PublisherConfig { port, topic: self.kv_events_topic }),
            enable_scale_out: self.enable_scale_out,
        })
    }
}

impl Default for SimConfig {
    /// The defaults of `vllm-sim`, on an ephemeral loopback port.
    fn default() -> Self {
        let args = <SimArgs as clap::Parser>::parse_from(["vllm-sim", "--port", "0"]);
        args.into_config().expect("defaults are valid")
    }
}

/// The simulator's errors, in vLLM's error shape.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("{0}")]
    BadRequest(String),
    /// A bad value of one request parameter, named in the body's `param` as vLLM does.
    #[error("{message}")]
    Parameter { message: String, param: &'static str },
    /// vLLM 0.32's answer for a model it does not serve: it names the ones it does.
    #[error("The model `{model}` does not exist. Valid aliases: {served}.")]
    ModelNotFound { model: String, served: String },
    #[error("route {0} not found")]
    NotFound(String),
    #[error("{0}")]
    Internal(String),
    /// An endpoint the server has but was not started with (vLLM's scale-out routes
    /// without `--enable-scale-out`).
    #[error("{0}")]
    Forbidden(&'static str),
}

impl SimError {
    pub fn status(&self) -> StatusCode {
        match self {
            SimError::BadRequest(_) | SimError::Parameter { .. } => StatusCode::BAD_REQUEST,
            SimError::ModelNotFound { .. } | SimError::NotFound(_) => StatusCode::NOT_FOUND,
            SimError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            SimError::Forbidden(_) => StatusCode::FORBIDDEN,
        }
    }
}

impl IntoResponse for SimError {
    fn into_response(self) -> Response {
        let (kind, param) = match &self {
            SimError::BadRequest(_) => ("BadRequestError", None),
            SimError::Parameter { param, .. } => ("BadRequestError", Some(*param)),
            SimError::ModelNotFound { .. } => ("NotFoundError", Some("model")),
            SimError::NotFound(_) => ("NotFoundError", None),
            SimError::Internal(_) => ("InternalServerError", None),
            SimError::Forbidden(_) => ("PermissionDeniedError", None),
        };
        let status = self.status();
        let body = serde_json::json!({"error": {"message": self.to_string(), "type": kind, "param": param,
            "code": status.as_u16()}});
        let mut response = (status, body.to_string()).into_response();
        response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        response
    }
}

/// A simulated replica serving on `addr` until dropped or shut down.
pub struct RunningSim {
    pub addr: SocketAddr,
    pub state: Arc<SimState>,
    /// The port KV events are published on, when on.
    pub kv_events_port: Option<u16>,
    server: JoinHandle<()>,
    killed: tokio::sync::watch::Sender<bool>,
}

impl RunningSim {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn metrics(&self) -> &SimMetrics {
        &self.state.metrics
    }

    pub fn faults(&self) -> &Faults {
        &self.state.faults
    }

    /// Stop like a crashed process: the listener closes and every open connection is
    /// cut mid-response.
    pub fn shutdown(&self) {
        self.killed.send_replace(true);
        self.server.abort();
    }
}

impl Drop for RunningSim {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Start a simulated replica in this process.
pub async fn start(config: SimConfig) -> std::io::Result<RunningSim> {
    tokenizer::warm_up();
    let listener = server::bind(config.listen)?;
    let addr = listener.local_addr()?;
    let metrics = Arc::new(SimMetrics::new(&config.served_model_name));
    let faults = Arc::new(Faults::new(config.faults.clone()));
    let api = ApiServer::start(config.profile.api, config.time_scale, faults.clone());
    let publisher = match &config.kv_events {
        Some(events) => Some(kv_events::start(addr.ip(), events).await?),
        None => None,
    };
    let kv_events_port = publisher.as_ref().map(|p| p.port);
    let engine = Engine::start(
        EngineConfig {
            profile: config.profile.clone(),
            max_num_seqs: config.max_num_seqs,
            max_num_batched_tokens: config.max_num_batched_tokens,
            num_gpu_blocks: config.num_gpu_blocks,
            time_scale: config.time_scale,
            kv_events: publisher.map(|p| p.events),
        },
        metrics.clone(),
        faults.clone(),
        api.clone(),
    );
    let state = Arc::new(SimState::new(config, engine, api, metrics, faults.clone(), addr));
    let app = server::routes(state.clone());
    let (killed, on_kill) = tokio::sync::watch::channel(false);
    let server = tokio::spawn(server::accept_loop(listener, app, faults, on_kill));
    Ok(RunningSim { addr, state, kv_events_port, server, killed })
}

/// Start `n` simulated replicas with the same configuration, each on its own port.
pub async fn start_fleet(n: usize, config: &SimConfig) -> std::io::Result<Vec<RunningSim>> {
    let mut fleet = Vec::with_capacity(n);
    for _ in 0..n {
        fleet.push(start(config.clone()).await?);
    }
    Ok(fleet)
}
