//! The router's own Prometheus metrics (`router_` prefix), served on `GET /metrics`.
//!
//! One registry per router instance (tests run several routers in one process). Hot-path
//! users hold pre-resolved children where the label set is known up front (per-replica
//! gauges); the rest resolve labels per request, which costs a hash lookup, no allocation.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};

pub struct Metrics {
    registry: Registry,
    /// Responses sent to clients, by endpoint, replica (`none` when the router answered
    /// itself) and HTTP status.
    pub requests: IntCounterVec,
    /// From request arrival to the end of the response body, by endpoint.
    pub duration: HistogramVec,
    /// From request arrival to the first response body bytes (for a stream, the first SSE
    /// event), by endpoint.
    pub first_event: HistogramVec,
    pub in_flight: IntGaugeVec,
    pub replica_healthy: IntGaugeVec,
    /// 1 while the replica's circuit breaker is open (not half-open).
    pub circuit_open: IntGaugeVec,
    /// 1 while the replica is ejected after a failed stream.
    pub replica_ejected: IntGaugeVec,
    /// Ejections by replica and result: `ejected`, `breaker_opened`, `refused` (the
    /// ejection ceiling was reached).
    pub ejections: IntCounterVec,
    /// Requests routed in panic (too few replicas in rotation: all not down
    /// eligible), by endpoint.
    pub panic_routing: IntCounterVec,
    /// Idle pooled connections to replicas, as of the last reaping.
    pub upstream_idle_connections: prometheus::IntGauge,
    /// Client request fields removed before forwarding, by field
    /// (`kv_transfer_params`).
    pub stripped_fields: IntCounterVec,
    /// Routing decisions by policy, replica and reason.
    pub decisions: IntCounterVec,
    /// Second attempts on another replica, by endpoint.
    pub retries: IntCounterVec,
    /// Streams that broke mid-answer, by endpoint and outcome: `continued` (the rest
    /// came from another replica), `failed` (the continuation failed too), `refused`
    /// (what was sent cannot be carried on, or the attempts or retry budget are spent).
    /// Streams whose request cannot be continued at all (token ids, n > 1, tools, ...)
    /// are known to be so on arrival and not counted here.
    pub continuations: IntCounterVec,
    /// Retries the retry budget refused, by endpoint.
    pub retries_denied: IntCounterVec,
    /// Upstream failures by replica and kind (`connect`, `before_headers`,
    /// `header_timeout`, `status_5xx`, `mid_body`, `idle_timeout`,
    /// `first_byte_timeout`).
    pub upstream_errors: IntCounterVec,
    /// Clients gone before the response ended, by endpoint and stage (`waiting` for
    /// headers, `streaming` the body).
    pub client_disconnects: IntCounterVec,
    /// Clients cut off for accepting none of a response's bytes for
    /// `--client-idle-timeout`, by kind: `connection` (a blocked socket, either
    /// protocol), `stream` (an HTTP/2 stream whose window stayed closed).
    pub client_stalls: IntCounterVec,
    /// HTTP/2 streams the client reset within a second of opening them, before their
    /// response ended.
    pub premature_resets: prometheus::IntCounter,
    /// Client connections sent GOAWAY and closed by the router, by reason
    /// (`premature_resets`).
    pub client_goaways: IntCounterVec,
    /// Client connections open.
    pub client_connections: prometheus::IntGauge,
    /// Request body bytes the router holds, all requests together.
    pub request_bytes_held: prometheus::IntGauge,
    /// Prompts handed to the tokenizer's threads, by outcome: `done`, `busy` (the queue
    /// was full: not tokenised), `abandoned` (the client left while it waited).
    pub tokenizer_jobs: IntCounterVec,
    /// Prompts waiting for a tokenizer thread.
    pub tokenizer_queued: prometheus::IntGauge,
    /// Tokenizer threads at work.
    pub tokenizer_busy: prometheus::IntGauge,
    /// P/D phases: `prefill` (request start to prefill response), `handoff` (prefill
    /// response to decode request), `decode_ttft` (decode request to first byte),
    /// `total` (request start to end of response).
    pub pd_phase: HistogramVec,
    /// P/D requests by the prefill and decode replica that served them.
    pub pd_decisions: IntCounterVec,
    /// Requests sent whole to decode because prefill gave no KV transfer parameters.
    pub pd_fallbacks: IntCounterVec,
    /// Decode requests by tokenize-once mode: `on` (token ids), `off` (disabled),
    /// `unavailable` (no ids from prefill, or a chat feature only the chat endpoint has).
    pub pd_tokenize_once: IntCounterVec,
    /// `--engine-api generate`: inference requests by endpoint and how they were
    /// served: `generate` (tokens in and out of the engine) or `fallback` with the
    /// reason (the engine's OpenAI endpoint, unchanged).
    pub engine_api_requests: IntCounterVec,
    /// Prompt blocks the cache-aware policy remembers per replica (set when scraped).
    pub cache_index_blocks: IntGaugeVec,
    /// KV event batches from each replica, by outcome: `applied`, `replayed` (fetched
    /// from the replay endpoint after a gap), `dropped` (undecodable).
    pub kv_event_batches: IntCounterVec,
    /// Blocks in KV events, by replica and kind: `stored`, `removed`, `orphaned` (a
    /// stored block whose parent was never seen).
    pub kv_event_blocks: IntCounterVec,
    /// Sequence gaps in a replica's KV events.
    pub kv_event_gaps: IntCounterVec,
    /// A replica's KV index forgotten, by reason: `cleared` (AllBlocksCleared),
    /// `restart` (sequence started again), `gap` (missed events not replayed),
    /// `malformed` (an undecodable batch), `block_size` (the engine's block size
    /// changed), `silence` (requests routed, no events), `disconnect`, `oversize`.
    pub kv_index_resets: IntCounterVec,
    /// 1 while the router is subscribed to the replica's KV events.
    pub kv_events_connected: IntGaugeVec,
    /// KV event connections ended by the publisher's fault or loss, by replica and kind:
    /// `oversize` (a frame or message over the bound), `protocol` (not ZMTP as it
    /// should be), `closed` (the connection dropped), `restart` (the feed task itself
    /// failed and was started again).
    pub kv_feed_errors: IntCounterVec,
    /// Prompt tokens of routed requests, and the part the chosen replica was believed
    /// to hold (`kv-aware`): their ratio is the router's expected prefix cache hit rate.
    pub routed_prompt_tokens: IntCounterVec,
    pub routed_cached_tokens: IntCounterVec,
    /// With `--explain-routing`, prompt tokens believed cached on the chosen replica
    /// (`chosen`) and on the best eligible one (`best`), by policy: their difference is
    /// the routing loss.
    pub routing_cached_tokens: IntCounterVec,
    /// Time a request waited for a concurrency slot, by key and priority (0 for those
    /// that found one free).
    pub queue_wait: HistogramVec,
    /// Requests waiting for a concurrency slot now.
    pub queued: prometheus::IntGauge,
    /// Keyed requests answered, by key name and status.
    pub key_requests: IntCounterVec,
    /// Tokens used by each key, from the engines' usage: `prompt`, `completion`,
    /// `cached` (the prompt tokens the engine found in its prefix cache).
    pub key_tokens: IntCounterVec,
    /// Keyed requests refused by a rate limit, by key and limit (`requests`, `tokens`).
    pub key_rate_limited: IntCounterVec,
    /// Files reloaded while running, by file and outcome (`ok`, `error`).
    pub config_reloads: IntCounterVec,
}

/// The `kind` label values of `router_key_tokens_total`.
pub const KEY_TOKEN_KINDS: [&str; 3] = ["prompt", "completion", "cached"];

/// The `endpoint` label values of proxied requests.
pub const ENDPOINTS: [&str; 4] = ["chat_completions", "completions", "other", "prefill"];

/// The `kind` label values of `router_upstream_errors_total`.
pub const UPSTREAM_ERROR_KINDS: [&str; 7] = [
    "connect",
    "before_headers",
    "header_timeout",
    "status_5xx",
    "mid_body",
    "idle_timeout",
    "first_byte_timeout",
];

/// The `outcome` label values of `router_kv_event_batches_total`.
pub const KV_BATCH_OUTCOMES: [&str; 3] = ["applied", "replayed", "dropped"];

/// The `kind` label values of `router_kv_event_blocks_total`.
pub const KV_BLOCK_KINDS: [&str; 3] = ["stored", "removed", "orphaned"];

/// The `reason` label values of `router_kv_index_resets_total`.
pub const KV_INDEX_RESET_REASONS: [&str; 8] =
    ["cleared", "restart", "gap", "malformed", "block_size", "silence", "disconnect", "oversize"];

/// The `kind` label values of `router_kv_feed_errors_total`.
pub const KV_FEED_ERROR_KINDS: [&str; 5] = ["oversize", "protocol", "closed", "connect", "restart"];

/// The `phase` label values of `router_pd_phase_seconds`.
pub const PD_PHASES: [&str; 4] = ["prefill", "handoff", "decode_ttft", "total"];

const LATENCY_BUCKETS: &[f64] =
    &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0];

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry.register(Box::new(c.clone())).expect("unique metric");
            c
        };
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry.register(Box::new(g.clone())).expect("unique metric");
            g
        };
        let histogram = |name: &str, help: &str, labels: &[&str]| {
            let opts = HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec());
            let h = HistogramVec::new(opts, labels).expect("valid metric");
            registry.register(Box::new(h.clone())).expect("unique metric");
            h
        };
        let metrics = Metrics {
            requests: counter(
                "router_requests_total",
                "Responses sent to clients by endpoint, replica and status",
                &["endpoint", "replica", "status"],
            ),
            duration: histogram(
                "router_request_duration_seconds",
                "Time from request arrival to the end of the response body",
                &["endpoint"],
            ),
            first_event: histogram(
                "router_time_to_first_event_seconds",
                "Time from request arrival to the first response body bytes (first SSE event)",
                &["endpoint"],
            ),
            in_flight: gauge("router_in_flight_requests", "Requests in flight per replica", &["replica"]),
            replica_healthy: gauge(
                "router_replica_healthy",
                "1 if the replica receives new requests, 0 if not",
                &["replica"],
            ),
            circuit_open: gauge(
                "router_replica_circuit_open",
                "1 while the replica's circuit breaker is open after repeated failures",
                &["replica"],
            ),
            replica_ejected: gauge(
                "router_replica_ejected",
                "1 while the replica is ejected after a failed stream",
                &["replica"],
            ),
            ejections: counter(
                "router_ejections_total",
                "Replicas taken out for errors, by result (ejected, breaker_opened, refused at the ceiling)",
                &["replica", "result"],
            ),
            panic_routing: counter(
                "router_panic_routing_total",
                "Requests routed with too few replicas in rotation, to every replica not down",
                &["endpoint"],
            ),
            upstream_idle_connections: {
                let g = prometheus::IntGauge::new(
                    "router_upstream_idle_connections",
                    "Idle pooled connections to replicas, as of the last reaping",
                )
                .expect("valid metric");
                registry.register(Box::new(g.clone())).expect("unique metric");
                g
            },
            stripped_fields: counter(
                "router_stripped_fields_total",
                "Client request fields removed before forwarding, by field",
                &["field"],
            ),
            decisions: counter(
                "router_routing_decisions_total",
                "Routing decisions by policy, replica and reason",
                &["policy", "replica", "reason"],
            ),
            retries: counter(
                "router_retries_total",
                "Requests retried on another replica before any response byte was sent",
                &["endpoint"],
            ),
            continuations: counter(
                "router_continuations_total",
                "Streams that broke mid-answer, by outcome (continued on another replica, failed, refused)",
                &["endpoint", "outcome"],
            ),
            retries_denied: counter(
                "router_retries_denied_total",
                "Retries refused because the retry budget was spent",
                &["endpoint"],
            ),
            upstream_errors: counter(
                "router_upstream_errors_total",
                "Upstream failures by replica and kind",
                &["replica", "kind"],
            ),
            client_disconnects: counter(
                "router_client_disconnects_total",
                "Clients that went away before their response ended",
                &["endpoint", "stage"],
            ),
            client_stalls: counter(
                "router_client_stalls_total",
                "Clients cut off for accepting no response bytes for the idle limit (connection, stream)",
                &["kind"],
            ),
            premature_resets: {
                let c = prometheus::IntCounter::new(
                    "router_client_premature_resets_total",
                    "HTTP/2 streams reset by the client within a second, before their response ended",
                )
                .expect("valid metric");
                registry.register(Box::new(c.clone())).expect("unique metric");
                c
            },
            client_goaways: counter(
                "router_client_goaways_total",
                "Client connections sent GOAWAY and closed by the router, by reason",
                &["reason"],
            ),
            client_connections: {
                let g = prometheus::IntGauge::new("router_client_connections", "Client connections open")
                    .expect("valid metric");
                registry.register(Box::new(g.clone())).expect("unique metric");
                g
            },
            request_bytes_held: {
                let g = prometheus::IntGauge::new(
                    "router_request_bytes_held",
                    "Request body bytes held by the router, all requests together",
                )
                .expect("valid metric");
                registry.register(Box::new(g.clone())).expect("unique metric");
                g
            },
            tokenizer_jobs: counter(
                "router_tokenizer_jobs_total",
                "Prompts handed to the tokenizer threads, by outcome (done, busy, abandoned)",
                &["outcome"],
            ),
            tokenizer_queued: {
                let g = prometheus::IntGauge::new(
                    "router_tokenizer_queued",
                    "Prompts waiting for a tokenizer thread",
                )
                .expect("valid metric");
                registry.register(Box::new(g.clone())).expect("unique metric");
                g
            },
            tokenizer_busy: {
                let g =
                    prometheus::IntGauge::new("router_tokenizer_busy_threads", "Tokenizer threads at work")
                        .expect("valid metric");
                registry.register(Box::new(g.clone())).expect("unique metric");
                g
            },
            pd_phase: histogram(
                "router_pd_phase_seconds",
                "Prefill/decode phases: prefill, handoff, decode_ttft, total",
                &["phase"],
            ),
            pd_decisions: counter(
                "router_pd_decisions_total",
                "P/D requests by prefill and decode replica",
                &["prefill", "decode"],
            ),
            pd_fallbacks: counter(
                "router_pd_fallbacks_total",
                "P/D requests sent whole to decode, by prefill replica and reason",
                &["prefill", "reason"],
            ),
            pd_tokenize_once: counter(
                "router_pd_tokenize_once_total",
                "P/D decode requests by tokenize-once mode (on, off, unavailable)",
                &["mode"],
            ),
            engine_api_requests: counter(
                "router_engine_api_requests_total",
                "Inference requests in --engine-api generate mode, by endpoint, path (generate, fallback) and fallback reason",
                &["endpoint", "path", "reason"],
            ),
            cache_index_blocks: gauge(
                "router_cache_index_blocks",
                "Prompt blocks the cache-aware policy believes each replica holds",
                &["replica"],
            ),
            kv_event_batches: counter(
                "router_kv_event_batches_total",
                "KV event batches received per replica by outcome (applied, replayed, dropped)",
                &["replica", "outcome"],
            ),
            kv_event_blocks: counter(
                "router_kv_event_blocks_total",
                "Blocks in KV events per replica by kind (stored, removed, orphaned)",
                &["replica", "kind"],
            ),
            kv_event_gaps: counter(
                "router_kv_event_gaps_total",
                "Sequence gaps in a replica's KV events",
                &["replica"],
            ),
            kv_index_resets: counter(
                "router_kv_index_resets_total",
                "A replica's KV index forgotten, by reason",
                &["replica", "reason"],
            ),
            kv_events_connected: gauge(
                "router_kv_events_connected",
                "1 while subscribed to the replica's KV events",
                &["replica"],
            ),
            kv_feed_errors: counter(
                "router_kv_feed_errors_total",
                "KV event connections ended, by replica and kind (oversize, protocol, closed, restart)",
                &["replica", "kind"],
            ),
            routed_prompt_tokens: counter(
                "router_routed_prompt_tokens_total",
                "Prompt tokens of requests served after routing by a token-aware policy",
                &["policy"],
            ),
            routed_cached_tokens: counter(
                "router_routed_cached_tokens_total",
                "Prompt tokens the serving replica was believed to hold and reuse from its prefix cache",
                &["policy"],
            ),
            routing_cached_tokens: counter(
                "router_routing_cached_tokens_total",
                "Prompt tokens believed cached on the chosen replica and on the best one (--explain-routing)",
                &["policy", "kind"],
            ),
            queue_wait: histogram(
                "router_queue_wait_seconds",
                "Time a request waited for a concurrency slot, by API key and priority",
                &["key", "priority"],
            ),
            queued: {
                let g = prometheus::IntGauge::new(
                    "router_queued_requests",
                    "Requests waiting for a concurrency slot",
                )
                .expect("valid metric");
                registry.register(Box::new(g.clone())).expect("unique metric");
                g
            },
            key_requests: counter(
                "router_key_requests_total",
                "Requests answered per API key, by status",
                &["key", "status"],
            ),
            key_tokens: counter(
                "router_key_tokens_total",
                "Tokens used per API key, from the engines' usage (prompt, completion, cached)",
                &["key", "kind"],
            ),
            key_rate_limited: counter(
                "router_key_rate_limited_total",
                "Requests refused by a key's rate limit (requests, tokens)",
                &["key", "limit"],
            ),
            config_reloads: counter(
                "router_config_reloads_total",
                "Files reloaded while running, by file and outcome",
                &["file", "outcome"],
            ),
            registry,
        };
        // Series that exist from the start read 0 rather than missing, so rate() and
        // alerts work before the first failure.
        for endpoint in ENDPOINTS {
            metrics.duration.with_label_values(&[endpoint]);
            metrics.first_event.with_label_values(&[endpoint]);
            metrics.retries.with_label_values(&[endpoint]);
            metrics.panic_routing.with_label_values(&[endpoint]);
            metrics.retries_denied.with_label_values(&[endpoint]);
            for outcome in ["continued", "failed", "refused"] {
                metrics.continuations.with_label_values(&[endpoint, outcome]);
            }
            for stage in ["waiting", "streaming"] {
                metrics.client_disconnects.with_label_values(&[endpoint, stage]);
            }
        }
        metrics.stripped_fields.with_label_values(&["kv_transfer_params"]);
        for kind in ["connection", "stream"] {
            metrics.client_stalls.with_label_values(&[kind]);
        }
        metrics.client_goaways.with_label_values(&["premature_resets"]);
        for outcome in ["done", "busy", "abandoned"] {
            metrics.tokenizer_jobs.with_label_values(&[outcome]);
        }
        metrics
    }

    /// Create an API key's series at 0.
    pub fn add_key(&self, key: &str, priority: &str) {
        for kind in KEY_TOKEN_KINDS {
            self.key_tokens.with_label_values(&[key, kind]);
        }
        for limit in ["requests", "tokens"] {
            self.key_rate_limited.with_label_values(&[key, limit]);
        }
        self.queue_wait.with_label_values(&[key, priority]);
    }

    /// Create a replica's per-replica series at 0.
    pub fn add_replica(&self, replica: &str) {
        for kind in UPSTREAM_ERROR_KINDS {
            self.upstream_errors.with_label_values(&[replica, kind]);
        }
        for result in ["ejected", "breaker_opened", "refused"] {
            self.ejections.with_label_values(&[replica, result]);
        }
        for endpoint in ENDPOINTS {
            self.requests.with_label_values(&[endpoint, replica, "200"]);
        }
    }

    /// Create the series of a replica routed by `policy` at 0: its decisions for every
    /// reason, and the token counts of a token-aware policy.
    pub fn add_routed_replica(&self, policy: &str, replica: &str, counts_tokens: bool) {
        for reason in crate::policy::Reason::ALL {
            self.decisions.with_label_values(&[policy, replica, reason.as_str()]);
        }
        if counts_tokens {
            self.routed_prompt_tokens.with_label_values(&[policy]);
            self.routed_cached_tokens.with_label_values(&[policy]);
            for kind in ["chosen", "best"] {
                self.routing_cached_tokens.with_label_values(&[policy, kind]);
            }
        }
    }

    /// Create a replica's KV events series at 0, when its feed starts.
    pub fn add_kv_feed(&self, replica: &str) {
        self.kv_events_connected.with_label_values(&[replica]);
        self.kv_event_gaps.with_label_values(&[replica]);
        for outcome in KV_BATCH_OUTCOMES {
            self.kv_event_batches.with_label_values(&[replica, outcome]);
        }
        for kind in KV_BLOCK_KINDS {
            self.kv_event_blocks.with_label_values(&[replica, kind]);
        }
        for reason in KV_INDEX_RESET_REASONS {
            self.kv_index_resets.with_label_values(&[replica, reason]);
        }
        for kind in KV_FEED_ERROR_KINDS {
            self.kv_feed_errors.with_label_values(&[replica, kind]);
        }
    }

    /// Create the P/D series at 0 for the stages' replicas known at start.
    pub fn add_pd(&self, prefill: &[&str], decode: &[&str]) {
        for phase in PD_PHASES {
            self.pd_phase.with_label_values(&[phase]);
        }
        for mode in ["on", "off", "unavailable"] {
            self.pd_tokenize_once.with_label_values(&[mode]);
        }
        for p in prefill {
            self.pd_fallbacks.with_label_values(&[p, "no_kv_transfer_params"]);
            for d in decode {
                self.pd_decisions.with_label_values(&[p, d]);
            }
        }
    }

    /// Drop a removed replica's gauges (its counters stay: they are history).
    pub fn remove_replica(&self, replica: &str) {
        for gauge in [
            &self.in_flight,
            &self.replica_healthy,
            &self.circuit_open,
            &self.replica_ejected,
            &self.cache_index_blocks,
            &self.kv_events_connected,
        ] {
            let _ = gauge.remove_label_values(&[replica]);
        }
    }

    /// The Prometheus text exposition of every family.
    /// Register a subsystem's own metrics (made only when it runs) in this registry.
    pub fn register(&self, collector: Box<dyn prometheus::core::Collector>) {
        self.registry.register(collector).expect("unique metric");
    }

    pub fn render(&self) -> String {
        let mut out = Vec::with_capacity(16 * 1024);
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding to a Vec cannot fail");
        String::from_utf8(out).expect("prometheus text is UTF-8")
    }
}

/// The exposition `text` without the samples of other API keys than `key` (samples
/// with a `key` label of another value; those without the label stay).
pub fn only_key(text: &str, key: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        if line.starts_with('#') || label(line, "key").is_none_or(|value| value == key) {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// The value of label `name` in a sample line (escapes left as written).
fn label<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let open = line.find('{')?;
    let mut rest = &line[open + 1..];
    loop {
        let (label, after) = rest.split_once("=\"")?;
        // The value ends at the first quote not escaped.
        let mut end = 0;
        let bytes = after.as_bytes();
        while end < bytes.len() && bytes[end] != b'"' {
            end += if bytes[end] == b'\\' { 2 } else { 1 };
        }
        let value = after.get(..end)?;
        if label.trim_start_matches(',') == name {
            return Some(value);
        }
        rest = after.get(end + 1..)?;
        if rest.starts_with('}') {
            return None;
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_sees_its_own_series_and_no_other_keys() {
        let text = "# HELP router_key_requests_total x\n\
            router_key_requests_total{key=\"a\",status=\"200\"} 3\n\
            router_key_requests_total{key=\"b\",status=\"200\"} 4\n\
            router_queue_wait_seconds_bucket{key=\"a\\\"b\",priority=\"normal\",le=\"0.1\"} 1\n\
            router_queue_wait_seconds_bucket{key=\"anonymous\",priority=\"normal\",le=\"0.1\"} 1\n\
            router_requests_total{endpoint=\"x\",replica=\"r\",status=\"200\"} 9\n\
            router_keyless_total 2\n";
        let seen = only_key(text, "a");
        assert!(seen.contains("key=\"a\",status"));
        assert!(!seen.contains("key=\"b\"") && !seen.contains("anonymous") && !seen.contains("a\\\"b"));
        assert!(seen.contains("router_requests_total") && seen.contains("router_keyless_total 2"));
        assert!(seen.contains("# HELP"));
        assert_eq!(label("m{priority=\"x\",key=\"k\"} 1", "key"), Some("k"));
        assert_eq!(label("m{monkey=\"k\"} 1", "key"), None);
        assert_eq!(label("m 1", "key"), None);
    }
}
