//! `consistent-hash`: session affinity on a ring of virtual nodes, with bounded loads.
//!
//! By default (`--session-spread even`) a session's home and the order it tries the
//! others come from the census ([`super::SessionCensus`]: even homes, the same on every
//! router instance that saw the same sessions), and a home the engines' own load marks
//! overloaded ([`Candidate::overloaded`], read from their `/metrics`, so every instance
//! sees it) passes the request to the next replica of the session's order. The ring
//! below is `--session-spread hash`: each session hashed alone.
//!
//! Each replica owns `virtual_nodes` points on a ring (hashring, hashed with xxh3 from
//! the replica's URL, so the layout does not depend on list order). A session key
//! hashes to a point; the next virtual node clockwise names its owner. When the owner
//! is not eligible (unhealthy, or it just failed this request) we keep walking clockwise
//! to the next eligible replica: only the lost replica's sessions move, they spread over
//! the others because its virtual nodes are scattered, and they come back when it does.
//!
//! Bounded loads (Mirrokni, Thorup, Zadimoghaddam 2016): with a balance factor `c`, no
//! replica takes a request while it already has `ceil(c * (m + 1) / n)` or more in
//! flight (`m` requests in flight over the `n` eligible replicas); the excess continues
//! clockwise. Without a factor (the default) the policy is pure affinity but for the
//! engines' overload. Each instance counts only its own requests in flight, so with
//! several instances each moves different requests: a factor suits one instance.
//!
//! hashring answers "who owns this key" but walks the ring only by cloning it, so at
//! build time we read the ring's order once and store, for every virtual node, the
//! distinct replicas met walking clockwise from it. A decision is then one ring lookup
//! and a short slice scan.

use std::hash::{Hash, Hasher};

use hashring::HashRing;
use xxhash_rust::xxh3::Xxh3Builder;

use super::{Candidate, Decision, Policy, PowerOfTwo, Reason, SessionCensus};
use crate::ingress::routing_key::RoutingKey;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HashOptions {
    /// Virtual nodes per replica.
    pub virtual_nodes: usize,
    /// Bounded-load factor `c` (> 1.0), or `None` for pure affinity.
    pub balance_factor: Option<f64>,
    /// How sessions are given homes (`--session-spread`).
    pub spread: SessionSpread,
    /// How long the census keeps a session it no longer sees (`--session-window`).
    pub session_window: std::time::Duration,
    /// How much more than its share of homes a replica may hold (`--session-slack`).
    pub session_slack: f64,
}

impl Default for HashOptions {
    fn default() -> Self {
        HashOptions {
            virtual_nodes: 160,
            balance_factor: None,
            spread: SessionSpread::Hash,
            session_window: std::time::Duration::from_secs(600),
            session_slack: 0.0,
        }
    }
}

/// How `consistent-hash` gives sessions their homes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SessionSpread {
    /// Evenly: the census's plan ([`super::SessionCensus`]), the same on every instance
    /// that saw the same sessions.
    Even,
    /// Each session hashed onto the ring alone (binomial: uneven when sessions are few).
    Hash,
}

/// A point on the ring: the `index`-th virtual node of replica `replica`. Only the
/// replica's name and the index are hashed, never its position in the list.
#[derive(Debug, Clone)]
struct VirtualNode {
    name: std::sync::Arc<str>,
    index: u32,
    replica: u32,
}

impl Hash for VirtualNode {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.name.hash(state);
        self.index.hash(state);
    }
}

pub struct ConsistentHash {
    ring: HashRing<VirtualNode, Xxh3Builder>,
    /// `walks[replica * virtual_nodes + index]`: the distinct replicas met walking
    /// clockwise from that virtual node, starting with its own replica.
    walks: Vec<Box<[u32]>>,
    virtual_nodes: usize,
    balance_factor: Option<f64>,
    /// With `--session-spread even`: the census that plans homes, and the names it
    /// plans them over.
    census: Option<(std::sync::Arc<SessionCensus>, Vec<String>)>,
}

impl ConsistentHash {
    /// Homes planned evenly by `census` (kept across rebuilds of the policy).
    pub fn with_census(
        replica_names: &[String],
        options: HashOptions,
        census: std::sync::Arc<SessionCensus>,
    ) -> Self {
        let mut policy = Self::new(replica_names, options);
        if options.spread == SessionSpread::Even {
            policy.census = Some((census, replica_names.to_vec()));
        }
        policy
    }

    pub fn new(replica_names: &[String], options: HashOptions) -> Self {
        let virtual_nodes = options.virtual_nodes.max(1);
        let mut ring = HashRing::with_hasher(Xxh3Builder::new());
        let mut nodes = Vec::with_capacity(replica_names.len() * virtual_nodes);
        for (replica, name) in replica_names.iter().enumerate() {
            let name: std::sync::Arc<str> = name.as_str().into();
            for index in 0..virtual_nodes {
                nodes.push(VirtualNode { name: name.clone(), index: index as u32, replica: replica as u32 });
            }
        }
        ring.batch_add(nodes);
        let walks = Self::walks(&ring, replica_names.len(), virtual_nodes);
        ConsistentHash { ring, walks, virtual_nodes, balance_factor: options.balance_factor, census: None }
    }

    fn walks(
        ring: &HashRing<VirtualNode, Xxh3Builder>,
        replicas: usize,
        virtual_nodes: usize,
    ) -> Vec<Box<[u32]>> {
        // Asked for more than `len` replicas, hashring returns the whole ring once, in
        // clockwise order (from some point: where the walk starts does not matter).
        let order = ring.get_with_replicas(&0u8, ring.len() + 1).unwrap_or_default();
        debug_assert_eq!(order.len(), replicas * virtual_nodes);
        let mut walks = vec![Box::<[u32]>::default(); replicas * virtual_nodes];
        let mut seen = vec![false; replicas];
        for start in 0..order.len() {
            seen.iter_mut().for_each(|s| *s = false);
            let mut walk = Vec::with_capacity(replicas);
            for node in order.iter().cycle().skip(start).take(order.len()) {
                let r = node.replica as usize;
                if !seen[r] {
                    seen[r] = true;
                    walk.push(node.replica);
                    if walk.len() == replicas {
                        break;
                    }
                }
            }
            let node = &order[start];
            walks[node.replica as usize * virtual_nodes + node.index as usize] = walk.into();
        }
        walks
    }

    /// The replicas in the order this key tries them: owner first.
    fn walk(&self, key: &RoutingKey) -> &[u32] {
        match self.ring.get(&key.as_bytes()) {
            Some(node) => &self.walks[node.replica as usize * self.virtual_nodes + node.index as usize],
            None => &[],
        }
    }

    /// The most a replica may already have in flight and still take this request.
    fn load_cap(&self, replicas: &[Candidate]) -> Option<usize> {
        let factor = self.balance_factor?;
        let (eligible, in_flight) = replicas
            .iter()
            .filter(|c| c.eligible)
            .fold((0usize, 0usize), |(n, m), c| (n + 1, m + c.in_flight));
        if eligible == 0 {
            return None;
        }
        let cap = (factor * (in_flight + 1) as f64 / eligible as f64).ceil() as usize;
        Some(cap.max(1))
    }
}

impl Policy for ConsistentHash {
    fn name(&self) -> &'static str {
        "consistent-hash"
    }

    fn choose(&self, key: Option<&RoutingKey>, replicas: &[Candidate]) -> Option<Decision> {
        let Some(key) = key else {
            return PowerOfTwo::pick(replicas).map(|replica| Decision { replica, reason: Reason::Keyless });
        };
        let planned;
        let walk: &[u32] = match &self.census {
            Some((census, names)) => {
                planned = census
                    .order(key.as_bytes(), names, std::time::Instant::now())
                    .into_iter()
                    .map(|r| r as u32)
                    .collect::<Vec<u32>>();
                &planned
            }
            None => self.walk(key),
        };
        let owner = *walk.first()? as usize;
        let cap = self.load_cap(replicas);
        let mut spilled = false;
        let mut first_eligible = None;
        for &r in walk {
            let r = r as usize;
            let Some(c) = replicas.get(r).filter(|c| c.eligible) else { continue };
            first_eligible.get_or_insert(r);
            if c.overloaded || cap.is_some_and(|cap| c.in_flight >= cap) {
                spilled = true;
                continue;
            }
            let reason = match (r == owner, spilled) {
                (true, _) => Reason::Affinity,
                (false, true) => Reason::Spill,
                (false, false) => Reason::Failover,
            };
            return Some(Decision { replica: r, reason });
        }
        // Every eligible replica overloaded (by the engines' signal, or over the cap,
        // unreachable with a cap >= the mean load): the session's own first.
        first_eligible.map(|replica| Decision { replica, reason: Reason::Spill })
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::all;
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("http://10.0.0.{i}:8000")).collect()
    }

    fn key(i: usize) -> RoutingKey {
        RoutingKey::from(format!("session-{i}"))
    }

    fn owners(ch: &ConsistentHash, c: &[Candidate], keys: usize) -> Vec<usize> {
        (0..keys).map(|i| ch.choose(Some(&key(i)), c).unwrap().replica).collect()
    }

    #[test]
    fn same_key_same_replica_and_keys_spread() {
        let ch = ConsistentHash::new(&names(4), HashOptions::default());
        let c = all(&[0; 4]);
        let first = owners(&ch, &c, 2000);
        assert_eq!(first, owners(&ch, &c, 2000));
        let mut per = [0usize; 4];
        first.iter().for_each(|&r| per[r] += 1);
        // 160 virtual nodes keep each share within a generous band around 25%.
        assert!(per.iter().all(|&n| (300..700).contains(&n)), "{per:?}");
    }

    #[test]
    fn walks_list_every_replica_once_owner_first() {
        let ch = ConsistentHash::new(&names(5), HashOptions { virtual_nodes: 20, ..HashOptions::default() });
        assert_eq!(ch.walks.len(), 100);
        for walk in &ch.walks {
            let mut sorted = walk.to_vec();
            sorted.sort();
            assert_eq!(sorted, [0, 1, 2, 3, 4]);
        }
        let w = ch.walk(&key(1));
        let owner = ch.choose(Some(&key(1)), &all(&[0; 5])).unwrap().replica;
        assert_eq!(w[0] as usize, owner);
    }

    #[test]
    fn losing_a_replica_moves_only_its_sessions_and_spreads_them() {
        let ch = ConsistentHash::new(&names(4), HashOptions::default());
        let mut c = all(&[0; 4]);
        let before = owners(&ch, &c, 1000);
        c[2].eligible = false;
        let during = ch_with_reasons(&ch, &c, 1000);
        let mut moved_to = [0usize; 4];
        for (i, (&b, &(d, reason))) in before.iter().zip(&during).enumerate() {
            if b == 2 {
                assert_ne!(d, 2);
                assert_eq!(reason, Reason::Failover, "key {i}");
                moved_to[d] += 1;
            } else {
                assert_eq!(b, d, "key {i} moved though its replica is fine");
                assert_eq!(reason, Reason::Affinity);
            }
        }
        assert!(moved_to.iter().enumerate().all(|(r, &n)| r == 2 || n > 0), "{moved_to:?}");
        c[2].eligible = true;
        assert_eq!(before, owners(&ch, &c, 1000));
    }

    fn ch_with_reasons(ch: &ConsistentHash, c: &[Candidate], keys: usize) -> Vec<(usize, Reason)> {
        (0..keys)
            .map(|i| {
                let d = ch.choose(Some(&key(i)), c).unwrap();
                (d.replica, d.reason)
            })
            .collect()
    }

    #[test]
    fn ring_does_not_depend_on_list_order() {
        let n = names(3);
        let reversed: Vec<String> = n.iter().rev().cloned().collect();
        let a = ConsistentHash::new(&n, HashOptions::default());
        let b = ConsistentHash::new(&reversed, HashOptions::default());
        let c = all(&[0; 3]);
        for i in 0..200 {
            let ra = a.choose(Some(&key(i)), &c).unwrap().replica;
            let rb = b.choose(Some(&key(i)), &c).unwrap().replica;
            assert_eq!(n[ra], reversed[rb]);
        }
    }

    #[test]
    fn bounded_loads_spill_along_the_ring() {
        let opts = HashOptions { balance_factor: Some(1.25), ..HashOptions::default() };
        let ch = ConsistentHash::new(&names(4), opts);
        let k = key(7);
        let owner = ch.choose(Some(&k), &all(&[0; 4])).unwrap().replica;
        let mut loads = [1usize; 4];
        loads[owner] = 4; // total 7, cap = ceil(1.25 * 8 / 4) = 3: the owner is full.
        let d = ch.choose(Some(&k), &all(&loads)).unwrap();
        assert_ne!(d.replica, owner);
        assert_eq!(d.reason, Reason::Spill);
        assert_eq!(d.replica as u32, ch.walk(&k)[1]);
        loads[owner] = 1; // total 4, cap = ceil(1.25 * 5 / 4) = 2: room again, back home.
        assert_eq!(ch.choose(Some(&k), &all(&loads)).unwrap().reason, Reason::Affinity);
    }

    #[test]
    fn without_factor_affinity_ignores_load() {
        let ch = ConsistentHash::new(&names(4), HashOptions::default());
        let k = key(3);
        let owner = ch.choose(Some(&k), &all(&[0; 4])).unwrap().replica;
        let mut loads = [0usize; 4];
        loads[owner] = 1000;
        assert_eq!(ch.choose(Some(&k), &all(&loads)).unwrap().replica, owner);
    }

    #[test]
    fn keyless_uses_power_of_two() {
        let ch = ConsistentHash::new(&names(2), HashOptions::default());
        let d = ch.choose(None, &all(&[5, 0])).unwrap();
        assert_eq!(d, Decision { replica: 1, reason: Reason::Keyless });
    }

    #[test]
    fn nothing_eligible_is_none() {
        let ch = ConsistentHash::new(&names(2), HashOptions::default());
        let mut c = all(&[0, 0]);
        c.iter_mut().for_each(|c| c.eligible = false);
        assert_eq!(ch.choose(Some(&key(1)), &c), None);
        let empty = ConsistentHash::new(&[], HashOptions::default());
        assert_eq!(empty.choose(Some(&key(1)), &[]), None);
    }
}
