//! Where prompts are rendered and tokenised: a few threads of their own, off the async
//! workers that serve every connection.
//!
//! Tokenising a multi-megabyte prompt takes seconds of CPU. Done inside a request's
//! future it would hold an async worker for all that time, and with two of them a pair
//! of such prompts would stall `/health`, metrics and every stream. So the work
//! (`--engine-api generate`'s rendering and tokenising, `kv-aware`'s prompt ids) goes to
//! a pool of `--tokenizer-threads` threads through a queue of `--tokenizer-queue` jobs.
//! A full queue refuses at once ([`Busy`]): the caller then does without the router's
//! tokens (generate mode sends the request to the engine's OpenAI endpoint, which
//! tokenises it itself; kv-aware routes it by load), so a flood of huge prompts costs
//! their senders the router's help, not anyone's answer. A job whose caller has gone
//! (the client hung up while it waited) is skipped.

use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};

use prometheus::{IntCounterVec, IntGauge};
use tokio::sync::oneshot;

type Job = Box<dyn FnOnce() + Send>;

/// The queue was full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Busy;

/// The pool's counters: `router_tokenizer_jobs_total{outcome}`,
/// `router_tokenizer_queued` and `router_tokenizer_busy_threads`.
#[derive(Clone)]
pub struct PoolMetrics {
    pub jobs: IntCounterVec,
    pub queued: IntGauge,
    pub busy: IntGauge,
}

pub struct TokenizePool {
    jobs: SyncSender<Job>,
    metrics: Option<PoolMetrics>,
}

impl TokenizePool {
    /// `threads` threads taking jobs from a queue of at most `queue`.
    pub fn new(threads: usize, queue: usize, metrics: Option<PoolMetrics>) -> Arc<Self> {
        let (jobs, waiting) = std::sync::mpsc::sync_channel::<Job>(queue);
        let waiting = Arc::new(Mutex::new(waiting));
        for i in 0..threads.max(1) {
            let waiting = waiting.clone();
            std::thread::Builder::new()
                .name(format!("tokenize-{i}"))
                .spawn(move || work(&waiting))
                .expect("a thread can be started");
        }
        Arc::new(TokenizePool { jobs, metrics })
    }

    /// Run `job` on the pool and wait for its result; [`Busy`] at once when the queue
    /// is full.
    pub async fn run<T: Send + 'static>(&self, job: impl FnOnce() -> T + Send + 'static) -> Result<T, Busy> {
        let (done, result) = oneshot::channel();
        let metrics = self.metrics.clone();
        if let Some(metrics) = &metrics {
            metrics.queued.inc();
        }
        let wrapped: Job = Box::new(move || {
            if let Some(metrics) = &metrics {
                metrics.queued.dec();
                metrics.busy.inc();
            }
            let outcome = if done.is_closed() {
                "abandoned"
            } else {
                let _ = done.send(job());
                "done"
            };
            if let Some(metrics) = metrics {
                metrics.busy.dec();
                metrics.jobs.with_label_values(&[outcome]).inc();
            }
        });
        match self.jobs.try_send(wrapped) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                if let Some(metrics) = &self.metrics {
                    metrics.queued.dec();
                    metrics.jobs.with_label_values(&["busy"]).inc();
                }
                return Err(Busy);
            }
        }
        result.await.map_err(|_| Busy)
    }
}

fn work(waiting: &Mutex<Receiver<Job>>) {
    loop {
        let job = match waiting.lock() {
            Ok(receiver) => receiver.recv(),
            Err(_) => return,
        };
        match job {
            // A job that panics (a tokenizer bug) costs its own request only: its
            // caller sees the result channel closed.
            Ok(job) => {
                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
            }
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn jobs_run_off_the_runtime_and_a_full_queue_refuses_at_once() {
        let metrics = PoolMetrics {
            jobs: IntCounterVec::new(prometheus::Opts::new("jobs", "test"), &["outcome"]).unwrap(),
            queued: IntGauge::new("queued", "test").unwrap(),
            busy: IntGauge::new("busy", "test").unwrap(),
        };
        let pool = TokenizePool::new(1, 1, Some(metrics.clone()));
        assert_eq!(pool.run(|| 6 * 7).await, Ok(42));
        // One job runs (holding the only thread), one waits in the queue: a third is
        // refused.
        let (started, running_now) = oneshot::channel::<()>();
        let (release, hold) = std::sync::mpsc::channel::<()>();
        let running = {
            let pool = pool.clone();
            tokio::spawn(async move {
                pool.run(move || {
                    let _ = started.send(());
                    hold.recv().is_ok()
                })
                .await
            })
        };
        running_now.await.unwrap();
        let waiting = {
            let pool = pool.clone();
            tokio::spawn(async move { pool.run(|| "second").await })
        };
        for _ in 0..1000 {
            if metrics.queued.get() == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(metrics.queued.get(), 1, "the second job waits");
        assert_eq!(pool.run(|| "third").await, Err(Busy));
        release.send(()).unwrap();
        assert_eq!(running.await.unwrap(), Ok(true));
        assert_eq!(waiting.await.unwrap(), Ok("second"));
        // A job that panics costs only its caller.
        assert_eq!(pool.run(|| -> u8 { panic!("a tokenizer bug") }).await, Err(Busy));
        assert_eq!(pool.run(|| 1).await, Ok(1));
        assert_eq!(metrics.jobs.with_label_values(&["busy"]).get(), 1);
        assert_eq!(metrics.queued.get(), 0);
    }
}
