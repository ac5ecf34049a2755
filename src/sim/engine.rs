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
//! Requests arrive on a channel and tokens leave on each request's own channel. A
//! request whose receiver is dropped (the client went away) is aborted at the next step
//! and its blocks freed.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::faults::Faults;
use super::kv_cache::{BLOCK_SIZE, BlockId, KvCache, block_hashes, chain_hash};
use super::metrics::SimMetrics;
use super::profile::{Profile, StepShape};
use super::sampler::Sampler;

#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub profile: Profile,
    pub max_num_seqs: usize,
    pub max_num_batched_tokens: usize,
    pub num_gpu_blocks: usize,
    /// Simulated time runs this many times faster than real time.
    pub time_scale: f64,
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
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// `max_tokens` reached.
    Length,
    /// The model's end of sequence.
    Stop,
    /// The text now contains `stop[i]`.
    StopString(usize),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A generated token; `finish` is set on the last one.
    Token { id: u32, finish: Option<Finish> },
    /// Prefill done (for `PrefillOnly`): the blocks that hold the prompt's KV.
    PrefillBlocks(Vec<BlockId>),
    /// The request can never run (e.g. larger than the whole KV cache).
    Rejected(String),
}

/// Handle for submitting requests to one engine.
#[derive(Clone)]
pub struct Engine {
    tx: mpsc::UnboundedSender<EngineRequest>,
}

impl Engine {
    pub fn start(config: EngineConfig, metrics: Arc<SimMetrics>, faults: Arc<Faults>) -> Engine {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(Scheduler::new(config, metrics, faults).run(rx));
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
    blocks: Vec<BlockId>,
    /// Full blocks already published to the prefix cache.
    published: usize,
    parent_hash: u64,
    sampler: Sampler,
    generated: usize,
    admitted: bool,
    last_token_at: Option<Instant>,
    ready_at: Option<Instant>,
    /// Generated text, kept only when the request has stop strings.
    text: Option<super::tokenizer::Detokenizer>,
    text_so_far: String,
}

impl Seq {
    fn new(req: EngineRequest) -> Seq {
        let sampler = Sampler::new(&req.prompt, req.seed);
        let tokens = req.prompt.clone();
        let text = (!req.stop.is_empty()).then(Default::default);
        let prompt_len = tokens.len();
        Seq {
            req,
            tokens,
            prompt_len,
            computed: 0,
            blocks: Vec::new(),
            published: 0,
            parent_hash: 0,
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
    fn stop_string_hit(&mut self, id: u32) -> Option<usize> {
        let detok = self.text.as_mut()?;
        self.text_so_far.push_str(&detok.push(id));
        self.req.stop.iter().position(|s| self.text_so_far.contains(s.as_str()))
    }

    fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(BLOCK_SIZE).saturating_sub(self.blocks.len())
    }
}

enum Admission {
    /// Running; computes this many tokens this step.
    Scheduled(usize),
    /// Its blocks do not fit now: it waits at the head of the queue.
    NoRoom,
    /// It can never fit; the client has been told.
    Rejected,
}

struct Scheduler {
    config: EngineConfig,
    metrics: Arc<SimMetrics>,
    faults: Arc<Faults>,
    kv: KvCache,
    waiting: VecDeque<Seq>,
    running: Vec<Seq>,
    /// Decode requests waiting for their KV to arrive from a prefill replica.
    transferring: Vec<Seq>,
}

impl Scheduler {
    fn new(config: EngineConfig, metrics: Arc<SimMetrics>, faults: Arc<Faults>) -> Self {
        let kv = KvCache::new(config.num_gpu_blocks);
        Scheduler {
            config,
            metrics,
            faults,
            kv,
            waiting: VecDeque::new(),
            running: Vec::new(),
            transferring: Vec::new(),
        }
    }

    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<EngineRequest>) {
        let mut clock = Instant::now();
        loop {
            if self.running.is_empty() && self.waiting.is_empty() {
                self.publish_gauges();
                let next_ready = self.transferring.iter().filter_map(|s| s.ready_at).min();
                let request = match next_ready {
                    Some(at) => tokio::select! {
                        r = rx.recv() => r.map(Some),
                        _ = tokio::time::sleep_until(at.into()) => Some(None),
                    },
                    None => rx.recv().await.map(Some),
                };
                match request {
                    None => return,
                    Some(Some(r)) => self.accept(r),
                    Some(None) => {}
                }
                clock = Instant::now();
            }
            while let Ok(r) = rx.try_recv() {
                self.accept(r);
            }
            self.drop_aborted();
            self.release_transferred();
            let (shape, scheduled) = self.schedule();
            self.publish_gauges();
            if scheduled.is_empty() {
                if self.running.is_empty() && !self.waiting.is_empty() {
                    // Nothing runs and the head cannot be admitted: it never will be.
                    let seq = self.waiting.pop_front().expect("non-empty");
                    let _ = seq.req.events.send(Event::Rejected(
                        "request needs more KV cache blocks than the engine has".to_owned(),
                    ));
                }
                tokio::task::yield_now().await;
                continue;
            }
            let step = self
                .config
                .profile
                .step_time(&shape)
                .mul_f64(self.faults.slowdown())
                .div_f64(self.config.time_scale.max(1e-6));
            clock = (clock + step).max(Instant::now() - Duration::from_millis(50));
            self.sleep_until(clock).await;
            self.finish_step(&scheduled);
        }
    }

    /// Wait for the end of the step, noticing clients that go away meanwhile (a slow
    /// profile or a slowdown fault can make one step last long).
    async fn sleep_until(&mut self, deadline: Instant) {
        const SLICE: Duration = Duration::from_millis(50);
        loop {
            let now = Instant::now();
            if now >= deadline {
                return;
            }
            tokio::time::sleep_until((deadline.min(now + SLICE)).into()).await;
            if Instant::now() < deadline {
                self.drop_aborted_running();
            }
        }
    }

    /// Abort running sequences whose client left, mid-step. Only the last ones can be
    /// removed without disturbing the step's plan (indexes into `running`); the rest are
    /// dropped at the next step boundary.
    fn drop_aborted_running(&mut self) {
        while self.running.last().is_some_and(|s| s.req.events.is_closed()) {
            let seq = self.running.pop().expect("checked");
            self.kv.release(&seq.blocks);
            self.metrics.aborted.inc();
        }
        self.publish_gauges();
    }

    fn accept(&mut self, req: EngineRequest) {
        let mut seq = Seq::new(req);
        if let Kind::RemoteKv { per_block } = seq.req.kind {
            let total = seq.tokens.len();
            let cached = self.kv.lookup(&block_hashes(&seq.tokens[..total - 1]));
            let pulled = total.div_ceil(BLOCK_SIZE).saturating_sub(cached);
            let transfer = per_block * pulled as u32;
            seq.ready_at = Some(Instant::now() + transfer.div_f64(self.config.time_scale.max(1e-6)));
            self.transferring.push(seq);
        } else {
            self.waiting.push_back(seq);
        }
    }

    fn release_transferred(&mut self) {
        let now = Instant::now();
        let mut i = 0;
        while i < self.transferring.len() {
            if self.transferring[i].ready_at.is_some_and(|at| at <= now) {
                let seq = self.transferring.swap_remove(i);
                self.waiting.push_back(seq);
            } else {
                i += 1;
            }
        }
    }

    fn drop_aborted(&mut self) {
        let kv = &mut self.kv;
        let metrics = &self.metrics;
        let mut abort = |seq: &Seq| {
            if seq.req.events.is_closed() {
                kv.release(&seq.blocks);
                metrics.aborted.inc();
                false
            } else {
                true
            }
        };
        self.running.retain(&mut abort);
        self.waiting.retain(&mut abort);
        self.transferring.retain(&mut abort);
    }

    fn publish_gauges(&self) {
        self.metrics.running.set(self.running.len() as i64);
        self.metrics.waiting.set((self.waiting.len() + self.transferring.len()) as i64);
        self.metrics.kv_usage.set(self.kv.usage());
    }

    /// Plan one step: `(running index, tokens to compute)` for each scheduled sequence.
    fn schedule(&mut self) -> (StepShape, Vec<(usize, usize)>) {
        let mut budget = self.config.max_num_batched_tokens;
        let mut scheduled: Vec<(usize, usize)> = Vec::new();
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let need = self.running[i].remaining().min(budget);
            let blocks = self.running[i].blocks_for(self.running[i].computed + need);
            if !self.make_room(blocks, i) {
                break; // `i` itself was preempted
            }
            let new = self.kv.allocate(blocks).expect("room was made");
            self.running[i].blocks.extend(new);
            scheduled.push((i, need));
            budget -= need;
            i += 1;
        }
        while budget > 0 && self.running.len() < self.config.max_num_seqs {
            let Some(mut seq) = self.waiting.pop_front() else { break };
            match self.admit(&mut seq, budget) {
                Admission::Scheduled(need) => {
                    budget -= need;
                    self.running.push(seq);
                    scheduled.push((self.running.len() - 1, need));
                }
                Admission::NoRoom => {
                    self.waiting.push_front(seq);
                    break;
                }
                Admission::Rejected => {}
            }
        }
        let mut shape = StepShape { seqs: scheduled.len(), ..Default::default() };
        for &(i, need) in &scheduled {
            let seq = &self.running[i];
            if seq.remaining() == 1 && need == 1 && seq.computed >= seq.prompt_len {
                shape.decode_context_tokens += seq.tokens.len();
            } else {
                shape.prefill_tokens += need;
                shape.prefill_token_pairs += need as f64 * (seq.computed as f64 + need as f64 / 2.0);
            }
        }
        (shape, scheduled)
    }

    /// Free `blocks` blocks, preempting the latest-admitted running sequences other
    /// than `keep` (and `keep` itself as a last resort). False if `keep` was preempted.
    fn make_room(&mut self, blocks: usize, keep: usize) -> bool {
        while self.kv.free_blocks() < blocks {
            let victim = self.running.len() - 1;
            let mut seq = self.running.pop().expect("keep is running");
            self.kv.release(&seq.blocks);
            seq.blocks.clear();
            seq.computed = 0;
            seq.published = 0;
            seq.parent_hash = 0;
            self.metrics.preemptions.inc();
            self.waiting.push_front(seq);
            if victim == keep {
                return false;
            }
        }
        true
    }

    /// Admit a waiting sequence with its cached prefix, if its blocks fit now.
    fn admit(&mut self, seq: &mut Seq, budget: usize) -> Admission {
        let total = seq.tokens.len();
        if total.div_ceil(BLOCK_SIZE) > self.kv.num_blocks() {
            let _ = seq.req.events.send(Event::Rejected(format!(
                "request needs {} KV blocks, the engine has {}",
                total.div_ceil(BLOCK_SIZE),
                self.kv.num_blocks()
            )));
            return Admission::Rejected;
        }
        // Reuse cached full blocks, always leaving at least one token to compute.
        let hashes = block_hashes(&seq.tokens[..total - 1]);
        let hit_blocks = self.kv.lookup(&hashes);
        let remote = matches!(seq.req.kind, Kind::RemoteKv { .. });
        let computed = if remote { total - 1 } else { hit_blocks * BLOCK_SIZE };
        let need = (total - computed).min(budget);
        let fresh = (computed + need).div_ceil(BLOCK_SIZE) - hit_blocks;
        if self.kv.free_blocks() < fresh + hit_blocks {
            return Admission::NoRoom;
        }
        let mut blocks = self.kv.take_cached(&hashes[..hit_blocks]);
        match self.kv.allocate(fresh) {
            Some(new) => blocks.extend(new),
            None => {
                self.kv.release(&blocks);
                return Admission::NoRoom;
            }
        }
        if !seq.admitted {
            seq.admitted = true;
            self.metrics.prefix_queries.inc_by(total as u64);
            self.metrics.prefix_hits.inc_by((hit_blocks * BLOCK_SIZE) as u64);
            self.metrics.queue_time.observe(seq.req.arrived.elapsed().as_secs_f64());
        }
        seq.blocks = blocks;
        seq.computed = computed;
        seq.published = hit_blocks;
        seq.parent_hash = if hit_blocks > 0 { hashes[hit_blocks - 1] } else { 0 };
        Admission::Scheduled(need)
    }

    fn finish_step(&mut self, scheduled: &[(usize, usize)]) {
        let now = Instant::now();
        let mut done = Vec::new();
        for &(i, need) in scheduled {
            let Some(seq) = self.running.get_mut(i) else { continue };
            seq.computed += need;
            if seq.computed <= seq.prompt_len {
                self.metrics.prompt_tokens.inc_by(need as u64);
            }
            publish_full_blocks(&mut self.kv, seq);
            if seq.computed < seq.tokens.len() {
                continue; // mid-prefill
            }
            if seq.req.kind == Kind::PrefillOnly && seq.generated == 0 {
                let _ = seq.req.events.send(Event::PrefillBlocks(seq.blocks.clone()));
            }
            let id = seq.sampler.next_token();
            seq.tokens.push(id);
            seq.generated += 1;
            self.metrics.generation_tokens.inc();
            match seq.last_token_at {
                None => self.metrics.ttft.observe((now - seq.req.arrived).as_secs_f64()),
                Some(t) => self.metrics.itl.observe((now - t).as_secs_f64()),
            }
            seq.last_token_at = Some(now);
            let stop_hit = seq.stop_string_hit(id);
            let finish = if let Some(i) = stop_hit.filter(|_| seq.generated >= seq.req.min_tokens) {
                Some(Finish::StopString(i))
            } else if seq.generated >= seq.req.max_tokens || seq.req.kind == Kind::PrefillOnly {
                Some(Finish::Length)
            } else if !seq.req.ignore_eos
                && seq.generated >= seq.req.min_tokens
                && seq.generated >= seq.sampler.natural_len()
            {
                Some(Finish::Stop)
            } else {
                None
            };
            let sent = seq.req.events.send(Event::Token { id, finish });
            if finish.is_some() || sent.is_err() {
                done.push(i);
                if let Some(f) = finish {
                    let reason = if f == Finish::Length { "length" } else { "stop" };

                    self.metrics.request_success.with_label_values(&[reason]).inc();
                    self.metrics.e2e.observe((now - seq.req.arrived).as_secs_f64());
                } else {
                    self.metrics.aborted.inc();
                }
            }
        }
        done.sort_unstable();
        for i in done.into_iter().rev() {
            let seq = self.running.remove(i);
            self.kv.release(&seq.blocks);
        }
    }
}

/// Publish the sequence's newly filled blocks under their chained hashes.
fn publish_full_blocks(kv: &mut KvCache, seq: &mut Seq) {
    let full = seq.computed / BLOCK_SIZE;
    while seq.published < full.min(seq.blocks.len()) {
        let b = seq.published;
        let hash = chain_hash(seq.parent_hash, &seq.tokens[b * BLOCK_SIZE..(b + 1) * BLOCK_SIZE]);
        kv.publish(seq.blocks[b], hash);
        seq.parent_hash = hash;
        seq.published += 1;
    }
}
