//! One replica's remembered prompt blocks: a bounded set of chained block hashes, each
//! with the time it was last used.
//!
//! A lookup walks a request's blocks from the first and stops at the first one missing
//! or expired: the length of the prefix the replica is believed to hold. When the set
//! grows past its bound, the least recently used tenth goes at once (one pass over the
//! set, so the cost is spread over many insertions), expired entries with it.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// Block hashes are xxh3 values already: used as they are, not hashed again.
#[derive(Default)]
pub(crate) struct Prehashed(u64);

impl Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only u64 keys are stored; fold anything else in, for completeness.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

type Map = HashMap<u64, u64, BuildHasherDefault<Prehashed>>;

pub struct ReplicaBlocks {
    capacity: usize,
    /// Block hash -> last use, in the index clock's milliseconds.
    blocks: Mutex<Map>,
    /// When a request was first routed here after the last KV event batch arrived
    /// (index clock, milliseconds + 1; 0 when none): events that do not follow are stale.
    routed_since_events: AtomicU64,
    /// Tokens per block of this replica's KV events (0 until its first stored block;
    /// unused by `prefix-aware`, whose blocks are bytes).
    block_size: AtomicUsize,
}

impl ReplicaBlocks {
    pub fn new(capacity: usize) -> Self {
        ReplicaBlocks {
            capacity: capacity.max(1),
            blocks: Mutex::new(Map::default()),
            routed_since_events: AtomicU64::new(0),
            block_size: AtomicUsize::new(0),
        }
    }

    /// Tokens per block of this replica's engine, as its events say (0: not known yet).
    pub fn block_size(&self) -> usize {
        self.block_size.load(Ordering::Relaxed)
    }

    pub fn set_block_size(&self, tokens: usize) {
        self.block_size.store(tokens, Ordering::Relaxed);
    }

    /// A request was routed here at `now` (for the KV events' staleness check).
    pub fn note_routed(&self, now: u64) {
        let _ = self.routed_since_events.compare_exchange(0, now + 1, Ordering::Relaxed, Ordering::Relaxed);
    }

    /// Events arrived: the replica is not silent.
    pub fn note_events(&self) {
        self.routed_since_events.store(0, Ordering::Relaxed);
    }

    /// Whether requests were routed here at least `silence_ms` before `now` with no
    /// events since.
    pub fn silent_since_routed(&self, now: u64, silence_ms: u64) -> bool {
        match self.routed_since_events.load(Ordering::Relaxed) {
            0 => false,
            at => now.saturating_sub(at - 1) >= silence_ms,
        }
    }

    /// How many of `hashes`, from the first, this replica holds (used within `ttl_ms`
    /// of `now`).
    pub fn matched(&self, hashes: &[u64], now: u64, ttl_ms: u64) -> usize {
        let blocks = self.blocks.lock().expect("replica blocks lock");
        hashes
            .iter()
            .take_while(|h| blocks.get(h).is_some_and(|&used| now.saturating_sub(used) <= ttl_ms))
            .count()
    }

    /// Remember that this replica holds `hashes`, used at `now`.
    pub fn remember(&self, hashes: &[u64], now: u64) {
        let mut blocks = self.blocks.lock().expect("replica blocks lock");
        for &h in hashes {
            blocks.insert(h, now);
        }
        if blocks.len() > self.capacity {
            evict(&mut blocks, self.capacity - self.capacity / 10);
        }
    }

    /// Forget `hashes` (the engine evicted them).
    pub fn forget(&self, hashes: &[u64]) {
        let mut blocks = self.blocks.lock().expect("replica blocks lock");
        for h in hashes {
            blocks.remove(h);
        }
    }

    /// Forget everything (the engine cleared its cache, or restarted).
    pub fn clear(&self) {
        self.blocks.lock().expect("replica blocks lock").clear();
    }

    pub fn len(&self) -> usize {
        self.blocks.lock().expect("replica blocks lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Keep the `keep` most recently used blocks (fewer when several share the cut-off time).
fn evict(blocks: &mut Map, keep: usize) {
    let mut times: Vec<u64> = blocks.values().copied().collect();
    let drop = times.len().saturating_sub(keep);
    if drop == 0 {
        return;
    }
    let (_, &mut cutoff, _) = times.select_nth_unstable(drop - 1);
    blocks.retain(|_, &mut used| used > cutoff);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_held_prefix_only() {
        let r = ReplicaBlocks::new(100);
        r.remember(&[1, 2, 3], 0);
        assert_eq!(r.matched(&[1, 2, 3, 4], 0, 1000), 3);
        assert_eq!(r.matched(&[1, 9, 3], 0, 1000), 1);
        assert_eq!(r.matched(&[9, 1, 2], 0, 1000), 0);
        assert_eq!(r.matched(&[], 0, 1000), 0);
    }

    #[test]
    fn expired_blocks_do_not_match() {
        let r = ReplicaBlocks::new(100);
        r.remember(&[1, 2], 0);
        r.remember(&[2], 500);
        assert_eq!(r.matched(&[1, 2], 1000, 1000), 2);
        assert_eq!(r.matched(&[1, 2], 1001, 1000), 0);
        assert_eq!(r.matched(&[2], 1001, 1000), 1);
    }

    #[test]
    fn least_recently_used_go_first() {
        let r = ReplicaBlocks::new(10);
        for t in 0..10u64 {
            r.remember(&[100 + t], t);
        }
        assert_eq!(r.len(), 10);
        r.remember(&[200], 20);
        // Over the bound: down to 9, the oldest gone, the newest kept.
        assert_eq!(r.len(), 9);
        assert_eq!(r.matched(&[100], 20, 1000), 0);
        assert_eq!(r.matched(&[101], 20, 1000), 0);
        assert_eq!(r.matched(&[109], 20, 1000), 1);
        assert_eq!(r.matched(&[200], 20, 1000), 1);
    }

    #[test]
    fn forget_and_clear() {
        let r = ReplicaBlocks::new(10);
        r.remember(&[1, 2, 3], 0);
        r.forget(&[2]);
        assert_eq!(r.matched(&[1, 2, 3], 0, 1000), 1);
        r.clear();
        assert!(r.is_empty());
    }
}
