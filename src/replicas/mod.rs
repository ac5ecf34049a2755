//! The replica registry: every replica the router knows, its health, the models it
//! serves and the requests the router has in flight on it.
//!
//! The registry is shared by the ingress (which snapshots it into policy
//! [`Candidate`]s), the proxy (which holds an [`InFlight`] guard per request) and the
//! health checker (which flips health and refreshes model lists). All per-request reads
//! are atomics or an `ArcSwap` load: no locks on the request path.

mod breaker;
mod health;
mod url;

use breaker::Breaker;
pub use breaker::BreakerSettings;
pub use health::{HealthChecker, HealthConfig};
pub use url::ReplicaUrl;

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use arc_swap::ArcSwapOption;
use prometheus::IntGauge;

use crate::error::RouterError;
use crate::metrics::Metrics;
use crate::policy::Candidate;

/// One model as a replica lists it in `GET /v1/models`: its id and the card verbatim.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelCard {
    pub id: String,
    pub card: serde_json::Value,
}

pub struct Replica {
    pub index: usize,
    pub url: ReplicaUrl,
    in_flight: AtomicUsize,
    healthy: AtomicBool,
    streak: Mutex<Streak>,
    /// `None` until the replica has answered `GET /v1/models` once; until then it is
    /// assumed to serve any model (a replica without that endpoint still works).
    models: ArcSwapOption<Vec<ModelCard>>,
    in_flight_gauge: IntGauge,
    healthy_gauge: IntGauge,
    breaker: Breaker,
}

/// Consecutive probe outcomes, for the healthy/unhealthy thresholds.
#[derive(Debug, Default)]
struct Streak {
    probed: bool,
    successes: u32,
    failures: u32,
}

impl Replica {
    pub fn name(&self) -> &str {
        self.url.name()
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Whether the circuit breaker lets requests through (closed or half-open).
    pub fn breaker_allows(&self) -> bool {
        self.breaker.allows()
    }

    /// Feed the breaker one attempt's outcome; true when a failure opened it.
    pub fn record_attempt(&self, ok: bool) -> bool {
        if ok {
            self.breaker.success();
            false
        } else {
            self.breaker.failure()
        }
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

    /// Take the replica out of rotation now (it died under a request); the health
    /// checker brings it back after the healthy threshold of consecutive successes.
    /// Returns whether it was in rotation.
    pub fn take_out_of_rotation(&self) -> bool {
        let mut streak = self.streak.lock().expect("streak lock poisoned");
        streak.probed = true;
        streak.successes = 0;
        streak.failures = streak.failures.max(1);
        let was = self.is_healthy();
        self.set_healthy(false);
        was
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

pub struct Registry {
    replicas: Vec<Arc<Replica>>,
    thresholds: Thresholds,
}

impl Registry {
    pub fn new(urls: Vec<ReplicaUrl>, thresholds: Thresholds, metrics: &Metrics) -> Self {
        Self::with_breaker(urls, thresholds, BreakerSettings::default(), metrics)
    }

    pub fn with_breaker(
        urls: Vec<ReplicaUrl>,
        thresholds: Thresholds,
        breaker: BreakerSettings,
        metrics: &Metrics,
    ) -> Self {
        let replicas = urls
            .into_iter()
            .enumerate()
            .map(|(index, url)| {
                metrics.add_replica(url.name());
                let in_flight_gauge = metrics.in_flight.with_label_values(&[url.name()]);
                let healthy_gauge = metrics.replica_healthy.with_label_values(&[url.name()]);
                let open_gauge = metrics.circuit_open.with_label_values(&[url.name()]);
                open_gauge.set(0);
                Arc::new(Replica {
                    index,
                    url,
                    in_flight: AtomicUsize::new(0),
                    healthy: AtomicBool::new(false),
                    streak: Mutex::new(Streak::default()),
                    models: ArcSwapOption::empty(),
                    in_flight_gauge,
                    healthy_gauge,
                    breaker: Breaker::new(breaker, open_gauge),
                })
            })
            .collect();
        Registry { replicas, thresholds }
    }

    pub fn replicas(&self) -> &[Arc<Replica>] {
        &self.replicas
    }

    pub fn get(&self, index: usize) -> &Arc<Replica> {
        &self.replicas[index]
    }

    pub fn names(&self) -> Vec<String> {
        self.replicas.iter().map(|r| r.name().to_owned()).collect()
    }

    pub fn healthy_count(&self) -> usize {
        self.replicas.iter().filter(|r| r.is_healthy()).count()
    }

    /// The policy's view of the replicas for one request: eligible means healthy, serving
    /// `model` (when the request names one) and not in `tried`.
    ///
    /// Errors when no replica is eligible before any was tried: no healthy replica at all
    /// (503), or none serving the model (404, as vLLM answers an unknown model).
    pub fn candidates(&self, model: Option<&str>, tried: &[usize]) -> Result<Vec<Candidate>, RouterError> {
        let mut any_healthy = false;
        let mut any_serving = false;
        let mut any_eligible = false;
        let candidates = self
            .replicas
            .iter()
            .map(|r| {
                let healthy = r.is_healthy();
                let serving = healthy && model.is_none_or(|m| r.serves(m));
                let eligible = serving && r.breaker_allows() && !tried.contains(&r.index);
                any_healthy |= healthy;
                any_serving |= serving;
                any_eligible |= eligible;
                Candidate { eligible, in_flight: r.in_flight() }
            })
            .collect();
        if any_eligible || !tried.is_empty() {
            return Ok(candidates);
        }
        match model {
            // Healthy replicas exist but none lists the model: vLLM's unknown-model 404.
            Some(m) if any_healthy && !any_serving => Err(RouterError::ModelNotFound(m.to_owned())),
            // None healthy, or every one serving it has its breaker open.
            _ => Err(RouterError::NoHealthyReplica),
        }
    }

    /// Record a probe (or a passive signal from the proxy). Returns the new health if it
    /// changed. The very first probe of a replica decides its health at once, so a
    /// router starting against a healthy fleet serves immediately.
    pub fn record(&self, replica: &Replica, ok: bool) -> Option<bool> {
        let mut streak = replica.streak.lock().expect("streak lock poisoned");
        let first = !streak.probed;
        streak.probed = true;
        if ok {
            streak.successes = streak.successes.saturating_add(1);
            streak.failures = 0;
        } else {
            streak.failures = streak.failures.saturating_add(1);
            streak.successes = 0;
        }
        let was = replica.is_healthy();
        let now = if first {
            ok
        } else if was {
            streak.failures < self.thresholds.unhealthy
        } else {
            streak.successes >= self.thresholds.healthy
        };
        if first || now != was {
            replica.set_healthy(now);
        }
        (now != was).then_some(now)
    }

    /// The context length a healthy replica reports for `model` in its model card.
    pub fn max_model_len(&self, model: &str) -> Option<u64> {
        self.replicas
            .iter()
            .filter(|r| r.is_healthy())
            .find_map(|r| r.models()?.iter().find(|c| c.id == model)?.card.get("max_model_len")?.as_u64())
    }

    /// The union of the models healthy replicas serve, first card of each id wins.
    pub fn model_cards(&self) -> Vec<ModelCard> {
        let mut out: Vec<ModelCard> = Vec::new();
        for replica in self.replicas.iter().filter(|r| r.is_healthy()) {
            if let Some(models) = replica.models() {
                for card in models.iter() {
                    if !out.iter().any(|c| c.id == card.id) {
                        out.push(card.clone());
                    }
                }
            }
        }
        out
    }
}

/// One request in flight on one replica, from the routing decision until its response
/// body ends or is dropped.
pub struct InFlight {
    replica: Arc<Replica>,
}

impl InFlight {
    pub fn start(replica: Arc<Replica>) -> Self {
        replica.in_flight.fetch_add(1, Ordering::Relaxed);
        replica.in_flight_gauge.inc();
        InFlight { replica }
    }

    pub fn replica(&self) -> &Arc<Replica> {
        &self.replica
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.replica.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.replica.in_flight_gauge.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry(n: usize) -> Registry {
        let urls =
            (0..n).map(|i| ReplicaUrl::parse(&format!("http://127.0.0.1:{}", 9000 + i)).unwrap()).collect();
        Registry::new(urls, Thresholds { unhealthy: 2, healthy: 3 }, &Metrics::new())
    }

    fn card(id: &str) -> ModelCard {
        ModelCard { id: id.into(), card: serde_json::json!({"id": id, "object": "model"}) }
    }

    #[test]
    fn thresholds_gate_transitions() {
        let reg = registry(1);
        let r = reg.get(0).clone();
        assert!(!r.is_healthy());
        assert_eq!(reg.record(&r, true), Some(true)); // first probe decides
        assert_eq!(reg.record(&r, false), None); // 1 failure < 2
        assert_eq!(reg.record(&r, false), Some(false));
        assert_eq!(reg.record(&r, true), None);
        assert_eq!(reg.record(&r, true), None);
        assert_eq!(reg.record(&r, true), Some(true)); // 3 successes
    }

    #[test]
    fn candidates_errors_and_model_filter() {
        let reg = registry(3);
        assert!(matches!(reg.candidates(Some("m"), &[]), Err(RouterError::NoHealthyReplica)));
        for r in reg.replicas() {
            reg.record(r, true);
        }
        reg.get(0).set_models(vec![card("a")]);
        reg.get(1).set_models(vec![card("b")]);
        // Replica 2 has not listed models yet: it may serve anything.
        let c = reg.candidates(Some("a"), &[]).unwrap();
        assert_eq!(c.iter().map(|c| c.eligible).collect::<Vec<_>>(), [true, false, true]);
        reg.get(2).set_models(vec![card("b")]);
        assert!(matches!(reg.candidates(Some("zzz"), &[]), Err(RouterError::ModelNotFound(_))));
        let c = reg.candidates(Some("b"), &[1]).unwrap();
        assert_eq!(c.iter().map(|c| c.eligible).collect::<Vec<_>>(), [false, false, true]);
        let ids: Vec<_> = reg.model_cards().into_iter().map(|c| c.id).collect();
        assert_eq!(ids, ["a", "b"]);
    }

    #[test]
    fn breaker_opens_after_failures_and_closes_on_success() {
        let metrics = Metrics::new();
        let urls = vec![ReplicaUrl::parse("http://127.0.0.1:9000").unwrap()];
        let settings = BreakerSettings { failures: 3, cooldown: std::time::Duration::from_millis(40) };
        let reg = Registry::with_breaker(urls, Thresholds { unhealthy: 2, healthy: 1 }, settings, &metrics);
        let r = reg.get(0).clone();
        reg.record(&r, true);
        assert!(!r.record_attempt(false) && !r.record_attempt(false));
        assert!(r.breaker_allows());
        assert!(r.record_attempt(false), "the third failure opens it");
        assert!(!r.breaker_allows());
        assert!(matches!(reg.candidates(None, &[]), Err(RouterError::NoHealthyReplica)));
        assert!(
            matches!(reg.candidates(Some("m"), &[]), Err(RouterError::NoHealthyReplica)),
            "an open breaker is unavailability, not an unknown model"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(r.breaker_allows(), "half-open after the cool-down");
        assert!(r.record_attempt(false), "a half-open failure opens it again");
        assert!(!r.breaker_allows());
        std::thread::sleep(std::time::Duration::from_millis(50));
        r.record_attempt(true);
        assert!(r.breaker_allows());
        assert!(!r.record_attempt(false), "closed again: failures count from zero");
    }

    #[test]
    fn in_flight_guard_counts() {
        let reg = registry(1);
        let r = reg.get(0).clone();
        let a = InFlight::start(r.clone());
        let b = InFlight::start(r.clone());
        assert_eq!(r.in_flight(), 2);
        drop(a);
        drop(b);
        assert_eq!(r.in_flight(), 0);
    }
}
