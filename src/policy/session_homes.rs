//! Where each session's turns have been going, for the cache-aware policies: a session's
//! first turn is placed by cache and load, later turns follow it while its replica is
//! eligible and not overloaded.
//!
//! Kept by session key hash and replica name, so it outlives changes to the replica set
//! (a session whose replica left is placed again). Bounded: past `capacity` sessions
//! the least recently seen half is forgotten, and a forgotten session is simply placed
//! again (by cache, so usually where it was).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use xxhash_rust::xxh3::xxh3_64;

use super::{Candidate, PrefixOptions};
use crate::ingress::routing_key::RoutingKey;

pub struct SessionHomes {
    capacity: usize,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    homes: HashMap<u64, (Arc<str>, u64)>,
    clock: u64,
}

impl Default for SessionHomes {
    /// Room for 100,000 sessions (a few MB).
    fn default() -> Self {
        SessionHomes::new(100_000)
    }
}

impl SessionHomes {
    pub fn new(capacity: usize) -> Self {
        SessionHomes { capacity: capacity.max(2), inner: Mutex::new(Inner::default()) }
    }

    /// The replica the session's last turn went to.
    pub fn get(&self, key: &RoutingKey) -> Option<Arc<str>> {
        let mut inner = self.inner.lock().expect("session homes lock");
        inner.clock += 1;
        let now = inner.clock;
        inner.homes.get_mut(&xxh3_64(key.as_bytes())).map(|(home, used)| {
            *used = now;
            home.clone()
        })
    }

    /// The index in `names` of the session's replica, if it should take this turn:
    /// eligible, and not over [`super::overload_bound`] of the least loaded.
    pub fn home_for(
        &self,
        key: &RoutingKey,
        names: &[String],
        replicas: &[Candidate],
        balance: &PrefixOptions,
    ) -> Option<usize> {
        let home = self.get(key)?;
        let i = names.iter().position(|n| *n == *home)?;
        let bound = super::candidates_bound(replicas, balance.balance_abs, balance.balance_rel)?;
        (replicas[i].eligible && replicas[i].in_flight <= bound).then_some(i)
    }

    pub fn set(&self, key: &RoutingKey, replica: &str) {
        let mut inner = self.inner.lock().expect("session homes lock");
        inner.clock += 1;
        let now = inner.clock;
        let hash = xxh3_64(key.as_bytes());
        match inner.homes.get_mut(&hash) {
            Some((home, used)) if &**home == replica => *used = now,
            _ => {
                inner.homes.insert(hash, (replica.into(), now));
            }
        }
        if inner.homes.len() > self.capacity {
            let mut ages: Vec<u64> = inner.homes.values().map(|(_, used)| *used).collect();
            let half = ages.len() / 2;
            let cut = *ages.select_nth_unstable(half).1;
            inner.homes.retain(|_, (_, used)| *used > cut);
        }
    }

    pub fn len(&self) -> usize {
        self.inner.lock().expect("session homes lock").homes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_and_forgets_the_oldest() {
        let homes = SessionHomes::new(4);
        let key = |i: u32| RoutingKey::from(format!("s{i}"));
        for i in 0..4 {
            homes.set(&key(i), "a");
        }
        assert_eq!(homes.get(&key(0)).as_deref(), Some("a"));
        homes.set(&key(1), "b");
        assert_eq!(homes.get(&key(1)).as_deref(), Some("b"));
        homes.set(&key(9), "c");
        assert!(homes.len() <= 4);
        assert!(homes.get(&key(9)).is_some(), "the newest stays");
        assert!(homes.get(&key(2)).is_none(), "the least recently seen goes");
    }
}
