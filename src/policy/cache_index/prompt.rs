//! A request's prompt as chained block hashes.
//!
//! The prompt is the raw JSON text of the request's `messages` (chat) or `prompt`
//! (completions), exactly as the client sent it: a client that resends a conversation
//! with one more turn sends the same bytes up to where the new turn starts, so its
//! blocks up to there hash the same. Only whole blocks count (the tail is still growing
//! in the next turn). Block `i`'s hash is xxh3 of its bytes seeded with block `i - 1`'s
//! hash, and block 0 is seeded with the model's name, so one hash names one prefix of
//! one model. Hashing runs at memory speed: a 150 kB agentic prompt costs microseconds.

use xxhash_rust::xxh3::xxh3_64_with_seed;

use super::kv_events::cache_root;
use crate::policy::CacheScope;

/// The chained hashes of a prompt's whole blocks.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PromptBlocks {
    pub hashes: Vec<u64>,
    /// The prompt's length in tokens, when the policy tokenised it (else 0).
    pub tokens: usize,
    /// `kv-aware`: tokens per block of `hashes` (0 for byte blocks)...
    pub block_tokens: usize,
    /// ... and the prompt's keys at the other block sizes the fleet's engines use
    /// (none when they all agree, as they should).
    pub other_sizes: Vec<(usize, Vec<u64>)>,
}

impl PromptBlocks {
    /// The prompt's byte blocks in `scope`: block 0 is seeded with the model and the
    /// request's cache salt, so a salted prompt shares no block with anyone else's.
    pub fn new(scope: CacheScope<'_>, prompt: &[u8], block_bytes: usize) -> Self {
        let block_bytes = block_bytes.max(1);
        let mut seed = xxh3_64_with_seed(scope.model.unwrap_or("").as_bytes(), cache_root(scope.salt));
        let hashes = prompt
            .chunks_exact(block_bytes)
            .map(|block| {
                seed = xxh3_64_with_seed(block, seed);
                seed
            })
            .collect();
        PromptBlocks { hashes, ..PromptBlocks::default() }
    }

    /// The keys of the prompt's blocks of `block_tokens` tokens (`hashes` when the size
    /// is unknown, 0); empty if the prompt was not keyed at that size.
    pub fn keys(&self, block_tokens: usize) -> &[u64] {
        if block_tokens == 0 || block_tokens == self.block_tokens {
            return &self.hashes;
        }
        self.other_sizes.iter().find(|(size, _)| *size == block_tokens).map_or(&[], |(_, keys)| keys)
    }

    pub fn len(&self) -> usize {
        self.hashes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.hashes.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_longer_conversation_shares_its_earlier_blocks() {
        let turn1 = br#"[{"role":"system","content":"You are a coding agent."},{"role":"user","content":"fix the bug"}]"#;
        let turn2 = br#"[{"role":"system","content":"You are a coding agent."},{"role":"user","content":"fix the bug"},{"role":"assistant","content":"done"},{"role":"user","content":"now test it"}]"#;
        let a = PromptBlocks::new(CacheScope::model("m"), turn1, 16);
        let b = PromptBlocks::new(CacheScope::model("m"), turn2, 16);
        assert_eq!(a.len(), turn1.len() / 16);
        // Every whole block of turn 1 before its closing bracket is a block of turn 2.
        let common = (turn1.len() - 1) / 16;
        assert_eq!(a.hashes[..common], b.hashes[..common]);
        assert!(b.len() > a.len());
    }

    #[test]
    fn hashes_name_whole_prefixes_of_one_model() {
        let x = PromptBlocks::new(CacheScope::model("m"), b"aaaabbbbcccc", 4);
        let y = PromptBlocks::new(CacheScope::model("m"), b"zzzzbbbbcccc", 4);
        // Same second block after a different first: a different prefix, a different hash.
        assert_ne!(x.hashes[1], y.hashes[1]);
        let other_model = PromptBlocks::new(CacheScope::model("n"), b"aaaabbbbcccc", 4);
        assert_ne!(x.hashes[0], other_model.hashes[0]);
        assert!(PromptBlocks::new(CacheScope::model("m"), b"abc", 4).is_empty());
    }
}
