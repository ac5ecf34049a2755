//! Routing policies: pure functions from a request's key and a snapshot of the replicas
//! to a choice and the reason for it.
//!
//! A policy never does I/O, takes no locks and never logs above `debug`. The ingress
//! builds the snapshot ([`Candidate`] per replica, indexed like the registry), asks the
//! policy, and the proxy carries the decision out. Retries ask again with the failed
//! replica marked ineligible, which for `consistent-hash` means "the next one on the
//! ring".
//!
//! Cache-aware policies (`prefix-aware`) also see the request's prompt, as chained block
//! hashes ([`crate::cache_index`]): the dispatcher asks [`Policy::prompt_blocks`] once and
//! then [`Policy::choose_for_prompt`]. Their choice is still a pure function
//! ([`choose_by_prefix`]); only the memory of what went where is state.

mod consistent_hash;
mod least_loaded;
mod power_of_two;
mod prefix_aware;
mod random;
mod round_robin;

pub use consistent_hash::{ConsistentHash, HashOptions};
pub use least_loaded::LeastLoaded;
pub use power_of_two::PowerOfTwo;
pub use prefix_aware::{PrefixAware, PrefixOptions, choose_by_prefix};
pub use random::Random;
pub use round_robin::RoundRobin;

use std::sync::Arc;

use crate::cache_index::{CacheIndex, PromptBlocks};
use crate::routing_key::RoutingKey;

/// What a policy sees of one replica for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    /// Healthy, serves the request's model, and not already tried for this request.
    pub eligible: bool,
    /// Requests the router has in flight on this replica.
    pub in_flight: usize,
}

/// Why a replica was chosen; a label of `router_routing_decisions_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// A load-balancing policy's ordinary choice.
    Balanced,
    /// `consistent-hash` without a session key: routed by power-of-two.
    Keyless,
    /// The session key's owner on the ring.
    Affinity,
    /// The owner is not eligible (unhealthy, or already failed this request): next on the ring.
    Failover,
    /// The owner is over the bounded-load cap: the excess spilled along the ring.
    Spill,
    /// A second attempt after the first replica failed before responding.
    Retry,
    /// `prefix-aware`: the replica holding the longest part of the prompt.
    Cached,
    /// `prefix-aware`: no replica holds enough of the prompt; the least loaded.
    Uncached,
    /// `prefix-aware`: the best holder was overloaded; the best of the rest.
    Overloaded,
}

impl Reason {
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
    /// or `prompt`); `None` for policies that do not route by prompt.
    fn prompt_blocks(&self, _model: Option<&str>, _prompt: &[u8]) -> Option<PromptBlocks> {
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
}

/// Settings of the policies that have any.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct PolicyOptions {
    pub hash: HashOptions,
    pub prefix: PrefixOptions,
}

impl PolicyKind {
    /// Build the policy for replicas with these stable names (their URLs): the ring of
    /// `consistent-hash` is laid out from names, so a replica keeps its sessions across
    /// restarts of the router and changes of the replica list's order. `index` is the
    /// cache-aware policies' memory, kept across rebuilds (see [`PolicyKind::uses_index`]).
    pub fn build(
        self,
        replica_names: &[String],
        options: &PolicyOptions,
        index: Option<&Arc<CacheIndex>>,
    ) -> Box<dyn Policy> {
        let hash = options.hash;
        match self {
            PolicyKind::RoundRobin => Box::new(RoundRobin::default()),
            PolicyKind::Random => Box::new(Random),
            PolicyKind::PowerOfTwo => Box::new(PowerOfTwo),
            PolicyKind::LeastLoaded => Box::new(LeastLoaded::default()),
            PolicyKind::ConsistentHash => Box::new(ConsistentHash::new(replica_names, hash)),
            PolicyKind::PrefixAware => {
                let index = index.cloned().expect("prefix-aware is built with a cache index");
                Box::new(PrefixAware::new(replica_names, index, options.prefix))
            }
        }
    }

    /// Whether the policy keeps a [`CacheIndex`].
    pub fn uses_index(self) -> bool {
        matches!(self, PolicyKind::PrefixAware)
    }
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
        loads.iter().map(|&in_flight| Candidate { eligible: true, in_flight }).collect()
    }
}
