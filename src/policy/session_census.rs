//! Even session homes that every router instance computes alike: `consistent-hash`'s
//! default (`--session-spread even`).
//!
//! Hashing sessions onto replicas one by one is binomial: 64 sessions on 4 replicas land
//! 8/17/19/20 as often as not, and the busiest replica sets the pace (measured at 0.77x
//! round robin's throughput). Bounding each replica's load per request evens that out
//! but moves requests off their home, and each router instance, seeing only its own
//! requests in flight, moves different ones.
//!
//! Instead, each instance keeps a census of the sessions it has seen in the last
//! `--session-window` (key hash and last sight), and lays their homes out as one plan:
//! in the order of their hashes, each session takes the first replica of its own
//! rendezvous order (replicas ranked by a hash of session and replica name) that has
//! fewer than `ceil(sessions / replicas)` homes. The plan is a pure function of the set
//! of sessions and the replica names: instances that have seen the same sessions (behind
//! a Service that spreads connections, each sees every session within seconds) compute
//! the same homes, a restarted or new instance computes them again as soon as it has
//! seen the sessions, and no replica holds more than its share. A session the plan does
//! not know yet (first seen since it was made) takes the first replica of its order,
//! where the next plan, made within a quarter of a second, most often keeps it (a replica
//! is full only for the sessions last in hash order); taking the replica with room in the
//! last plan instead piled new sessions on the replicas that plan left short, and moved
//! them all at the next (measured: 3 instances, 512 new sessions at once, 83% of requests
//! on their home against 98%). A replica joining or leaving moves few sessions: the order of each session is
//! fixed by names, so only the sessions that lose their place, or are displaced by
//! those, move.
//!
//! The plan counts sessions, not their load: sessions that differ in weight are evened
//! out by the engines' own load (`crate::replicas::engine_load`: a home over the bound
//! by that shared signal passes its sessions to the next replica of their order).
//!
//! The census is bounded: past `capacity` sessions, the least recently seen half is
//! forgotten.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

/// How often, at most, a changed census is planned again.
const REPLAN_EVERY: Duration = Duration::from_millis(250);

/// One layout of session homes over one list of replica names.
#[derive(Debug, Default)]
struct Plan {
    /// Seeds of the replica names, in the order of the list it was made for.
    seeds: Vec<u64>,
    homes: HashMap<u64, u32>,
    made: Option<Instant>,
}

pub struct SessionCensus {
    window: Duration,
    /// A replica may hold this fraction more than its share of homes.
    slack: f64,
    capacity: usize,
    seen: Mutex<HashMap<u64, Instant>>,
    plan: ArcSwap<Plan>,
    changed: AtomicBool,
    planning: Mutex<()>,
    /// A plan is being made on a blocking thread.
    planning_queued: AtomicBool,
}

impl Default for SessionCensus {
    /// A ten-minute window, room for 100,000 sessions, no slack.
    fn default() -> Self {
        SessionCensus::new(Duration::from_secs(600), 100_000)
    }
}

impl SessionCensus {
    pub fn new(window: Duration, capacity: usize) -> Self {
        Self::with_slack(window, capacity, 0.0)
    }

    pub fn with_slack(window: Duration, capacity: usize, slack: f64) -> Self {
        SessionCensus {
            window,
            slack: if slack.is_finite() { slack.clamp(0.0, 10.0) } else { 0.0 },
            capacity: capacity.max(2),
            seen: Mutex::new(HashMap::new()),
            plan: ArcSwap::from_pointee(Plan::default()),
            changed: AtomicBool::new(false),
            planning: Mutex::new(()),
            planning_queued: AtomicBool::new(false),
        }
    }

    /// The replicas in the order session `key` tries them, home first: the census's
    /// home for it, then the rest of its rendezvous order. `names` are the replicas'
    /// names in the fleet's order; the indices returned are into it. Records the sight.
    ///
    /// A plan for another replica list is made at once, by this call; one that is only
    /// due (sessions joined, or may have left) is made on a blocking thread when there is
    /// a runtime, and this call uses the last one meanwhile: planning 100,000 sessions
    /// takes milliseconds no request should wait for.
    pub fn order(self: &Arc<Self>, key: &[u8], names: &[String], now: Instant) -> Vec<usize> {
        let session = xxh3_64(key);
        self.sight(session, now);
        let seeds = seeds(names);
        let mut plan = self.plan.load_full();
        if plan.seeds != seeds {
            self.replan(&seeds, now);
            plan = self.plan.load_full();
        } else if self.due(&plan, now) {
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) if !self.planning_queued.swap(true, Ordering::Relaxed) => {
                    let census = self.clone();
                    runtime.spawn_blocking(move || {
                        census.replan(&seeds, Instant::now());
                        census.planning_queued.store(false, Ordering::Relaxed);
                    });
                }
                Ok(_) => {}
                Err(_) => {
                    self.replan(&seeds, now);
                    plan = self.plan.load_full();
                }
            }
        }
        let mut order = rendezvous(session, &plan.seeds);
        let home = match plan.homes.get(&session) {
            Some(&home) => Some(home as usize),
            None => order.first().copied(),
        };
        if let Some(home) = home
            && let Some(at) = order.iter().position(|&r| r == home)
        {
            order[..=at].rotate_right(1);
        }
        order
    }

    /// Sessions in the census now.
    pub fn len(&self) -> usize {
        self.seen.lock().expect("census lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn sight(&self, session: u64, now: Instant) {
        let mut seen = self.seen.lock().expect("census lock");
        if seen.insert(session, now).is_none() {
            self.changed.store(true, Ordering::Relaxed);
            if seen.len() > self.capacity {
                let mut ages: Vec<Instant> = seen.values().copied().collect();
                let half = ages.len() / 2;
                let cut = *ages.select_nth_unstable(half).1;
                seen.retain(|_, at| *at > cut);
            }
        }
    }

    /// Whether the plan should be made again: sessions joined since, or some may have
    /// left the window.
    fn due(&self, plan: &Plan, now: Instant) -> bool {
        let age = plan.made.map_or(Duration::MAX, |made| now.saturating_duration_since(made));
        (self.changed.load(Ordering::Relaxed) && age >= REPLAN_EVERY) || age >= self.window / 8
    }

    /// Make the plan for these replicas from the sessions seen within the window. One
    /// request makes it; the others meanwhile use the last one.
    fn replan(&self, seeds: &[u64], now: Instant) {
        let Ok(_planning) = self.planning.try_lock() else { return };
        let current = self.plan.load();
        if current.seeds == seeds && !self.due(&current, now) {
            return;
        }
        self.changed.store(false, Ordering::Relaxed);
        let mut sessions: Vec<u64> = {
            let mut seen = self.seen.lock().expect("census lock");
            let window = self.window;
            seen.retain(|_, at| now.saturating_duration_since(*at) <= window);
            seen.keys().copied().collect()
        };
        sessions.sort_unstable();
        self.plan.store(Arc::new(plan(&sessions, seeds, self.slack, now)));
    }
}

/// Homes for `sessions` (sorted) over replicas with these name seeds: each in turn takes
/// the first replica of its order with fewer than its share.
fn plan(sessions: &[u64], seeds: &[u64], slack: f64, now: Instant) -> Plan {
    let n = seeds.len();
    let cap =
        if n == 0 { 0 } else { ((1.0 + slack) * sessions.len() as f64 / n as f64).ceil().max(1.0) as u32 };
    let mut counts = vec![0u32; n];
    let mut homes = HashMap::with_capacity(sessions.len());
    for &session in sessions {
        if let Some(home) = rendezvous(session, seeds).into_iter().find(|&r| counts[r] < cap) {
            counts[home] += 1;
            homes.insert(session, home as u32);
        }
    }
    Plan { seeds: seeds.to_vec(), homes, made: Some(now) }
}

fn seeds(names: &[String]) -> Vec<u64> {
    names.iter().map(|name| xxh3_64(name.as_bytes())).collect()
}

/// Replica indices by descending score of (session, replica name): the session's own
/// order, the same on every instance, independent of the list's order.
fn rendezvous(session: u64, seeds: &[u64]) -> Vec<usize> {
    let mut scored: Vec<(u64, usize)> = seeds
        .iter()
        .enumerate()
        .map(|(i, &seed)| (xxh3_64_with_seed(&session.to_le_bytes(), seed), i))
        .collect();
    scored.sort_unstable_by(|a, b| b.cmp(a));
    scored.into_iter().map(|(_, i)| i).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("http://10.0.0.{i}:8000")).collect()
    }

    fn homes(census: &Arc<SessionCensus>, keys: &[String], names: &[String], now: Instant) -> Vec<usize> {
        keys.iter().map(|k| census.order(k.as_bytes(), names, now)[0]).collect()
    }

    fn keys(n: usize, tag: &str) -> Vec<String> {
        (0..n).map(|i| format!("{tag}-session-{i}")).collect()
    }

    #[test]
    fn few_sessions_are_spread_evenly_where_hashing_is_not() {
        let names = names(4);
        let t0 = Instant::now();
        for tag in ["a", "b", "c", "d", "e"] {
            let census = Arc::new(SessionCensus::default());
            let keys = keys(64, tag);
            homes(&census, &keys, &names, t0);
            let later = t0 + REPLAN_EVERY;
            let mut per = [0; 4];
            homes(&census, &keys, &names, later).iter().for_each(|&r| per[r] += 1);
            assert_eq!(per, [16; 4], "{tag}");
            // Hashing the same keys alone is uneven.
            let mut hashed = [0; 4];
            keys.iter().for_each(|k| hashed[rendezvous(xxh3_64(k.as_bytes()), &seeds(&names))[0]] += 1);
            assert_ne!(hashed, [16; 4], "{tag}: {hashed:?}");
        }
    }

    #[test]
    fn instances_that_saw_the_same_sessions_agree_whatever_the_order() {
        let names = names(5);
        let reversed: Vec<String> = names.iter().rev().cloned().collect();
        let keys = keys(103, "x");
        let t0 = Instant::now();
        let (a, b) = (Arc::new(SessionCensus::default()), Arc::new(SessionCensus::default()));
        homes(&a, &keys, &names, t0);
        let mut shuffled = keys.clone();
        fastrand::shuffle(&mut shuffled);
        homes(&b, &shuffled, &reversed, t0);
        let t1 = t0 + REPLAN_EVERY;
        let ha = homes(&a, &keys, &names, t1);
        let hb = homes(&b, &keys, &reversed, t1);
        for (i, (&x, &y)) in ha.iter().zip(&hb).enumerate() {
            assert_eq!(names[x], reversed[y], "session {i}");
        }
    }

    #[test]
    fn a_replica_leaving_moves_its_sessions_and_few_others() {
        let all = names(4);
        let keys = keys(400, "y");
        let t0 = Instant::now();
        let census = Arc::new(SessionCensus::default());
        homes(&census, &keys, &all, t0);
        let before = homes(&census, &keys, &all, t0 + REPLAN_EVERY);
        let three: Vec<String> = all[..3].to_vec();
        let after = homes(&census, &keys, &three, t0 + REPLAN_EVERY);
        let moved = before.iter().zip(&after).filter(|(b, a)| b != a).count();
        let lost = before.iter().filter(|&&b| b == 3).count();
        assert_eq!(lost, 100);
        assert!(moved < lost + lost / 2, "{moved} moved for {lost} that lost their home");
    }

    #[test]
    fn sessions_leave_the_window_and_the_census_is_bounded() {
        let names = names(2);
        let census = Arc::new(SessionCensus::new(Duration::from_secs(60), 1000));
        let t0 = Instant::now();
        homes(&census, &keys(10, "old"), &names, t0);
        homes(&census, &keys(10, "new"), &names, t0 + Duration::from_secs(61));
        assert_eq!(census.len(), 10, "the old ones left the window");
        homes(&census, &keys(5000, "many"), &names, t0 + Duration::from_secs(62));
        assert!(census.len() <= 1000);
        assert!(census.order(b"k", &[], t0).is_empty());
    }
}
