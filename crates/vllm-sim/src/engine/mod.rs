//! The engine: one continuous-batching scheduler loop per simulated replica.
//!
//! Each step the scheduler (like vLLM's v1 scheduler) gives every running sequence its
//! next tokens (a prefill chunk, or one decode token) within `max_num_batched_tokens`,
//! then admits waiting requests while seats (`max_num_seqs`), token budget and KV
//! blocks last. A request is admitted with its longest cached prefix already computed.
//! When a running sequence needs a block and none is free, the most recently admitted
//! sequence is preempted (its blocks freed, recomputed later). The step then takes the
//! time the profile says, and every sequence that finished computing its tokens samples
//! one: that is when its client sees a token.
//!
//! Requests arrive on a channel; each step's tokens go to the replica's API server
//! ([`super::api_server`]), which delivers them on each request's own channel once it has
//! processed them. A request whose receiver is dropped (the client went away) is aborted
//! at the next step and its blocks freed.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use super::api_server::ApiServer;
use super::faults::Faults;
use super::kv_cache::{BLOCK_SIZE, BlockId, CacheEvent, KvCache, block_hashes, chain_hash};
use super::metrics::SimMetrics;
use super::profile::{Profile, StepShape};
use super::sampler::Sampler;
use scheduler::Scheduler;

mod scheduler;

#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub profile: Profile,
    pub max_num_seqs: usize,
    pub max_num_batched_tokens: usize,
    pub num_gpu_blocks: usize,
    /// Simulated time runs this many times faster than real time.
    pub time_scale: f64,
    /// Where to send the cache's events after each step, when publishing them.
    pub kv_events: Option<mpsc::UnboundedSender<Vec<CacheEvent>>>,
}

/// How the prompt's KV comes to be.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Kind {
    /// Computed here.
    Local,
    /// Computed here, then the request ends after one token (P/D prefill stage).
    PrefillOnly,
    /// Pulled from a prefill replica: all but the last prompt token arrive after the
    /// transfer, and are not computed here. Blocks already in this replica's prefix
    /// cache are not pulled; each other block takes `per_block`.
    RemoteKv { per_block: Duration },
}

pub struct EngineRequest {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub min_tokens: usize,
    pub ignore_eos: bool,
    pub seed: Option<u64>,
    /// Stop strings: generation ends when the text contains one (after `min_tokens`).
    pub stop: Vec<String>,
    pub kind: Kind,
    pub arrived: Instant,
    pub events: mpsc::UnboundedSender<Event>,
    /// What one of its output tokens costs the API server ([`ApiCosts::token_weight`]).
    pub output_weight: f64,
    /// vLLM's `cache_salt`: the prompt's first block is hashed with it.
    pub cache_salt: Option<String>,
}

pub use crate::events::{Event, Finish};

/// Handle for submitting requests to one engine.
#[derive(Clone)]
pub struct Engine {
    tx: mpsc::UnboundedSender<EngineRequest>,
}

impl Engine {
    pub fn start(
        config: EngineConfig,
        metrics: Arc<SimMetrics>,
        faults: Arc<Faults>,
        api: ApiServer,
    ) -> Engine {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(Scheduler::new(config, metrics, faults, api).run(rx));
        Engine { tx }
    }

    pub fn submit(&self, request: EngineRequest) {
        // The loop only ends when every handle is gone, so this cannot fail in use.
        let _ = self.tx.send(request);
    }
}

struct Seq {
    req: EngineRequest,
    /// Prompt, then generated tokens.
    tokens: Vec<u32>,
    prompt_len: usize,
    /// Tokens whose KV is in the cache.
    computed: usize,
    /// The sequence's blocks in order; those before `released` were given back (outside
    /// the attention window, or never needed) and are not held.
    blocks: Vec<BlockId>,
    released: usize,
    /// Full blocks already published to the prefix cache.
    published: usize,
    /// Where the sequence's chain of block hashes starts (its cache salt's root).
    root: u64,
    parent_hash: u64,
    sampler: Sampler,
    generated: usize,
    admitted: bool,
    last_token_at: Option<Instant>,
    ready_at: Option<Instant>,
    /// Generated text, kept only when the request has stop strings.
    text: Option<llm_common::tokenizer::Detokenizer>,
    text_so_far: String,
}

impl Seq {
    fn new(req: EngineRequest) -> Seq {
        let sampler = Sampler::new(&req.prompt, req.seed);
        let tokens = req.prompt.clone();
        let text = (!req.stop.is_empty()).then(Default::default);
        let prompt_len = tokens.len();
        let root = crate::kv_cache::root(req.cache_salt.as_deref());
        Seq {
            root,
            req,
            tokens,
            prompt_len,
            computed: 0,
            blocks: Vec::new(),
            released: 0,
            published: 0,
            parent_hash: root,
            sampler,
            generated: 0,
            admitted: false,
            last_token_at: None,
            ready_at: None,
            text,
            text_so_far: String::new(),
        }
    }

    fn remaining(&self) -> usize {
        self.tokens.len() - self.computed
    }

    /// Feed a generated token to the stop-string check; the index of a stop string the
    /// text now contains.
    /// As vLLM: only a stop string that ends in this token's text counts, and only once
    /// more than `min_tokens` tokens are out; of several, the one ending first.
    fn stop_string_hit(&mut self, id: u32, generated: usize) -> Option<usize> {
        let detok = self.text.as_mut()?;
        let before = self.text_so_far.len();
        self.text_so_far.push_str(&detok.push(id));
        if generated <= self.req.min_tokens {
            return None;
        }
        let text = &self.text_so_far;
        let mut best: Option<(usize, usize)> = None;
        for (i, stop) in self.req.stop.iter().enumerate() {
            let mut from = (before + 1).saturating_sub(stop.len());
            while !text.is_char_boundary(from) {
                from -= 1;
            }
            if let Some(at) = text[from..].find(stop.as_str()) {
                let end = from + at + stop.len();
                if best.is_none_or(|(e, _)| end < e) {
                    best = Some((end, i));
                }
            }
        }
        best.map(|(_, i)| i)
    }

    fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(BLOCK_SIZE).saturating_sub(self.blocks.len())
    }

    /// The blocks this sequence holds references on.
    fn held(&self) -> &[BlockId] {
        &self.blocks[self.released..]
    }
}

/// A block slot the sequence never held (before its window when it was admitted).
const NOT_HELD: BlockId = BlockId::MAX;

/// Sum over the tokens `start..start + n` of how many earlier tokens each attends to.
fn attention_pairs(start: usize, n: usize, window: Option<usize>) -> f64 {
    let full = |from: usize, count: usize| count as f64 * (from as f64 + count as f64 / 2.0);
    match window {
        None => full(start, n),
        Some(w) if start >= w => (n * w) as f64,
        Some(w) => {
            let ramp = (w - start).min(n);
            full(start, ramp) + ((n - ramp) * w) as f64
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::profile::{ApiCosts, qwen3_0_6b_fp8_h100};
    use super::*;

    #[test]
    fn attention_pairs_are_capped_by_the_window() {
        assert_eq!(attention_pairs(0, 4, None), 8.0);
        assert_eq!(attention_pairs(100, 10, Some(50)), 500.0, "past the window: window per token");
        // 40 tokens from 20 with a window of 50: 30 ramp up (20..50), 10 see 50.
        assert_eq!(attention_pairs(20, 40, Some(50)), 30.0 * 35.0 + 500.0);
        assert_eq!(attention_pairs(0, 10, Some(50)), attention_pairs(0, 10, None));
    }

    async fn run(engine: &Engine, prompt: Vec<u32>, max_tokens: usize) -> Vec<u32> {
        let (tx, mut rx) = mpsc::unbounded_channel();
        engine.submit(EngineRequest {
            prompt,
            max_tokens,
            min_tokens: 0,
            ignore_eos: true,
            seed: None,
            stop: Vec::new(),
            kind: Kind::Local,
            arrived: Instant::now(),
            events: tx,
            output_weight: 1.0,
            cache_salt: None,
        });
        let mut ids = Vec::new();
        while let Some(event) = rx.recv().await {
            match event {
                Event::Token { id, finish } => {
                    ids.push(id);
                    if finish.is_some() {
                        return ids;
                    }
                }
                Event::Rejected(why) => panic!("{why}"),
                Event::PrefillBlocks(_) => {}
            }
        }
        panic!("no finish");
    }

    /// With a 64-token window a sequence keeps only ~5 blocks: a 1600-token prompt (100
    /// blocks) runs on a 24-block pool, and its repeat finds its last window cached.
    #[tokio::test(start_paused = true)]
    async fn a_window_keeps_only_its_blocks_and_reuses_its_cached_window() {
        let mut profile = qwen3_0_6b_fp8_h100();
        profile.attention_window = Some(64);
        let config = EngineConfig {
            profile,
            max_num_seqs: 8,
            max_num_batched_tokens: 256,
            num_gpu_blocks: 24,
            time_scale: 1.0,
            kv_events: None,
        };
        let metrics = Arc::new(SimMetrics::new("m"));
        let faults = Arc::new(Faults::new(Default::default()));
        let api = ApiServer::start(ApiCosts::NONE, 1.0, faults.clone());
        let engine = Engine::start(config, metrics.clone(), faults, api);
        let prompt: Vec<u32> = (0..1600).map(|i| (i * 31 % 50_000) as u32).collect();
        let first = run(&engine, prompt.clone(), 20).await;
        assert_eq!(first.len(), 20);
        let hits_before = metrics.prefix_hits.get();
        let second = run(&engine, prompt, 20).await;
        assert_eq!(first, second, "same prompt, same output");
        let reused = metrics.prefix_hits.get() - hits_before;
        assert!(reused >= 1500, "the repeat reused its window's blocks: {reused} tokens");
        assert_eq!(metrics.preemptions.get(), 0);
    }
}
