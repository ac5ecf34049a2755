//! `round-robin`: each request to the next eligible replica in turn.

use std::sync::atomic::{AtomicUsize, Ordering};

use super::{Candidate, Decision, Policy, Reason, rotated};
use crate::ingress::routing_key::RoutingKey;

#[derive(Debug, Default)]
pub struct RoundRobin {
    next: AtomicUsize,
}

impl Policy for RoundRobin {
    fn name(&self) -> &'static str {
        "round-robin"
    }

    fn choose(&self, _key: Option<&RoutingKey>, replicas: &[Candidate]) -> Option<Decision> {
        let n = replicas.len();
        if n == 0 {
            return None;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
        rotated(start, n)
            .find(|&i| replicas[i].eligible)
            .map(|replica| Decision { replica, reason: Reason::Balanced })
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::all;
    use super::*;

    #[test]
    fn cycles_and_skips_ineligible() {
        let rr = RoundRobin::default();
        let mut c = all(&[0, 0, 0]);
        let picks: Vec<_> = (0..6).map(|_| rr.choose(None, &c).unwrap().replica).collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
        c[1].eligible = false;
        let picks: Vec<_> = (0..4).map(|_| rr.choose(None, &c).unwrap().replica).collect();
        assert!(!picks.contains(&1));
        c.iter_mut().for_each(|c| c.eligible = false);
        assert_eq!(rr.choose(None, &c), None);
    }
}
