//! How long a client connection may stay open with nothing to do
//! (`--client-keep-alive-timeout`): a connection with no request in flight for that long
//! is closed, whether it is an HTTP/1.1 keep-alive connection between requests, an
//! HTTP/2 connection with no open stream (its pings do not count as use), or a
//! connection that never sent a request at all. Without it each such connection would
//! hold a file descriptor for as long as its peer liked, and enough of them would stop
//! the router accepting anyone.
//!
//! A request counts as in flight from the moment hyper hands it over until its response
//! body ends or is dropped, so a long answer (a stream, or a non-streamed completion the
//! engine takes minutes over) keeps its connection, however quiet the socket is.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// One connection's requests in flight, and when the last one ended.
pub struct Activity {
    started: Instant,
    in_flight: AtomicUsize,
    /// Milliseconds after `started` when the connection last became idle.
    idle_since_ms: AtomicU64,
}

impl Activity {
    pub fn new() -> Arc<Self> {
        Arc::new(Activity {
            started: Instant::now(),
            in_flight: AtomicUsize::new(0),
            idle_since_ms: AtomicU64::new(0),
        })
    }

    /// A request arrived; it is in flight until the guard is dropped.
    pub fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(self.clone())
    }

    /// Resolves once the connection has had no request in flight for `limit`.
    pub async fn idle_for(&self, limit: Duration) {
        loop {
            let wait = if self.in_flight.load(Ordering::Acquire) > 0 {
                limit
            } else {
                let since = self.started + Duration::from_millis(self.idle_since_ms.load(Ordering::Acquire));
                let idle = since.elapsed();
                if idle >= limit {
                    // A request may have begun since the count was read; check again.
                    if self.in_flight.load(Ordering::Acquire) == 0 {
                        return;
                    }
                    limit
                } else {
                    limit - idle
                }
            };
            tokio::time::sleep(wait).await;
        }
    }
}

/// A request in flight on its connection.
pub struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let activity = &self.0;
        let now = activity.started.elapsed().as_millis() as u64;
        activity.idle_since_ms.fetch_max(now, Ordering::AcqRel);
        activity.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn idle_means_no_request_in_flight_for_the_whole_limit() {
        let activity = Activity::new();
        let limit = Duration::from_secs(10);
        // A request in flight for longer than the limit keeps the connection.
        let request = activity.begin();
        let idle = tokio::time::timeout(Duration::from_secs(30), activity.idle_for(limit)).await;
        assert!(idle.is_err(), "busy for 30 s is not idle");
        drop(request);
        let ended = Instant::now();
        activity.idle_for(limit).await;
        assert_eq!(ended.elapsed(), limit, "idle from the end of the last request");
    }
}
