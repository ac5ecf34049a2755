//! Outlier ejection with a ceiling, and panic routing: how the data path's evidence
//! against a replica (a stream that broke, a breaker that opened) is kept from emptying
//! the fleet.
//!
//! Under overload a healthy engine looks like a failing one: vLLM sends a stream's
//! headers before the request is even scheduled, streams go quiet, attempts time out.
//! Ejecting on every such signal without a limit takes busy replicas out one after
//! another until none is left and every client gets 503. So, as Envoy does:
//!
//! - at most `--max-ejection-percent` of a stage's replicas may be out for errors at
//!   once (ejected after a failed stream, or with an open circuit breaker); an ejection
//!   or a breaker opening beyond that is refused and counted;
//! - when fewer than `--panic-threshold` percent of the replicas serving a model are in
//!   rotation (health checks, ejections and breakers together), the ceiling is not
//!   enough: requests go to every replica not known to be down (its last health check
//!   refused the connection or answered an error, which an overloaded engine does not
//!   do; a check that timed out is not proof) and each request so routed is counted.
//!
//! The choices here are pure functions over the replicas' states; [`super::Registry`]
//! takes its lock around the ones that change a state.

use std::sync::Arc;

use super::Replica;

/// `--max-ejection-percent` and `--panic-threshold`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutlierSettings {
    /// Most replicas out for errors at once, in percent of the stage (rounded down).
    pub max_ejection_percent: u8,
    /// Below this percentage of replicas in rotation, route to all that are not down
    /// (0: never).
    pub panic_threshold: u8,
}

impl Default for OutlierSettings {
    fn default() -> Self {
        OutlierSettings { max_ejection_percent: 50, panic_threshold: 50 }
    }
}

/// Whether one more replica of `replicas` may be taken out for errors.
pub(super) fn room_for_one_more(replicas: &[Arc<Replica>], max_percent: u8) -> bool {
    let out = replicas.iter().filter(|r| r.out_for_errors()).count();
    out < replicas.len() * usize::from(max_percent) / 100
}

/// Whether `in_rotation` of `members` is below the panic threshold.
pub(super) fn panicking(in_rotation: usize, members: usize, threshold: u8) -> bool {
    threshold > 0 && members > 0 && in_rotation * 100 < usize::from(threshold) * members
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ceiling_rounds_down_and_never_takes_a_lone_replica() {
        assert!(!panicking(1, 2, 50), "half is not below half");
        assert!(panicking(1, 3, 50));
        assert!(panicking(0, 1, 50));
        assert!(!panicking(0, 1, 0), "0 turns panic routing off");
        assert!(!panicking(0, 0, 50), "nothing to route to");
        assert!(panicking(3, 4, 100));
    }
}
