//! The scheduler loop behind an [`Engine`](super::Engine): one step at a time, admit,
//! prefill, decode, preempt, and hand each step's tokens to the API server.

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio::time::Instant;

use super::*;
use crate::api_server::{ApiServer, StepOutput};

enum Admission {
    /// Running; computes this many tokens this step.
    Scheduled(usize),
    /// Its blocks do not fit now: it waits at the head of the queue.
    NoRoom,
    /// It can never fit; the client has been told.
    Rejected,
}

pub(super) struct Scheduler {
    config: EngineConfig,
    metrics: Arc<SimMetrics>,
    faults: Arc<Faults>,
    api: ApiServer,
    kv: KvCache,
    waiting: VecDeque<Seq>,
    running: Vec<Seq>,
    /// Decode requests waiting for their KV to arrive from a prefill replica.
    transferring: Vec<Seq>,
}

impl Scheduler {
    pub(super) fn new(
        config: EngineConfig,
        metrics: Arc<SimMetrics>,
        faults: Arc<Faults>,
        api: ApiServer,
    ) -> Self {
        let mut kv = KvCache::new(config.num_gpu_blocks);
        if config.kv_events.is_some() {
            kv.record_events();
        }
        Scheduler {
            config,
            metrics,
            faults,
            api,
            kv,
            waiting: VecDeque::new(),
            running: Vec::new(),
            transferring: Vec::new(),
        }
    }

    pub(super) async fn run(mut self, mut rx: mpsc::UnboundedReceiver<EngineRequest>) {
        let mut clock = Instant::now();
        loop {
            if self.running.is_empty() && self.waiting.is_empty() {
                self.publish_gauges();
                let next_ready = self.transferring.iter().filter_map(|s| s.ready_at).min();
                let request = match next_ready {
                    Some(at) => tokio::select! {
                        r = rx.recv() => r.map(Some),
                        _ = tokio::time::sleep_until(at) => Some(None),
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
            self.send_kv_events();
        }
    }

    /// Hand the step's cache events to the publisher (one batch per step, as vLLM).
    fn send_kv_events(&mut self) {
        if let Some(tx) = &self.config.kv_events {
            let events = self.kv.take_events();
            if !events.is_empty() {
                let _ = tx.send(events);
            }
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
            tokio::time::sleep_until(deadline.min(now + SLICE)).await;
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
            self.kv.release(seq.held());
            self.metrics.aborted.inc();
        }
        self.publish_gauges();
    }

    fn accept(&mut self, req: EngineRequest) {
        let mut seq = Seq::new(req);
        if let Kind::RemoteKv { per_block } = seq.req.kind {
            // Pull the blocks the decode step reads that this replica does not have: the
            // whole prompt, or with a window only the blocks the window reaches.
            let total = seq.tokens.len();
            let hashes = block_hashes(&seq.tokens[..total - 1], seq.root);
            let from = self.window_start(total - 1);
            let cached = match self.config.profile.attention_window {
                None => self.kv.lookup(&hashes),
                Some(_) => self.kv.cached_count(&hashes[from.min(hashes.len())..]),
            };
            let pulled = total.div_ceil(BLOCK_SIZE).saturating_sub(from + cached);
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
                kv.release(seq.held());
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
        let window = self.config.profile.attention_window;
        let mut shape = StepShape { seqs: scheduled.len(), ..Default::default() };
        for &(i, need) in &scheduled {
            let seq = &self.running[i];
            if seq.remaining() == 1 && need == 1 && seq.computed >= seq.prompt_len {
                shape.decode_context_tokens += window.map_or(seq.tokens.len(), |w| seq.tokens.len().min(w));
            } else {
                shape.prefill_tokens += need;
                shape.prefill_token_pairs += attention_pairs(seq.computed, need, window);
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
            self.kv.release(seq.held());
            seq.blocks.clear();
            seq.released = 0;
            seq.computed = 0;
            seq.published = 0;
            seq.parent_hash = seq.root;
            self.metrics.preemptions.inc();
            self.waiting.push_front(seq);
            if victim == keep {
                return false;
            }
        }
        true
    }

    /// The first block attention reads when the next token is at `position`: 0 with full
    /// attention, else the block holding the window's first token.
    fn window_start(&self, position: usize) -> usize {
        self.config.profile.attention_window.map_or(0, |w| position.saturating_sub(w) / BLOCK_SIZE)
    }

    /// Admit a waiting sequence with its cached prefix, if its blocks fit now.
    fn admit(&mut self, seq: &mut Seq, budget: usize) -> Admission {
        let total = seq.tokens.len();
        let window_blocks = self.config.profile.attention_window.map(|w| w.div_ceil(BLOCK_SIZE));
        let needed =
            window_blocks.map_or(total.div_ceil(BLOCK_SIZE), |w| (w + 1).min(total.div_ceil(BLOCK_SIZE)));
        if needed > self.kv.num_blocks() {
            let _ = seq.req.events.send(Event::Rejected(format!(
                "request needs {needed} KV blocks, the engine has {}",
                self.kv.num_blocks()
            )));
            return Admission::Rejected;
        }
        // Reuse cached full blocks, always leaving at least one token to compute.
        let hashes = block_hashes(&seq.tokens[..total - 1], seq.root);
        let hit_blocks = self.kv.lookup_window(&hashes, window_blocks);
        let remote = matches!(seq.req.kind, Kind::RemoteKv { .. });
        let computed = if remote { total - 1 } else { hit_blocks * BLOCK_SIZE };
        let need = (total - computed).min(budget);
        // Blocks before the window of this step's first token are never held; cached ones
        // in the window are reused; the rest up to the step's last token are fresh.
        let hold_from = self.window_start(computed);
        let reuse = hold_from.min(hit_blocks)..hit_blocks;
        let fresh_from = hit_blocks.max(hold_from);
        let fresh = (computed + need).div_ceil(BLOCK_SIZE) - fresh_from;
        if self.kv.free_blocks() < fresh + reuse.len() {
            return Admission::NoRoom;
        }
        let mut blocks = vec![NOT_HELD; reuse.start];
        blocks.extend(self.kv.take_cached(&hashes[reuse.clone()]));
        blocks.resize(fresh_from, NOT_HELD);
        match self.kv.allocate(fresh) {
            Some(new) => blocks.extend(new),
            None => {
                self.kv.release(&blocks[reuse.clone()]);
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
        seq.released = if reuse.is_empty() { fresh_from } else { reuse.start };
        seq.computed = computed;
        seq.published = fresh_from;
        seq.parent_hash = if fresh_from > 0 { hashes[fresh_from - 1] } else { seq.root };
        Admission::Scheduled(need)
    }

    /// Give back the blocks a sequence's window no longer reaches (they stay cached).
    fn release_outside_window(&mut self, i: usize) {
        let from = self.window_start(self.running[i].computed);
        let seq = &mut self.running[i];
        let until = from.min(seq.published).min(seq.blocks.len());
        if until > seq.released {
            self.kv.release(&seq.blocks[seq.released..until]);
            seq.released = until;
        }
    }

    fn finish_step(&mut self, scheduled: &[(usize, usize)]) {
        let now = Instant::now();
        let mut done = Vec::new();
        let mut output: StepOutput = Vec::with_capacity(scheduled.len());
        // The API server's work for the step's tokens, each weighted by its endpoint.
        let mut token_units = 0.0;
        for &(i, need) in scheduled {
            let Some(seq) = self.running.get_mut(i) else { continue };
            if seq.req.events.is_closed() {
                done.push(i);
                self.metrics.aborted.inc();
                continue;
            }
            seq.computed += need;
            if seq.computed <= seq.prompt_len {
                self.metrics.prompt_tokens.inc_by(need as u64);
            }
            publish_full_blocks(&mut self.kv, seq);
            if self.config.profile.attention_window.is_some() {
                self.release_outside_window(i);
            }
            let seq = &mut self.running[i];
            if seq.computed < seq.tokens.len() {
                continue; // mid-prefill
            }
            if seq.req.kind == Kind::PrefillOnly && seq.generated == 0 {
                output.push((seq.req.events.clone(), Event::PrefillBlocks(seq.blocks.clone())));
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
            let stop_hit = seq.stop_string_hit(id, seq.generated);
            let finish = if let Some(i) = stop_hit {
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
            // A natural end is the model's end-of-text token.
            let id = if finish == Some(Finish::Stop) { llm_common::tokenizer::EOS_ID } else { id };
            output.push((seq.req.events.clone(), Event::Token { id, finish }));
            token_units += seq.req.output_weight;
            if let Some(f) = finish {
                done.push(i);
                let reason = if f == Finish::Length { "length" } else { "stop" };
                self.metrics.request_success.with_label_values(&[reason]).inc();
                self.metrics.e2e.observe((now - seq.req.arrived).as_secs_f64());
            }
        }
        self.api.output(output, token_units);
        done.sort_unstable();
        for i in done.into_iter().rev() {
            let seq = self.running.remove(i);
            self.kv.release(seq.held());
        }
    }
}

/// Publish the sequence's newly filled blocks under their chained hashes.
fn publish_full_blocks(kv: &mut KvCache, seq: &mut Seq) {
    let full = seq.computed / BLOCK_SIZE;
    while seq.published < full.min(seq.blocks.len()) {
        let b = seq.published;
        let tokens = &seq.tokens[b * BLOCK_SIZE..(b + 1) * BLOCK_SIZE];
        let hash = chain_hash(seq.parent_hash, tokens);
        kv.publish(
            seq.blocks[b],
            hash,
            (b > 0).then_some(seq.parent_hash),
            tokens,
            seq.req.cache_salt.as_deref(),
        );
        seq.parent_hash = hash;
        seq.published += 1;
    }
}
