//! The KV cache: a fixed pool of 16-token blocks with prefix caching, as vLLM's block
//! pool works.
//!
//! A full block is identified by a chained hash: the hash of its 16 token ids and of
//! the previous block's hash, so a block hash names the whole prefix up to it. When a
//! sequence fills a block, the block is published under its hash. A new request looks
//! up its prompt's block hashes in order and reuses the longest run found: those
//! tokens need no prefill. Freed blocks keep their contents and stay findable until the
//! pool needs them back; the least recently freed is reused first (LRU eviction).
//!
//! With sliding-window attention (each token sees only the last `window` tokens), a
//! sequence holds only the blocks its window still reaches and frees the older ones, and a
//! prompt's prefix is usable when the blocks of the window before its end are cached,
//! whatever happened to the blocks before them (vLLM's sliding-window cache manager).
//!
//! With events on ([`KvCache::record_events`]) the cache notes what a vLLM engine would
//! publish as KV events: blocks newly findable by hash (with their token ids and their
//! parent) and blocks evicted, for [`super::kv_events`] to send.

use std::collections::{BTreeMap, HashMap};

use xxhash_rust::xxh3::xxh3_64_with_seed;

pub const BLOCK_SIZE: usize = 16;

pub type BlockId = u32;

#[derive(Debug, Clone, Default)]
struct Block {
    ref_count: u32,
    hash: Option<u64>,
    /// Position in the free queue while free.
    free_at: Option<u64>,
}

pub struct KvCache {
    blocks: Vec<Block>,
    /// Free blocks in eviction order: lowest key first.
    free: BTreeMap<u64, BlockId>,
    next_free_key: u64,
    cached: HashMap<u64, BlockId>,
    /// Events since the last [`take_events`](KvCache::take_events), when recording.
    events: Option<Vec<CacheEvent>>,
}

/// A change to what the cache can serve by hash, as vLLM's KV events describe it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheEvent {
    /// Consecutive blocks now cached; the first a child of `parent` (none for a prompt's
    /// first block); `tokens` are their token ids, `BLOCK_SIZE` per block.
    /// `salt` is the first block's cache salt, when it has one (vLLM's `extra_keys`).
    Stored { hashes: Vec<u64>, parent: Option<u64>, tokens: Vec<u32>, salt: Option<String> },
    /// Blocks evicted.
    Removed { hashes: Vec<u64> },
}

/// Where a prompt's chain of block hashes starts: 0, or a root of its `cache_salt` (vLLM
/// hashes the salt into a prompt's first block, so salted prompts share no block with
/// any other).
pub fn root(salt: Option<&str>) -> u64 {
    salt.map_or(0, |salt| xxh3_64_with_seed(salt.as_bytes(), 0x5a17) | 1)
}

/// The chained hashes of every full block of `tokens`, from `root`.
pub fn block_hashes(tokens: &[u32], root: u64) -> Vec<u64> {
    let mut parent = root;
    tokens
        .chunks_exact(BLOCK_SIZE)
        .map(|block| {
            parent = chain_hash(parent, block);
            parent
        })
        .collect()
}

/// The hash of one full block given its predecessor's hash (0 for the first block).
pub fn chain_hash(parent: u64, block: &[u32]) -> u64 {
    let mut bytes = [0u8; BLOCK_SIZE * 4];
    for (i, id) in block.iter().enumerate() {
        bytes[i * 4..i * 4 + 4].copy_from_slice(&id.to_le_bytes());
    }
    xxh3_64_with_seed(&bytes, parent)
}

impl KvCache {
    pub fn new(num_blocks: usize) -> Self {
        let mut cache = KvCache {
            blocks: vec![Block::default(); num_blocks],
            free: BTreeMap::new(),
            next_free_key: 0,
            cached: HashMap::new(),
            events: None,
        };
        for id in 0..num_blocks as BlockId {
            cache.push_free(id);
        }
        cache
    }

    /// Note stored and evicted blocks from now on.
    pub fn record_events(&mut self) {
        self.events.get_or_insert_with(Vec::new);
    }

    /// The events noted since the last call (none when not recording).
    pub fn take_events(&mut self) -> Vec<CacheEvent> {
        self.events.as_mut().map(std::mem::take).unwrap_or_default()
    }

    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    pub fn free_blocks(&self) -> usize {
        self.free.len()
    }

    /// Fraction of blocks held by running sequences (vLLM's `kv_cache_usage_perc`).
    pub fn usage(&self) -> f64 {
        if self.blocks.is_empty() {
            return 0.0;
        }
        1.0 - self.free.len() as f64 / self.blocks.len() as f64
    }

    fn push_free(&mut self, id: BlockId) {
        let key = self.next_free_key;
        self.next_free_key += 1;
        self.free.insert(key, id);
        self.blocks[id as usize].free_at = Some(key);
    }

    /// The cached blocks matching the longest prefix of `hashes`, without taking them.
    pub fn lookup(&self, hashes: &[u64]) -> usize {
        hashes.iter().take_while(|h| self.cached.contains_key(h)).count()
    }

    /// The longest usable prefix of `hashes`, in blocks, when attention sees only the last
    /// `window_blocks` blocks: the longest `n` whose last `window_blocks` blocks (or all
    /// of them, if fewer) are cached. `None` is full attention: [`lookup`](Self::lookup).
    pub fn lookup_window(&self, hashes: &[u64], window_blocks: Option<usize>) -> usize {
        let Some(window) = window_blocks else { return self.lookup(hashes) };
        let (mut best, mut run) = (0, 0);
        for (i, hash) in hashes.iter().enumerate() {
            run = if self.cached.contains_key(hash) { run + 1 } else { 0 };
            if run > 0 && (run >= window || run == i + 1) {
                best = i + 1;
            }
        }
        best
    }

    /// How many of `hashes` are cached, wherever they are.
    pub fn cached_count(&self, hashes: &[u64]) -> usize {
        hashes.iter().filter(|h| self.cached.contains_key(h)).count()
    }

    /// Take references on the cached blocks of the first `n` hashes (found by
    /// [`lookup`](Self::lookup)).
    pub fn take_cached(&mut self, hashes: &[u64]) -> Vec<BlockId> {
        hashes
            .iter()
            .map(|h| {
                let id = self.cached[h];
                let block = &mut self.blocks[id as usize];
                if let Some(key) = block.free_at.take() {
                    self.free.remove(&key);
                }
                block.ref_count += 1;
                id
            })
            .collect()
    }

    /// Allocate `n` fresh blocks, evicting the least recently freed cached ones. None if
    /// the pool has fewer than `n` free blocks (nothing is taken then).
    pub fn allocate(&mut self, n: usize) -> Option<Vec<BlockId>> {
        if self.free.len() < n {
            return None;
        }
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let (_, id) = self.free.pop_first().expect("checked length");
            let block = &mut self.blocks[id as usize];
            block.free_at = None;
            block.ref_count = 1;
            if let Some(hash) = block.hash.take()
                && self.cached.get(&hash) == Some(&id)
            {
                self.cached.remove(&hash);
                if let Some(events) = &mut self.events {
                    match events.last_mut() {
                        Some(CacheEvent::Removed { hashes }) => hashes.push(hash),
                        _ => events.push(CacheEvent::Removed { hashes: vec![hash] }),
                    }
                }
            }
            out.push(id);
        }
        Some(out)
    }

    /// Publish a full block under its chained hash so later requests can reuse it.
    /// `parent` is the previous block's hash (none for a prompt's first block) and
    /// `tokens` the block's token ids, for the stored event (and `salt` a first block's
    /// cache salt).
    pub fn publish(
        &mut self,
        id: BlockId,
        hash: u64,
        parent: Option<u64>,
        tokens: &[u32],
        salt: Option<&str>,
    ) {
        self.blocks[id as usize].hash = Some(hash);
        let std::collections::hash_map::Entry::Vacant(slot) = self.cached.entry(hash) else { return };
        slot.insert(id);
        let Some(events) = &mut self.events else { return };
        // A block continuing the last stored run joins its event, as one vLLM event
        // carries a request's consecutive new blocks.
        if let Some(CacheEvent::Stored { hashes, tokens: ids, .. }) = events.last_mut()
            && parent.is_some()
            && hashes.last() == parent.as_ref()
        {
            hashes.push(hash);
            ids.extend_from_slice(tokens);
            return;
        }
        let salt = parent.is_none().then(|| salt.map(str::to_owned)).flatten();
        events.push(CacheEvent::Stored { hashes: vec![hash], parent, tokens: tokens.to_vec(), salt });
    }

    /// Drop a sequence's references; blocks nobody holds go to the back of the free
    /// queue, still findable by hash until reused.
    pub fn release(&mut self, ids: &[BlockId]) {
        // Free the tail first so a sequence's last blocks are evicted before its prefix.
        for &id in ids.iter().rev() {
            let block = &mut self.blocks[id as usize];
            block.ref_count = block.ref_count.saturating_sub(1);
            if block.ref_count == 0 {
                self.push_free(id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(n: usize, salt: u32) -> Vec<u32> {
        (0..n as u32).map(|i| i * 7 + salt).collect()
    }

    #[test]
    fn chained_hashes_name_prefixes() {
        let a = block_hashes(&tokens(40, 0), 0);
        assert_eq!(a.len(), 2);
        let mut other = tokens(40, 0);
        other[3] = 99_999;
        let b = block_hashes(&other, 0);
        assert_ne!(a[0], b[0]);
        assert_ne!(a[1], b[1], "a change in block 0 changes every later hash");
    }

    #[test]
    fn a_window_needs_only_its_last_blocks_cached() {
        let mut kv = KvCache::new(8);
        let hashes = block_hashes(&tokens(16 * 6, 3), 0);
        // Blocks 2..6 cached, 0 and 1 not (evicted long ago).
        let blocks = kv.allocate(4).unwrap();
        for (b, h) in blocks.iter().zip(&hashes[2..6]) {
            kv.publish(*b, *h, None, &[0; BLOCK_SIZE], None);
        }
        assert_eq!(kv.lookup(&hashes), 0, "full attention needs the whole prefix");
        assert_eq!(kv.lookup_window(&hashes, None), 0);
        assert_eq!(kv.lookup_window(&hashes, Some(3)), 6, "the last 3 blocks are there");
        assert_eq!(kv.lookup_window(&hashes, Some(5)), 0);
        assert_eq!(kv.cached_count(&hashes), 4);
    }

    #[test]
    fn published_blocks_are_reused_and_evicted_lru() {
        let mut kv = KvCache::new(4);
        let hashes = block_hashes(&tokens(32, 1), 0);
        let blocks = kv.allocate(2).unwrap();
        kv.publish(blocks[0], hashes[0], None, &[0; BLOCK_SIZE], None);
        kv.publish(blocks[1], hashes[1], Some(hashes[0]), &[0; BLOCK_SIZE], None);
        kv.release(&blocks);
        assert_eq!(kv.free_blocks(), 4);
        assert_eq!(kv.lookup(&hashes), 2, "freed blocks stay cached");
        let reused = kv.take_cached(&hashes);
        assert_eq!(reused, blocks);
        assert_eq!(kv.free_blocks(), 2);
        kv.release(&reused);
        // Allocating the whole pool evicts them.
        let all = kv.allocate(4).unwrap();
        assert_eq!(kv.lookup(&hashes), 0);
        assert!(kv.allocate(1).is_none());
        kv.release(&all);
        assert_eq!(kv.usage(), 0.0);
    }

    #[test]
    fn events_describe_stored_runs_and_evictions() {
        let mut kv = KvCache::new(3);
        kv.record_events();
        let toks = tokens(48, 2);
        let hashes = block_hashes(&toks, 0);
        let blocks = kv.allocate(3).unwrap();
        kv.publish(blocks[0], hashes[0], None, &toks[..16], None);
        kv.publish(blocks[1], hashes[1], Some(hashes[0]), &toks[16..32], None);
        // Already cached under that hash: nothing new to announce.
        kv.publish(blocks[2], hashes[1], Some(hashes[0]), &toks[16..32], None);
        assert_eq!(
            kv.take_events(),
            vec![CacheEvent::Stored {
                hashes: hashes[..2].to_vec(),
                parent: None,
                tokens: toks[..32].to_vec(),
                salt: None,
            }]
        );
        kv.release(&blocks);
        kv.allocate(3).unwrap();
        assert_eq!(kv.take_events(), vec![CacheEvent::Removed { hashes: vec![hashes[1], hashes[0]] }]);
        assert!(kv.take_events().is_empty());
    }

    #[test]
    fn a_salted_prompt_shares_no_block_and_announces_its_salt() {
        let toks = tokens(32, 5);
        let (plain, salted) = (block_hashes(&toks, 0), block_hashes(&toks, root(Some("tenant-a"))));
        assert!(plain.iter().all(|h| !salted.contains(h)), "every block differs");
        assert_ne!(salted, block_hashes(&toks, root(Some("tenant-b"))));
        let mut kv = KvCache::new(4);
        kv.record_events();
        let blocks = kv.allocate(2).unwrap();
        kv.publish(blocks[0], salted[0], None, &toks[..16], Some("tenant-a"));
        kv.publish(blocks[1], salted[1], Some(salted[0]), &toks[16..], Some("tenant-a"));
        assert_eq!(kv.lookup(&plain), 0);
        assert_eq!(kv.lookup(&salted), 2);
        let events = kv.take_events();
        assert!(
            matches!(&events[..], [CacheEvent::Stored { salt: Some(s), hashes, .. }] if s == "tenant-a" && hashes.len() == 2)
        );
    }
}
