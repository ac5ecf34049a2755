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
//! `min_match` of the prompt's blocks; below that, the prompt is new and goes to the
//! least loaded replica, which spreads distinct prefixes.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::CacheScope;
use super::session_homes::SessionHomes;
use super::{Candidate, Decision, LeastLoaded, Policy, Reason, overload_bound, rotated};
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
}

impl Default for PrefixOptions {
    fn default() -> Self {
        PrefixOptions { block_bytes: 256, min_match: 0.3, balance_abs: 4, balance_rel: 1.5 }
    }
}

/// Choose among `replicas` for a prompt of `prompt_blocks` blocks of which replica `i`
/// holds the first `matched[i]`, and `held[i]` blocks in all. Ties go to the less
/// loaded; a new prompt's ties to the replica holding least (so distinct prefixes
/// spread over the fleet's memory), then to the first from `start` (a rotating offset).
pub fn choose_by_prefix(
    prompt_blocks: usize,
    matched: &[usize],
    held: &[usize],
    replicas: &[Candidate],
    options: &PrefixOptions,
    start: usize,
) -> Option<Decision> {
    let n = replicas.len();
    let eligible = || rotated(start % n.max(1), n).filter(|&i| replicas[i].eligible);
    let min = eligible().map(|i| replicas[i].in_flight).min()?;
    let bound = overload_bound(min, options.balance_abs, options.balance_rel);
    let least_loaded = || eligible().min_by_key(|&i| (replicas[i].in_flight, held[i]));
    // Longest match, then least loaded; `max_by_key` keeps the last of equals, so the
    // key inverts the load and the rotation order.
    let best_of = |admit: &dyn Fn(usize) -> bool| {
        eligible()
            .enumerate()
            .filter(|&(_, i)| admit(i))
            .max_by_key(|&(order, i)| (matched[i], std::cmp::Reverse((replicas[i].in_flight, order))))
            .map(|(_, i)| i)
    };
    let needed = ((options.min_match * prompt_blocks as f64).ceil() as usize).max(1);
    let best = best_of(&|_| true)?;
    if prompt_blocks == 0 || matched[best] < needed {
        return least_loaded().map(|replica| Decision { replica, reason: Reason::Uncached });
    }
    if replicas[best].in_flight <= bound {
        return Some(Decision { replica: best, reason: Reason::Cached });
    }
    // The best holder is overloaded: the best of the rest, by match then load.
    let replica = best_of(&|i| replicas[i].in_flight <= bound)?;
    Some(Decision { replica, reason: Reason::Overloaded })
}

/// The policy: [`choose_by_prefix`] over the replicas' memories.
pub struct PrefixAware {
    index: Arc<CacheIndex>,
    /// Each replica's memory, indexed like the fleet.
    memories: Vec<Arc<ReplicaBlocks>>,
    names: Vec<String>,
    sessions: Arc<SessionHomes>,
    options: PrefixOptions,
    rotation: AtomicUsize,
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
            sessions,
            options,
            rotation: AtomicUsize::new(0),
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
        let held: Vec<usize> = self.memories.iter().map(|memory| memory.len()).collect();
        let start = self.rotation.fetch_add(1, Ordering::Relaxed);
        let decision = choose_by_prefix(prompt.len(), &matched, &held, replicas, &self.options, start)?;
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

    const O: PrefixOptions =
        PrefixOptions { block_bytes: 4, min_match: 0.5, balance_abs: 4, balance_rel: 1.5 };

    fn pick(prompt: usize, matched: &[usize], loads: &[usize]) -> Decision {
        choose_by_prefix(prompt, matched, &vec![0; loads.len()], &all(loads), &O, 0).unwrap()
    }

    #[test]
    fn the_longest_match_wins_while_not_overloaded() {
        let d = pick(10, &[2, 9, 6], &[0, 3, 0]);
        assert_eq!((d.replica, d.reason), (1, Reason::Cached));
        // Equal matches: the less loaded.
        let d = pick(10, &[8, 8, 1], &[5, 2, 0]);
        assert_eq!((d.replica, d.reason), (1, Reason::Cached));
    }

    #[test]
    fn short_matches_go_to_the_least_loaded() {
        let d = pick(10, &[4, 0, 0], &[0, 2, 1]);
        assert_eq!((d.replica, d.reason), (0, Reason::Uncached));
        let d = pick(10, &[4, 0, 0], &[3, 2, 1]);
        assert_eq!((d.replica, d.reason), (2, Reason::Uncached));
        let d = pick(0, &[0, 0], &[1, 0]);
        assert_eq!((d.replica, d.reason), (1, Reason::Uncached));
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
        let d = choose_by_prefix(10, &[0, 10, 0], &[0; 3], &c, &O, 0).unwrap();
        assert_ne!(d.replica, 1);
        c.iter_mut().for_each(|c| c.eligible = false);
        assert_eq!(choose_by_prefix(10, &[0, 10, 0], &[0; 3], &c, &O, 0), None);
    }

    #[test]
    fn ties_rotate() {
        let pick = |matched: &[usize], held: &[usize], s| {
            choose_by_prefix(10, matched, held, &all(&[0, 0, 0]), &O, s).unwrap().replica
        };
        let picks: Vec<usize> = (0..3).map(|s| pick(&[0, 0, 0], &[0, 0, 0], s)).collect();
        assert_eq!(picks, vec![0, 1, 2]);
        let picks: Vec<usize> = (0..3).map(|s| pick(&[9, 9, 9], &[0, 0, 0], s)).collect();
        assert_eq!(picks, vec![0, 1, 2]);
        // A new prompt on equally loaded replicas: the one remembering least, whatever
        // the rotation.
        let picks: Vec<usize> = (0..3).map(|s| pick(&[0, 0, 0], &[50, 7, 20], s)).collect();
        assert_eq!(picks, vec![1, 1, 1]);
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
        // Each session keeps one request in flight on its replica.
        let mut loads = vec![0; 4];
        let mut homes = Vec::new();
        for session in 0..4 {
            let mut text = format!("session {session} says hello and keeps talking; ");
            let first = p.prompt_blocks(CacheScope::model("m"), text.as_bytes()).unwrap();
            let home = p.choose_for_prompt(None, &first, &all(&loads)).unwrap().replica;
            loads[home] += 1;
            for turn in 0..5 {
                text.push_str(&format!("turn {turn} adds more text to the conversation. "));
                let blocks = p.prompt_blocks(CacheScope::model("m"), text.as_bytes()).unwrap();
                let d = p.choose_for_prompt(None, &blocks, &all(&loads)).unwrap();
                assert_eq!((d.replica, d.reason), (home, Reason::Cached), "session {session} turn {turn}");
            }
            homes.push(home);
        }
        homes.sort();
        assert_eq!(homes, vec![0, 1, 2, 3]);
    }
}
