//! The registry: the replicas in rotation and the routing policy laid out for them,
//! published together as one immutable [`Fleet`] snapshot.
//!
//! A request loads the snapshot once (an `ArcSwap` load, no lock) and keeps it for all
//! its attempts, so the indices the policy returns always name the replicas it was
//! shown. The admin API changes the set (add, remove, drain) by building a new snapshot,
//! with a policy laid out for the new set (for `consistent-hash`, a ring in which only
//! the added or removed replica's sessions move), and swapping it in; requests already
//! routed keep the replica they hold. Changes are serialised by a lock that only the
//! admin API takes.

use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

use super::breaker::Verdict;
use super::{BreakerSettings, Fleet, ModelCard, OutlierSettings, Replica, ReplicaUrl, Thresholds, outliers};
use crate::metrics::Metrics;
use crate::policy::cache_index::{CacheIndex, IndexLimits, KvFeeds};
use crate::policy::prompt_tokens::PromptTokenizer;
use crate::policy::{HashOptions, KvOptions, PolicyKind, PolicyOptions, PolicyState, PrefixOptions};

/// How a registry's replicas are judged and routed to.
#[derive(Debug, Clone)]
pub struct RegistryConfig {
    pub thresholds: Thresholds,
    pub breaker: BreakerSettings,
    pub outliers: OutlierSettings,
    pub policy: PolicyKind,
    pub hash: HashOptions,
    pub prefix: PrefixOptions,
    pub kv: KvOptions,
    /// Bounds of the cache-aware policies' memory.
    pub index: IndexLimits,
    /// The tokenizer of `kv-aware` (the built-in one if none is given).
    pub tokenizer: Option<Arc<PromptTokenizer>>,
}

/// Token ids the tokenizer's segment cache holds (64 MB).
pub const TOKENIZER_CACHE_TOKENS: usize = 16 << 20;

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            thresholds: Thresholds { unhealthy: 3, healthy: 2 },
            breaker: BreakerSettings::default(),
            outliers: OutlierSettings::default(),
            policy: PolicyKind::PowerOfTwo,
            hash: HashOptions::default(),
            prefix: PrefixOptions::default(),
            kv: KvOptions::default(),
            index: IndexLimits::default(),
            tokenizer: None,
        }
    }
}

/// Why a change to the replica set was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MembershipError {
    #[error("replica {0} is already in the set")]
    Exists(String),
    #[error("no replica {0} in the set")]
    NotFound(String),
}

pub struct Registry {
    fleet: ArcSwap<Fleet>,
    config: RegistryConfig,
    /// What the cache-aware policies keep across changes to the set.
    state: PolicyState,
    /// The KV event subscriptions, following the set (`kv-aware`).
    feeds: std::sync::OnceLock<Arc<KvFeeds>>,
    metrics: Arc<Metrics>,
    /// Serialises changes to the set (admin API only; never taken by a request).
    changes: Mutex<()>,
    /// Serialises ejections and breaker openings, so two at once cannot both pass the
    /// ceiling (taken only when a request failed).
    ejections: Mutex<()>,
}

impl Registry {
    pub fn new(urls: Vec<ReplicaUrl>, config: RegistryConfig, metrics: Arc<Metrics>) -> Self {
        let replicas: Vec<_> =
            urls.into_iter().map(|url| Arc::new(Replica::new(url, config.breaker, &metrics))).collect();
        for replica in &replicas {
            routed_series(&config, &metrics, replica.name());
        }
        let state = PolicyState {
            index: config.policy.uses_index().then(|| Arc::new(CacheIndex::new(config.index))),
            tokenizer: config.policy.uses_tokens().then(|| {
                config.tokenizer.clone().unwrap_or_else(|| {
                    Arc::new(PromptTokenizer::Builtin(crate::policy::prompt_tokens::BuiltinTokenizer::new(
                        TOKENIZER_CACHE_TOKENS,
                    )))
                })
            }),
            sessions: Arc::default(),
            census: Arc::new(crate::policy::SessionCensus::with_slack(
                config.hash.session_window,
                100_000,
                config.hash.session_slack,
            )),
        };
        let fleet = ArcSwap::from_pointee(Self::lay_out(replicas, &config, &state));
        Registry {
            fleet,
            config,
            state,
            feeds: Default::default(),
            metrics,
            changes: Mutex::new(()),
            ejections: Mutex::new(()),
        }
    }

    fn lay_out(replicas: Vec<Arc<Replica>>, config: &RegistryConfig, state: &PolicyState) -> Fleet {
        let names: Vec<String> = replicas.iter().map(|r| r.name().to_owned()).collect();
        let options = PolicyOptions { hash: config.hash, prefix: config.prefix, kv: config.kv };
        Fleet { policy: config.policy.build(&names, &options, state), replicas, outliers: config.outliers }
    }

    /// Publish a new set, with its policy, and move the KV event subscriptions to it.
    fn publish(&self, replicas: Vec<Arc<Replica>>) {
        let fleet = Self::lay_out(replicas, &self.config, &self.state);
        if let Some(feeds) = self.feeds.get() {
            feeds.follow(&fleet.replicas.iter().map(|r| r.name().to_owned()).collect::<Vec<_>>());
        }
        self.fleet.store(Arc::new(fleet));
    }

    /// The cache-aware policies' memory, when the policy keeps one.
    pub fn cache_index(&self) -> Option<&Arc<CacheIndex>> {
        self.state.index.as_ref()
    }

    /// Subscribe to the replicas' KV events (now and as the set changes). Within the
    /// runtime; once.
    pub fn follow_kv_events(&self, feeds: Arc<KvFeeds>) {
        let names: Vec<String> = self.replicas().iter().map(|r| r.name().to_owned()).collect();
        feeds.follow(&names);
        let _ = self.feeds.set(feeds);
    }

    pub fn kv_feeds(&self) -> Option<&Arc<KvFeeds>> {
        self.feeds.get()
    }

    /// The current snapshot.
    pub fn fleet(&self) -> Arc<Fleet> {
        self.fleet.load_full()
    }

    pub fn replicas(&self) -> Vec<Arc<Replica>> {
        self.fleet.load().replicas.clone()
    }

    /// The replica at `index` in the current snapshot.
    pub fn get(&self, index: usize) -> Arc<Replica> {
        self.fleet.load().replicas[index].clone()
    }

    pub fn find(&self, name: &str) -> Option<Arc<Replica>> {
        self.fleet.load().replicas.iter().find(|r| r.name() == name).cloned()
    }

    pub fn policy(&self) -> PolicyKind {
        self.config.policy
    }

    /// Add a replica. It joins out of rotation and enters it when a health check passes
    /// (the caller probes it at once).
    pub fn add(&self, url: ReplicaUrl) -> Result<Arc<Replica>, MembershipError> {
        let _change = self.changes.lock().expect("registry change lock");
        let current = self.fleet.load_full();
        if current.replicas.iter().any(|r| r.name() == url.name()) {
            return Err(MembershipError::Exists(url.name().to_owned()));
        }
        let replica = Arc::new(Replica::new(url, self.config.breaker, &self.metrics));
        routed_series(&self.config, &self.metrics, replica.name());
        let mut replicas = current.replicas.clone();
        replicas.push(replica.clone());
        self.publish(replicas);
        Ok(replica)
    }

    /// Remove a replica from the set: it gets no new requests; those in flight finish
    /// (they hold the replica) and its per-replica gauges go away.
    pub fn remove(&self, name: &str) -> Result<Arc<Replica>, MembershipError> {
        let _change = self.changes.lock().expect("registry change lock");
        let current = self.fleet.load_full();
        let removed = current
            .replicas
            .iter()
            .find(|r| r.name() == name)
            .cloned()
            .ok_or_else(|| MembershipError::NotFound(name.to_owned()))?;
        let replicas = current.replicas.iter().filter(|r| r.name() != name).cloned().collect();
        self.publish(replicas);
        self.metrics.remove_replica(name);
        Ok(removed)
    }

    /// Start or stop draining a replica: while draining it keeps its place (and its
    /// sessions' place on the ring) but gets no new requests.
    pub fn set_draining(&self, name: &str, draining: bool) -> Result<Arc<Replica>, MembershipError> {
        let replica = self.find(name).ok_or_else(|| MembershipError::NotFound(name.to_owned()))?;
        replica.draining.store(draining, std::sync::atomic::Ordering::Relaxed);
        Ok(replica)
    }

    pub fn healthy_count(&self) -> usize {
        self.fleet.load().replicas.iter().filter(|r| r.is_healthy()).count()
    }

    /// Eject a replica whose stream failed, if the ceiling allows; whether it was.
    /// It returns when the health checks have passed the healthy threshold of times
    /// since.
    pub fn eject(&self, replica: &Arc<Replica>, kind: &str) -> bool {
        let _one_at_a_time = self.ejections.lock().expect("ejection lock");
        if replica.is_ejected() {
            return false;
        }
        let fleet = self.fleet.load();
        if !fleet.replicas.iter().any(|r| Arc::ptr_eq(r, replica)) {
            return false; // it left the set
        }
        let ejected = outliers::room_for_one_more(&fleet.replicas, self.config.outliers.max_ejection_percent);
        let result = if ejected { "ejected" } else { "refused" };
        self.metrics.ejections.with_label_values(&[replica.name(), result]).inc();
        if ejected {
            replica.eject();
            tracing::warn!(replica = replica.name(), kind, "replica failed mid-stream: ejected");
        } else {
            tracing::warn!(
                replica = replica.name(),
                kind,
                "replica failed mid-stream: not ejected (ejection ceiling)"
            );
        }
        ejected
    }

    /// Feed the breaker a failed attempt; whether it opened. Opening counts against the
    /// ejection ceiling like an ejection.
    pub fn record_failure(&self, replica: &Arc<Replica>) -> bool {
        let _one_at_a_time = self.ejections.lock().expect("ejection lock");
        let fleet = self.fleet.load();
        let room = || outliers::room_for_one_more(&fleet.replicas, self.config.outliers.max_ejection_percent);
        match replica.breaker.failure(room) {
            Verdict::Opened => {
                self.metrics.ejections.with_label_values(&[replica.name(), "breaker_opened"]).inc();
                true
            }
            Verdict::Refused => {
                self.metrics.ejections.with_label_values(&[replica.name(), "refused"]).inc();
                false
            }
            Verdict::Stays => false,
        }
    }

    /// Record a health check's outcome: `ok`, and whether the replica is known to be
    /// down (it refused the connection or answered an error; a check that timed out is
    /// not proof). Returns the new health if it changed.
    pub fn record_probe(&self, replica: &Replica, ok: bool, down: bool) -> Option<bool> {
        replica.set_down(down);
        self.record(replica, ok)
    }

    /// Record a probe (or a passive signal from the proxy). Returns the new health if it
    /// changed. The very first probe of a replica decides its health at once, so a
    /// router starting against a healthy fleet serves immediately. An ejected replica
    /// returns once the healthy threshold of consecutive successes is reached.
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
            streak.failures < self.config.thresholds.unhealthy
        } else {
            streak.successes >= self.config.thresholds.healthy
        };
        if first || now != was {
            replica.set_healthy(now);
        }
        if ok && replica.is_ejected() && streak.successes >= self.config.thresholds.healthy {
            replica.restore();
            tracing::info!(replica = replica.name(), "ejected replica back in rotation");
        }
        (now != was).then_some(now)
    }

    /// The context length a healthy replica reports for `model` in its model card.
    pub fn max_model_len(&self, model: &str) -> Option<u64> {
        self.fleet
            .load()
            .replicas
            .iter()
            .filter(|r| r.is_healthy())
            .find_map(|r| r.models()?.iter().find(|c| c.id == model)?.card.get("max_model_len")?.as_u64())
    }

    /// The union of the models healthy replicas serve, first card of each id wins.
    pub fn model_cards(&self) -> Vec<ModelCard> {
        let mut out: Vec<ModelCard> = Vec::new();
        for replica in self.fleet.load().replicas.iter().filter(|r| r.is_healthy()) {
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

/// The replica's routing series at 0, under the policy's name as it counts them.
fn routed_series(config: &RegistryConfig, metrics: &Metrics, replica: &str) {
    use clap::ValueEnum;
    let policy = config.policy.to_possible_value().expect("every policy has a name");
    metrics.add_routed_replica(policy.get_name(), replica, config.policy.uses_tokens());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::RouterError;
    use crate::ingress::routing_key::RoutingKey;

    fn url(i: usize) -> ReplicaUrl {
        ReplicaUrl::parse(&format!("http://127.0.0.1:{}", 9000 + i)).unwrap()
    }

    fn registry(n: usize, policy: PolicyKind) -> Registry {
        let config = RegistryConfig {
            thresholds: Thresholds { unhealthy: 2, healthy: 3 },
            policy,
            ..Default::default()
        };
        Registry::new((0..n).map(url).collect(), config, Arc::new(Metrics::new()))
    }

    fn card(id: &str) -> ModelCard {
        ModelCard { id: id.into(), card: serde_json::json!({"id": id, "object": "model"}) }
    }

    #[test]
    fn thresholds_gate_transitions() {
        let reg = registry(1, PolicyKind::RoundRobin);
        let r = reg.get(0);
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
        let reg = registry(3, PolicyKind::RoundRobin);
        assert!(matches!(reg.fleet().candidates(Some("m"), &[]), Err(RouterError::NoHealthyReplica)));
        for r in reg.replicas() {
            reg.record(&r, true);
        }
        reg.get(0).set_models(vec![card("a")]);
        reg.get(1).set_models(vec![card("b")]);
        // Replica 2 has not listed models yet: it may serve anything.
        let c = reg.fleet().candidates(Some("a"), &[]).unwrap();
        assert_eq!(c.iter().map(|c| c.eligible).collect::<Vec<_>>(), [true, false, true]);
        reg.get(2).set_models(vec![card("b")]);
        // A model nobody lists goes anywhere: the engine answers it.
        let c = reg.fleet().candidates(Some("zzz"), &[]).unwrap();
        assert_eq!(c.iter().map(|c| c.eligible).collect::<Vec<_>>(), [true, true, true]);
        let c = reg.fleet().candidates(Some("b"), &[1]).unwrap();
        assert_eq!(c.iter().map(|c| c.eligible).collect::<Vec<_>>(), [false, false, true]);
        let ids: Vec<_> = reg.model_cards().into_iter().map(|c| c.id).collect();
        assert_eq!(ids, ["a", "b"]);
    }

    #[test]
    fn breaker_opens_after_failures_and_closes_on_success() {
        let settings = BreakerSettings {
            failures: 3,
            cooldown: std::time::Duration::from_millis(40),
            error_rate: None,
            ..BreakerSettings::default()
        };
        // One replica: only a ceiling of 100% lets its breaker open.
        let outliers = OutlierSettings { max_ejection_percent: 100, panic_threshold: 0 };
        let config = RegistryConfig { breaker: settings, outliers, ..Default::default() };
        let reg = Registry::new(vec![url(0)], config, Arc::new(Metrics::new()));
        let r = reg.get(0);
        reg.record(&r, true);
        assert!(!reg.record_failure(&r) && !reg.record_failure(&r));
        assert!(r.breaker_allows());
        assert!(reg.record_failure(&r), "the third failure opens it");
        assert!(!r.breaker_allows());
        assert!(matches!(reg.fleet().candidates(None, &[]), Err(RouterError::NoHealthyReplica)));
        assert!(
            matches!(reg.fleet().candidates(Some("m"), &[]), Err(RouterError::NoHealthyReplica)),
            "an open breaker is unavailability, not an unknown model"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(r.breaker_allows(), "half-open after the cool-down");
        assert!(reg.record_failure(&r), "a half-open failure opens it again");
        assert!(!r.breaker_allows());
        std::thread::sleep(std::time::Duration::from_millis(50));
        r.record_success();
        assert!(r.breaker_allows());
        assert!(!reg.record_failure(&r), "closed again: failures count from zero");
    }

    #[test]
    fn ejections_stop_at_the_ceiling_and_panic_routes_to_all_not_down() {
        let reg = registry(4, PolicyKind::RoundRobin);
        for r in reg.replicas() {
            reg.record_probe(&r, true, false);
        }
        let eligible = |reg: &Registry| {
            let c = reg.fleet().candidates(None, &[]).unwrap();
            (c.iter().map(|c| c.eligible).collect::<Vec<_>>(), c.panic)
        };
        // 50% of 4: two may go, the third is refused.
        assert!(reg.eject(&reg.get(0), "mid_body"));
        assert!(!reg.eject(&reg.get(0), "mid_body"), "already out");
        assert!(reg.eject(&reg.get(1), "mid_body"));
        assert!(!reg.eject(&reg.get(2), "mid_body"), "the ceiling");
        assert_eq!(eligible(&reg), (vec![false, false, true, true], false));
        // An open breaker counts against the same ceiling.
        let r3 = reg.get(3);
        for _ in 0..10 {
            assert!(!reg.record_failure(&r3));
        }
        assert!(r3.breaker_allows());
        // Health checks take a third one out: 1 of 4 in rotation is below 50%, so the
        // router routes to every replica not down, the ejected ones included.
        reg.record_probe(&reg.get(2), false, false);
        reg.record_probe(&reg.get(2), false, false);
        assert_eq!(eligible(&reg), (vec![true, true, true, true], true));
        // A replica that refuses connections is not routed to, even in panic.
        reg.record_probe(&reg.get(2), false, true);
        assert_eq!(eligible(&reg), (vec![true, true, false, true], true));
        // Ejected replicas return after the healthy threshold (3 here) of passed checks.
        for _ in 0..3 {
            reg.record_probe(&reg.get(0), true, false);
        }
        assert!(!reg.get(0).is_ejected());
        assert_eq!(eligible(&reg), (vec![true, false, false, true], false));
    }

    #[test]
    fn adding_and_removing_moves_only_that_replicas_sessions() {
        let reg = registry(3, PolicyKind::ConsistentHash);
        for r in reg.replicas() {
            reg.record(&r, true);
        }
        let owner = |reg: &Registry, i: usize| {
            let fleet = reg.fleet();
            let key = RoutingKey::from(format!("session-{i}"));
            let d = fleet.policy.choose(Some(&key), &fleet.candidates(None, &[]).unwrap()).unwrap();
            fleet.get(d.replica).name().to_owned()
        };
        let before: Vec<String> = (0..300).map(|i| owner(&reg, i)).collect();
        let added = reg.add(url(3)).unwrap();
        assert_eq!(reg.add(url(3)).unwrap_err(), MembershipError::Exists(url(3).name().to_owned()));
        assert!(!added.is_healthy(), "a new replica waits for its first probe");
        assert_eq!(before, (0..300).map(|i| owner(&reg, i)).collect::<Vec<_>>(), "not in rotation yet");
        reg.record(&added, true);
        let after: Vec<String> = (0..300).map(|i| owner(&reg, i)).collect();
        let moved: Vec<_> = before.iter().zip(&after).filter(|(b, a)| b != a).collect();
        assert!(
            !moved.is_empty() && moved.iter().all(|(_, a)| *a == added.name()),
            "only moves to the new one"
        );
        reg.remove(added.name()).unwrap();
        assert_eq!(before, (0..300).map(|i| owner(&reg, i)).collect::<Vec<_>>(), "and back when it leaves");
        assert_eq!(reg.remove(added.name()).unwrap_err(), MembershipError::NotFound(added.name().to_owned()));
    }

    #[test]
    fn a_draining_replica_gets_nothing_new() {
        let reg = registry(2, PolicyKind::RoundRobin);
        for r in reg.replicas() {
            reg.record(&r, true);
        }
        let name = reg.get(0).name().to_owned();
        reg.set_draining(&name, true).unwrap();
        let c = reg.fleet().candidates(None, &[]).unwrap();
        assert_eq!(c.iter().map(|c| c.eligible).collect::<Vec<_>>(), [false, true]);
        reg.set_draining(reg.get(1).name(), true).unwrap();
        assert!(matches!(reg.fleet().candidates(None, &[]), Err(RouterError::NoHealthyReplica)));
        reg.set_draining(&name, false).unwrap();
        assert!(reg.fleet().candidates(None, &[]).is_ok());
        assert!(reg.set_draining("http://nope:1", true).is_err());
    }
}
