//! The simulator's Prometheus metrics: vLLM's own names (so dashboards and load-aware
//! routers read a simulated replica like a real one), plus `sim_` counters that let
//! tests see what happened inside.

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

pub struct SimMetrics {
    registry: Registry,
    pub running: IntGauge,
    pub waiting: IntGauge,
    pub kv_usage: Gauge,
    pub prefix_queries: IntCounter,
    pub prefix_hits: IntCounter,
    pub preemptions: IntCounter,
    pub prompt_tokens: IntCounter,
    pub generation_tokens: IntCounter,
    pub request_success: IntCounterVec,
    pub ttft: Histogram,
    pub itl: Histogram,
    pub e2e: Histogram,
    pub queue_time: Histogram,
    pub prompts_from_text: IntCounter,
    pub prompts_from_ids: IntCounter,
    pub aborted: IntCounter,
    pub pd_accepted: IntCounter,
    pub pd_rejected: IntCounter,
    pub pd_prefills: IntCounter,
    pub faults: IntCounterVec,
}

const LATENCY: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
    80.0,
];

impl SimMetrics {
    pub fn new(model: &str) -> Self {
        let registry = Registry::new();
        let labels = prometheus::labels! { "model_name".to_owned() => model.to_owned(), "engine".to_owned() => "0".to_owned() };
        let opts = |name: &str, help: &str| Opts::new(name, help).const_labels(labels.clone());
        macro_rules! register {
            ($metric:expr) => {{
                let m = $metric;
                registry.register(Box::new(m.clone())).expect("unique metric");
                m
            }};
        }
        let hist = |name: &str, help: &str| {
            Histogram::with_opts(
                HistogramOpts::new(name, help).const_labels(labels.clone()).buckets(LATENCY.to_vec()),
            )
            .expect("valid histogram")
        };
        let sim = |name: &str, help: &str| Opts::new(name, help);
        SimMetrics {
            running: register!(
                IntGauge::with_opts(opts(
                    "vllm:num_requests_running",
                    "Requests in model execution batches."
                ))
                .unwrap()
            ),
            waiting: register!(
                IntGauge::with_opts(opts("vllm:num_requests_waiting", "Requests waiting to be processed."))
                    .unwrap()
            ),
            kv_usage: register!(
                Gauge::with_opts(opts(
                    "vllm:kv_cache_usage_perc",
                    "KV-cache usage. 1 means 100 percent usage."
                ))
                .unwrap()
            ),
            prefix_queries: register!(
                IntCounter::with_opts(opts(
                    "vllm:prefix_cache_queries_total",
                    "Prefix cache queries, in terms of number of queried tokens."
                ))
                .unwrap()
            ),
            prefix_hits: register!(
                IntCounter::with_opts(opts(
                    "vllm:prefix_cache_hits_total",
                    "Prefix cache hits, in terms of number of cached tokens."
                ))
                .unwrap()
            ),
            preemptions: register!(
                IntCounter::with_opts(opts(
                    "vllm:num_preemptions_total",
                    "Cumulative number of preemption from the engine."
                ))
                .unwrap()
            ),
            prompt_tokens: register!(
                IntCounter::with_opts(opts(
                    "vllm:prompt_tokens_total",
                    "Number of prefill tokens processed."
                ))
                .unwrap()
            ),
            generation_tokens: register!(
                IntCounter::with_opts(opts(
                    "vllm:generation_tokens_total",
                    "Number of generation tokens processed."
                ))
                .unwrap()
            ),
            request_success: register!(
                IntCounterVec::new(
                    opts("vllm:request_success_total", "Count of successfully processed requests."),
                    &["finished_reason"]
                )
                .unwrap()
            ),
            ttft: register!(hist(
                "vllm:time_to_first_token_seconds",
                "Histogram of time to first token in seconds."
            )),
            itl: register!(hist(
                "vllm:inter_token_latency_seconds",
                "Histogram of inter-token latency in seconds."
            )),
            e2e: register!(hist(
                "vllm:e2e_request_latency_seconds",
                "Histogram of e2e request latency in seconds."
            )),
            queue_time: register!(hist(
                "vllm:request_queue_time_seconds",
                "Histogram of time spent in WAITING phase for request."
            )),
            prompts_from_text: register!(
                IntCounter::with_opts(sim(
                    "sim_prompts_tokenized_total",
                    "Prompts the simulator tokenised from text."
                ))
                .unwrap()
            ),
            prompts_from_ids: register!(
                IntCounter::with_opts(sim("sim_prompts_token_ids_total", "Prompts received as token ids."))
                    .unwrap()
            ),
            aborted: register!(
                IntCounter::with_opts(sim(
                    "sim_requests_aborted_total",
                    "Requests aborted because the client went away."
                ))
                .unwrap()
            ),
            pd_accepted: register!(
                IntCounter::with_opts(sim(
                    "sim_pd_handoffs_accepted_total",
                    "Decode requests whose kv_transfer_params were valid: prefill skipped."
                ))
                .unwrap()
            ),
            pd_rejected: register!(
                IntCounter::with_opts(sim(
                    "sim_pd_handoffs_rejected_total",
                    "Decode requests without valid kv_transfer_params: full local prefill."
                ))
                .unwrap()
            ),
            pd_prefills: register!(
                IntCounter::with_opts(sim(
                    "sim_pd_prefills_total",
                    "Prefill-only requests (do_remote_decode) served."
                ))
                .unwrap()
            ),
            faults: register!(
                IntCounterVec::new(
                    sim("sim_faults_injected_total", "Requests affected by an injected fault."),
                    &["fault"]
                )
                .unwrap()
            ),
            registry,
        }
    }

    pub fn render(&self) -> String {
        let mut out = Vec::with_capacity(16 * 1024);
        TextEncoder::new().encode(&self.registry.gather(), &mut out).expect("encode to Vec");
        String::from_utf8(out).expect("prometheus text is UTF-8")
    }
}
