//! A run: send a workload's requests at a fixed concurrency or at a Poisson rate, first
//! for a warm-up phase whose results are discarded, then for the recorded phase, and
//! collect every outcome.
//!
//! - Fixed concurrency: `n` workers, each sending its next request as soon as its last
//!   one ended (`vllm bench serve --max-concurrency n --request-rate inf`).
//! - Rate: requests start at exponentially distributed gaps (a Poisson process with the
//!   given mean rate), optionally capped at a concurrency, as `--request-rate r`.
//! - Sessions (the agentic workload): a worker replays one session at a time, turn by
//!   turn, waiting each turn's delay after the previous response, so at most `n` sessions
//!   (and requests) are in flight, as AIPerf's `--concurrency` holds a slot per session;
//!   the workers may start spread over a ramp (AIPerf's `--concurrency-ramp-duration`).
//!   In rate mode, sessions start at the Poisson rate.
//!
//! The two phases are one continuous run: the recorded phase starts where the warm-up
//! ends, with the engines' batches full and sessions spread over their turns, not with
//! every worker starting at once. A request belongs to the phase in which it started.
//! Each phase ends after a request count or a duration; at the end of the recorded
//! phase no new request starts (a session stops at its next turn), and the requests in
//! flight are waited for, so every one is accounted for.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;

use super::client::{Client, Outcome, Prepared};
use super::conversation::Conversation;
use super::progress::Progress;
use super::random::RandomWorkload;
use super::trace::TraceSession;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Pacing {
    Concurrency(usize),
    Rate { per_second: f64, max_concurrency: Option<usize>, seed: u64 },
}

/// When a phase ends.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Limit {
    Requests(usize),
    Duration(Duration),
}

/// What a run sends.
pub enum Work {
    Random(RandomWorkload),
    /// Trace sessions replayed in dataset order.
    Sessions(SessionWork),
}

pub struct SessionWork {
    pub sessions: Arc<Vec<TraceSession>>,
    pub model: String,
    /// Tokens per hash id.
    pub block_size: usize,
    /// Workers start spread evenly over this long.
    pub ramp: Duration,
    /// The engines run this many times faster than real time: inter-turn delays shrink
    /// (or, below 1, stretch) by the same factor.
    pub time_scale: f64,
}

/// Everything that happened in a run.
pub struct Run {
    /// Outcomes of the requests started in the recorded phase, by start time; their
    /// `start` is measured from the start of the recorded phase.
    pub recorded: Vec<Outcome>,
    /// Outcomes of the warm-up requests.
    pub warmup: Vec<Outcome>,
    pub warmup_duration: Duration,
    /// From the start of the recorded phase to the last response's end.
    pub duration: Duration,
    /// From the start of the recorded phase to the moment no new request could start.
    pub window: Duration,
    /// Requests cancelled at the drain limit.
    pub unfinished: usize,
    /// Sessions started (session workloads).
    pub sessions_started: usize,
    /// The dataset ran out before the recorded phase ended.
    pub exhausted: bool,
}

impl Run {
    /// Express every time in the engines' clock: with engines running `time_scale` times
    /// faster than real time (below 1: slower, for loads this machine cannot carry in
    /// real time), a wall-clock time `t` is `t * time_scale` of engine time.
    pub fn rescale(&mut self, time_scale: f64) {
        if time_scale == 1.0 {
            return;
        }
        let scale = |d: &mut Duration| *d = d.mul_f64(time_scale);
        for outcome in self.recorded.iter_mut().chain(self.warmup.iter_mut()) {
            scale(&mut outcome.start);
            scale(&mut outcome.latency);
            if let Some(ttft) = outcome.ttft.as_mut() {
                scale(ttft);
            }
            for gap in &mut outcome.itl_us {
                *gap = (*gap as f64 * time_scale).round().min(u32::MAX as f64) as u32;
            }
        }
        scale(&mut self.warmup_duration);
        scale(&mut self.duration);
        scale(&mut self.window);
    }
}

/// Decides whether another request may start, and in which phase.
struct Gate {
    warmup: Option<Limit>,
    limit: Limit,
    epoch: Instant,
    started: AtomicUsize,
    /// The start of the recorded phase (from `epoch`) and the index of its first request.
    recording: OnceLock<(Duration, usize)>,
    /// When the first request was refused, from `epoch`.
    closed_at: OnceLock<Duration>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Warmup,
    Recorded,
}

impl Gate {
    fn new(warmup: Option<Limit>, limit: Limit) -> Self {
        let gate = Gate {
            warmup,
            limit,
            epoch: Instant::now(),
            started: AtomicUsize::new(0),
            recording: OnceLock::new(),
            closed_at: OnceLock::new(),
        };
        if warmup.is_none() {
            let _ = gate.recording.set((Duration::ZERO, 0));
        }
        gate
    }

    /// Admit one request, in its phase; None once the run is over.
    fn admit(&self) -> Option<Phase> {
        if self.closed_at.get().is_some() {
            return None;
        }
        let n = self.started.fetch_add(1, Ordering::Relaxed);
        let now = self.epoch.elapsed();
        if self.recording.get().is_none() {
            let warming = match self.warmup {
                Some(Limit::Requests(w)) => n < w,
                Some(Limit::Duration(w)) => now < w,
                None => false,
            };
            if warming {
                return Some(Phase::Warmup);
            }
        }
        let (from, first) = *self.recording.get_or_init(|| (now, n));
        let open = match self.limit {
            Limit::Requests(r) => n < first.saturating_add(r),
            Limit::Duration(d) => now < from + d,
        };
        if !open {
            let _ = self.closed_at.set(now);
            return None;
        }
        Some(Phase::Recorded)
    }

    /// Whether the run may still start something (without counting a request).
    fn open(&self) -> bool {
        self.closed_at.get().is_none()
            && match (self.limit, self.recording.get()) {
                (Limit::Duration(d), Some((from, _))) => self.epoch.elapsed() < *from + d,
                _ => true,
            }
    }

    /// The end of a recorded phase limited by duration, once it has started.
    fn end_of_window(&self) -> Option<Duration> {
        match (self.limit, self.recording.get()) {
            (Limit::Duration(d), Some((from, _))) => Some(*from + d),
            _ => None,
        }
    }

    /// Sleep for `delay`, or less if the run's end comes first.
    async fn sleep(&self, delay: Duration) {
        let delay = match (self.limit, self.recording.get()) {
            (Limit::Duration(d), Some((from, _))) => {
                delay.min((*from + d).saturating_sub(self.epoch.elapsed()))
            }
            _ => delay,
        };
        tokio::time::sleep(delay).await;
    }
}

struct Shared {
    client: Arc<Client>,
    work: Work,
    gate: Gate,
    progress: Arc<Progress>,
    /// The index of the next request (random work) or session to start.
    next: AtomicUsize,
    /// Every outcome, as it happens (so a task cut at the drain timeout loses nothing
    /// that finished).
    outcomes: mpsc::UnboundedSender<(Phase, Outcome)>,
    /// The dataset ran out while the run was open.
    exhausted: AtomicBool,
}

impl Shared {
    /// Whether another unit of work may start: for a session, the run is still open (its
    /// turns are admitted one by one); a request is admitted when it is sent.
    fn open(&self) -> bool {
        if !self.gate.open() {
            return false;
        }
        let exhausted = match &self.work {
            Work::Random(_) => false,
            Work::Sessions(work) => self.next.load(Ordering::Relaxed) >= work.sessions.len(),
        };
        if exhausted {
            self.exhausted.store(true, Ordering::Relaxed);
        }
        !exhausted
    }

    /// One request, or one whole session. False when nothing more may start.
    async fn unit(&self) -> bool {
        match &self.work {
            Work::Random(workload) => {
                let Some(phase) = self.gate.admit() else { return false };
                let index = self.next.fetch_add(1, Ordering::Relaxed);
                let outcome = self.send(&workload.request(index)).await;
                let _ = self.outcomes.send((phase, outcome));
                true
            }
            Work::Sessions(work) => {
                let index = self.next.fetch_add(1, Ordering::Relaxed);
                match work.sessions.get(index) {
                    Some(session) => {
                        self.session(session, work).await;
                        true
                    }
                    None => {
                        if self.gate.open() {
                            self.exhausted.store(true, Ordering::Relaxed);
                        }
                        false
                    }
                }
            }
        }
    }

    async fn send(&self, request: &Prepared) -> Outcome {
        self.progress.begin();
        let outcome = self.client.send(request, self.gate.epoch).await;
        self.progress.end(&outcome);
        outcome
    }

    async fn session(&self, session: &TraceSession, work: &SessionWork) {
        let mut conversation = Conversation::new(&work.model, &session.session_id, work.block_size);
        for turn in &session.turns {
            if !turn.delay.is_zero() {
                self.gate.sleep(turn.delay.div_f64(work.time_scale.max(1e-9))).await;
            }
            let Some(phase) = self.gate.admit() else { break };
            let request = conversation.ask(turn);
            let mut outcome = self.send(&request).await;
            let failed = !outcome.ok();
            conversation.answer(&std::mem::take(&mut outcome.text), outcome.output_tokens);
            let _ = self.outcomes.send((phase, outcome));
            if failed {
                break; // an agent does not go on without its answer
            }
        }
    }
}

/// Run the workload: warm-up, then the recorded phase. With a `drain` limit, requests
/// still running that long after the recorded phase closed are cancelled and counted
/// as unfinished.
pub async fn run(
    client: Arc<Client>,
    work: Work,
    pacing: Pacing,
    phases: (Option<Limit>, Limit),
    drain: Option<Duration>,
    progress: Arc<Progress>,
) -> Run {
    let (sender, mut receiver) = mpsc::unbounded_channel();
    let shared = Arc::new(Shared {
        client,
        work,
        gate: Gate::new(phases.0, phases.1),
        progress: progress.clone(),
        next: AtomicUsize::new(0),
        outcomes: sender,
        exhausted: AtomicBool::new(false),
    });
    let mut tasks = JoinSet::new();
    match pacing {
        Pacing::Concurrency(n) => {
            let ramp = match &shared.work {
                Work::Sessions(work) => work.ramp,
                Work::Random(_) => Duration::ZERO,
            };
            let n = n.max(1);
            for i in 0..n {
                let shared = shared.clone();
                let start = ramp.mul_f64(i as f64 / n as f64);
                tasks.spawn(async move {
                    if !start.is_zero() {
                        tokio::time::sleep(start).await;
                    }
                    while shared.open() && shared.unit().await {}
                });
            }
        }
        Pacing::Rate { per_second, max_concurrency, seed } => {
            let permits = max_concurrency.map(|n| Arc::new(Semaphore::new(n.max(1))));
            let mut rng = fastrand::Rng::with_seed(seed);
            let mut at = 0.0;
            while shared.open() {
                at += -(1.0 - rng.f64()).ln() / per_second.max(1e-9);
                tokio::time::sleep_until((shared.gate.epoch + Duration::from_secs_f64(at)).into()).await;
                let permit = match &permits {
                    Some(p) => Some(p.clone().acquire_owned().await.expect("never closed")),
                    None => None,
                };
                let shared = shared.clone();
                tasks.spawn(async move {
                    let _permit = permit;
                    shared.unit().await;
                });
            }
        }
    }
    // Wait for every task; past the drain limit, cancel what is left.
    let mut unfinished = 0;
    loop {
        let waited = tokio::time::timeout(Duration::from_millis(100), tasks.join_next()).await;
        match waited {
            Ok(Some(joined)) => joined.expect("a run's task panicked"),
            Ok(None) => break,
            Err(_) => {
                let closed = shared.gate.closed_at.get().copied().or_else(|| shared.gate.end_of_window());
                let now = shared.gate.epoch.elapsed();
                if let (Some(drain), Some(closed)) = (drain, closed)
                    && now > closed + drain
                {
                    unfinished = progress.in_flight();
                    tasks.abort_all();
                    while tasks.join_next().await.is_some() {}
                    break;
                }
            }
        }
    }
    let end = shared.gate.epoch.elapsed();
    let exhausted = shared.exhausted.load(Ordering::Relaxed);
    let sessions_started = match &shared.work {
        Work::Sessions(work) => shared.next.load(Ordering::Relaxed).min(work.sessions.len()),
        Work::Random(_) => 0,
    };
    let (from, _) = shared.gate.recording.get().copied().unwrap_or((end, 0));
    let closed = shared.gate.closed_at.get().copied().or_else(|| shared.gate.end_of_window()).unwrap_or(end);
    drop(shared);
    let (mut recorded, mut warmup) = (Vec::new(), Vec::new());
    while let Some((phase, mut outcome)) = receiver.recv().await {
        match phase {
            Phase::Recorded => {
                outcome.start = outcome.start.saturating_sub(from);
                recorded.push(outcome);
            }
            Phase::Warmup => warmup.push(outcome),
        }
    }
    recorded.sort_by_key(|o| o.start);
    warmup.sort_by_key(|o| o.start);
    Run {
        recorded,
        warmup,
        warmup_duration: from,
        duration: end.saturating_sub(from),
        window: closed.min(end).saturating_sub(from),
        unfinished,
        sessions_started,
        exhausted,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rescaling_multiplies_every_time() {
        let outcome = Outcome {
            start: Duration::from_millis(10),
            ttft: Some(Duration::from_millis(100)),
            itl_us: vec![2000, 4000],
            latency: Duration::from_millis(300),
            ..Outcome::default()
        };
        let mut run = Run {
            recorded: vec![outcome],
            warmup: vec![],
            warmup_duration: Duration::from_secs(2),
            duration: Duration::from_secs(10),
            window: Duration::from_secs(8),
            unfinished: 0,
            sessions_started: 0,
            exhausted: false,
        };
        run.rescale(0.25);
        let o = &run.recorded[0];
        assert_eq!(
            (o.start, o.ttft, o.latency),
            (Duration::from_micros(2500), Some(Duration::from_millis(25)), Duration::from_millis(75))
        );
        assert_eq!(o.itl_us, [500, 1000]);
        assert_eq!((run.duration, run.window), (Duration::from_millis(2500), Duration::from_secs(2)));
    }

    #[test]
    fn phases_by_count_then_stop() {
        let gate = Gate::new(Some(Limit::Requests(2)), Limit::Requests(3));
        let phases: Vec<_> = (0..7).map(|_| gate.admit()).collect();
        use Phase::*;
        assert_eq!(
            phases,
            [Some(Warmup), Some(Warmup), Some(Recorded), Some(Recorded), Some(Recorded), None, None]
        );
        assert!(!gate.open());
    }

    #[test]
    fn an_unbounded_count_after_a_warmup_stays_open() {
        let gate = Gate::new(Some(Limit::Requests(1)), Limit::Requests(usize::MAX));
        assert_eq!(gate.admit(), Some(Phase::Warmup));
        assert!((0..100).all(|_| gate.admit() == Some(Phase::Recorded)));
        assert!(gate.open());
    }

    #[test]
    fn no_warmup_records_from_the_start() {
        let gate = Gate::new(None, Limit::Requests(1));
        assert_eq!(gate.admit(), Some(Phase::Recorded));
        assert_eq!(gate.admit(), None);
        assert_eq!(gate.recording.get().unwrap().0, Duration::ZERO);
    }

    #[test]
    fn warmup_by_duration_then_a_request_count() {
        let gate = Gate::new(Some(Limit::Duration(Duration::from_millis(30))), Limit::Requests(2));
        assert_eq!(gate.admit(), Some(Phase::Warmup));
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(gate.admit(), Some(Phase::Recorded));
        assert_eq!(gate.admit(), Some(Phase::Recorded));
        assert_eq!(gate.admit(), None);
    }
}
