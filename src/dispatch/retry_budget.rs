//! The retry budget: how many second attempts the router may make, so that retries
//! cannot multiply load on a fleet that is already failing.
//!
//! Each request deposits `ratio` of a retry (0.2: at most one retry per five requests
//! in the long run), and a steady `floor` of retries per second is allowed on top, so a
//! quiet router can still retry. A retry spends one; with nothing left the first
//! attempt's outcome goes to the client. The balance is capped at ten seconds' worth of
//! floor plus the deposits of the last 1000 requests, so a long calm spell does not
//! bank an unbounded burst. Before a retry the router waits a short jittered backoff.

use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy)]
pub struct RetrySettings {
    /// Retries earned per request.
    pub ratio: f64,
    /// Retries per second allowed regardless of traffic.
    pub floor_per_sec: f64,
    /// Mean wait before a retry (jittered between 0.5x and 1.5x).
    pub backoff: Duration,
}

impl Default for RetrySettings {
    fn default() -> Self {
        RetrySettings { ratio: 0.2, floor_per_sec: 10.0, backoff: Duration::from_millis(20) }
    }
}

pub struct RetryBudget {
    settings: RetrySettings,
    state: Mutex<(f64, Instant)>,
}

impl RetryBudget {
    pub fn new(settings: RetrySettings) -> Self {
        RetryBudget { settings, state: Mutex::new((settings.floor_per_sec, Instant::now())) }
    }

    fn cap(&self) -> f64 {
        self.settings.floor_per_sec * 10.0 + self.settings.ratio * 1000.0
    }

    fn refill(&self, balance: &mut (f64, Instant)) {
        let now = Instant::now();
        balance.0 =
            (balance.0 + (now - balance.1).as_secs_f64() * self.settings.floor_per_sec).min(self.cap());
        balance.1 = now;
    }

    /// A request arrived.
    pub fn deposit(&self) {
        let mut state = self.state.lock().expect("retry budget lock");
        self.refill(&mut state);
        state.0 = (state.0 + self.settings.ratio).min(self.cap());
    }

    /// Take one retry if the budget allows.
    pub fn try_spend(&self) -> bool {
        let mut state = self.state.lock().expect("retry budget lock");
        self.refill(&mut state);
        if state.0 >= 1.0 {
            state.0 -= 1.0;
            true
        } else {
            false
        }
    }

    /// The jittered wait before a retry.
    pub fn backoff(&self) -> Duration {
        self.settings.backoff.mul_f64(0.5 + fastrand::f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratio_limits_retries_and_floor_refills() {
        let budget =
            RetryBudget::new(RetrySettings { ratio: 0.25, floor_per_sec: 0.0, backoff: Duration::ZERO });
        assert!(!budget.try_spend(), "nothing earned yet");
        for _ in 0..8 {
            budget.deposit();
        }
        assert!(budget.try_spend() && budget.try_spend(), "8 requests x 0.25 = 2 retries");
        assert!(!budget.try_spend());
        let floor =
            RetryBudget::new(RetrySettings { ratio: 0.0, floor_per_sec: 100.0, backoff: Duration::ZERO });
        let spent = (0..2000).filter(|_| floor.try_spend()).count();
        assert!((100..=1001).contains(&spent), "the starting balance and the cap bound a burst: {spent}");
        std::thread::sleep(Duration::from_millis(30));
        assert!(floor.try_spend(), "the floor refills over time");
    }
}
