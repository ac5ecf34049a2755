//! The replica's API-server process, as a cost model between HTTP and the engine.
//!
//! vLLM's OpenAI server is one Python process per replica (the study ran
//! `--api-server-count 1`): one event loop takes in each request (parse, validate,
//! render and tokenise the prompt, hand it to the engine core) and turns every engine
//! step's outputs into responses (detokenise, build and write one SSE chunk per token).
//! The engine core runs apart and never waits for it. So when the loop is busy a new
//! request waits to be taken in, every stream of the replica waits while a request is
//! taken in, and tokens that queue up behind other work leave in a burst. Client-side
//! TTFT under load is mostly this queue, not the engine (the study saw ~15-18 ms of
//! engine TTFT under 165-190 ms at the client).
//!
//! The model is one FIFO queue of work per replica, priced by [`ApiCosts`]: an intake
//! per request, an output job per engine step. Each job occupies the loop for its cost
//! (scaled by the simulator's time scale) after the jobs before it. With
//! [`ApiCosts::NONE`] nothing queues: intakes return at once and outputs are delivered as
//! the engine makes them.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::faults::Faults;
use super::profile::{ApiCosts, PromptForm};
use crate::events::Event;

/// One step's outputs: each event with the stream it goes to.
pub type StepOutput = Vec<(mpsc::UnboundedSender<Event>, Event)>;

enum Job {
    Intake { cost: Duration, taken: oneshot::Sender<Instant> },
    Output { cost: Duration, events: StepOutput },
}

/// A job and when it was queued: it starts then, or when the loop is free if that is later.
struct Queued {
    at: Instant,
    job: Job,
}

/// Handle to one replica's API-server loop.
#[derive(Clone)]
pub struct ApiServer {
    costs: ApiCosts,
    time_scale: f64,
    jobs: Option<mpsc::UnboundedSender<Queued>>,
    /// Time the loop has spent working, in nanoseconds of the simulated clock.
    busy_ns: Arc<AtomicU64>,
}

impl ApiServer {
    /// Start the loop (none is needed without costs). The `slowdown` fault slows it as it
    /// slows the engine: a slow replica is slow all over.
    pub fn start(costs: ApiCosts, time_scale: f64, faults: Arc<Faults>) -> ApiServer {
        let busy_ns = Arc::new(AtomicU64::new(0));
        let jobs = (!costs.is_none()).then(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(run(rx, faults, busy_ns.clone(), time_scale));
            tx
        });
        ApiServer { costs, time_scale, jobs, busy_ns }
    }

    /// How long the loop has been busy so far, in the simulated clock (real time times
    /// the time scale): its utilisation is this over elapsed simulated time.
    pub fn busy(&self) -> Duration {
        Duration::from_nanos(self.busy_ns.load(Ordering::Relaxed))
    }

    pub fn costs(&self) -> &ApiCosts {
        &self.costs
    }

    /// Wait until the loop has taken in a request with a prompt of `prompt_tokens`
    /// tokens given as `form`.
    pub async fn intake(&self, prompt_tokens: usize, form: PromptForm) {
        let Some(jobs) = &self.jobs else { return };
        // The request reaches the loop after its latency, and each hop is queued when the
        // one before it was done, however late the timers wake us.
        let mut at = Instant::now() + self.scaled(self.costs.request_latency);
        if at > Instant::now() {
            tokio::time::sleep_until(at).await;
        }
        let hops = self.costs.intake_hops.max(1);
        let cost = self.scaled(self.costs.intake(prompt_tokens, form)) / hops;
        for _ in 0..hops {
            let (taken, done) = oneshot::channel();
            if jobs.send(Queued { at, job: Job::Intake { cost, taken } }).is_err() {
                return;
            }
            match done.await {
                Ok(finished) => at = finished,
                Err(_) => return,
            }
        }
    }

    /// Deliver one step's outputs once the loop has processed them.
    pub fn output(&self, events: StepOutput, token_units: f64) {
        if events.is_empty() {
            return;
        }
        match &self.jobs {
            Some(jobs) => {
                let cost = self.scaled(self.costs.output(token_units));
                let queued = Queued { at: Instant::now(), job: Job::Output { cost, events } };
                if let Err(mpsc::error::SendError(Queued { job: Job::Output { events, .. }, .. })) =
                    jobs.send(queued)
                {
                    deliver(events);
                }
            }
            None => deliver(events),
        }
    }

    fn scaled(&self, cost: Duration) -> Duration {
        cost.div_f64(self.time_scale.max(1e-6))
    }
}

fn deliver(events: StepOutput) {
    for (to, event) in events {
        let _ = to.send(event);
    }
}

/// The loop: each job starts when the one before it has finished (or when it was queued, if
/// the loop was idle then) and completes `cost` later. Start times come from the previous
/// job's deadline and the job's own queueing time, never from when the timer woke us
/// (tokio's timers fire up to a millisecond late), so timer granularity delays a delivery
/// but never slows the loop down.
async fn run(
    mut jobs: mpsc::UnboundedReceiver<Queued>,
    faults: Arc<Faults>,
    busy_ns: Arc<AtomicU64>,
    time_scale: f64,
) {
    let mut free_at = Instant::now();
    while let Some(Queued { at, job }) = jobs.recv().await {
        let start = free_at.max(at);
        let cost = match &job {
            Job::Intake { cost, .. } | Job::Output { cost, .. } => cost.mul_f64(faults.slowdown()),
        };
        free_at = start + cost;
        busy_ns.fetch_add(cost.mul_f64(time_scale).as_nanos() as u64, Ordering::Relaxed);
        if free_at > Instant::now() {
            tokio::time::sleep_until(free_at).await;
        }
        match job {
            Job::Intake { taken, .. } => {
                let _ = taken.send(free_at);
            }
            Job::Output { events, .. } => deliver(events),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_faults() -> Arc<Faults> {
        Arc::new(Faults::new(Default::default()))
    }

    fn costs() -> ApiCosts {
        ApiCosts {
            intake_hops: 1,
            request_latency: Duration::ZERO,
            per_request: Duration::from_millis(20),
            per_prompt_token: Duration::from_micros(1),
            per_chat_token: Duration::ZERO,
            per_prompt_id: Duration::ZERO,
            per_step: Duration::from_millis(1),
            per_token: Duration::from_millis(1),
            generate_request: 1.0,
            generate_token: 1.0,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn work_is_served_in_order_one_job_at_a_time() {
        let api = ApiServer::start(costs(), 1.0, no_faults());
        let t0 = Instant::now();
        let (tx, mut rx) = mpsc::unbounded_channel();
        // A step's output, then a request's intake (1000 text tokens: 21 ms), then
        // another step's output: the second output waits behind the intake.
        api.output(vec![(tx.clone(), Event::Token { id: 1, finish: None })], 1.0);
        let intake = {
            let api = api.clone();
            tokio::spawn(async move {
                api.intake(1000, PromptForm::Text).await;
                Instant::now()
            })
        };
        tokio::task::yield_now().await;
        api.output(vec![(tx.clone(), Event::Token { id: 2, finish: None })], 1.0);
        rx.recv().await.unwrap();
        assert_eq!(t0.elapsed(), Duration::from_millis(2), "first output: per_step + one token");
        let taken = intake.await.unwrap();
        assert_eq!(taken - t0, Duration::from_millis(23));
        assert_eq!(rx.recv().await.unwrap(), Event::Token { id: 2, finish: None });
        assert_eq!(t0.elapsed(), Duration::from_millis(25), "the second output waited for the intake");
    }

    #[tokio::test(start_paused = true)]
    async fn time_scale_shrinks_costs_and_none_costs_nothing() {
        let api = ApiServer::start(costs(), 10.0, no_faults());
        let t0 = Instant::now();
        api.intake(0, PromptForm::Text).await;
        assert_eq!(t0.elapsed(), Duration::from_millis(2));
        let free = ApiServer::start(ApiCosts::NONE, 1.0, no_faults());
        let (tx, mut rx) = mpsc::unbounded_channel();
        let t1 = Instant::now();
        free.intake(100_000, PromptForm::Chat).await;
        free.output(vec![(tx, Event::Token { id: 3, finish: None })], 1.0);
        assert_eq!(rx.recv().await.unwrap(), Event::Token { id: 3, finish: None });
        assert_eq!(t1.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn a_late_timer_delays_deliveries_but_not_the_loop() {
        // Ten outputs of 2 ms each (per_step 1 ms + one token), queued at once. The clock
        // then jumps 7 ms in one go, as when a timer fires late: the outputs due by then
        // leave together, and the rest keep the loop's own pace, so the tenth leaves at
        // 20 ms, not 7 ms + 2 ms x 9.
        let api = ApiServer::start(costs(), 1.0, no_faults());
        let t0 = Instant::now();
        let (tx, mut rx) = mpsc::unbounded_channel();
        for id in 0..10 {
            api.output(vec![(tx.clone(), Event::Token { id, finish: None })], 1.0);
        }
        tokio::task::yield_now().await;
        tokio::time::advance(Duration::from_millis(7)).await;
        let mut delivered = Vec::new();
        for _ in 0..10 {
            rx.recv().await.unwrap();
            delivered.push(t0.elapsed());
        }
        assert_eq!(delivered[0], Duration::from_millis(7), "the first three were due by the jump");
        assert_eq!(delivered[2], Duration::from_millis(7));
        assert_eq!(delivered[3], Duration::from_millis(8));
        assert_eq!(delivered[9], Duration::from_millis(20));
    }
}
