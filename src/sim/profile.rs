//! Timing profiles: how long one engine step takes on a given model and GPU.
//!
//! vLLM runs one forward pass per step over every scheduled sequence: prefill chunks
//! and one token for each decoding sequence. We model a step's duration as
//!
//! ```text
//! step = base + per_seq * seqs
//!      + prefill_tokens * prefill_per_token
//!      + prefill_tokens * mean_prefill_context * attention_per_token_pair
//!      + kv_bytes_read(decode contexts) / hbm_bandwidth
//! ```
//!
//! `base` and `per_seq` are the fixed costs of a step (kernel launches, sampling,
//! vLLM's scheduler and output processing), which dominate for small models; prefill is
//! compute-bound (FLOPs per token); decode attention is memory-bound (it reads every
//! cached K and V of every decoding sequence). Model shapes come from the models'
//! published `config.json`; GPU figures from NVIDIA's H100 SXM datasheet; the fixed costs
//! are fitted to published serving measurements, cited on each profile.

use std::time::Duration;

#[derive(Debug, Clone, PartialEq)]
pub struct Profile {
    pub name: &'static str,
    /// The model id the simulator serves by default.
    pub model: &'static str,
    pub max_model_len: usize,
    /// KV cache blocks (16 tokens each) that fit on the GPU.
    pub num_gpu_blocks: usize,
    /// Bytes of K and V per token across all layers.
    pub kv_bytes_per_token: f64,
    pub base: Duration,
    pub per_seq: Duration,
    pub prefill_per_token: Duration,
    /// Attention cost per (new token, earlier token) pair during prefill.
    pub attention_per_token_pair: Duration,
    /// Effective HBM bandwidth, bytes per second.
    pub hbm_bytes_per_sec: f64,
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
        self.base
            + self.per_seq * shape.seqs as u32
            + self.prefill_per_token * shape.prefill_tokens as u32
            + self.attention_per_token_pair.mul_f64(shape.prefill_token_pairs)
            + Duration::from_secs_f64(kv_read)
    }

    pub fn by_name(name: &str) -> Option<Profile> {
        PROFILES.iter().map(|f| f()).find(|p| p.name == name)
    }

    pub fn names() -> Vec<&'static str> {
        PROFILES.iter().map(|f| f().name).collect()
    }
}

const PROFILES: [fn() -> Profile; 2] = [qwen3_0_6b_h100, gpt_oss_20b_h100];

/// H100 SXM: 3.35 TB/s HBM3 peak (NVIDIA H100 datasheet); decode attention kernels
/// reach about 75% of it.
const H100_HBM: f64 = 3.35e12 * 0.75;

/// Qwen/Qwen3-0.6B on one H100 80GB, bf16.
///
/// - Shape (Qwen3-0.6B `config.json`): 28 layers, 8 KV heads, head_dim 128, so K+V is
///   2 x 28 x 8 x 128 x 2 B = 114,688 B per token; 40,960 max positions.
/// - KV capacity: 0.9 x 80 GB minus 1.2 GB of weights and ~2 GB of activations
///   leaves ~69 GB, about 600k tokens = 37,500 blocks of 16.
/// - Prefill: 2 x 0.6e9 FLOPs per token at ~400 TFLOP/s effective (40% of the 989
///   dense bf16 TFLOP/s of the datasheet) = 3 us per token; attention 4 x 28 layers x
///   2048 query dims FLOPs per token pair at the same rate = 0.57 ns per pair.
/// - Fixed costs fitted to the Ray Serve LLM / vllm-router study (Anyscale blog "High
///   Performance Distributed Inference with Ray Serve LLM", vLLM 0.22, 8x H100): at 32
///   concurrent decode-heavy streams per replica (ISL 50) the engine-side mean TTFT was
///   14.7 ms (Ray) and 17.7 ms (vllm-router). A new request waits about half a step and
///   is then prefilled in one step, so TTFT is about 1.5 steps: a step of ~10 ms at
///   batch 32, i.e. base 6.5 ms + 0.1 ms per sequence (+ ~0.5 ms of KV reads).
pub fn qwen3_0_6b_h100() -> Profile {
    Profile {
        name: "qwen3-0.6b-h100",
        model: "Qwen/Qwen3-0.6B",
        max_model_len: 40_960,
        num_gpu_blocks: 37_500,
        kv_bytes_per_token: 114_688.0,
        base: Duration::from_micros(6_500),
        per_seq: Duration::from_micros(100),
        prefill_per_token: Duration::from_nanos(3_000),
        attention_per_token_pair: Duration::from_nanos(1).mul_f64(0.57),
        hbm_bytes_per_sec: H100_HBM,
    }
}

/// openai/gpt-oss-20b on one H100 80GB (MXFP4 MoE weights, bf16 KV cache).
///
/// - Shape (gpt-oss-20b `config.json`): 24 layers, 8 KV heads, head_dim 64, so K+V is
///   2 x 24 x 8 x 64 x 2 B = 49,152 B per token (we charge every layer; half of them
///   use a 128-token sliding window in reality, so long-context decode is pessimistic);
///   131,072 max positions. 3.6B active parameters per token.
/// - KV capacity: 0.9 x 80 GB minus ~13 GB of weights and ~3 GB of activations leaves
///   ~56 GB, about 1.14M tokens = 71,000 blocks.
/// - Prefill: 2 x 3.6e9 FLOPs per token at ~600 TFLOP/s effective = 12 us per token;
///   attention 4 x 24 x 4096 FLOPs per pair = 0.66 ns per pair.
/// - Fixed costs fitted to GPUStack's performance lab ("Optimizing GPT-OSS-20B
///   Throughput on NVIDIA H100 GPUs", vLLM with --async-scheduling): mean TPOT ~87 ms on
///   ShareGPT at saturation (max-num-seqs 256), so 7 ms + 0.3 ms per sequence gives
///   ~84 ms at 256 sequences before KV reads.
pub fn gpt_oss_20b_h100() -> Profile {
    Profile {
        name: "gpt-oss-20b-h100",
        model: "openai/gpt-oss-20b",
        max_model_len: 131_072,
        num_gpu_blocks: 71_000,
        kv_bytes_per_token: 49_152.0,
        base: Duration::from_micros(7_000),
        per_seq: Duration::from_micros(300),
        prefill_per_token: Duration::from_nanos(12_000),
        attention_per_token_pair: Duration::from_nanos(1).mul_f64(0.66),
        hbm_bytes_per_sec: H100_HBM,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qwen_decode_step_matches_the_fitted_measurement() {
        let p = qwen3_0_6b_h100();
        // 32 decoding sequences with ~300 tokens of context each (ISL 50, OSL 500).
        let step =
            p.step_time(&StepShape { seqs: 32, decode_context_tokens: 32 * 300, ..Default::default() });
        let ms = step.as_secs_f64() * 1e3;
        assert!((9.0..11.5).contains(&ms), "{ms} ms");
    }

    #[test]
    fn long_prompts_cost_more_than_linear() {
        let p = qwen3_0_6b_h100();
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
        assert_eq!(Profile::names(), ["qwen3-0.6b-h100", "gpt-oss-20b-h100"]);
    }
}
