//! `kv-aware`: send a request to the replica with the least estimated work for it, from
//! what the engines themselves report holding (vLLM's KV events, [`crate::policy::cache_index`]).
//!
//! The request's prompt is tokenised in the router ([`crate::policy::prompt_tokens`]) and cut
//! into the engines' blocks, each keyed by its token ids chained to the blocks before
//! it, as the KV events key them. For each replica, `matched` is how many prompt tokens
//! its cache holds from the start. The cost of a replica is
//!
//! `prefill_weight * (prompt tokens - matched) + load_weight * tokens in flight`
//!
//! (this cost decides every request with `--kv-pure-cost`; by default it decides only
//! when the conversation's holder is overloaded, see below)
//!
//! the prompt tokens it would still have to prefill, plus the prefill work of the
//! requests the router has in flight on it (for each, the prompt tokens its replica did
//! not hold when it was routed): the shape of Dynamo's and Ray's KV-aware cost, in
//! tokens, with the load counted as the work that delays a new request's first token.
//! Counting whole prompts in flight instead (Dynamo's active blocks) moved sessions
//! away from their cache at every small swing of load: on the agentic workload at
//! c=128 that cost 15% of throughput against consistent hashing (see README). The
//! lowest cost wins; ties go to fewer requests in flight, then to the replica holding
//! least, then rotate. The choice is the pure [`choose_by_cost`].
//!
//! By default two rules come first, because minimising that cost request by request
//! moves conversations between replicas at every swing of load and loses their cache
//! (measured on the agentic workload: 0.90-0.99x consistent hashing's throughput, and
//! 90-94% prefix-cache hits against its 94-95%; see README): a prompt that no replica
//! holds more of than the others (a new conversation) is placed by
//! [`place_new_conversation`], and a prompt some replica holds more of goes to that
//! replica while it is not overloaded ([`super::overload_bound`] with
//! `--prefix-balance-abs` / `--prefix-balance-rel`). Only an overloaded holder sends
//! the request to the cheapest of the others.
//!
//! The prompt's blocks are remembered on the chosen replica as the request is sent
//! ([`Policy::routed`]; the engine will store them when its prefill runs, and report
//! it), so requests sharing a prefix that arrive together follow the first; if that
//! attempt fails, those not yet reported are taken back ([`Policy::unrouted`]). With a session key, later turns follow the
//! session's replica while it is eligible and not overloaded ([`super::overload_bound`]
//! with `--prefix-balance-abs` / `--prefix-balance-rel`).
//! A replica whose events are stale has an empty memory and is judged by load alone.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::session_homes::SessionHomes;
use super::{
    CacheScope, CachedView, Candidate, Decision, LeastLoaded, Policy, PrefixOptions, Reason, Routed, rotated,
};
use crate::policy::cache_index::kv_events::{cache_root, token_block_keys};

/// Tokens per block assumed for a prompt while no replica has reported its own (vLLM's
/// GPU default).
const DEFAULT_BLOCK_SIZE: usize = 16;
use crate::ingress::routing_key::RoutingKey;
use crate::policy::cache_index::{CacheIndex, PromptBlocks, ReplicaBlocks};
use crate::policy::prompt_tokens::PromptTokenizer;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KvOptions {
    /// Weight of a prompt token the replica would have to prefill.
    pub prefill_weight: f64,
    /// Weight of a prompt token of a request in flight on the replica.
    pub load_weight: f64,
    /// Every request by [`choose_by_cost`] alone (Dynamo's way), rather than new
    /// conversations by hash and held ones by their holder until it is overloaded.
    pub pure_cost: bool,
}

impl Default for KvOptions {
    fn default() -> Self {
        KvOptions { prefill_weight: 1.0, load_weight: 1.0, pure_cost: false }
    }
}

/// The replica with the lowest cost for a prompt of `prompt_tokens` of which replica `i`
/// holds the first `matched[i]` (and `held[i]` blocks in all). Equal costs go to fewer
/// requests in flight, then to the replica holding least (so distinct new prompts
/// spread over the fleet's cache), then rotate from `start`. `Cached` when the winner holds the longest match
/// there is, `Overloaded` when a replica holding more lost on load, `Uncached` when no
/// replica holds any of it.
pub fn choose_by_cost(
    prompt_tokens: usize,
    matched: &[usize],
    held: &[usize],
    replicas: &[Candidate],
    options: &KvOptions,
    start: usize,
) -> Option<Decision> {
    let n = replicas.len();
    let cost = |i: usize| {
        let uncached = prompt_tokens.saturating_sub(matched[i]) as f64;
        options.prefill_weight * uncached + options.load_weight * replicas[i].in_flight_tokens as f64
    };
    let eligible = || rotated(start % n.max(1), n).filter(|&i| replicas[i].eligible);
    let best = eligible().min_by(|&a, &b| {
        cost(a)
            .total_cmp(&cost(b))
            .then(replicas[a].in_flight.cmp(&replicas[b].in_flight))
            .then(held[a].cmp(&held[b]))
    })?;
    let longest = eligible().map(|i| matched[i]).max().unwrap_or(0);
    let reason = if longest == 0 {
        Reason::Uncached
    } else if matched[best] == longest {
        Reason::Cached
    } else {
        Reason::Overloaded
    };
    Some(Decision { replica: best, reason })
}

/// Where a new conversation goes: a prompt no replica holds more of than the others
/// (beyond a prefix they all hold, such as a shared system prompt) is placed by
/// rendezvous hashing of `conversation` (its last block's key, which is the
/// conversation's own) over the replicas' names, among the eligible ones not overloaded.
///
/// Placing a new conversation by the load of the moment instead piles sessions onto
/// whichever replicas happen to be between turns, and the cache then keeps them there:
/// on the agentic workload at c=64 that cost 10% of throughput against consistent
/// hashing (see README). Hashing spreads conversations evenly, as consistent hashing
/// of session ids does, without needing the ids; the cache keeps them where they start.
pub fn place_new_conversation(
    conversation: u64,
    name_hashes: &[u64],
    replicas: &[Candidate],
    balance: &PrefixOptions,
) -> Option<usize> {
    let bound = super::candidates_bound(replicas, balance.balance_abs, balance.balance_rel)?;
    (0..replicas.len())
        .filter(|&i| replicas[i].eligible && replicas[i].in_flight <= bound)
        .max_by_key(|&i| xxhash_rust::xxh3::xxh3_64_with_seed(&conversation.to_le_bytes(), name_hashes[i]))
}

/// The replica holding the longest part of the prompt, if it is eligible and not
/// overloaded ([`super::overload_bound`]).
fn holder(matched: &[usize], replicas: &[Candidate], balance: &PrefixOptions) -> Option<usize> {
    let bound = super::candidates_bound(replicas, balance.balance_abs, balance.balance_rel)?;
    let best = (0..replicas.len())
        .filter(|&i| replicas[i].eligible)
        .max_by_key(|&i| (matched[i], std::cmp::Reverse(replicas[i].in_flight)))?;
    (replicas[best].in_flight <= bound).then_some(best)
}

/// Whether no replica holds more of the prompt than the others, to within a block.
fn no_replica_holds_it(matched: &[usize], replicas: &[Candidate], block: usize) -> bool {
    let mut best = [0usize; 2];
    for (m, c) in matched.iter().zip(replicas) {
        if !c.eligible {
            continue;
        }
        if *m > best[0] {
            best = [*m, best[0]];
        } else if *m > best[1] {
            best[1] = *m;
        }
    }
    best[0] < best[1] + block
}

/// The policy: [`choose_by_cost`] over the replicas' event-fed memories.
pub struct KvAware {
    index: Arc<CacheIndex>,
    memories: Vec<Arc<ReplicaBlocks>>,
    names: Vec<String>,
    /// xxh3 of each name, for placing new conversations.
    name_hashes: Vec<u64>,
    tokenizer: Arc<PromptTokenizer>,
    sessions: Arc<SessionHomes>,
    options: KvOptions,
    balance: PrefixOptions,
    rotation: AtomicUsize,
    without_prompt: LeastLoaded,
}

impl KvAware {
    pub fn new(
        replica_names: &[String],
        index: Arc<CacheIndex>,
        tokenizer: Arc<PromptTokenizer>,
        sessions: Arc<SessionHomes>,
        options: KvOptions,
        balance: PrefixOptions,
    ) -> Self {
        KvAware {
            memories: index.lay_out(replica_names),
            names: replica_names.to_vec(),
            name_hashes: replica_names.iter().map(|n| xxhash_rust::xxh3::xxh3_64(n.as_bytes())).collect(),
            index,
            tokenizer,
            sessions,
            options,
            balance,
            rotation: AtomicUsize::new(0),
            without_prompt: LeastLoaded::default(),
        }
    }
}

impl Policy for KvAware {
    fn name(&self) -> &'static str {
        "kv-aware"
    }

    fn choose(&self, key: Option<&RoutingKey>, replicas: &[Candidate]) -> Option<Decision> {
        self.without_prompt.choose(key, replicas)
    }

    /// The prompt keyed at every block size the replicas' engines report (one, in a
    /// fleet configured alike), the most common first.
    fn prompt_blocks(&self, scope: CacheScope<'_>, prompt: &[u8]) -> Option<PromptBlocks> {
        let tokens = self.tokenizer.tokens(prompt)?;
        self.prompt_blocks_for_ids(scope, &tokens)
    }

    /// Keyed as the engines' events key their blocks: from the root of the request's
    /// `cache_salt` (the model is not part of the key: one engine serves one model).
    fn prompt_blocks_for_ids(&self, scope: CacheScope<'_>, tokens: &[u32]) -> Option<PromptBlocks> {
        let root = cache_root(scope.salt);
        let mut sizes: Vec<(usize, usize)> = Vec::new();
        for size in self.memories.iter().map(|m| m.block_size()).filter(|&s| s > 0) {
            match sizes.iter_mut().find(|(s, _)| *s == size) {
                Some((_, count)) => *count += 1,
                None => sizes.push((size, 1)),
            }
        }
        sizes.sort_by_key(|&(size, count)| (std::cmp::Reverse(count), size));
        let mut keyed = sizes.iter().map(|&(size, _)| (size, token_block_keys(tokens, size, root)));
        let (block_tokens, hashes) = keyed
            .next()
            .unwrap_or_else(|| (DEFAULT_BLOCK_SIZE, token_block_keys(tokens, DEFAULT_BLOCK_SIZE, root)));
        Some(PromptBlocks { hashes, tokens: tokens.len(), block_tokens, other_sizes: keyed.collect() })
    }

    fn choose_for_prompt(
        &self,
        key: Option<&RoutingKey>,
        prompt: &PromptBlocks,
        replicas: &[Candidate],
    ) -> Option<Decision> {
        let (now, ttl, block) = (self.index.now(), self.index.ttl_ms(), prompt.block_tokens);
        let matched: Vec<usize> = replicas
            .iter()
            .zip(&self.memories)
            .map(|(c, memory)| if c.eligible { matched_tokens(memory, prompt, now, ttl) } else { 0 })
            .collect();
        if let Some(replica) =
            key.and_then(|k| self.sessions.home_for(k, &self.names, replicas, &self.balance))
        {
            return Some(Decision { replica, reason: Reason::Affinity });
        }
        if !self.options.pure_cost {
            if let Some(&last) = prompt.hashes.last()
                && no_replica_holds_it(&matched, replicas, block)
                && let Some(replica) =
                    place_new_conversation(last, &self.name_hashes, replicas, &self.balance)
            {
                return Some(Decision { replica, reason: Reason::Uncached });
            }
            // The conversation's holder keeps it while it is not overloaded.
            if let Some(home) = holder(&matched, replicas, &self.balance) {
                return Some(Decision { replica: home, reason: Reason::Cached });
            }
        }
        let start = self.rotation.fetch_add(1, Ordering::Relaxed);
        let held: Vec<usize> = self.memories.iter().map(|m| m.len()).collect();
        choose_by_cost(prompt.tokens, &matched, &held, replicas, &self.options, start)
    }

    fn cached_view(
        &self,
        prompt: &PromptBlocks,
        decision: Decision,
        replicas: &[Candidate],
    ) -> Option<CachedView> {
        let (now, ttl) = (self.index.now(), self.index.ttl_ms());
        let held = |i: usize| matched_tokens(&self.memories[i], prompt, now, ttl);
        let chosen = held(decision.replica);
        let best = (0..replicas.len()).filter(|&i| replicas[i].eligible).map(held).max().unwrap_or(0);
        Some(CachedView { chosen, best: best.max(chosen) })
    }

    /// Remember the prompt on the replica (and the session's home); its load is the
    /// tokens it has to prefill there.
    fn routed(&self, key: Option<&RoutingKey>, prompt: &PromptBlocks, decision: Decision) -> Routed {
        let (now, ttl) = (self.index.now(), self.index.ttl_ms());
        let memory = &self.memories[decision.replica];
        let (assumed_from, cached) = held(memory, prompt, now, ttl);
        let keys = prompt.keys(memory.block_size());
        memory.remember(keys, now);
        // Its engine reports the blocks it stores; a prompt it holds whole brings it none,
        // and may be followed by no event at all, which is not silence.
        if assumed_from < keys.len() {
            memory.note_routed(now);
        }
        if let Some(key) = key {
            self.sessions.set(key, &self.names[decision.replica]);
        }
        Routed { load_tokens: prompt.tokens - cached, cached_tokens: Some(cached), assumed_from }
    }

    /// Forget the blocks remembered when the attempt was sent; those the engine reported
    /// before were kept. (A block its engine stored meanwhile is forgotten too, until
    /// the engine's next event or request about it: a belief too low costs a little
    /// locality, one too high sends conversations where their cache is not.)
    fn unrouted(&self, prompt: &PromptBlocks, decision: Decision, routed: Routed) {
        let memory = &self.memories[decision.replica];
        let keys = prompt.keys(memory.block_size());
        memory.forget(&keys[routed.assumed_from.min(keys.len())..]);
    }
}

/// Prompt tokens from the start that `memory` holds and its engine can reuse.
fn matched_tokens(memory: &ReplicaBlocks, prompt: &PromptBlocks, now: u64, ttl: u64) -> usize {
    held(memory, prompt, now, ttl).1
}

/// The prompt's blocks from the start that `memory` holds, keyed at its engine's block
/// size, and the tokens of them its engine can reuse. vLLM always computes a prompt's
/// last token, so it reuses at most the whole blocks before that token: a prompt of
/// exactly n blocks, all cached, reuses n - 1 of them and prefills the last again.
fn held(memory: &ReplicaBlocks, prompt: &PromptBlocks, now: u64, ttl: u64) -> (usize, usize) {
    let size = match memory.block_size() {
        0 => prompt.block_tokens,
        size => size,
    };
    let blocks = memory.matched(prompt.keys(size), now, ttl);
    (blocks, blocks.min(prompt.tokens.saturating_sub(1) / size.max(1)) * size)
}

#[cfg(test)]
mod tests {
    use super::super::test_support::all;
    use super::*;

    fn with_tokens(loads: &[(usize, usize)]) -> Vec<Candidate> {
        loads
            .iter()
            .map(|&(in_flight, in_flight_tokens)| Candidate {
                eligible: true,
                in_flight,
                in_flight_tokens,
                overloaded: false,
            })
            .collect()
    }

    #[test]
    fn the_least_work_wins() {
        let o = KvOptions::default();
        // Replica 1 holds 900 of 1000 tokens: 100 to prefill.
        let d = choose_by_cost(1000, &[0, 900, 0], &[0; 3], &all(&[0, 0, 0]), &o, 0).unwrap();
        assert_eq!((d.replica, d.reason), (1, Reason::Cached));
        // ... but it has 2000 tokens in flight: replica 0 (1000 to prefill, idle) is cheaper.
        let d =
            choose_by_cost(1000, &[0, 900, 0], &[0; 3], &with_tokens(&[(0, 0), (2, 2000), (1, 500)]), &o, 0)
                .unwrap();
        assert_eq!((d.replica, d.reason), (0, Reason::Overloaded));
        // Weighting load less keeps it on the cache.
        let light = KvOptions { load_weight: 0.1, ..o };
        let d = choose_by_cost(
            1000,
            &[0, 900, 0],
            &[0; 3],
            &with_tokens(&[(0, 0), (2, 2000), (1, 500)]),
            &light,
            0,
        );
        assert_eq!(d.unwrap().replica, 1);
    }

    #[test]
    fn nothing_cached_goes_by_load_and_ties_rotate() {
        let o = KvOptions::default();
        let d = choose_by_cost(100, &[0, 0, 0], &[0; 3], &with_tokens(&[(1, 50), (0, 0), (1, 10)]), &o, 0)
            .unwrap();
        assert_eq!((d.replica, d.reason), (1, Reason::Uncached));
        let picks: Vec<usize> = (0..3)
            .map(|s| choose_by_cost(100, &[0, 0, 0], &[0; 3], &all(&[0, 0, 0]), &o, s).unwrap().replica)
            .collect();
        assert_eq!(picks, vec![0, 1, 2]);
        // Equal cost: fewer requests in flight.
        let d = choose_by_cost(100, &[0, 0], &[0; 2], &with_tokens(&[(3, 0), (1, 0)]), &o, 0).unwrap();
        assert_eq!(d.replica, 1);
        // Equal cost and load: the replica holding least, whatever the rotation.
        let picks: Vec<usize> = (0..3)
            .map(|s| choose_by_cost(100, &[0, 0, 0], &[50, 7, 20], &all(&[0, 0, 0]), &o, s).unwrap().replica)
            .collect();
        assert_eq!(picks, vec![1, 1, 1]);
    }

    #[test]
    fn new_conversations_spread_by_hash_and_avoid_overload() {
        let names: Vec<u64> = (0..4u64).map(|i| xxhash_rust::xxh3::xxh3_64(&i.to_le_bytes())).collect();
        let balance = PrefixOptions::default();
        let mut counts = [0; 4];
        for conversation in 0..400u64 {
            counts[place_new_conversation(conversation, &names, &all(&[0; 4]), &balance).unwrap()] += 1;
        }
        assert!(counts.iter().all(|&n| n > 60), "{counts:?}");
        // The same conversation, the same replica; an overloaded one is skipped.
        let home = place_new_conversation(7, &names, &all(&[0; 4]), &balance).unwrap();
        assert_eq!(place_new_conversation(7, &names, &all(&[1, 1, 1, 1]), &balance), Some(home));
        let mut loads = [0; 4];
        loads[home] = 10;
        assert_ne!(place_new_conversation(7, &names, &all(&loads), &balance), Some(home));
        // Held everywhere alike (a shared prefix) is new; one replica ahead by a block is not.
        assert!(no_replica_holds_it(&[160, 160, 160], &all(&[0; 3]), 16));
        assert!(!no_replica_holds_it(&[160, 176, 160], &all(&[0; 3]), 16));
    }

    #[test]
    fn a_holder_keeps_its_conversation_until_overloaded() {
        let balance = PrefixOptions::default();
        let m = [100, 900, 300];
        // min 0: bound max(0 + 4, 0) = 4.
        assert_eq!(holder(&m, &all(&[2, 4, 0]), &balance), Some(1));
        assert_eq!(holder(&m, &all(&[2, 5, 0]), &balance), None);
        // min 2: bound 6; min 20: bound max(24, 30) = 30.
        assert_eq!(holder(&m, &all(&[2, 6, 2]), &balance), Some(1));
        assert_eq!(holder(&m, &all(&[20, 30, 25]), &balance), Some(1));
        assert_eq!(holder(&m, &all(&[20, 31, 25]), &balance), None);
        let mut c = all(&[0, 0, 0]);
        c[1].eligible = false;
        assert_eq!(holder(&[100, 900, 300], &c, &balance), Some(2));
    }

    #[test]
    fn the_last_prompt_token_is_always_prefilled() {
        let memory = ReplicaBlocks::new(100);
        memory.set_block_size(4);
        let prompt = |n: u32| {
            let tokens: Vec<u32> = (0..n).collect();
            PromptBlocks {
                hashes: token_block_keys(&tokens, 4, 0),
                tokens: tokens.len(),
                block_tokens: 4,
                other_sizes: vec![],
            }
        };
        // Both blocks of a 9-token prompt cached: 8 reused, the ninth token prefilled.
        memory.remember(&prompt(9).hashes, 0);
        assert_eq!(matched_tokens(&memory, &prompt(9), 0, u64::MAX), 8);
        // An 8-token prompt is exactly those two blocks: vLLM reuses only the first.
        assert_eq!(matched_tokens(&memory, &prompt(8), 0, u64::MAX), 4);
        assert_eq!(matched_tokens(&memory, &prompt(1), 0, u64::MAX), 0);
        assert_eq!(matched_tokens(&memory, &prompt(0), 0, u64::MAX), 0);
    }

    #[test]
    fn ineligible_replicas_are_never_chosen() {
        let mut c = all(&[0, 0]);
        c[1].eligible = false;
        let d = choose_by_cost(100, &[0, 100], &[0; 2], &c, &KvOptions::default(), 0).unwrap();
        assert_eq!(d.replica, 0);
        c[0].eligible = false;
        assert_eq!(choose_by_cost(100, &[0, 100], &[0; 2], &c, &KvOptions::default(), 0), None);
    }
}
