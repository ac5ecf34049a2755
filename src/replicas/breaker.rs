//! Circuit breaking for one replica, fed by the data path: the outcome of every
//! attempt the dispatcher makes. Health checks are separate (they probe `/health`); the
//! breaker catches the replica whose `/health` answers while its requests fail.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use prometheus::IntGauge;

/// The circuit breaker of one replica, fed by the data path (health checks are
/// separate): `failures` consecutive failed attempts open it for the cool-down; after
/// that it is half-open, the replica gets traffic again, and the next attempt decides:
/// a success closes it, a failure opens it again.
pub(super) struct Breaker {
    failures: AtomicU32,
    /// Milliseconds since `epoch` until which the breaker is open (0 = closed).
    open_until: AtomicU64,
    epoch: Instant,
    settings: BreakerSettings,
    open_gauge: IntGauge,
}

/// `--breaker-failures` and `--breaker-cooldown`.
#[derive(Debug, Clone, Copy)]
pub struct BreakerSettings {
    pub failures: u32,
    pub cooldown: Duration,
}

impl Breaker {
    pub(super) fn new(settings: BreakerSettings, open_gauge: IntGauge) -> Self {
        Breaker {
            failures: AtomicU32::new(0),
            open_until: AtomicU64::new(0),
            epoch: Instant::now(),
            settings,
            open_gauge,
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64 + 1
    }

    pub(super) fn allows(&self) -> bool {
        let until = self.open_until.load(Ordering::Relaxed);
        until == 0 || self.now_ms() >= until
    }

    pub(super) fn success(&self) {
        self.failures.store(0, Ordering::Relaxed);
        if self.open_until.swap(0, Ordering::Relaxed) != 0 {
            self.open_gauge.set(0);
        }
    }

    /// Returns true when this failure opened the breaker.
    pub(super) fn failure(&self) -> bool {
        let failures = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        let half_open = self.open_until.load(Ordering::Relaxed) != 0;
        if failures >= self.settings.failures || half_open {
            let until = self.now_ms() + self.settings.cooldown.as_millis() as u64;
            let was = self.open_until.swap(until, Ordering::Relaxed);
            self.open_gauge.set(1);
            return was == 0 || was <= self.now_ms();
        }
        false
    }
}

impl Default for BreakerSettings {
    fn default() -> Self {
        BreakerSettings { failures: 5, cooldown: Duration::from_secs(10) }
    }
}
