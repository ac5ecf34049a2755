//! Where a key's limits are kept: in this process ([`RateLimits`]), or, with
//! `--state-store`, in the store every router instance shares ([`SharedLimits`]).
//!
//! Without a store each instance holds each key to its whole limit, so N instances
//! behind one Service let a key use N times it (documented, and the default). With one,
//! every admission is decided by the store, and its settlement is sent there too.
//! When the store does not answer (unreachable, slower than `--state-store-timeout`, or
//! answering nonsense) the instance fails open to a share of the limit
//! (`--router-instances`: the limit divided by the instances), kept in this process:
//! together the instances still allow about the limit while the store is away. Every
//! such admission is counted (`router_state_store_fallbacks_total`), the store's
//! reachability is a gauge (`router_state_store_up`), and the shipped alert rules page
//! on both.
//!
//! A request remembers which ledger admitted it ([`Ledger`]) and is settled there.

use std::sync::Arc;
use std::time::Instant;

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts};

use super::rate_limits::{Limits, RateLimits, Refused};
use super::shared_limits::SharedLimits;

/// Which ledger admitted a request, and so is told what it used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ledger {
    /// This instance's buckets (no store, or a key without limits).
    Local,
    /// The store's buckets, for a key with this many tokens per minute (0: none).
    Shared { tokens_per_minute: u64 },
    /// This instance's share, while the store did not answer.
    Fallback,
}

/// What the store costs and how it fails, as counted.
#[derive(Clone)]
pub struct StoreCounters {
    /// `router_state_store_errors_total{op, kind}`.
    pub errors: IntCounterVec,
    /// `router_state_store_fallbacks_total`.
    pub fallbacks: IntCounter,
    /// `router_state_store_seconds`: an admission's round trip to the store.
    pub seconds: Histogram,
}

impl StoreCounters {
    /// The store's metrics, registered in `metrics` (with `router_state_store_up`, which
    /// `up` sets).
    fn register(metrics: &crate::metrics::Metrics) -> (StoreCounters, IntGauge) {
        let errors = IntCounterVec::new(
            Opts::new(
                "router_state_store_errors_total",
                "Calls to the state store that got no usable answer, by op and kind",
            ),
            &["op", "kind"],
        )
        .expect("valid metric");
        for op in ["admit", "settle"] {
            for kind in crate::state_store::StoreError::LABELS {
                errors.with_label_values(&[op, kind]);
            }
        }
        let fallbacks = IntCounter::new(
            "router_state_store_fallbacks_total",
            "Keyed admissions decided by this instance's share because the state store did not answer",
        )
        .expect("valid metric");
        let buckets = vec![0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25];
        let seconds = Histogram::with_opts(
            HistogramOpts::new("router_state_store_seconds", "An admission's round trip to the state store")
                .buckets(buckets),
        )
        .expect("valid metric");
        let up = IntGauge::new("router_state_store_up", "1 while the state store is connected")
            .expect("valid metric");
        metrics.register(Box::new(errors.clone()));
        metrics.register(Box::new(fallbacks.clone()));
        metrics.register(Box::new(seconds.clone()));
        metrics.register(Box::new(up.clone()));
        (StoreCounters { errors, fallbacks, seconds }, up)
    }
}

struct Shared {
    store: SharedLimits,
    fallback: RateLimits,
    instances: u32,
    counters: StoreCounters,
}

/// The per-key limits, wherever they are kept.
#[derive(Clone, Default)]
pub struct KeyLimits {
    local: RateLimits,
    shared: Option<Arc<Shared>>,
}

impl From<RateLimits> for KeyLimits {
    fn from(local: RateLimits) -> Self {
        KeyLimits { local, shared: None }
    }
}

impl KeyLimits {
    /// Limits kept in the store `config` names (connected in the background), failing
    /// open to a `1 / instances` share; its metrics go to `metrics`.
    pub fn open_shared(config: &crate::config::StateStoreConfig, metrics: &crate::metrics::Metrics) -> Self {
        let (counters, up) = StoreCounters::register(metrics);
        let on_up = move |is_up: bool| up.set(i64::from(is_up));
        let store = SharedLimits::open(config.target.clone(), &config.prefix, config.timeout, on_up);
        let shared =
            Shared { store, fallback: RateLimits::default(), instances: config.instances.max(1), counters };
        KeyLimits { local: RateLimits::default(), shared: Some(Arc::new(shared)) }
    }

    /// Take one request and `estimate` tokens from `key`, or refuse and say when to
    /// come back.
    pub async fn admit(
        &self,
        key: &Arc<str>,
        limits: Limits,
        estimate: u64,
        now: Instant,
    ) -> Result<Ledger, Refused> {
        let Some(shared) = self.shared.as_ref().filter(|_| limits != Limits::default()) else {
            return self.local.admit(key, limits, estimate, now).map(|()| Ledger::Local);
        };
        if shared.store.is_up() {
            let asked = Instant::now();
            let answer = shared.store.admit(key, limits, estimate).await;
            if answer.is_ok() {
                shared.counters.seconds.observe(asked.elapsed().as_secs_f64());
            }
            match answer {
                Ok(Ok(())) => {
                    return Ok(Ledger::Shared { tokens_per_minute: limits.tokens_per_minute.unwrap_or(0) });
                }
                Ok(Err(refused)) => return Err(refused),
                Err(error) => {
                    tracing::debug!(%error, key = &**key, "the state store did not decide; this instance's share does");
                    shared.counters.errors.with_label_values(&["admit", error.label()]).inc();
                }
            }
        }
        shared.counters.fallbacks.inc();
        let share = limits.share(shared.instances);
        shared.fallback.admit(key, share, estimate, Instant::now()).map(|()| Ledger::Fallback)
    }

    /// Tell the ledger that admitted `key`'s request that it used `used` tokens of the
    /// `estimate` it was charged.
    pub fn settle(&self, key: &Arc<str>, ledger: Ledger, estimate: u64, used: u64, now: Instant) {
        match (ledger, &self.shared) {
            (Ledger::Local, _) | (_, None) => self.local.settle(key, estimate, used, now),
            (Ledger::Fallback, Some(shared)) => shared.fallback.settle(key, estimate, used, now),
            (Ledger::Shared { tokens_per_minute: 0 }, Some(_)) => {}
            (Ledger::Shared { tokens_per_minute }, Some(shared)) => {
                let extra =
                    (used as i128 - estimate as i128).clamp(i64::MIN as i128, i64::MAX as i128) as i64;
                if extra != 0
                    && let Err(error) = shared.store.settle(key, tokens_per_minute, extra)
                {
                    tracing::debug!(%error, key = &**key, "a settlement did not reach the state store");
                    shared.counters.errors.with_label_values(&["settle", error.label()]).inc();
                }
            }
        }
    }

    /// Forget the keys no longer configured (in this process; the store forgets a key
    /// five minutes after its last use).
    pub fn retain(&self, names: &[Arc<str>]) {
        self.local.retain(names);
        if let Some(shared) = &self.shared {
            shared.fallback.retain(names);
        }
    }
}
