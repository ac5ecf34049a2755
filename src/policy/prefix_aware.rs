//! `prefix-aware`: send a request where the longest part of its prompt is already
//! cached, unless that replica is overloaded; otherwise to the least loaded replica.
//!
//! What each replica holds is the router's own memory of what it sent there
//! ([`crate::policy::cache_index`]): no engine events, no tokenizer. The choice itself is the
//! pure function [`choose_by_prefix`]; the policy looks the prompt up in each replica's
//! memory, asks it, and remembers the prompt on the replica chosen, so that requests
//! sharing a prefix that arrive together follow the first.
//!
//! A replica is overloaded when it has more than `min + balance_abs` and more than
//! `balance_rel * min` requests in flight, `min` being the least loaded eligible
//! replica's count: a shared prefix draws its sessions to one replica only until that
//! replica is clearly busier than the rest, then the excess goes elsewhere (and that
//! replica learns the prefix too). A match counts when it covers at least
//! `min_match` of the prompt's blocks; below that, the prompt is new.
//!
//! Where memory does not decide, the prompt itself does, so that router instances that
//! never saw each other's requests choose alike: each prompt has its own order of the
//! replicas, a rendezvous hash of its leading blocks (`--prefix-affinity-blocks`) with
//! the replicas' names. A new prompt goes to the first replica of its order that is not
//! overloaded (so distinct prefixes spread, and the same prefix goes to the same replica
//! from every instance), and equal matches are broken by that order, not by which
//! instance happened to route what.

use std::sync::Arc;

use super::CacheScope;
use super::session_homes::SessionHomes;
use super::{Candidate, Decision, LeastLoaded, Policy, Reason, overload_bound};
use crate::ingress::routing_key::RoutingKey;
use crate::policy::cache_index::{CacheIndex, PromptBlocks, ReplicaBlocks};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PrefixOptions {
    /// Bytes of prompt text per block.
    pub block_bytes: usize,
    /// Fraction of the prompt's blocks a replica must hold to attract it.
    pub min_match: f64,
    /// A replica is overloaded above `min + balance_abs` requests in flight ...
    pub balance_abs: usize,
    /// ... and above `balance_rel * min`.
    pub balance_rel: f64,
    /// Leading blocks of a prompt that decide its own order of the replicas.
    pub affinity_blocks: usize,
}

impl Default for PrefixOptions {
    fn default() -> Self {
        PrefixOptions {
            block_bytes: 256,
            min_match: 0.3,
            balance_abs: 4,
            balance_rel: 1.5,
            affinity_blocks: 4,
        }
    }
}

/// Choose among `replicas` for a prompt of `prompt_blocks` blocks of which replica `i`
/// holds the first `matched[i]`; `order` is the prompt's own order of the replicas (a
/// permutation of their indices). The longest match wins unless overloaded (or over
/// the engines' own bound); a new prompt goes to the first replica of its order that
/// is neither; equal matches go to the earlier in the order.
pub fn choose_by_prefix(
    prompt_blocks: usize,
    matched: &[usize],
    replicas: &[Candidate],
    options: &PrefixOptions,
    order: &[usize],
) -> Option<Decision> {
    let eligible = || order.iter().copied().filter(|&i| replicas.get(i).is_some_and(|c| c.eligible));
    let min = eligible().map(|i| replicas[i].in_flight).min()?;
    let bound = overload_bound(min, options.balance_abs, options.balance_rel);
    let fits = |i: usize| replicas[i].in_flight <= bound && !replicas[i].overloaded;
    // Longest match, then the earlier in the order: `max_by_key` keeps the last of
    // equals, so the key inverts the position.
    let best_of = |admit: &dyn Fn(usize) -> bool| {
        eligible()
            .enumerate()
            .filter(|&(_, i)| admit(i))
            .max_by_key(|&(position, i)| (matched[i], std::cmp::Reverse(position)))
            .map(|(_, i)| i)
    };
    let needed = ((options.min_match * prompt_blocks as f64).ceil() as usize).max(1);
    let best = best_of(&|_| true)?;
    if prompt_blocks == 0 || matched[best] < needed {
        let replica =
            eligible().find(|&i| fits(i)).or_else(|| eligible().min_by_key(|&i| replicas[i].in_flight))?;
        return Some(Decision { replica, reason: Reason::Uncached });
    }
    if fits(best) {
        return Some(Decision { replica: best, reason: Reason::Cached });
    }
    // The best holder is overloaded: the best of the rest, by match then order.
    let replica = best_of(&fits).unwrap_or(best);
    Some(Decision { replica, reason: Reason::Overloaded })
}

/// The prompt's own order of the replicas: by a rendezvous hash of its first
/// `affinity_blocks` blocks' chained hash with each replica's name seed.
pub fn prompt_order(prompt: &PromptBlocks, seeds: &[u64], affinity_blocks: usize) -> Vec<usize> {
    let lead = match prompt.hashes.len().min(affinity_blocks.max(1)) {
        0 => 0,
        n => prompt.hashes[n - 1],
    };
    let mut scored: Vec<(u64, usize)> = seeds
        .iter()
        .enumerate()
        .map(|(i, &seed)| (xxhash_rust::xxh3::xxh3_64_with_seed(&lead.to_le_bytes(), seed), i))
        .collect();
    scored.sort_unstable_by(|a, b| b.cmp(a));
    scored.into_iter().map(|(_, i)| i).collect()
}

/// The policy: [`choose_by_prefix`] over the replicas' memories.
pub struct PrefixAware {
    index: Arc<CacheIndex>,
    /// Each replica's memory, indexed like the fleet.
    memories: Vec<Arc<ReplicaBlocks>>,
    names: Vec<String>,
    /// The names' hashes, for each prompt's own order.
    seeds: Vec<u64>,
    sessions: Arc<SessionHomes>,
    options: PrefixOptions,
    /// Requests without a prompt.
    without_prompt: LeastLoaded,
}

impl PrefixAware {
    pub fn new(
        replica_names: &[String],
        index: Arc<CacheIndex>,
        sessions: Arc<SessionHomes>,
        options: PrefixOptions,
    ) -> Self {
        let memories = index.lay_out(replica_names);
        PrefixAware {
            index,
            memories,
            names: replica_names.to_vec(),
            seeds: replica_names.iter().map(|n| xxhash_rust::xxh3::xxh3_64(n.as_bytes())).collect(),
            sessions,
            options,
            without_prompt: LeastLoaded::default(),
        }
    }
}

impl Policy for PrefixAware {
    fn name(&self) -> &'static str {
        "prefix-aware"
    }

    /// A request without a prompt (`/tokenize`, other calls): the least loaded replica.
    fn choose(&self, key: Option<&RoutingKey>, replicas: &[Candidate]) -> Option<Decision> {
        self.without_prompt.choose(key, replicas)
    }

    fn prompt_blocks(&self, scope: CacheScope<'_>, prompt: &[u8]) -> Option<PromptBlocks> {
        Some(PromptBlocks::new(scope, prompt, self.options.block_bytes))
    }

    fn choose_for_prompt(
        &self,
        key: Option<&RoutingKey>,
        prompt: &PromptBlocks,
        replicas: &[Candidate],
    ) -> Option<Decision> {
        let (now, ttl) = (self.index.now(), self.index.ttl_ms());
        if let Some(replica) =
            key.and_then(|k| self.sessions.home_for(k, &self.names, replicas, &self.options))
        {
            self.memories[replica].remember(&prompt.hashes, now);
            return Some(Decision { replica, reason: Reason::Affinity });
        }
        let matched: Vec<usize> = replicas
            .iter()
            .zip(&self.memories)
            .map(|(c, memory)| if c.eligible { memory.matched(&prompt.hashes, now, ttl) } else { 0 })
            .collect();
        let order = prompt_order(prompt, &self.seeds, self.options.affinity_blocks);
        let decision = choose_by_prefix(prompt.len(), &matched, replicas, &self.options, &order)?;
        self.memories[decision.replica].remember(&prompt.hashes, now);
        if let Some(key) = key {
            self.sessions.set(key, &self.names[decision.replica]);
        }
        Some(decision)
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::all;
    use super::*;
    use crate::policy::cache_index::IndexLimits;
    use std::time::Duration;

    const O: PrefixOptions = PrefixOptions {
        block_bytes: 4,
        min_match: 0.5,
        balance_abs: 4,
        balance_rel: 1.5,
        affinity_blocks: 2,
    };

    fn pick(prompt: usize, matched: &[usize], loads: &[usize]) -> Decision {
        let order: Vec<usize> = (0..loads.len()).collect();
        choose_by_prefix(prompt, matched, &all(loads), &O, &order).unwrap()
    }

    #[test]
    fn the_longest_match_wins_while_not_overloaded() {
        let d = pick(10, &[2, 9, 6], &[0, 3, 0]);
        assert_eq!((d.replica, d.reason), (1, Reason::Cached));
        // Equal matches: the earlier in the prompt's order, whatever the loads.
        let d = pick(10, &[8, 8, 1], &[3, 2, 0]);
        assert_eq!((d.replica, d.reason), (0, Reason::Cached));
    }

    #[test]
    fn a_new_prompt_goes_to_the_first_of_its_order_within_the_bound() {
        let d = pick(10, &[4, 0, 0], &[0, 2, 1]);
        assert_eq!((d.replica, d.reason), (0, Reason::Uncached));
        // min 1: bound max(1 + 4, 1) = 5; replica 0 at 6 is over it.
        let d = pick(10, &[4, 0, 0], &[6, 2, 1]);
        assert_eq!((d.replica, d.reason), (1, Reason::Uncached));
        let d = pick(0, &[0, 0], &[1, 0]);
        assert_eq!((d.replica, d.reason), (0, Reason::Uncached));
        // Overloaded by the engines' own load: passed over.
        let mut c = all(&[0, 0, 0]);
        c[0].overloaded = true;
        let d = choose_by_prefix(10, &[0, 0, 0], &c, &O, &[0, 1, 2]).unwrap();
        assert_eq!(d.replica, 1);
    }

    #[test]
    fn an_overloaded_holder_passes_to_the_next_best() {
        // min 2: bound max(2 + 4, 3) = 6; replica 1 at 7 is over it.
        let d = pick(10, &[6, 10, 0], &[4, 7, 2]);
        assert_eq!((d.replica, d.reason), (0, Reason::Overloaded));
        // At the bound it still takes the request.
        let d = pick(10, &[6, 10, 0], &[4, 6, 2]);
        assert_eq!((d.replica, d.reason), (1, Reason::Cached));
        // The relative bound matters once loads are high: min 20 allows 30.
        let d = pick(10, &[0, 10, 0], &[20, 30, 25]);
        assert_eq!(d.replica, 1);
        let d = pick(10, &[0, 10, 0], &[20, 31, 25]);
        assert_eq!((d.replica, d.reason), (0, Reason::Overloaded));
    }

    #[test]
    fn ineligible_replicas_are_never_chosen() {
        let mut c = all(&[0, 0, 0]);
        c[1].eligible = false;
        let d = choose_by_prefix(10, &[0, 10, 0], &c, &O, &[0, 1, 2]).unwrap();
        assert_ne!(d.replica, 1);
        c.iter_mut().for_each(|c| c.eligible = false);
        assert_eq!(choose_by_prefix(10, &[0, 10, 0], &c, &O, &[0, 1, 2]), None);
    }

    #[test]
    fn a_prompts_order_comes_from_its_leading_blocks_and_the_names_alone() {
        let seeds: Vec<u64> =
            (0..5).map(|i| xxhash_rust::xxh3::xxh3_64(format!("http://r{i}").as_bytes())).collect();
        let blocks = |text: &str| PromptBlocks::new(CacheScope::model("m"), text.as_bytes(), 4);
        let a = prompt_order(&blocks("abcdefgh and then one thing"), &seeds, 2);
        let b = prompt_order(&blocks("abcdefgh and then another"), &seeds, 2);
        assert_eq!(a, b, "the same leading blocks, the same order");
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, [0, 1, 2, 3, 4]);
        // Distinct leading blocks spread over the replicas.
        let firsts: std::collections::HashSet<usize> =
            (0..40).map(|i| prompt_order(&blocks(&format!("{i:08} session")), &seeds, 2)[0]).collect();
        assert_eq!(firsts.len(), 5);
    }

    fn policy(n: usize) -> PrefixAware {
        let names: Vec<String> = (0..n).map(|i| format!("http://r{i}")).collect();
        let index =
            Arc::new(CacheIndex::new(IndexLimits { blocks_per_replica: 1000, ttl: Duration::from_secs(60) }));
        PrefixAware::new(&names, index, Arc::default(), O)
    }

    #[test]
    fn a_growing_conversation_stays_and_distinct_ones_spread() {
        let p = policy(4);
        let loads = vec![0; 4];
        let mut homes = Vec::new();
        for session in 0..12 {
            // Distinct from the first bytes: the leading blocks differ.
            let mut text =
                format!("{session:02} session says hello and keeps talking about many things at length; ");
            let first = p.prompt_blocks(CacheScope::model("m"), text.as_bytes()).unwrap();
            let home = p.choose_for_prompt(None, &first, &all(&loads)).unwrap().replica;
            for turn in 0..5 {
                text.push_str(&format!("turn {turn} adds more text to the conversation. "));
                let blocks = p.prompt_blocks(CacheScope::model("m"), text.as_bytes()).unwrap();
                let d = p.choose_for_prompt(None, &blocks, &all(&loads)).unwrap();
                assert_eq!((d.replica, d.reason), (home, Reason::Cached), "session {session} turn {turn}");
            }
            homes.push(home);
        }
        // Every instance would place them alike: a second policy, no shared memory.
        let other = policy(4);
        for (session, &home) in homes.iter().enumerate() {
            let text =
                format!("{session:02} session says hello and keeps talking about many things at length; ");
            let first = other.prompt_blocks(CacheScope::model("m"), text.as_bytes()).unwrap();
            assert_eq!(other.choose_for_prompt(None, &first, &all(&[0; 4])).unwrap().replica, home);
        }
        homes.sort();
        homes.dedup();
        // Hashed, so binomial: 12 prompts on 4 replicas reach 3 of them here.
        assert!(homes.len() >= 3, "12 distinct prompts spread: {homes:?}");
    }

    #[test]
    fn prompts_sharing_their_leading_blocks_share_a_replica_until_it_is_overloaded() {
        let p = policy(4);
        let mut loads = vec![0; 4];
        let mut served = Vec::new();
        for session in 0..8 {
            let text = format!("SYSTEM: the same agent. user {session} asks something new");
            let blocks = p.prompt_blocks(CacheScope::model("m"), text.as_bytes()).unwrap();
            let d = p.choose_for_prompt(None, &blocks, &all(&loads)).unwrap();
            loads[d.replica] += 1;
            served.push(d.replica);
        }
        // The first replica of their order takes them to min + 4 = 4 ... then the next.
        assert_eq!(served[..5].iter().collect::<std::collections::HashSet<_>>().len(), 1, "{served:?}");
        assert_ne!(served[5], served[0], "{served:?}");
    }
}
