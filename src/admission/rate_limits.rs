//! Per-key rate limits: requests per minute and tokens per minute, each a token bucket
//! that holds one minute's allowance and refills continuously.
//!
//! A request takes one request token and its prompt estimate in tokens at admission,
//! both under one lock, so concurrent requests cannot together take more than the
//! buckets hold (no over-admission). When the response ends, [`RateLimits::settle`]
//! charges the difference between what the engine reported (prompt + completion) and
//! the estimate; a key that used more than it was charged goes into debt, bounded by
//! one minute's allowance, and waits until the bucket refills. A refusal says how long
//! until the request would fit: the `Retry-After` the client gets.
//!
//! The state is kept by key name, so a reloaded keys file keeps each key's spending.
//! Time is passed in, which keeps the arithmetic testable.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A key's limits, from its entry in the keys file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    pub requests_per_minute: Option<u32>,
    pub tokens_per_minute: Option<u64>,
}

impl Limits {
    /// This instance's share of the limits when `instances` share them: each at least
    /// one per minute, so the instances together allow no more than the limit (but
    /// for a limit smaller than the instance count).
    pub fn share(self, instances: u32) -> Limits {
        let instances = instances.max(1);
        Limits {
            requests_per_minute: self.requests_per_minute.map(|n| (n / instances).max(1)),
            tokens_per_minute: self.tokens_per_minute.map(|n| (n / u64::from(instances)).max(1)),
        }
    }
}

/// Which limit refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exceeded {
    Requests,
    Tokens,
}

impl Exceeded {
    pub fn label(self) -> &'static str {
        match self {
            Exceeded::Requests => "requests",
            Exceeded::Tokens => "tokens",
        }
    }
}

/// A refusal: the limit, its per-minute size and when to try again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    pub limit: Exceeded,
    pub per_minute: u64,
    pub retry_after: Duration,
}

/// One minute's allowance, refilled continuously. `level` may go below zero (debt from
/// settling), never below minus one allowance.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    level: f64,
    per_minute: f64,
    at: Instant,
}

impl Bucket {
    fn new(per_minute: u64, now: Instant) -> Self {
        Bucket { level: per_minute as f64, per_minute: per_minute as f64, at: now }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.level = (self.level + elapsed * self.per_minute / 60.0).min(self.per_minute);
        self.at = now;
    }

    /// How long until `need` fits (zero if it does now).
    fn wait_for(&self, need: f64) -> Duration {
        if self.level >= need {
            return Duration::ZERO;
        }
        Duration::from_secs_f64((need - self.level) * 60.0 / self.per_minute)
    }

    /// Resize to a new allowance (the keys file changed), keeping what was spent.
    fn resize(&mut self, per_minute: u64) {
        let per_minute = per_minute as f64;
        if per_minute != self.per_minute {
            let spent = self.per_minute - self.level;
            self.per_minute = per_minute;
            self.level = (per_minute - spent).clamp(-per_minute, per_minute);
        }
    }
}

#[derive(Debug, Default)]
struct KeyState {
    requests: Option<Bucket>,
    tokens: Option<Bucket>,
}

/// The buckets of every key with limits.
#[derive(Debug, Clone, Default)]
pub struct RateLimits {
    keys: Arc<Mutex<HashMap<Arc<str>, KeyState>>>,
}

impl RateLimits {
    /// Take one request and `estimate` tokens from `key`'s buckets, or refuse and say
    /// when to come back. A request whose estimate exceeds the whole allowance needs a
    /// full bucket, not more (else it could never pass).
    pub fn admit(&self, key: &Arc<str>, limits: Limits, estimate: u64, now: Instant) -> Result<(), Refused> {
        if limits == Limits::default() {
            return Ok(());
        }
        let mut keys = self.keys.lock().expect("rate limit state");
        let state = keys.entry(key.clone()).or_default();
        let requests = sync(&mut state.requests, limits.requests_per_minute.map(u64::from), now);
        let tokens = sync(&mut state.tokens, limits.tokens_per_minute, now);
        let estimate = estimate as f64;
        if let Some(bucket) = requests
            && bucket.level < 1.0
        {
            return Err(refused(Exceeded::Requests, bucket, 1.0));
        }
        if let Some(bucket) = tokens {
            let need = estimate.min(bucket.per_minute);
            if bucket.level < need || bucket.level <= 0.0 {
                return Err(refused(Exceeded::Tokens, bucket, need.max(1.0)));
            }
        }
        if let Some(bucket) = &mut state.requests {
            bucket.level -= 1.0;
        }
        if let Some(bucket) = &mut state.tokens {
            bucket.level -= estimate;
        }
        Ok(())
    }

    /// Charge `key` the tokens it used beyond its estimate (or give back the part of
    /// the estimate it did not use).
    pub fn settle(&self, key: &Arc<str>, estimate: u64, used: u64, now: Instant) {
        let mut keys = self.keys.lock().expect("rate limit state");
        if let Some(bucket) = keys.get_mut(key).and_then(|state| state.tokens.as_mut()) {
            bucket.refill(now);
            bucket.level =
                (bucket.level - (used as f64 - estimate as f64)).clamp(-bucket.per_minute, bucket.per_minute);
        }
    }

    /// Forget the keys no longer configured.
    pub fn retain(&self, names: &[Arc<str>]) {
        self.keys.lock().expect("rate limit state").retain(|name, _| names.contains(name));
    }
}

/// The bucket for `per_minute` (made, resized or dropped as the limit says), refilled.
fn sync(bucket: &mut Option<Bucket>, per_minute: Option<u64>, now: Instant) -> Option<Bucket> {
    match (bucket.as_mut(), per_minute) {
        (_, None) => *bucket = None,
        (None, Some(n)) => *bucket = Some(Bucket::new(n, now)),
        (Some(b), Some(n)) => {
            b.resize(n);
            b.refill(now);
        }
    }
    *bucket
}

fn refused(limit: Exceeded, bucket: Bucket, need: f64) -> Refused {
    Refused { limit, per_minute: bucket.per_minute as u64, retry_after: retry_after(bucket.wait_for(need)) }
}

/// The `Retry-After` for a wait: whole seconds, rounded up (a client that waits that
/// long fits), at least one.
pub fn retry_after(wait: Duration) -> Duration {
    Duration::from_secs(wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(Duration::from_secs(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> Arc<str> {
        Arc::from("team-a")
    }

    #[test]
    fn requests_per_minute_allow_a_minute_and_refill() {
        let limits = RateLimits::default();
        let rpm = Limits { requests_per_minute: Some(5), tokens_per_minute: None };
        let t0 = Instant::now();
        for _ in 0..5 {
            limits.admit(&key(), rpm, 100, t0).unwrap();
        }
        let refused = limits.admit(&key(), rpm, 100, t0).unwrap_err();
        assert_eq!(refused.limit, Exceeded::Requests);
        assert_eq!(refused.retry_after, Duration::from_secs(12), "one request per 12 s");
        assert!(limits.admit(&key(), rpm, 100, t0 + Duration::from_secs(11)).is_err());
        assert!(limits.admit(&key(), rpm, 100, t0 + Duration::from_secs(12)).is_ok());
        // Another key has its own buckets.
        assert!(limits.admit(&Arc::from("team-b"), rpm, 100, t0).is_ok());
        // No limits, no state.
        assert!(limits.admit(&Arc::from("free"), Limits::default(), u64::MAX, t0).is_ok());
    }

    #[test]
    fn tokens_are_estimated_then_settled_with_bounded_debt() {
        let limits = RateLimits::default();
        let tpm = Limits { requests_per_minute: None, tokens_per_minute: Some(6_000) };
        let t0 = Instant::now();
        limits.admit(&key(), tpm, 4_000, t0).unwrap();
        let refused = limits.admit(&key(), tpm, 4_000, t0).unwrap_err();
        assert_eq!((refused.limit, refused.retry_after), (Exceeded::Tokens, Duration::from_secs(20)));
        // The engine says the first used 1,000: 3,000 come back.
        limits.settle(&key(), 4_000, 1_000, t0);
        limits.admit(&key(), tpm, 4_000, t0).unwrap();
        // It used 50,000 instead: debt, bounded by one minute's allowance.
        limits.settle(&key(), 4_000, 50_000, t0);
        let refused = limits.admit(&key(), tpm, 10, t0).unwrap_err();
        assert_eq!(refused.retry_after, Duration::from_secs(61));
        // An estimate beyond the allowance waits for a full bucket, not forever.
        let t1 = t0 + Duration::from_secs(120);
        limits.admit(&key(), tpm, 1_000_000, t1).unwrap();
        assert!(limits.admit(&key(), tpm, 1, t1).is_err());
    }

    #[test]
    fn concurrent_admissions_never_exceed_the_allowance() {
        let limits = RateLimits::default();
        let both = Limits { requests_per_minute: Some(50), tokens_per_minute: Some(1_000) };
        let t0 = Instant::now();
        let admitted = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|scope| {
            for _ in 0..8 {
                scope.spawn(|| {
                    for _ in 0..100 {
                        if limits.admit(&key(), both, 30, t0).is_ok() {
                            admitted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        assert_eq!(admitted.into_inner(), 33, "1,000 tokens / 30 per request");
    }

    #[test]
    fn a_changed_limit_keeps_what_was_spent() {
        let limits = RateLimits::default();
        let t0 = Instant::now();
        let five = Limits { requests_per_minute: Some(5), tokens_per_minute: None };
        for _ in 0..5 {
            limits.admit(&key(), five, 0, t0).unwrap();
        }
        let ten = Limits { requests_per_minute: Some(10), ..five };
        for _ in 0..5 {
            limits.admit(&key(), ten, 0, t0).unwrap();
        }
        assert!(limits.admit(&key(), ten, 0, t0).is_err());
        limits.retain(&[]);
        assert!(limits.admit(&key(), ten, 0, t0).is_ok(), "a forgotten key starts afresh");
    }
}
