//! `power-of-two`: sample two distinct eligible replicas, take the one with fewer
//! requests in flight (Mitzenmacher's "power of two choices"). The default policy, and
//! what `consistent-hash` falls back to for requests without a session key.

use super::{Candidate, Decision, Policy, Reason, eligible_count, nth_eligible};
use crate::ingress::routing_key::RoutingKey;

#[derive(Debug, Default)]
pub struct PowerOfTwo;

impl PowerOfTwo {
    pub fn pick(replicas: &[Candidate]) -> Option<usize> {
        let k = eligible_count(replicas);
        match k {
            0 => None,
            1 => nth_eligible(replicas, 0),
            _ => {
                let a = fastrand::usize(..k);
                let mut b = fastrand::usize(..k - 1);
                if b >= a {
                    b += 1;
                }
                let (a, b) = (nth_eligible(replicas, a)?, nth_eligible(replicas, b)?);
                Some(if replicas[b].in_flight < replicas[a].in_flight { b } else { a })
            }
        }
    }
}

impl Policy for PowerOfTwo {
    fn name(&self) -> &'static str {
        "power-of-two"
    }

    fn choose(&self, _key: Option<&RoutingKey>, replicas: &[Candidate]) -> Option<Decision> {
        Self::pick(replicas).map(|replica| Decision { replica, reason: Reason::Balanced })
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::all;
    use super::*;

    #[test]
    fn never_picks_the_most_loaded_of_many() {
        // The busiest replica can only win a draw against itself, which p2c never does.
        let c = all(&[5, 1, 2, 9]);
        for _ in 0..500 {
            assert_ne!(PowerOfTwo.choose(None, &c).unwrap().replica, 3);
        }
    }

    #[test]
    fn two_replicas_always_take_the_lighter() {
        let c = all(&[3, 1]);
        for _ in 0..50 {
            assert_eq!(PowerOfTwo.choose(None, &c).unwrap().replica, 1);
        }
    }

    #[test]
    fn single_and_no_eligible() {
        let mut c = all(&[0, 7]);
        c[0].eligible = false;
        assert_eq!(PowerOfTwo.choose(None, &c).unwrap().replica, 1);
        c[1].eligible = false;
        assert_eq!(PowerOfTwo.choose(None, &c), None);
    }
}
