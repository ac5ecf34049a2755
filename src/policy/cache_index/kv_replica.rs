//! What one replica's KV events say it holds: our keys for its cached blocks, in its
//! [`ReplicaBlocks`], and the engine's hashes mapped to them for parents and removals.
//!
//! The index is keyed by the token ids the events carry: a stored block's key is xxh3 of
//! its `block_size` token ids seeded with its parent's key (0 for a block without a
//! parent), the chaining vLLM applies to its own hashes, so the same prompt tokens give
//! the same keys in the router ([`token_block_keys`]).
//!
//! Each replica has its own block size, learnt from its events: one engine configured
//! differently (or lying) changes only how its own memory is keyed. An event with a
//! block size other than the replica's forgets the replica's memory and starts again
//! at the new size.

use std::collections::HashMap;
use std::sync::Arc;

use super::ReplicaBlocks;
use super::kv_events::{EngineHash, KvEvent, token_block_keys};

pub struct KvReplica {
    blocks: Arc<ReplicaBlocks>,
    keys: HashMap<EngineHash, u64>,
    /// More engine hashes than this and the map is dropped whole (events were lost, or
    /// the engine never removes): the replica is then routed by load until it refills.
    max_keys: usize,
}

/// What applying an event changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Applied {
    pub stored: usize,
    pub removed: usize,
    /// A stored block whose parent we never saw (an event was missed): not indexed.
    pub orphans: usize,
    /// The event's block size differed from the replica's: its memory was forgotten.
    pub resized: bool,
    /// The map grew past its bound and was dropped whole.
    pub oversize: bool,
}

impl KvReplica {
    pub fn new(blocks: Arc<ReplicaBlocks>, max_keys: usize) -> Self {
        KvReplica { blocks, keys: HashMap::new(), max_keys }
    }

    pub fn apply(&mut self, event: &KvEvent, now: u64) -> Applied {
        let mut applied = Applied::default();
        match event {
            KvEvent::BlockStored { block_hashes, parent, token_ids, block_size, root } => {
                if self.blocks.block_size() != *block_size {
                    applied.resized = self.blocks.block_size() != 0;
                    self.clear();
                    self.blocks.set_block_size(*block_size);
                }
                let parent_key = match parent {
                    None => Some(*root),
                    Some(p) => self.keys.get(p).copied(),
                };
                let Some(parent_key) = parent_key else {
                    applied.orphans = block_hashes.len();
                    return applied;
                };
                let ours = token_block_keys(token_ids, *block_size, parent_key);
                for (engine, key) in block_hashes.iter().zip(&ours) {
                    self.keys.insert(*engine, *key);
                }
                self.blocks.remember(&ours, now);
                applied.stored = ours.len();
                if self.keys.len() > self.max_keys {
                    applied.oversize = true;
                    self.clear();
                }
            }
            KvEvent::BlockRemoved { block_hashes } => {
                let ours: Vec<u64> = block_hashes.iter().filter_map(|h| self.keys.remove(h)).collect();
                self.blocks.forget(&ours);
                applied.removed = ours.len();
            }
            KvEvent::AllBlocksCleared => {
                applied.removed = self.keys.len();
                self.clear();
            }
        }
        applied
    }

    /// Forget everything (cleared, restarted, or too far behind to trust).
    pub fn clear(&mut self) {
        self.keys.clear();
        self.keys.shrink_to(1024);
        self.blocks.clear();
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(hashes: Vec<u64>, parent: Option<u64>, tokens: Vec<u32>, block_size: usize) -> KvEvent {
        KvEvent::BlockStored { block_hashes: hashes, parent, token_ids: tokens, block_size, root: 0 }
    }

    #[test]
    fn stored_blocks_chain_by_tokens_and_removals_resolve() {
        let blocks = Arc::new(ReplicaBlocks::new(1000));
        let mut replica = KvReplica::new(blocks.clone(), 1000);
        let prompt: Vec<u32> = (0..8).collect();
        // The engine stores the prompt in two events, the second a child of the first.
        assert_eq!(replica.apply(&stored(vec![100, 101], None, prompt[..4].to_vec(), 2), 0).stored, 2);
        assert_eq!(replica.apply(&stored(vec![102, 103], Some(101), prompt[4..].to_vec(), 2), 0).stored, 2);
        assert_eq!(blocks.block_size(), 2);
        // The router computes the same keys from the prompt's tokens alone.
        let keys = token_block_keys(&prompt, 2, 0);
        assert_eq!(blocks.matched(&keys, 0, 1000), 4);
        // Removing the third block cuts the match there.
        assert_eq!(replica.apply(&KvEvent::BlockRemoved { block_hashes: vec![102, 999] }, 0).removed, 1);
        assert_eq!(blocks.matched(&keys, 0, 1000), 2);
        // A child of a block we never saw is not indexed.
        assert_eq!(replica.apply(&stored(vec![200], Some(555), vec![1, 1], 2), 0).orphans, 1);
        replica.apply(&KvEvent::AllBlocksCleared, 0);
        assert!(replica.is_empty());
        assert_eq!(blocks.matched(&keys, 0, 1000), 0);
    }

    #[test]
    fn a_new_block_size_starts_the_replica_again() {
        let blocks = Arc::new(ReplicaBlocks::new(1000));
        let mut replica = KvReplica::new(blocks.clone(), 1000);
        let first = replica.apply(&stored(vec![1, 2], None, vec![1, 2, 3, 4], 2), 0);
        assert!(!first.resized, "learning the first size is not a change");
        let changed = replica.apply(&stored(vec![9], None, vec![5, 6, 7, 8], 4), 0);
        assert!(changed.resized);
        assert_eq!(blocks.block_size(), 4);
        assert_eq!(blocks.len(), 1, "the size-2 blocks are forgotten");
        assert_eq!(replica.apply(&stored(vec![10], Some(1), vec![1; 4], 4), 0).orphans, 1);
    }

    #[test]
    fn an_oversized_map_is_dropped_whole() {
        let blocks = Arc::new(ReplicaBlocks::new(1000));
        let mut replica = KvReplica::new(blocks.clone(), 3);
        let applied = replica.apply(&stored(vec![1, 2, 3, 4], None, vec![0; 4], 1), 0);
        assert!(applied.oversize);
        assert!(replica.is_empty() && blocks.is_empty());
    }
}
