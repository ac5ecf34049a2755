//! Serving flags: where the router listens, what it reads from clients and how long it
//! waits for them, what it forwards, and how it shuts down.

use std::net::SocketAddr;
use std::time::Duration;

use super::values::parse_positive_duration;

#[derive(Debug, clap::Args)]
#[command(next_help_heading = "Serving")]
pub struct ServingArgs {
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0")]
    pub host: std::net::IpAddr,

    /// Port to listen on (0 picks a free one).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,

    /// Largest request body accepted, in bytes; larger ones get 413.
    #[arg(long, default_value_t = 32 * 1024 * 1024)]
    pub max_body_bytes: usize,

    /// Most request body bytes held at once, all requests together (each request's for as
    /// long as its response lasts); a body that would pass it gets 503 and Retry-After.
    #[arg(long, default_value_t = 1 << 30, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_buffered_request_bytes: u64,

    /// Time a client has to send its request headers; slower connections are closed.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub header_read_timeout: Duration,

    /// Time a client has to send its whole request body; slower uploads get 408.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub body_read_timeout: Duration,

    /// Longest a client may accept no bytes of a response it is being sent (a full
    /// socket): then its connection is closed, its upstream request cancelled and its
    /// slot freed (HAProxy's `timeout client`).
    #[arg(long, default_value = "60s", value_parser = parse_positive_duration)]
    pub client_idle_timeout: Duration,

    /// Close a client connection that has had no request in flight for this long
    /// (HTTP/1.1 between requests, HTTP/2 with no open stream, or one that never sent a
    /// request). A long answer keeps its connection however quiet it is.
    #[arg(long, default_value = "60s", value_parser = parse_positive_duration)]
    pub client_keep_alive_timeout: Duration,

    /// Most client connections open at once; beyond it the router stops accepting until
    /// one closes (new ones wait in the listen backlog), so descriptors and memory stay
    /// bounded whatever clients do.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_client_connections: u32,

    /// Forward this path too (repeatable; a trailing `*` matches any rest), besides chat,
    /// completions and vLLM's other OpenAI endpoints (embeddings, responses, audio,
    /// score, rerank, classify, tokenize, detokenize). Anything else under /v1/ gets 404:
    /// vLLM's administrative calls (LoRA loading...) are not for the router's clients.
    #[arg(long = "forward-path", value_name = "PATH", value_parser = parse_forward_path)]
    pub forward_paths: Vec<String>,

    /// Forward the client's Authorization header to replicas (default: dropped, as it
    /// carries the router's key, not the replicas').
    #[arg(long)]
    pub forward_authorization: bool,

    /// How the router talks to the engines: `openai` passes chat and completions requests
    /// through to the engines' OpenAI endpoints; `generate` renders the chat template,
    /// tokenises and detokenises in the router and sends token ids to vLLM's
    /// `/inference/v1/generate` (engines started with `--enable-scale-out`; needs
    /// `--tokenizer`, `builtin` with `--sim`). Requests it cannot serve identically
    /// (tools, structured output, logprobs, n > 1, ...) go to the OpenAI endpoint.
    #[arg(long, value_enum, default_value_t = crate::frontend::EngineApi::Openai)]
    pub engine_api: crate::frontend::EngineApi,

    /// Pass a client's `kv_transfer_params` on to the engines (by default they are
    /// removed: they tell an engine to pull KV blocks from a host and port the client
    /// names; only the router's P/D stages set them).
    #[arg(long)]
    pub trust_client_kv_params: bool,

    /// Threads serving requests (default: one per CPU core).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub worker_threads: Option<u16>,

    /// On SIGTERM/SIGINT, time in-flight requests get to finish before the router exits.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,

    /// On SIGTERM/SIGINT, time the router keeps serving, with /health answering 503
    /// `draining`, before it stops accepting and drains: long enough for a load balancer
    /// (a Kubernetes Service's endpoints) to stop sending it new connections.
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    pub shutdown_delay: Duration,

    /// Serve TLS with this certificate chain (PEM), with --tls-key. ALPN offers h2 and
    /// http/1.1; the files are read again when they change or on SIGHUP.
    #[arg(long, value_name = "PATH", requires = "tls_key")]
    pub tls_cert: Option<std::path::PathBuf>,

    /// The private key (PEM: PKCS#8, PKCS#1 or SEC1) of --tls-cert.
    #[arg(long, value_name = "PATH", requires = "tls_cert")]
    pub tls_key: Option<std::path::PathBuf>,

    /// TLS for the admin listener (--admin-listen), with --admin-tls-key.
    #[arg(long, value_name = "PATH", requires_all = ["admin_tls_key", "admin_listen"])]
    pub admin_tls_cert: Option<std::path::PathBuf>,

    /// The private key of --admin-tls-cert.
    #[arg(long, value_name = "PATH", requires = "admin_tls_cert")]
    pub admin_tls_key: Option<std::path::PathBuf>,
}

impl ServingArgs {
    pub fn listen(&self) -> SocketAddr {
        SocketAddr::new(self.host, self.port)
    }

    /// The `/v1/` paths forwarded: vLLM's OpenAI endpoints, then `--forward-path`'s.
    /// The serving listener's certificate and key, when it serves TLS.
    pub fn tls(&self) -> Option<crate::ingress::tls::TlsFiles> {
        let (cert, key) = (self.tls_cert.clone()?, self.tls_key.clone()?);
        Some(crate::ingress::tls::TlsFiles { cert, key })
    }

    /// The admin listener's.
    pub fn admin_tls(&self) -> Option<crate::ingress::tls::TlsFiles> {
        let (cert, key) = (self.admin_tls_cert.clone()?, self.admin_tls_key.clone()?);
        Some(crate::ingress::tls::TlsFiles { cert, key })
    }

    pub fn forward_paths(&self) -> Vec<String> {
        crate::ingress::FORWARDED_BY_DEFAULT
            .iter()
            .map(|p| p.to_string())
            .chain(self.forward_paths.iter().cloned())
            .collect()
    }
}

fn parse_forward_path(text: &str) -> Result<String, String> {
    let path = text.strip_suffix('*').unwrap_or(text);
    if !path.starts_with("/v1/") || path.contains("..") || path.contains('*') {
        return Err(format!("`{text}` is not a /v1/ path (a trailing * matches any rest)"));
    }
    Ok(text.to_owned())
}
