//! One snapshot of the fleet: the replicas in rotation, the policy built for exactly
//! them, and which of them a request may go to (eligibility, model, panic routing).

use std::sync::Arc;

use super::{OutlierSettings, Replica, outliers};
use crate::error::RouterError;
use crate::policy::{Candidate, Policy};

/// The replicas in rotation and the policy built for exactly them.
pub struct Fleet {
    pub replicas: Vec<Arc<Replica>>,
    pub policy: Box<dyn Policy>,
    pub(super) outliers: OutlierSettings,
}

/// The policy's view of the replicas for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidates {
    pub list: Vec<Candidate>,
    /// Too few replicas in rotation: every one not known to be down is eligible
    /// ([`outliers`]).
    pub panic: bool,
}

impl std::ops::Deref for Candidates {
    type Target = [Candidate];

    fn deref(&self) -> &[Candidate] {
        &self.list
    }
}

impl Fleet {
    pub fn get(&self, index: usize) -> &Arc<Replica> {
        &self.replicas[index]
    }

    /// The policy's view of the replicas for one request: eligible means in rotation
    /// (healthy, not ejected, its breaker closed or half-open, not draining), serving
    /// `model` (when the request names one) and not in `tried` (indices into this
    /// fleet). When fewer than the panic threshold of the replicas serving the model
    /// are in rotation, every one of them that is not down and not draining is eligible.
    ///
    /// A model that no healthy replica lists goes to any replica, as a request without a
    /// model does: the engine answers it, with vLLM's own 404 naming its valid models, or
    /// by serving it (vLLM resolves LoRA adapters by name at run time, and can skip the
    /// name check), which a router that answered for it would have refused.
    ///
    /// Errors when no replica is usable before any was tried (503).
    pub fn candidates(&self, model: Option<&str>, tried: &[usize]) -> Result<Candidates, RouterError> {
        let lists = |r: &Replica| model.is_none_or(|m| r.serves(m));
        let known = self.replicas.iter().any(|r| r.is_healthy() && lists(r));
        let serves = |r: &Replica| !known || lists(r);
        let (mut members, mut in_rotation) = (0, 0);
        for r in self.replicas.iter().filter(|r| serves(r) && !r.is_draining()) {
            members += 1;
            in_rotation += usize::from(r.in_rotation());
        }
        let panic = outliers::panicking(in_rotation, members, self.outliers.panic_threshold);
        let mut any_eligible = false;
        let list = self
            .replicas
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let usable = if panic { !r.is_down() && !r.is_draining() } else { r.in_rotation() };
                let eligible = usable && serves(r) && !tried.contains(&i);
                any_eligible |= eligible;
                Candidate {
                    eligible,
                    in_flight: r.in_flight(),
                    in_flight_tokens: r.in_flight_tokens(),
                    overloaded: r.engine.is_overloaded(),
                }
            })
            .collect();
        if any_eligible || !tried.is_empty() {
            return Ok(Candidates { list, panic });
        }
        // None healthy, or every one serving the model is draining or has its breaker open.
        Err(RouterError::NoHealthyReplica)
    }
}
