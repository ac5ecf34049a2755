//! Circuit breaking for one replica, fed by the data path: the outcome of every
//! attempt the dispatcher makes. Health checks are separate (they probe `/health`); the
//! breaker catches the replica whose `/health` answers while its requests fail.
//!
//! Two triggers open it: `failures` consecutive failed attempts (a replica that fails
//! everything), or, over a window of at least `min_requests` attempts, an error rate of
//! `error_rate` or more (a replica that fails often but not always, which consecutive
//! counting never catches). Open, the replica gets no requests for the cool-down; then
//! it is half-open: it gets traffic again and the next attempt decides, a success
//! closing the breaker, a failure opening it again.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use prometheus::IntGauge;

pub(super) struct Breaker {
    failures: AtomicU32,
    /// Milliseconds since `epoch` until which the breaker is open (0 = closed).
    open_until: AtomicU64,
    /// Attempts and failures in the current error-rate window.
    window: Mutex<Window>,
    epoch: Instant,
    settings: BreakerSettings,
    open_gauge: IntGauge,
}

#[derive(Debug, Default)]
struct Window {
    /// Milliseconds since `epoch` when this window began.
    started: u64,
    attempts: u32,
    failures: u32,
}

/// What a failure did to the breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Verdict {
    /// Nothing visible: still closed, or still open.
    Stays,
    Opened,
    /// It would have opened, but the ejection ceiling is reached.
    Refused,
}

/// `--breaker-failures`, `--breaker-cooldown`, `--breaker-error-rate`,
/// `--breaker-window`, `--breaker-min-requests`.
#[derive(Debug, Clone, Copy)]
pub struct BreakerSettings {
    pub failures: u32,
    pub cooldown: Duration,
    /// Open at this failed fraction of a window's attempts; None disables the trigger.
    pub error_rate: Option<f64>,
    pub window: Duration,
    /// Fewer attempts than this in a window never open the breaker by rate.
    pub min_requests: u32,
}

impl Default for BreakerSettings {
    fn default() -> Self {
        BreakerSettings {
            failures: 5,
            cooldown: Duration::from_secs(10),
            error_rate: Some(0.5),
            window: Duration::from_secs(10),
            min_requests: 20,
        }
    }
}

impl Breaker {
    pub(super) fn new(settings: BreakerSettings, open_gauge: IntGauge) -> Self {
        open_gauge.set(0);
        Breaker {
            failures: AtomicU32::new(0),
            open_until: AtomicU64::new(0),
            window: Mutex::new(Window::default()),
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

    pub(super) fn is_open(&self) -> bool {
        !self.allows()
    }

    pub(super) fn success(&self) {
        self.failures.store(0, Ordering::Relaxed);
        self.count(false);
        if self.open_until.swap(0, Ordering::Relaxed) != 0 {
            self.open_gauge.set(0);
        }
    }

    /// Count a failure. When it calls for opening the breaker, `may_open` says whether
    /// the ejection ceiling leaves room; without it the breaker stays closed (or
    /// half-open) and the next failure asks again.
    pub(super) fn failure(&self, may_open: impl FnOnce() -> bool) -> Verdict {
        let failures = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        let rate_exceeded = self.count(true);
        let half_open = self.open_until.load(Ordering::Relaxed) != 0;
        if failures >= self.settings.failures || rate_exceeded || half_open {
            if !may_open() {
                return Verdict::Refused;
            }
            let now = self.now_ms();
            let until = now + self.settings.cooldown.as_millis() as u64;
            let was = self.open_until.swap(until, Ordering::Relaxed);
            self.open_gauge.set(1);
            return if was == 0 || was <= now { Verdict::Opened } else { Verdict::Stays };
        }
        Verdict::Stays
    }

    /// Count an attempt in the error-rate window; true when the window's error rate
    /// now calls for opening.
    fn count(&self, failed: bool) -> bool {
        let Some(rate) = self.settings.error_rate else { return false };
        let now = self.now_ms();
        let mut w = self.window.lock().expect("breaker window lock");
        if now.saturating_sub(w.started) >= self.settings.window.as_millis() as u64 {
            *w = Window { started: now, ..Window::default() };
        }
        w.attempts += 1;
        w.failures += failed as u32;
        let exceeded = failed
            && w.attempts >= self.settings.min_requests
            && w.failures as f64 >= rate * w.attempts as f64;
        if exceeded {
            // Opening starts a fresh window: the cool-down decides what happens next.
            *w = Window { started: now, ..Window::default() };
        }
        exceeded
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker(settings: BreakerSettings) -> Breaker {
        Breaker::new(settings, IntGauge::new("open", "open").unwrap())
    }

    #[test]
    fn an_error_rate_opens_it_where_consecutive_counting_would_not() {
        let b = breaker(BreakerSettings { failures: 5, min_requests: 10, ..BreakerSettings::default() });
        // Fail every other attempt: never two failures in a row.
        let mut opened = false;
        for i in 0..11 {
            opened |= if i % 2 == 0 {
                b.failure(|| true) == Verdict::Opened
            } else {
                b.success();
                false
            };
        }
        assert!(opened, "6 failures of 11 attempts is over a 50% error rate");
        assert!(b.is_open());
    }

    #[test]
    fn few_attempts_or_a_low_rate_keep_it_closed() {
        let b = breaker(BreakerSettings { failures: 100, min_requests: 10, ..BreakerSettings::default() });
        for _ in 0..4 {
            assert_eq!(b.failure(|| true), Verdict::Stays, "under min_requests");
        }
        for _ in 0..20 {
            b.success();
        }
        assert!(b.failure(|| true) == Verdict::Stays && !b.is_open(), "5 of 25 is 20%");
        let off = breaker(BreakerSettings {
            failures: 100,
            error_rate: None,
            min_requests: 1,
            ..BreakerSettings::default()
        });
        assert!((0..50).all(|_| off.failure(|| true) == Verdict::Stays));
    }

    #[test]
    fn without_room_it_stays_closed_and_asks_again() {
        let b = breaker(BreakerSettings { failures: 2, error_rate: None, ..BreakerSettings::default() });
        assert_eq!(b.failure(|| false), Verdict::Stays);
        assert_eq!(b.failure(|| false), Verdict::Refused);
        assert!(!b.is_open());
        assert_eq!(b.failure(|| true), Verdict::Opened, "room again: the next failure opens it");
        assert!(b.is_open());
    }

    #[test]
    fn the_window_forgets_old_attempts() {
        let settings = BreakerSettings {
            failures: 100,
            min_requests: 4,
            window: Duration::from_millis(30),
            ..BreakerSettings::default()
        };
        let b = breaker(settings);
        for _ in 0..3 {
            b.failure(|| true);
        }
        std::thread::sleep(Duration::from_millis(40));
        b.success();
        b.success();
        b.success();
        assert_eq!(b.failure(|| true), Verdict::Stays, "1 of 4 in the new window");
    }
}
