//! One stage of the fleet (all replicas, or in P/D mode the prefill or the decode
//! replicas): its registry and health checker, and the two changes every source of
//! membership makes the same way, joining and leaving.
//!
//! The admin API and the discovery sources (file, DNS, Kubernetes) all go through
//! [`Stage::join`] and [`Stage::leave`], so a replica found by any of them enters
//! rotation only once a health check passes, and one that leaves stops getting new
//! requests at once while those in flight finish.

use std::sync::Arc;

use super::{HealthChecker, MembershipError, Registry, Replica, ReplicaUrl};

#[derive(Clone)]
pub struct Stage {
    /// `replica` (one stage), or `prefill` / `decode` in P/D mode.
    pub role: &'static str,
    pub registry: Arc<Registry>,
    pub checker: HealthChecker,
}

impl Stage {
    /// Add a replica and probe it at once: healthy, it is in rotation when this returns.
    pub async fn join(&self, url: ReplicaUrl, by: &str) -> Result<Arc<Replica>, MembershipError> {
        let replica = self.registry.add(url)?;
        self.checker.probe(&replica).await;
        tracing::info!(
            replica = replica.name(),
            role = self.role,
            healthy = replica.is_healthy(),
            by,
            "replica added"
        );
        Ok(replica)
    }

    /// Remove a replica: no new requests from now; those in flight finish.
    pub fn leave(&self, name: &str, by: &str) -> Result<Arc<Replica>, MembershipError> {
        let replica = self.registry.remove(name)?;
        tracing::info!(
            replica = replica.name(),
            role = self.role,
            in_flight = replica.in_flight(),
            by,
            "replica removed"
        );
        Ok(replica)
    }
}
