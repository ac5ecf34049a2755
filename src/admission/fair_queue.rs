//! The concurrency limit (`--max-concurrent-requests`) and its queue, fair across keys.
//!
//! When every slot is taken, a request waits in its key's queue. A freed slot goes to
//! the highest priority band with anyone waiting (`high`, `normal`, `low`), and within
//! a band to the keys in turn, one request each (round robin): a key that floods the
//! router queues behind itself, and another key's request waits for the next free slot,
//! not for the flood to drain. A lower band is never starved: once [`STARVATION_BOUND`]
//! slots in a row went to higher bands while it waited, the next goes to it (the band
//! passed over longest first), so a steady `high` key leaves every waiting band a share.
//! With `--queue-order fifo` every request is in one queue, served in arrival order, as
//! before.
//!
//! The queue is bounded (`--max-queued-requests`). When it is full, the longest queue
//! pays: an arrival from a key with fewer requests waiting pushes out the newest
//! request of the key with the most (that one gets the 429), and an arrival from the
//! biggest key is refused itself. A wait ends after `--queue-timeout` (503), and a
//! client that leaves while waiting takes its place out of the queue at once.
//!
//! A [`Slot`] is given back when it is dropped, straight to the next waiter.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus::{HistogramVec, IntGauge};
use tokio::sync::oneshot;

use crate::error::RouterError;

/// A key's priority band, from its entry in the keys file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    High,
    #[default]
    Normal,
    Low,
}

impl Priority {
    pub const ALL: [Priority; 3] = [Priority::High, Priority::Normal, Priority::Low];

    pub fn label(self) -> &'static str {
        match self {
            Priority::High => "high",
            Priority::Normal => "normal",
            Priority::Low => "low",
        }
    }

    /// The most urgent `priority` a request of this band may ask the engines for (vLLM's
    /// priority scheduling serves lower values first; 0 is its default): high keys any,
    /// the others none before the default. `None`: no bound.
    pub fn engine_floor(self) -> Option<i64> {
        match self {
            Priority::High => None,
            Priority::Normal | Priority::Low => Some(0),
        }
    }
}

/// How waiting requests are served (`--queue-order`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum QueueOrder {
    /// By priority, then round robin across keys.
    #[default]
    Fair,
    /// One queue in arrival order, whatever the key.
    Fifo,
}

/// Who a request is for: its key's name and priority.
#[derive(Debug, Clone)]
pub struct Flow {
    pub key: Arc<str>,
    pub priority: Priority,
}

/// The concurrency limit and its queue.
pub struct Limiter {
    inner: Arc<Inner>,
    queue_timeout: Duration,
}

struct Inner {
    state: Mutex<State>,
    max_queued: usize,
    order: QueueOrder,
    metrics: Option<QueueMetrics>,
}

/// The queue's metrics.
#[derive(Clone)]
pub struct QueueMetrics {
    /// `router_queue_wait_seconds{key, priority}`.
    pub wait: HistogramVec,
    /// `router_queued_requests`.
    pub queued: IntGauge,
}

/// Slots that may go to higher bands in a row while a lower band waits.
pub const STARVATION_BOUND: usize = 4;

#[derive(Default)]
struct State {
    free: usize,
    queued: usize,
    next_id: u64,
    /// One per priority, each a ring of keys with requests waiting.
    bands: [VecDeque<Queue>; 3],
    /// Per band: slots given to higher bands since it was last served while it waited.
    passed_over: [usize; 3],
}

struct Queue {
    key: Arc<str>,
    waiters: VecDeque<Waiter>,
}

struct Waiter {
    id: u64,
    grant: oneshot::Sender<Result<Slot, RouterError>>,
}

/// One request's slot, given back when dropped.
pub struct Slot {
    inner: Option<Arc<Inner>>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(inner) = self.inner.take() {
            inner.release();
        }
    }
}

impl Limiter {
    pub fn new(
        max_concurrent: usize,
        max_queued: usize,
        queue_timeout: Duration,
        order: QueueOrder,
        metrics: Option<QueueMetrics>,
    ) -> Self {
        let state = State { free: max_concurrent, ..State::default() };
        Limiter {
            inner: Arc::new(Inner { state: Mutex::new(state), max_queued, order, metrics }),
            queue_timeout,
        }
    }

    /// A slot for one request of `flow`, waiting in its queue if need be.
    pub async fn admit(&self, flow: &Flow) -> Result<Slot, RouterError> {
        let started = Instant::now();
        let (id, band, key, granted) = {
            let mut state = self.inner.state.lock().expect("queue state");
            if state.free > 0 {
                state.free -= 1;
                drop(state);
                self.inner.observe(flow, started);
                return Ok(Slot { inner: Some(self.inner.clone()) });
            }
            let (band, key) = match self.inner.order {
                QueueOrder::Fair => (flow.priority as usize, flow.key.clone()),
                QueueOrder::Fifo => (Priority::Normal as usize, Arc::from("")),
            };
            if state.queued >= self.inner.max_queued && !state.push_out_for(band, &key) {
                return Err(RouterError::QueueFull);
            }
            let (grant, granted) = oneshot::channel();
            state.next_id += 1;
            let id = state.next_id;
            state.queued += 1;
            let queues = &mut state.bands[band];
            match queues.iter_mut().find(|q| q.key == key) {
                Some(queue) => queue.waiters.push_back(Waiter { id, grant }),
                None => queues
                    .push_back(Queue { key: key.clone(), waiters: VecDeque::from([Waiter { id, grant }]) }),
            }
            self.inner.count(&state);
            (id, band, key, granted)
        };
        let leave = Leave { inner: &self.inner, band, key, id };
        let waited = tokio::time::timeout(self.queue_timeout, granted).await;
        drop(leave);
        match waited {
            Ok(Ok(Ok(slot))) => {
                self.inner.observe(flow, started);
                Ok(slot)
            }
            Ok(Ok(Err(refused))) => Err(refused),
            Ok(Err(_)) | Err(_) => Err(RouterError::QueueTimeout { after: self.queue_timeout }),
        }
    }
}

impl Inner {
    /// A slot came free: hand it to the next waiter still there, or keep it.
    fn release(self: Arc<Self>) {
        let mut state = self.state.lock().expect("queue state");
        let mut slot = Slot { inner: Some(self.clone()) };
        while let Some(waiter) = state.next_waiter() {
            self.count(&state);
            match waiter.grant.send(Ok(slot)) {
                Ok(()) => return,
                // Gone between its timeout and its leaving: the next one.
                Err(back) => slot = back.expect("sent a slot"),
            }
        }
        slot.inner = None;
        state.free += 1;
    }

    fn count(&self, state: &State) {
        if let Some(metrics) = &self.metrics {
            metrics.queued.set(state.queued as i64);
        }
    }

    fn observe(&self, flow: &Flow, started: Instant) {
        if let Some(QueueMetrics { wait, .. }) = &self.metrics {
            wait.with_label_values(&[&*flow.key, flow.priority.label()])
                .observe(started.elapsed().as_secs_f64());
        }
    }
}

impl State {
    /// The next waiter: highest band first, keys in turn within it; but a band passed
    /// over [`STARVATION_BOUND`] times is served first (the one passed over most).
    fn next_waiter(&mut self) -> Option<Waiter> {
        let top = self.bands.iter().position(|queues| !queues.is_empty())?;
        let starved = (top + 1..self.bands.len())
            .filter(|&b| !self.bands[b].is_empty() && self.passed_over[b] >= STARVATION_BOUND)
            .max_by_key(|&b| (self.passed_over[b], std::cmp::Reverse(b)));
        let band = starved.unwrap_or(top);
        for b in 0..self.bands.len() {
            if b == band || self.bands[b].is_empty() {
                self.passed_over[b] = 0;
            } else if b > band {
                self.passed_over[b] += 1;
            }
        }
        let queues = &mut self.bands[band];
        let mut queue = queues.pop_front().expect("not empty");
        let waiter = queue.waiters.pop_front().expect("queues in a band are not empty");
        if !queue.waiters.is_empty() {
            queues.push_back(queue);
        }
        self.queued -= 1;
        Some(waiter)
    }

    /// The queue is full: make room for `key` by refusing the newest request of the key
    /// with the most waiting, if that key has more waiting than `key` would. Lower bands
    /// lose ties.
    fn push_out_for(&mut self, band: usize, key: &Arc<str>) -> bool {
        let mine = self.bands[band].iter().find(|q| q.key == *key).map_or(0, |q| q.waiters.len());
        let longest = (0..self.bands.len())
            .rev()
            .flat_map(|b| self.bands[b].iter().enumerate().map(move |(i, q)| (b, i, q.waiters.len())))
            .fold(None, |best: Option<(usize, usize, usize)>, c| match best {
                Some(b) if b.2 >= c.2 => Some(b),
                _ => Some(c),
            });
        let Some((b, i, len)) = longest else { return false };
        if len <= mine + 1 {
            return false;
        }
        let queue = &mut self.bands[b][i];
        let waiter = queue.waiters.pop_back().expect("longest is not empty");
        if queue.waiters.is_empty() {
            self.bands[b].remove(i);
        }
        self.queued -= 1;
        let _ = waiter.grant.send(Err(RouterError::QueueFull));
        true
    }
}

/// Takes a waiter out of its queue when its wait ends, however it ends.
struct Leave<'a> {
    inner: &'a Arc<Inner>,
    band: usize,
    key: Arc<str>,
    id: u64,
}

impl Drop for Leave<'_> {
    fn drop(&mut self) {
        let mut state = self.inner.state.lock().expect("queue state");
        let queues = &mut state.bands[self.band];
        let Some(at) = queues.iter().position(|q| q.key == self.key) else { return };
        let Some(i) = queues[at].waiters.iter().position(|w| w.id == self.id) else { return };
        let waiter = queues[at].waiters.remove(i).expect("found");
        if queues[at].waiters.is_empty() {
            queues.remove(at);
        }
        state.queued -= 1;
        self.inner.count(&state);
        drop(state);
        drop(waiter);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow(key: &str, priority: Priority) -> Flow {
        Flow { key: Arc::from(key), priority }
    }

    fn limiter(slots: usize, queued: usize, order: QueueOrder) -> Arc<Limiter> {
        Arc::new(Limiter::new(slots, queued, Duration::from_secs(5), order, None))
    }

    /// Queue `keys` in order behind one held slot, then free slots one at a time and
    /// return the order the waiters were served in.
    async fn served_order(order: QueueOrder, keys: &[(&'static str, Priority)]) -> Vec<&'static str> {
        let limiter = limiter(1, 100, order);
        let held = limiter.admit(&flow("holder", Priority::Normal)).await.unwrap();
        let (done, mut served) = tokio::sync::mpsc::unbounded_channel();
        for &(key, priority) in keys {
            let (limiter, done) = (limiter.clone(), done.clone());
            tokio::spawn(async move {
                let slot = limiter.admit(&flow(key, priority)).await.unwrap();
                done.send((key, slot)).unwrap();
            });
            tokio::task::yield_now().await;
        }
        drop(held);
        let mut order = Vec::new();
        for _ in keys {
            let (key, slot) = served.recv().await.unwrap();
            order.push(key);
            drop(slot);
        }
        order
    }

    #[tokio::test]
    async fn keys_take_turns_and_priorities_go_first() {
        use Priority::*;
        let arrivals = [
            ("a", Normal),
            ("a", Normal),
            ("a", Normal),
            ("b", Normal),
            ("c", Low),
            ("h", High),
            ("b", Normal),
        ];
        // "c" (low) waits while four slots go to higher bands, then has the fifth.
        assert_eq!(served_order(QueueOrder::Fair, &arrivals).await, ["h", "a", "b", "a", "c", "b", "a"]);
        assert_eq!(served_order(QueueOrder::Fifo, &arrivals).await, ["a", "a", "a", "b", "c", "h", "b"]);
    }

    #[tokio::test]
    async fn a_steady_high_key_leaves_every_waiting_band_a_share() {
        use Priority::*;
        let mut arrivals = vec![("h", High); 12];
        arrivals.extend([("n", Normal), ("n", Normal), ("l", Low), ("l", Low)]);
        let order = served_order(QueueOrder::Fair, &arrivals).await;
        assert_eq!(
            order,
            ["h", "h", "h", "h", "n", "l", "h", "h", "h", "h", "n", "l", "h", "h", "h", "h"],
            "after {STARVATION_BOUND} slots to higher bands, a waiting band gets the next"
        );
    }

    #[tokio::test]
    async fn a_full_queue_pushes_out_the_biggest_key() {
        let limiter = limiter(1, 3, QueueOrder::Fair);
        let held = limiter.admit(&flow("x", Priority::Normal)).await.unwrap();
        let flood: Vec<_> = (0..3)
            .map(|_| {
                let limiter = limiter.clone();
                tokio::spawn(async move { limiter.admit(&flow("flood", Priority::Normal)).await.map(drop) })
            })
            .collect();
        tokio::task::yield_now().await;
        // The flood's own next request is refused; another key's pushes the newest out.
        assert!(matches!(limiter.admit(&flow("flood", Priority::Normal)).await, Err(RouterError::QueueFull)));
        let other = {
            let limiter = limiter.clone();
            tokio::spawn(async move { limiter.admit(&flow("other", Priority::Low)).await.map(drop) })
        };
        tokio::task::yield_now().await;
        drop(held);
        assert!(other.await.unwrap().is_ok());
        let outcomes: Vec<_> = futures_outcomes(flood).await;
        assert_eq!(outcomes.iter().filter(|ok| !**ok).count(), 1, "{outcomes:?}");
    }

    async fn futures_outcomes(tasks: Vec<tokio::task::JoinHandle<Result<(), RouterError>>>) -> Vec<bool> {
        let mut out = Vec::new();
        for task in tasks {
            out.push(task.await.unwrap().is_ok());
        }
        out
    }

    #[tokio::test]
    async fn waits_time_out_and_leavers_free_their_place() {
        let limiter = Arc::new(Limiter::new(1, 1, Duration::from_millis(50), QueueOrder::Fair, None));
        let held = limiter.admit(&flow("a", Priority::Normal)).await.unwrap();
        assert!(matches!(
            limiter.admit(&flow("b", Priority::Normal)).await,
            Err(RouterError::QueueTimeout { .. })
        ));
        // A waiter that is cancelled leaves the queue: the next one gets in line.
        let cancelled = {
            let limiter = limiter.clone();
            tokio::spawn(async move { limiter.admit(&flow("b", Priority::Normal)).await.map(drop) })
        };
        tokio::task::yield_now().await;
        cancelled.abort();
        let _ = cancelled.await;
        let next = {
            let limiter = limiter.clone();
            tokio::spawn(async move { limiter.admit(&flow("c", Priority::Normal)).await.map(drop) })
        };
        tokio::task::yield_now().await;
        drop(held);
        assert!(next.await.unwrap().is_ok());
        // Every slot came back.
        let a = limiter.admit(&flow("a", Priority::Normal)).await.unwrap();
        drop(a);
        assert_eq!(limiter.inner.state.lock().unwrap().free, 1);
        assert_eq!(limiter.inner.state.lock().unwrap().queued, 0);
    }
}
