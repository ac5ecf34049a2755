//! `random`: a uniformly random eligible replica.

use super::{Candidate, Decision, Policy, Reason, eligible_count, nth_eligible};
use crate::ingress::routing_key::RoutingKey;

#[derive(Debug, Default)]
pub struct Random;

impl Policy for Random {
    fn name(&self) -> &'static str {
        "random"
    }

    fn choose(&self, _key: Option<&RoutingKey>, replicas: &[Candidate]) -> Option<Decision> {
        let k = eligible_count(replicas);
        if k == 0 {
            return None;
        }
        nth_eligible(replicas, fastrand::usize(..k))
            .map(|replica| Decision { replica, reason: Reason::Balanced })
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::all;
    use super::*;

    #[test]
    fn only_eligible_and_all_of_them() {
        let mut c = all(&[0, 0, 0, 0]);
        c[2].eligible = false;
        let mut seen = [0usize; 4];
        for _ in 0..400 {
            seen[Random.choose(None, &c).unwrap().replica] += 1;
        }
        assert_eq!(seen[2], 0);
        assert!(seen[0] > 0 && seen[1] > 0 && seen[3] > 0, "{seen:?}");
    }
}
