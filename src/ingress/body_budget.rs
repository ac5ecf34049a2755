//! A cap on the request bytes the router holds at once, all requests together
//! (`--max-buffered-request-bytes`).
//!
//! Each request's body is bounded (`--max-body-bytes`), but many clients sending large
//! bodies at once would together hold as much memory as they like. So every body's bytes
//! are counted against one budget as they arrive (never by the length a client declares:
//! a client that announces 32 MB and sends ten bytes holds ten), and given back when the
//! request's response ends: the router keeps a body for as long as it may retry or
//! continue the request. A body that would take the budget past its cap is refused with
//! 503 and `Retry-After`, before its bytes are kept.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use prometheus::IntGauge;

pub struct BodyBudget {
    held: AtomicUsize,
    limit: usize,
    /// `router_request_bytes_held`.
    gauge: Option<IntGauge>,
}

/// Bytes one request holds of the budget, given back when dropped.
pub struct Held {
    budget: Arc<BodyBudget>,
    bytes: usize,
}

impl BodyBudget {
    pub fn new(limit: usize, gauge: Option<IntGauge>) -> Arc<Self> {
        Arc::new(BodyBudget { held: AtomicUsize::new(0), limit, gauge })
    }

    /// An empty hold for one request.
    pub fn hold(self: &Arc<Self>) -> Held {
        Held { budget: self.clone(), bytes: 0 }
    }

    /// Bytes held now, all requests together.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Acquire)
    }
}

impl Held {
    /// Take `bytes` more for this request; false (nothing taken) past the cap.
    pub fn take(&mut self, bytes: usize) -> bool {
        let budget = &self.budget;
        let taken = budget.held.fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
            held.checked_add(bytes).filter(|&after| after <= budget.limit)
        });
        if taken.is_err() {
            return false;
        }
        self.bytes += bytes;
        if let Some(gauge) = &budget.gauge {
            gauge.add(bytes as i64);
        }
        true
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if self.bytes > 0 {
            self.budget.held.fetch_sub(self.bytes, Ordering::AcqRel);
            if let Some(gauge) = &self.budget.gauge {
                gauge.sub(self.bytes as i64);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_are_held_until_their_request_ends_and_never_past_the_cap() {
        let budget = BodyBudget::new(100, None);
        let (mut a, mut b) = (budget.hold(), budget.hold());
        assert!(a.take(60));
        assert!(!b.take(41), "past the cap");
        assert!(b.take(40));
        assert_eq!(budget.held(), 100);
        drop(a);
        assert_eq!(budget.held(), 40);
        assert!(b.take(60));
        drop(b);
        assert_eq!(budget.held(), 0);
        assert!(!budget.hold().take(usize::MAX), "no overflow");
    }
}
