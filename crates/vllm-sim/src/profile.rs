//! Timing profiles: how long one engine step takes on a given model and GPU, what the
//! replica's API-server process costs, and the engine settings it was measured with.
//!
//! vLLM runs one forward pass per step over every scheduled sequence: prefill chunks and
//! one token for each decoding sequence. We model a step's duration as
//!
//! ```text
//! step = base + per_seq * seqs
//!      + mixed_step (if the step carries a prefill chunk)
//!      + prefill_tokens * prefill_per_token
//!      + prefill_token_pairs * attention_per_token_pair
//!      + kv_bytes_read(decode contexts) / hbm_bandwidth
//! ```
//!
//! `base` and `per_seq` are the fixed costs of a step (kernel launches, sampling, the
//! scheduler and output handling), which dominate for small models; a step that carries
//! a prefill chunk also pays `mixed_step` (vLLM replays a whole CUDA graph only for
//! decode-only batches; mixed ones run piecewise, with more launches); prefill is
//! compute-bound (linear layers per token, attention per pair of tokens); decode
//! attention is memory-bound (it reads every cached K and V of every decoding sequence).
//! The API server in front of the engine is a separate cost model ([`ApiCosts`], used by
//! [`super::api_server`]).
//!
//! The calibrated profiles reproduce the study the benchmark follows
//! (anyscale/llm-direct-streaming-benchmarks: vLLM 0.22 on 8x H100, its frozen results in
//! `artifacts/`, its engine settings in `serve/*/start.sh`); each constant says where it
//! comes from, and `bench-scripts/fidelity.py` re-measures the study's points against them.
//! Any constant can be changed at start-up (`vllm-sim --profile-set name=value`).

use std::time::Duration;

#[derive(Debug, Clone, PartialEq)]
pub struct Profile {
    pub name: &'static str,
    /// The model id the simulator serves by default.
    pub model: &'static str,
    pub max_model_len: usize,
    /// Engine defaults: the settings the profile was calibrated with.
    pub max_num_seqs: usize,
    pub max_num_batched_tokens: usize,
    /// KV cache blocks (16 tokens each) that fit on the GPU.
    pub num_gpu_blocks: usize,
    /// Bytes of K and V per token across all layers.
    pub kv_bytes_per_token: f64,
    pub base: Duration,
    pub per_seq: Duration,
    /// Extra fixed cost of a step that carries a prefill chunk.
    pub mixed_step: Duration,
    pub prefill_per_token: Duration,
    /// Attention cost per (new token, earlier token) pair during prefill, in seconds (a
    /// fraction of a nanosecond, below what a `Duration` can hold).
    pub attention_per_token_pair: f64,
    /// Effective HBM bandwidth of decode attention, bytes per second.
    pub hbm_bytes_per_sec: f64,
    /// Sliding-window attention: each token attends to at most this many earlier tokens,
    /// and a sequence keeps only the KV blocks its window reaches. `None`: full attention.
    pub attention_window: Option<usize>,
    /// P/D: how fast a decode replica pulls KV from a prefill replica, bytes per second.
    pub kv_transfer_bytes_per_sec: f64,
    pub api: ApiCosts,
}

/// The CPU work of the replica's API-server process (one event loop per replica), in
/// the units the simulator charges it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ApiCosts {
    /// Latency every request sees on its way to the engine that does not occupy the loop:
    /// the hops between the HTTP server, the renderer worker and the engine-core process.
    pub request_latency: Duration,
    /// Taking in one request: HTTP parsing, validation, request set-up, hand-off to the
    /// engine core.
    pub per_request: Duration,
    /// The intake split into a chain of `intake_hops` awaits, each of which waits behind
    /// whatever else the loop has ready (1: one piece of work). Idle, the hops cost
    /// nothing extra; busy streaming, each waits about one round of the loop. The study's
    /// figures fit best with 1 (`calibrate.py` with 4: loss 0.56 against 0.14).
    pub intake_hops: u32,
    /// Tokenising a text prompt, per prompt token.
    pub per_prompt_token: Duration,
    /// A chat request's messages, besides tokenising them: parsing and validating them
    /// and rendering the chat template, per prompt token.
    pub per_chat_token: Duration,
    /// A prompt given as token ids, per token (validation only: tokenize-once's saving).
    pub per_prompt_id: Duration,
    /// Turning one engine step's outputs into responses: the step's fixed part...
    pub per_step: Duration,
    /// ... and each token in it (detokenise, build and write the SSE chunk).
    pub per_token: Duration,
    /// A request through `/inference/v1/generate` (token ids in and out, no
    /// detokenising: the router's `--engine-api generate`): its intake's fixed part, and
    /// each of its output tokens, as a fraction of the OpenAI endpoints' (`per_request`,
    /// `per_token`). Measured on the real engine (see [`VLLM_SERVE_API`]).
    pub generate_request: f64,
    pub generate_token: f64,
}

impl ApiCosts {
    /// No API-server costs: tokens leave as soon as the engine makes them.
    pub const NONE: ApiCosts = ApiCosts {
        request_latency: Duration::ZERO,
        per_request: Duration::ZERO,
        intake_hops: 1,
        per_prompt_token: Duration::ZERO,
        per_chat_token: Duration::ZERO,
        per_prompt_id: Duration::ZERO,
        per_step: Duration::ZERO,
        per_token: Duration::ZERO,
        generate_request: 1.0,
        generate_token: 1.0,
    };

    pub fn is_none(&self) -> bool {
        *self == ApiCosts::NONE
    }

    /// The cost of taking in a request with a prompt of `tokens` tokens.
    pub fn intake(&self, tokens: usize, form: PromptForm) -> Duration {
        let (fixed, per) = match form {
            PromptForm::Text => (self.per_request, self.per_prompt_token),
            PromptForm::Chat => (self.per_request, self.per_prompt_token + self.per_chat_token),
            PromptForm::Ids => (self.per_request, self.per_prompt_id),
            PromptForm::Generate => (self.per_request.mul_f64(self.generate_request), self.per_prompt_id),
        };
        fixed + per.mul_f64(tokens as f64)
    }

    /// The cost of one step's outputs: `token_units` is its tokens, each weighted by what
    /// its endpoint costs a token (1 for the OpenAI endpoints, `generate_token` for
    /// generate).
    pub fn output(&self, token_units: f64) -> Duration {
        self.per_step + self.per_token.mul_f64(token_units)
    }

    /// The output weight of a token of a request that came in as `form`.
    pub fn token_weight(&self, form: PromptForm) -> f64 {
        if form == PromptForm::Generate { self.generate_token } else { 1.0 }
    }
}

/// How a request gives its prompt, which decides what the API server must do with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PromptForm {
    /// A completion's text: tokenised.
    Text,
    /// Chat messages: validated, rendered through the chat template, tokenised.
    Chat,
    /// Token ids: checked only.
    Ids,
    /// Token ids through `/inference/v1/generate`: checked only, and the answer is token
    /// ids (no detokenising).
    Generate,
}

/// What a step computes, as the scheduler sees it.
#[derive(Debug, Default, Clone, Copy)]
pub struct StepShape {
    pub seqs: usize,
    pub prefill_tokens: usize,
    /// Sum over prefill chunks of chunk length x mean context position of the chunk.
    pub prefill_token_pairs: f64,
    /// Sum of the context lengths of the decoding sequences.
    pub decode_context_tokens: usize,
}

impl Profile {
    pub fn step_time(&self, shape: &StepShape) -> Duration {
        let kv_read = shape.decode_context_tokens as f64 * self.kv_bytes_per_token / self.hbm_bytes_per_sec;
        let mixed = if shape.prefill_tokens > 0 { self.mixed_step } else { Duration::ZERO };
        self.base
            + self.per_seq * shape.seqs as u32
            + mixed
            + self.prefill_per_token * shape.prefill_tokens as u32
            + Duration::from_secs_f64(self.attention_per_token_pair * shape.prefill_token_pairs + kv_read)
    }

    pub fn by_name(name: &str) -> Option<Profile> {
        PROFILES.iter().map(|f| f()).find(|p| p.name == name)
    }

    pub fn names() -> Vec<&'static str> {
        PROFILES.iter().map(|f| f().name).collect()
    }

    /// Change one constant: `name=value`, durations with a unit (`1.7ms`, `900ns`).
    pub fn set(&mut self, assignment: &str) -> Result<(), String> {
        let (name, value) =
            assignment.split_once('=').ok_or_else(|| format!("`{assignment}` is not name=value"))?;
        let duration = || parse_duration(value).ok_or_else(|| format!("{name}: `{value}` is not a duration"));
        let number = || {
            value
                .parse::<f64>()
                .ok()
                .filter(|v| v.is_finite() && *v > 0.0)
                .ok_or_else(|| format!("{name}: `{value}` is not a positive number"))
        };
        let count = || {
            value
                .parse::<usize>()
                .ok()
                .filter(|v| *v > 0)
                .ok_or_else(|| format!("{name}: `{value}` is not a positive integer"))
        };
        match name {
            "base" => self.base = duration()?,
            "per_seq" => self.per_seq = duration()?,
            "mixed_step" => self.mixed_step = duration()?,
            "prefill_per_token" => self.prefill_per_token = duration()?,
            "attention_per_token_pair" => {
                self.attention_per_token_pair =
                    parse_seconds(value).ok_or_else(|| format!("{name}: `{value}` is not a duration"))?
            }
            "hbm_bytes_per_sec" => self.hbm_bytes_per_sec = number()?,
            "kv_transfer_bytes_per_sec" => self.kv_transfer_bytes_per_sec = number()?,
            "kv_bytes_per_token" => self.kv_bytes_per_token = number()?,
            "num_gpu_blocks" => self.num_gpu_blocks = count()?,
            "attention_window" => self.attention_window = if value == "none" { None } else { Some(count()?) },
            "api.request_latency" => self.api.request_latency = duration()?,
            "api.per_request" => self.api.per_request = duration()?,
            "api.intake_hops" => self.api.intake_hops = count()? as u32,
            "api.per_prompt_token" => self.api.per_prompt_token = duration()?,
            "api.per_chat_token" => self.api.per_chat_token = duration()?,
            "api.per_prompt_id" => self.api.per_prompt_id = duration()?,
            "api.per_step" => self.api.per_step = duration()?,
            "api.per_token" => self.api.per_token = duration()?,
            "api.generate_request" => self.api.generate_request = number()?,
            "api.generate_token" => self.api.generate_token = number()?,
            _ => return Err(format!("no profile constant `{name}` (known: {})", CONSTANTS.join(", "))),
        }
        Ok(())
    }
}

const CONSTANTS: [&str; 20] = [
    "base",
    "per_seq",
    "mixed_step",
    "prefill_per_token",
    "attention_per_token_pair",
    "hbm_bytes_per_sec",
    "kv_transfer_bytes_per_sec",
    "kv_bytes_per_token",
    "num_gpu_blocks",
    "attention_window",
    "api.request_latency",
    "api.per_request",
    "api.intake_hops",
    "api.per_prompt_token",
    "api.per_chat_token",
    "api.per_prompt_id",
    "api.per_step",
    "api.per_token",
    "api.generate_request",
    "api.generate_token",
];

/// `12ms`, `1.5us`, `2s`, in whole nanoseconds.
fn parse_duration(text: &str) -> Option<Duration> {
    parse_seconds(text).map(Duration::from_secs_f64)
}

/// `0.65ns`, `12ms`: seconds, to any precision.
fn parse_seconds(text: &str) -> Option<f64> {
    let split = text.find(|c: char| c.is_ascii_alphabetic() || c == 'µ')?;
    let (number, unit) = text.split_at(split);
    let value: f64 = number.trim().parse().ok().filter(|v: &f64| v.is_finite() && *v >= 0.0)?;
    let seconds = match unit.trim() {
        "s" => value,
        "ms" => value * 1e-3,
        "us" | "µs" => value * 1e-6,
        "ns" => value * 1e-9,
        _ => return None,
    };
    Some(seconds)
}

const PROFILES: [fn() -> Profile; 3] = [qwen3_0_6b_fp8_h100, phi_tiny_moe_dp4ep4_h100, gpt_oss_20b_h100];

/// H100 SXM: 3.35 TB/s HBM3 peak (NVIDIA H100 datasheet).
const H100_HBM: f64 = 3.35e12;

/// KV transfer between replicas (NixlConnector over RDMA), bytes per second: a 400 Gb/s
/// NIC's 50 GB/s. Profiles of replicas on one NVLink domain set their own.
const KV_TRANSFER: f64 = 50e9;

/// Usable memory of an H100 80GB as vLLM sees it (torch reports 79.2 GiB).
const H100_MEMORY: f64 = 79.2 * (1u64 << 30) as f64;

/// The API server of `vllm serve` as the study ran it (one API-server process and one
/// renderer worker per replica, HF's tokenizer). Fitted together with the Qwen engine to
/// the study's 18 prefill-heavy and decode-heavy vllm-router figures
/// (`bench-scripts/calibrate.py`, which replays them in virtual time) and checked on its 9
/// agentic ones — the only rows with this server in front of the engines (Ray Serve LLM
/// serves the same engines from its own replica process). What each constant stands for
/// and what in the study pins it:
///
/// - `request_latency` 38 ms: the floor under every point (decode-heavy c=64: 57 ms to
///   the first token for a 50-token prompt and a ~2 ms prefill step). Hops between
///   processes (HTTP server, renderer, engine core) and the client's own share; it
///   occupies nothing, so it does not grow with load.
/// - `per_request` 4.7 ms, in one piece: taking a request in holds the loop. The study's
///   streams stall for tens of milliseconds a few times a second (p99 ITL 33 ms at
///   decode-heavy c=64, where the median gap is 1.3 ms), and the stalls grow
///   with the request rate.
/// - `per_token` 76 us and `per_step` 175 us: the Python work per streamed token
///   (detokenise, build and write one SSE chunk) and per engine step. At decode-heavy
///   c=256 (32 streams and ~22 new requests a second a replica) the loop is saturated:
///   tokens queue and leave in bursts (the study's median ITL there is 0.00 ms, 0.01 ms at
///   c=128) and TTFT climbs to 190 ms while the engine's own TTFT stayed ~15-18 ms, as
///   the study reports; TPOT follows the loop, not the engine.
/// - `per_prompt_token` 0.63 us: tokenising (about 1.6 million tokens a second), the
///   intake of the 8000-token prefill-heavy prompts; vLLM 0.22's fastokens
///   (`VLLM_USE_FASTOKENS=1`, the study's agentic runs, `--fastokens` here) is ~25x faster.
/// - `per_chat_token` 0.78 us: the rest of a chat request's intake (parsing and validating
///   its messages, rendering the chat template), which fastokens does not speed up: what
///   keeps agentic TTFT at 104-163 ms for ~37k-token conversations.
/// - `per_prompt_id` 0.05 us: a prompt given as token ids is only checked.
/// - `generate_request` and `generate_token`: a request through `/inference/v1/generate`
///   with `detokenize: false` (what `router --engine-api generate` sends), as a fraction
///   of a chat request's fixed intake and of its per-token output work: measured on the
///   real CPU engine, API-server process CPU per request through the router both ways,
///   fitted over 32 and 256 output tokens (`bench-scripts/vllm/api_server_cpu.py`,
///   `artifacts/api-server-cpu`). The H100 profile's absolute costs are the study's
///   fit; only the ratios come from the CPU engine (same Python code, same work).
pub const VLLM_SERVE_API: ApiCosts = ApiCosts {
    request_latency: Duration::from_micros(38_100),
    per_request: Duration::from_micros(4_725),
    intake_hops: 1,
    per_prompt_token: Duration::from_nanos(630),
    per_chat_token: Duration::from_nanos(780),
    per_prompt_id: Duration::from_nanos(50),
    per_step: Duration::from_micros(175),
    per_token: Duration::from_nanos(75_950),
    generate_request: GENERATE_REQUEST,
    generate_token: GENERATE_TOKEN,
};

/// [`ApiCosts::generate_request`] measured (see [`VLLM_SERVE_API`]).
pub const GENERATE_REQUEST: f64 = 0.636;
/// [`ApiCosts::generate_token`] measured (see [`VLLM_SERVE_API`]).
pub const GENERATE_TOKEN: f64 = 0.82;

/// Qwen/Qwen3-0.6B-FP8 on one H100 80GB, as the study served it (`serve/vllm_8x/start.sh`:
/// fp8 KV cache, `--gpu-memory-utilization 0.95`, `--max-num-seqs 128`,
/// `--max-num-batched-tokens 16384`, `--max-model-len 81920` with YaRN, prefix caching,
/// one API server).
///
/// - Shape (Qwen3-0.6B `config.json`): 28 layers, 8 KV heads, head_dim 128; fp8 K and V
///   are 2 x 28 x 8 x 128 x 1 B = 57,344 B per token.
/// - KV capacity: 0.95 x 79.2 GiB = 80.8 GB, less ~0.8 GB of fp8 weights and ~4 GB of
///   activations, CUDA graphs and other buffers, leaves ~76 GB: 1.32M tokens, 82,600
///   blocks of 16.
/// - Step costs, fitted with the API server above to the study's decode-heavy (TPOT 1.88 /
///   2.05 / 2.42 ms at 8 / 16 / 32 streams a replica) and prefill-heavy rows (19.1 / 21.9
///   / 23.2 requests a second a replica, near saturation at the top), attention checked
///   on the agentic rows (ITL 8.8 / 16.4 / 30.5 ms with ~37k-token contexts): `base`
///   1.66 ms and `per_seq` 14.5 us a step; `mixed_step` 2.0 ms more for a step
///   carrying a prefill chunk; prefill 1.51 us a token (linear layers) plus 0.354 ns per
///   token pair (attention: an
///   8000-token prompt costs ~23 ms in all, half of it attention, as the FLOPs split:
///   2 x 0.44e9 a token for the linear layers, 229k a pair for attention); decode
///   attention reads K and V at 1.85 TB/s (55% of the HBM peak: fp8 KV is dequantised,
///   and 8 KV heads do not fill the GPU).
pub fn qwen3_0_6b_fp8_h100() -> Profile {
    let kv_bytes_per_token = 57_344.0;
    Profile {
        name: "qwen3-0.6b-fp8-h100",
        model: "Qwen/Qwen3-0.6B-FP8",
        max_model_len: 81_920,
        max_num_seqs: 128,
        max_num_batched_tokens: 16_384,
        num_gpu_blocks: kv_blocks(0.95 * H100_MEMORY - 4.8e9, kv_bytes_per_token),
        kv_bytes_per_token,
        base: Duration::from_micros(1_663),
        per_seq: Duration::from_nanos(14_460),
        mixed_step: Duration::from_micros(2_033),
        prefill_per_token: Duration::from_nanos(1_510),
        attention_per_token_pair: 0.354e-9,
        hbm_bytes_per_sec: 1.85e12,
        attention_window: None,
        kv_transfer_bytes_per_sec: KV_TRANSFER,
        api: VLLM_SERVE_API,
    }
}

/// microsoft/Phi-tiny-MoE-instruct, one data-parallel rank of a DP4EP4 replica on 4 H100s
/// (the study's `serve/vllm_pd4p4d/start.sh`: one such replica prefills, one decodes,
/// NixlConnector between them; bf16 KV cache, `--gpu-memory-utilization 0.90`,
/// `--max-num-seqs 128`, `--max-num-batched-tokens 16384`, `--max-model-len 81920`, no
/// fastokens). Each rank has its own API server, so a simulated replica stands for one
/// rank: the P/D setup is 4 prefill and 4 decode simulated replicas.
///
/// - Shape (model card: 3.8B parameters, 1.1B active; 32 layers, 4 KV heads of 128, 16
///   experts, 2 per token): bf16 K and V are 2 x 32 x 4 x 128 x 2 B = 65,536 B per token.
/// - Sliding-window attention of 2047 tokens (`sliding_window` in the Phi-3 family's
///   configs, which vLLM honours). The study's P/D rows need it: decode ITL grows only
///   from 7.4 to 14.8 ms between ~7 and ~33 decoding sequences of ~37k tokens a rank,
///   while full attention would read ~87 GB of KV a step at the top, 26 ms at HBM peak.
/// - KV capacity: 0.90 x 79.2 GiB = 76.5 GB, less ~3.3 GB of weights (attention and
///   embeddings replicated, experts split 4 ways) and ~4 GB of buffers: ~69 GB, 1.05M
///   tokens, 65,800 blocks.
/// - Step costs and the tokenizer's, fitted to the study's three P/D rows (TTFT 414 / 587
///   / 1103 ms, ITL 7.41 / 10.34 / 14.82 ms, 16.9 / 27.0 / 38.8 requests a second at
///   c = 64 / 128 / 256), the API server otherwise `vllm serve`'s: `base` 5.3 ms and
///   `per_seq` 242 us (expert parallelism makes every step an all-to-all across the four
///   ranks, and every token a dispatch and combine: about 0.24 ms a sequence, from the
///   ITL's slope); `mixed_step` 2.0 ms; prefill 5.5 us a token and 0.64 ns a token pair;
///   tokenising 1.03 us and rendering 0.73 us a prompt token (the fit's own, close to
///   Qwen's); KV pulled at 61 GB/s.
pub fn phi_tiny_moe_dp4ep4_h100() -> Profile {
    let kv_bytes_per_token = 65_536.0;
    Profile {
        name: "phi-tiny-moe-dp4ep4-h100",
        model: "microsoft/Phi-tiny-MoE-instruct",
        max_model_len: 81_920,
        max_num_seqs: 128,
        max_num_batched_tokens: 16_384,
        num_gpu_blocks: kv_blocks(0.90 * H100_MEMORY - 7.3e9, kv_bytes_per_token),
        kv_bytes_per_token,
        base: Duration::from_micros(5_261),
        per_seq: Duration::from_nanos(241_600),
        mixed_step: Duration::from_micros(1_993),
        prefill_per_token: Duration::from_nanos(5_499),
        attention_per_token_pair: 0.638e-9,
        hbm_bytes_per_sec: H100_HBM * 0.7,
        attention_window: Some(2047),
        kv_transfer_bytes_per_sec: 60.7e9,
        api: ApiCosts {
            per_prompt_token: Duration::from_nanos(1_033),
            per_chat_token: Duration::from_nanos(735),
            ..VLLM_SERVE_API
        },
    }
}

/// openai/gpt-oss-20b on one H100 80GB (MXFP4 MoE weights, bf16 KV cache). Not part of
/// the study and not calibrated against it: an estimate from the model's shape and one
/// public measurement, for trying the router with a larger model's timing.
///
/// - Shape (gpt-oss-20b `config.json`): 24 layers, 8 KV heads, head_dim 64: K+V is
///   49,152 B per token (every layer charged; half use a 128-token window in reality).
/// - KV capacity: 0.9 x 80 GB less ~16 GB of weights and buffers: ~71,000 blocks.
/// - Prefill: 2 x 3.6e9 FLOPs per active token at ~600 TFLOP/s = 12 us per token.
/// - Fixed costs from GPUStack's "Optimizing GPT-OSS-20B Throughput on NVIDIA H100 GPUs"
///   (vLLM, mean TPOT ~87 ms on ShareGPT at max-num-seqs 256): 7 ms + 0.3 ms per sequence.
pub fn gpt_oss_20b_h100() -> Profile {
    Profile {
        name: "gpt-oss-20b-h100",
        model: "openai/gpt-oss-20b",
        max_model_len: 131_072,
        max_num_seqs: 256,
        max_num_batched_tokens: 8192,
        num_gpu_blocks: 71_000,
        kv_bytes_per_token: 49_152.0,
        base: Duration::from_micros(7_000),
        per_seq: Duration::from_micros(300),
        mixed_step: Duration::ZERO,
        prefill_per_token: Duration::from_nanos(12_000),
        attention_per_token_pair: 0.66e-9,
        hbm_bytes_per_sec: H100_HBM * 0.75,
        attention_window: None,
        kv_transfer_bytes_per_sec: KV_TRANSFER,
        api: VLLM_SERVE_API,
    }
}

/// 16-token blocks that fit in `bytes` of KV cache.
fn kv_blocks(bytes: f64, kv_bytes_per_token: f64) -> usize {
    (bytes / (kv_bytes_per_token * 16.0)) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qwen_decode_steps_are_near_the_studys_tpot() {
        let p = qwen3_0_6b_fp8_h100();
        // Decode-heavy: ISL 50, OSL 500, so ~300 tokens of context on average. The
        // engine's step is most of a token's time (the API server adds its own).
        for (streams, published_ms) in [(8, 1.88), (16, 2.05), (32, 2.42)] {
            let shape =
                StepShape { seqs: streams, decode_context_tokens: streams * 300, ..Default::default() };
            let ms = p.step_time(&shape).as_secs_f64() * 1e3;
            assert!((ms / published_ms - 1.0).abs() < 0.12, "{streams} streams: {ms} ms");
        }
        let blocks = p.num_gpu_blocks;
        assert!((80_000..85_000).contains(&blocks), "{blocks} blocks");
    }

    #[test]
    fn long_prompts_cost_more_than_linear() {
        let p = qwen3_0_6b_fp8_h100();
        let chunk = |tokens: usize, start: usize| StepShape {
            seqs: 1,
            prefill_tokens: tokens,
            prefill_token_pairs: tokens as f64 * (start as f64 + tokens as f64 / 2.0),
            decode_context_tokens: 0,
        };
        let early = p.step_time(&chunk(2048, 0));
        let late = p.step_time(&chunk(2048, 20_000));
        assert!(late > early);
        assert!(Profile::by_name("gpt-oss-20b-h100").is_some());
        assert_eq!(Profile::names(), ["qwen3-0.6b-fp8-h100", "phi-tiny-moe-dp4ep4-h100", "gpt-oss-20b-h100"]);
    }

    #[test]
    fn constants_can_be_set_by_name() {
        let mut p = qwen3_0_6b_fp8_h100();
        p.set("base=2.5ms").unwrap();
        p.set("api.per_token=40us").unwrap();
        p.set("attention_per_token_pair=0.5ns").unwrap();
        p.set("hbm_bytes_per_sec=2e12").unwrap();
        p.set("attention_window=2047").unwrap();
        assert_eq!(p.attention_window, Some(2047));
        p.set("attention_window=none").unwrap();
        assert_eq!(p.attention_window, None);
        assert_eq!(p.base, Duration::from_micros(2500));
        assert_eq!(p.api.per_token, Duration::from_micros(40));
        assert!((p.attention_per_token_pair - 0.5e-9).abs() < 1e-15);
        assert_eq!(p.hbm_bytes_per_sec, 2e12);
        assert!(p.set("base=fast").unwrap_err().contains("not a duration"));
        assert!(p.set("warp=1").unwrap_err().contains("no profile constant"));
        assert!(p.set("base").unwrap_err().contains("name=value"));
        assert_eq!(ApiCosts::NONE.intake(1000, PromptForm::Chat), Duration::ZERO);
        assert_eq!(p.api.intake(1000, PromptForm::Text), p.api.per_request + p.api.per_prompt_token * 1000);
        assert!(p.api.intake(1000, PromptForm::Chat) > p.api.intake(1000, PromptForm::Text));
        assert!(p.api.intake(1000, PromptForm::Ids) < p.api.intake(1000, PromptForm::Text));
        // Through generate: the measured fraction of the fixed intake, and of each token.
        assert_eq!(
            p.api.intake(1000, PromptForm::Generate),
            p.api.per_request.mul_f64(GENERATE_REQUEST) + p.api.per_prompt_id * 1000
        );
        assert_eq!(p.api.token_weight(PromptForm::Generate), GENERATE_TOKEN);
        assert_eq!(p.api.token_weight(PromptForm::Chat), 1.0);
        assert_eq!(p.api.output(2.0), p.api.per_step + p.api.per_token * 2);
    }
}
