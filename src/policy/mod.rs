//! Routing policies: pure functions from a request's key and a snapshot of the replicas
//! to a choice and the reason for it.
//!
//! A policy never does I/O, takes no locks and never logs above `debug`. The ingress
//! builds the snapshot ([`Candidate`] per replica, indexed like the registry), asks the
//! policy, and the proxy carries the decision out. Retries ask again with the failed
//! replica marked ineligible, which for `consistent-hash` means "the next one on the
//! ring".
//!
//! Cache-aware policies (`prefix-aware`, `kv-aware`) also see the request's prompt, as
//! chained block hashes ([`crate::policy::cache_index`]): the dispatcher asks
//! [`Policy::prompt_blocks`] once and then [`Policy::choose_for_prompt`]. Their choice is
//! still a pure function ([`choose_by_prefix`], [`choose_by_cost`]); the memory of what
//! each replica holds, and of where each session went ([`SessionHomes`]), is the state
//! they keep across rebuilds ([`PolicyState`]).

pub mod cache_index;
pub mod prompt_tokens;

mod consistent_hash;
mod kv_aware;
mod least_loaded;
mod power_of_two;
mod prefix_aware;
mod random;
mod round_robin;
mod session_census;
mod session_homes;

pub use consistent_hash::{ConsistentHash, HashOptions, SessionSpread};
pub use kv_aware::{KvAware, KvOptions, choose_by_cost};
pub use least_loaded::LeastLoaded;
pub use power_of_two::PowerOfTwo;
pub use prefix_aware::{PrefixAware, PrefixOptions, choose_by_prefix};
pub use random::Random;
pub use round_robin::RoundRobin;
pub use session_census::SessionCensus;
pub use session_homes::SessionHomes;

use std::sync::Arc;

use crate::ingress::routing_key::RoutingKey;
use crate::policy::cache_index::{CacheIndex, PromptBlocks};
use crate::policy::prompt_tokens::PromptTokenizer;

/// What a policy sees of one replica for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    /// Healthy, serves the request's model, and not already tried for this request.
    pub eligible: bool,
    /// Requests the router has in flight on this replica.
    pub in_flight: usize,
    /// The load those requests add in tokens, as the policy counted it
    /// ([`Policy::routed`]: for `kv-aware`, the prompt tokens each had to prefill there;
    /// 0 for the other policies).
    pub in_flight_tokens: usize,
    /// Over the bound by the engine's own load, read from its `/metrics`: the signal
    /// every router instance shares ([`crate::replicas::engine_load`]).
    pub overloaded: bool,
}

/// Why a replica was chosen; a label of `router_routing_decisions_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// A load-balancing policy's ordinary choice.
    Balanced,
    /// `consistent-hash` without a session key: routed by power-of-two.
    Keyless,
    /// The session key's owner on the ring; for the cache-aware policies, the replica
    /// the session's earlier turns went to.
    Affinity,
    /// The owner is not eligible (unhealthy, or already failed this request): next on the ring.
    Failover,
    /// The owner is over the bounded-load cap: the excess spilled along the ring.
    Spill,
    /// A second attempt after the first replica failed before responding.
    Retry,
    /// Cache-aware: the replica holding the longest part of the prompt.
    Cached,
    /// Cache-aware: no replica holds enough of the prompt; by load.
    Uncached,
    /// Cache-aware: the best holder was too loaded; another one.
    Overloaded,
}

impl Reason {
    pub const ALL: [Reason; 9] = [
        Reason::Balanced,
        Reason::Keyless,
        Reason::Affinity,
        Reason::Failover,
        Reason::Spill,
        Reason::Retry,
        Reason::Cached,
        Reason::Uncached,
        Reason::Overloaded,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Balanced => "balanced",
            Reason::Keyless => "keyless",
            Reason::Affinity => "affinity",
            Reason::Failover => "failover",
            Reason::Spill => "spill",
            Reason::Retry => "retry",
            Reason::Cached => "cached",
            Reason::Uncached => "uncached",
            Reason::Overloaded => "overloaded",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub replica: usize,
    pub reason: Reason,
}

pub trait Policy: Send + Sync {
    fn name(&self) -> &'static str;

    /// Choose one eligible replica, or `None` when no candidate is eligible.
    fn choose(&self, key: Option<&RoutingKey>, replicas: &[Candidate]) -> Option<Decision>;

    /// A cache-aware policy's view of a request's prompt (the raw JSON of its `messages`
    /// or `prompt`) in the cache `scope` it can hit; `None` for policies that do not
    /// route by prompt.
    fn prompt_blocks(&self, _scope: CacheScope<'_>, _prompt: &[u8]) -> Option<PromptBlocks> {
        None
    }

    /// The same view from the prompt's token ids, when the router already has them
    /// (`--engine-api generate` tokenises once); `None` where the policy keys prompts by
    /// text, not ids.
    fn prompt_blocks_for_ids(&self, _scope: CacheScope<'_>, _ids: &[u32]) -> Option<PromptBlocks> {
        None
    }

    /// Choose for a request whose prompt is known.
    fn choose_for_prompt(
        &self,
        key: Option<&RoutingKey>,
        _prompt: &PromptBlocks,
        replicas: &[Candidate],
    ) -> Option<Decision> {
        self.choose(key, replicas)
    }

    /// The request is being sent where `decision` says: record what that means for the
    /// policy's memory, and say what was assumed ([`Routed`]).
    fn routed(&self, _key: Option<&RoutingKey>, _prompt: &PromptBlocks, _decision: Decision) -> Routed {
        Routed::default()
    }

    /// The attempt [`Policy::routed`] recorded got no answer from its replica (it is
    /// retried elsewhere, or fails): forget what was assumed the replica would store, so
    /// that a replica that never saw the prompt is not believed to hold it.
    fn unrouted(&self, _prompt: &PromptBlocks, _decision: Decision, _routed: Routed) {}

    /// For a policy that knows what each replica caches in tokens (`kv-aware`): the
    /// prompt tokens the chosen replica and the best eligible one are believed to hold,
    /// asked after the choice and before [`Policy::routed`] records it.
    fn cached_view(
        &self,
        _prompt: &PromptBlocks,
        _decision: Decision,
        _replicas: &[Candidate],
    ) -> Option<CachedView> {
        None
    }
}

/// What [`Policy::routed`] assumed of one attempt.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Routed {
    /// The load the request adds to the replica in tokens: counted in
    /// [`Candidate::in_flight_tokens`] while it is in flight (0 for policies that do not
    /// count tokens).
    pub load_tokens: usize,
    /// The prompt tokens the replica was believed to hold and will reuse, for a policy
    /// that knows (`kv-aware`): counted in `router_routed_cached_tokens_total` once the
    /// replica answers.
    pub cached_tokens: Option<usize>,
    /// The prompt's blocks from this one on were remembered on the replica as it was
    /// sent, before its engine reported storing them.
    pub assumed_from: usize,
}

/// Which cached blocks a request can hit: those of its model, stored under its
/// `cache_salt` (vLLM keys a salted prompt's blocks apart from everyone else's). The
/// cache-aware policies key a prompt's blocks in this scope, so a request is never
/// credited, or told of, blocks it could not use.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheScope<'a> {
    pub model: Option<&'a str>,
    pub salt: Option<&'a str>,
}

impl<'a> CacheScope<'a> {
    /// The scope of an unsalted request for `model`.
    pub fn model(model: &'a str) -> Self {
        CacheScope { model: Some(model), salt: None }
    }
}

/// What [`Policy::cached_view`] says: prompt tokens believed cached on the chosen replica
/// and the most any eligible replica held. They differ when the policy chose by load or
/// by session over the cache: the routing loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CachedView {
    pub chosen: usize,
    pub best: usize,
}

/// The policies `--policy` accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PolicyKind {
    RoundRobin,
    Random,
    PowerOfTwo,
    LeastLoaded,
    ConsistentHash,
    PrefixAware,
    KvAware,
}

/// Settings of the policies that have any.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct PolicyOptions {
    pub hash: HashOptions,
    pub prefix: PrefixOptions,
    pub kv: KvOptions,
}

/// What the cache-aware policies keep across rebuilds of the policy (changes to the
/// replica set): their index, tokenizer and session homes.
#[derive(Default, Clone)]
pub struct PolicyState {
    pub index: Option<Arc<CacheIndex>>,
    pub tokenizer: Option<Arc<PromptTokenizer>>,
    pub sessions: Arc<SessionHomes>,
    /// `consistent-hash --session-spread even`: the sessions seen, and their planned homes.
    pub census: Arc<SessionCensus>,
}

impl PolicyKind {
    /// Build the policy for replicas with these stable names (their URLs): the ring of
    /// `consistent-hash` is laid out from names, so a replica keeps its sessions across
    /// restarts of the router and changes of the replica list's order. `state` is what
    /// the cache-aware policies keep across rebuilds (see [`PolicyKind::uses_index`]).
    pub fn build(
        self,
        replica_names: &[String],
        options: &PolicyOptions,
        state: &PolicyState,
    ) -> Box<dyn Policy> {
        let hash = options.hash;
        match self {
            PolicyKind::RoundRobin => Box::new(RoundRobin::default()),
            PolicyKind::Random => Box::new(Random),
            PolicyKind::PowerOfTwo => Box::new(PowerOfTwo),
            PolicyKind::LeastLoaded => Box::new(LeastLoaded::default()),
            PolicyKind::ConsistentHash => {
                Box::new(ConsistentHash::with_census(replica_names, hash, state.census.clone()))
            }
            PolicyKind::PrefixAware => {
                let index = state.index.clone().expect("prefix-aware is built with a cache index");
                Box::new(PrefixAware::new(replica_names, index, state.sessions.clone(), options.prefix))
            }
            PolicyKind::KvAware => Box::new(KvAware::new(
                replica_names,
                state.index.clone().expect("kv-aware is built with a cache index"),
                state.tokenizer.clone().expect("kv-aware is built with a tokenizer"),
                state.sessions.clone(),
                options.kv,
                options.prefix,
            )),
        }
    }

    /// Whether the policy keeps a [`CacheIndex`].
    pub fn uses_index(self) -> bool {
        matches!(self, PolicyKind::PrefixAware | PolicyKind::KvAware)
    }

    /// Whether the policy needs the request's tokens (and so a tokenizer).
    pub fn uses_tokens(self) -> bool {
        matches!(self, PolicyKind::KvAware)
    }
}

/// [`overload_bound`] for these candidates: `None` when none is eligible.
pub fn candidates_bound(replicas: &[Candidate], abs: usize, rel: f64) -> Option<usize> {
    let min = replicas.iter().filter(|c| c.eligible).map(|c| c.in_flight).min()?;
    Some(overload_bound(min, abs, rel))
}

/// The most requests in flight a replica may have before it counts as overloaded, when
/// the least loaded eligible one has `min`: above `min + abs` and above `rel * min`.
pub fn overload_bound(min: usize, abs: usize, rel: f64) -> usize {
    (min + abs).max((rel * min as f64).floor() as usize)
}

/// The index of the `n`-th eligible candidate.
fn nth_eligible(replicas: &[Candidate], n: usize) -> Option<usize> {
    replicas.iter().enumerate().filter(|(_, c)| c.eligible).nth(n).map(|(i, _)| i)
}

/// Every index of `n` once, starting at `start` and wrapping around.
fn rotated(start: usize, n: usize) -> impl Iterator<Item = usize> {
    (0..n).map(move |offset| (start + offset) % n)
}

fn eligible_count(replicas: &[Candidate]) -> usize {
    replicas.iter().filter(|c| c.eligible).count()
}

#[cfg(test)]
pub(crate) mod test_support {
    use super::Candidate;

    pub fn all(loads: &[usize]) -> Vec<Candidate> {
        loads
            .iter()
            .map(|&in_flight| Candidate { eligible: true, in_flight, in_flight_tokens: 0, overloaded: false })
            .collect()
    }
}
