//! The replicas: each one's state (health, models, requests in flight, circuit breaker,
//! draining), the registry that holds the set in rotation, and the health checks.
//!
//! The registry ([`registry`]) is shared by the ingress (which takes a [`Fleet`]
//! snapshot and asks its policy), the proxy (which holds an [`InFlight`] guard per
//! request), the health checker (which flips health and refreshes model lists) and the
//! admin API (which adds, removes and drains replicas). All per-request reads are
//! atomics or an `ArcSwap` load: no locks on the request path.

mod breaker;
pub mod engine_load;
mod fleet;
mod health;
mod outliers;
mod registry;
mod stage;
mod url;

use breaker::Breaker;
pub use breaker::BreakerSettings;
pub use fleet::{Candidates, Fleet};
pub use health::{HealthChecker, HealthConfig};
pub use outliers::OutlierSettings;
pub use registry::{MembershipError, Registry, RegistryConfig, TOKENIZER_CACHE_TOKENS};
pub use stage::Stage;
pub use url::ReplicaUrl;

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use arc_swap::ArcSwapOption;
use prometheus::IntGauge;

use crate::metrics::Metrics;

/// One model as a replica lists it in `GET /v1/models`: its id and the card verbatim.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelCard {
    pub id: String,
    pub card: serde_json::Value,
}

pub struct Replica {
    pub url: ReplicaUrl,
    in_flight: AtomicUsize,
    /// The engine's own load, as last read from its `/metrics` ([`engine_load`]).
    pub engine: engine_load::EngineSignal,
    /// Prompt tokens of the requests in flight (when the policy counts them).
    in_flight_tokens: AtomicUsize,
    /// The health checks' verdict.
    healthy: AtomicBool,
    /// Out of rotation for a failed stream, until health checks pass again
    /// ([`outliers`]).
    ejected: AtomicBool,
    /// Never checked yet, or its last health check was refused or answered an error:
    /// not routed to even in panic.
    down: AtomicBool,
    /// Draining: no new requests; those in flight finish.
    draining: AtomicBool,
    streak: Mutex<Streak>,
    /// `None` until the replica has answered `GET /v1/models` once; until then it is
    /// assumed to serve any model (a replica without that endpoint still works).
    models: ArcSwapOption<Vec<ModelCard>>,
    in_flight_gauge: IntGauge,
    healthy_gauge: IntGauge,
    ejected_gauge: IntGauge,
    breaker: Breaker,
}

impl std::fmt::Debug for Replica {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replica")
            .field("url", &self.url.name())
            .field("healthy", &self.is_healthy())
            .field("ejected", &self.is_ejected())
            .field("draining", &self.is_draining())
            .field("in_flight", &self.in_flight())
            .finish()
    }
}

/// Consecutive probe outcomes, for the healthy/unhealthy thresholds.
#[derive(Debug, Default)]
struct Streak {
    probed: bool,
    successes: u32,
    failures: u32,
}

impl Replica {
    /// A replica not yet probed: out of rotation until its first health check passes.
    fn new(url: ReplicaUrl, breaker: BreakerSettings, metrics: &Metrics) -> Self {
        metrics.add_replica(url.name());
        let label = [url.name()];
        Replica {
            in_flight_gauge: metrics.in_flight.with_label_values(&label),
            healthy_gauge: metrics.replica_healthy.with_label_values(&label),
            ejected_gauge: metrics.replica_ejected.with_label_values(&label),
            breaker: Breaker::new(breaker, metrics.circuit_open.with_label_values(&label)),
            url,
            in_flight: AtomicUsize::new(0),
            engine: Default::default(),
            in_flight_tokens: AtomicUsize::new(0),
            healthy: AtomicBool::new(false),
            ejected: AtomicBool::new(false),
            down: AtomicBool::new(true),
            draining: AtomicBool::new(false),
            streak: Mutex::new(Streak::default()),
            models: ArcSwapOption::empty(),
        }
    }

    pub fn name(&self) -> &str {
        self.url.name()
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    pub fn is_ejected(&self) -> bool {
        self.ejected.load(Ordering::Relaxed)
    }

    pub fn is_down(&self) -> bool {
        self.down.load(Ordering::Relaxed)
    }

    /// Gets new requests in normal times: healthy, not ejected, its breaker letting
    /// requests through, not draining.
    pub fn in_rotation(&self) -> bool {
        self.is_healthy() && !self.is_ejected() && self.breaker_allows() && !self.is_draining()
    }

    /// Out of rotation on the data path's evidence (counted against the ejection
    /// ceiling).
    fn out_for_errors(&self) -> bool {
        self.is_ejected() || self.breaker_open()
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub fn in_flight_tokens(&self) -> usize {
        self.in_flight_tokens.load(Ordering::Relaxed)
    }

    /// Whether the circuit breaker lets requests through (closed or half-open).
    pub fn breaker_allows(&self) -> bool {
        self.breaker.allows()
    }

    pub fn breaker_open(&self) -> bool {
        self.breaker.is_open()
    }

    /// An attempt succeeded: the breaker's failures start again from zero (a failure
    /// goes through [`Registry::record_failure`], which applies the ejection ceiling).
    pub fn record_success(&self) {
        self.breaker.success();
    }

    pub fn models(&self) -> Option<Arc<Vec<ModelCard>>> {
        self.models.load_full()
    }

    pub fn set_models(&self, models: Vec<ModelCard>) {
        self.models.store(Some(Arc::new(models)));
    }

    pub fn serves(&self, model: &str) -> bool {
        match &*self.models.load() {
            Some(models) => models.iter().any(|m| m.id == model),
            None => true,
        }
    }

    /// Eject: out of rotation until the health checker has seen the healthy threshold
    /// of consecutive successes from now (only [`Registry::eject`] calls this, within
    /// the ceiling).
    fn eject(&self) {
        let mut streak = self.streak.lock().expect("streak lock poisoned");
        streak.successes = 0;
        self.ejected.store(true, Ordering::Relaxed);
        self.ejected_gauge.set(1);
    }

    fn restore(&self) {
        self.ejected.store(false, Ordering::Relaxed);
        self.ejected_gauge.set(0);
    }

    fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::Relaxed);
    }

    fn set_healthy(&self, healthy: bool) {
        self.healthy.store(healthy, Ordering::Relaxed);
        self.healthy_gauge.set(healthy as i64);
    }
}

/// Health thresholds: how many consecutive failures take a replica out of rotation and
/// how many consecutive successes bring it back.
#[derive(Debug, Clone, Copy)]
pub struct Thresholds {
    pub unhealthy: u32,
    pub healthy: u32,
}

/// One request in flight on one replica, from the routing decision until its response
/// body ends or is dropped.
pub struct InFlight {
    replica: Arc<Replica>,
    tokens: usize,
}

impl InFlight {
    pub fn start(replica: Arc<Replica>) -> Self {
        Self::with_tokens(replica, 0)
    }

    /// A request whose prompt is `tokens` long, counted in the replica's token load.
    pub fn with_tokens(replica: Arc<Replica>, tokens: usize) -> Self {
        replica.in_flight.fetch_add(1, Ordering::Relaxed);
        if tokens > 0 {
            replica.in_flight_tokens.fetch_add(tokens, Ordering::Relaxed);
        }
        replica.in_flight_gauge.inc();
        InFlight { replica, tokens }
    }

    pub fn replica(&self) -> &Arc<Replica> {
        &self.replica
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.replica.in_flight.fetch_sub(1, Ordering::Relaxed);
        if self.tokens > 0 {
            self.replica.in_flight_tokens.fetch_sub(self.tokens, Ordering::Relaxed);
        }
        self.replica.in_flight_gauge.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_flight_guard_counts() {
        let r = Arc::new(Replica::new(
            ReplicaUrl::parse("http://127.0.0.1:9000").unwrap(),
            BreakerSettings::default(),
            &Metrics::new(),
        ));
        let a = InFlight::start(r.clone());
        let b = InFlight::start(r.clone());
        assert_eq!(r.in_flight(), 2);
        drop(a);
        drop(b);
        assert_eq!(r.in_flight(), 0);
    }
}
