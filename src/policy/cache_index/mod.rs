//! The cache index: what the router believes each replica holds in its prefix cache,
//! as chained hashes of prompt blocks, so that a request can go where most of its prompt
//! is already cached.
//!
//! `--policy prefix-aware` fills it from the router's own decisions: a request's prompt
//! (the raw JSON of its `messages`, or its `prompt`) is cut into blocks of
//! `--prefix-block-bytes`, each block's hash chained to the one before it (and the first
//! to the model name), and the replica that gets the request is remembered to hold them.
//! A later request that starts with the same blocks matches them, block by block from
//! the start, up to its first block the replica does not hold. Chaining makes a block's
//! hash stand for the whole prefix up to it, so equal hashes mean equal prefixes.
//!
//! [`kv_events`] reads the other source of the same knowledge, vLLM's own KV cache
//! events (blocks stored and evicted, keyed by their token ids), for a policy that
//! follows what the engines really hold rather than what the router sent.
//!
//! Each replica's memory is bounded (`--prefix-index-blocks`, least recently used
//! forgotten first) and expires (`--prefix-index-ttl`), as the engine's own cache
//! forgets under pressure. The memory is kept by replica name and outlives changes to
//! the replica set: a replica that leaves takes its memory with it, the others keep
//! theirs.

mod blocks;
pub mod kv_events;
mod kv_feed;
mod kv_replica;
mod msgpack;
mod prompt;
pub mod zmtp;

pub use kv_feed::{FeedConfig, KvFeeds};
pub use kv_replica::{Applied, KvReplica};

pub(crate) use blocks::Prehashed;
pub use blocks::ReplicaBlocks;
pub use prompt::PromptBlocks;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Bounds of the index.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct IndexLimits {
    /// Blocks remembered per replica.
    pub blocks_per_replica: usize,
    /// A block not used for this long is forgotten.
    pub ttl: Duration,
}

impl Default for IndexLimits {
    /// 65,536 blocks of 256 bytes is 16 MB of prompt text, about 4M tokens: a few times
    /// the KV cache of one H100 serving a small model, so the memory forgets after the
    /// engine does rather than long before. Ten minutes covers an agent's think time.
    fn default() -> Self {
        IndexLimits { blocks_per_replica: 65_536, ttl: Duration::from_secs(600) }
    }
}

/// Every replica's remembered blocks, by replica name.
pub struct CacheIndex {
    limits: IndexLimits,
    epoch: Instant,
    replicas: Mutex<HashMap<Arc<str>, Arc<ReplicaBlocks>>>,
}

impl CacheIndex {
    pub fn new(limits: IndexLimits) -> Self {
        CacheIndex { limits, epoch: Instant::now(), replicas: Mutex::new(HashMap::new()) }
    }

    /// One replica's memory by name, made empty if it has none yet.
    pub fn memory(&self, name: &str) -> Arc<ReplicaBlocks> {
        let mut replicas = self.replicas.lock().expect("cache index lock");
        replicas
            .entry(name.into())
            .or_insert_with(|| Arc::new(ReplicaBlocks::new(self.limits.blocks_per_replica)))
            .clone()
    }

    /// The memories of exactly these replicas, in this order: existing ones are kept,
    /// new names start empty, names not listed are forgotten.
    pub fn lay_out(&self, names: &[String]) -> Vec<Arc<ReplicaBlocks>> {
        let mut replicas = self.replicas.lock().expect("cache index lock");
        let memories: Vec<Arc<ReplicaBlocks>> = names
            .iter()
            .map(|name| {
                replicas
                    .entry(name.as_str().into())
                    .or_insert_with(|| Arc::new(ReplicaBlocks::new(self.limits.blocks_per_replica)))
                    .clone()
            })
            .collect();
        replicas.retain(|name, _| names.iter().any(|n| n.as_str() == &**name));
        memories
    }

    /// The index's clock, in milliseconds since it was made.
    pub fn now(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    pub fn ttl_ms(&self) -> u64 {
        self.limits.ttl.as_millis() as u64
    }

    /// Blocks remembered, by replica name.
    pub fn sizes(&self) -> Vec<(Arc<str>, usize)> {
        let replicas = self.replicas.lock().expect("cache index lock");
        replicas.iter().map(|(name, blocks)| (name.clone(), blocks.len())).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn memories_follow_replicas_by_name() {
        let index = CacheIndex::new(IndexLimits { blocks_per_replica: 100, ttl: Duration::from_secs(60) });
        let first = index.lay_out(&names(&["a", "b"]));
        first[1].remember(&[1, 2, 3], index.now());
        // Reordered and with a newcomer: b keeps its memory wherever it stands.
        let second = index.lay_out(&names(&["c", "b", "a"]));
        assert_eq!(second[1].matched(&[1, 2, 3], index.now(), index.ttl_ms()), 3);
        assert_eq!(second[0].len(), 0);
        // b leaves and comes back: it starts empty.
        index.lay_out(&names(&["a", "c"]));
        let third = index.lay_out(&names(&["a", "b", "c"]));
        assert_eq!(third[1].len(), 0);
        assert_eq!(index.sizes().len(), 3);
    }
}
