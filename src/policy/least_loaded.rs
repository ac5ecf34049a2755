//! `least-loaded`: the eligible replica with the fewest requests in flight. Ties are
//! broken by a rotating start so that equally idle replicas share the work.

use std::sync::atomic::{AtomicUsize, Ordering};

use super::{Candidate, Decision, Policy, Reason, rotated};
use crate::ingress::routing_key::RoutingKey;

#[derive(Debug, Default)]
pub struct LeastLoaded {
    rotation: AtomicUsize,
}

impl Policy for LeastLoaded {
    fn name(&self) -> &'static str {
        "least-loaded"
    }

    fn choose(&self, _key: Option<&RoutingKey>, replicas: &[Candidate]) -> Option<Decision> {
        let n = replicas.len();
        if n == 0 {
            return None;
        }
        let start = self.rotation.fetch_add(1, Ordering::Relaxed) % n;
        rotated(start, n)
            .filter(|&i| replicas[i].eligible)
            .min_by_key(|&i| replicas[i].in_flight)
            .map(|replica| Decision { replica, reason: Reason::Balanced })
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::all;
    use super::*;

    #[test]
    fn picks_minimum_and_spreads_ties() {
        let ll = LeastLoaded::default();
        let mut c = all(&[4, 2, 9, 2]);
        let picks: Vec<_> = (0..4).map(|_| ll.choose(None, &c).unwrap().replica).collect();
        assert!(picks.iter().all(|&p| p == 1 || p == 3));
        assert!(picks.contains(&1) && picks.contains(&3));
        c[1].eligible = false;
        c[3].eligible = false;
        assert_eq!(ll.choose(None, &c).unwrap().replica, 0);
    }
}
