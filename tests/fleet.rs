//! Several router instances in front of the same replicas, on 127.0.0.1: what they
//! agree on without talking to each other. With `consistent-hash`'s defaults, three
//! instances that saw the same sessions give every session the same home and no replica
//! more than its share; an instance started later computes the same homes once it has
//! seen the sessions; an engine whose own load (its `/metrics`) is over the bound sends
//! its sessions to the same next replica from every instance, keeps them while it is
//! within the hysteresis band, and gets them back once it is not.

mod support;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use llm_router::policy::{PolicyKind, SessionSpread};
use llm_router::replicas::engine_load::OverloadBound;
use llm_router::server::RunningRouter;
use serde_json::json;
use support::*;

async fn instances(replicas: &[Arc<MockReplica>], n: usize, spread: SessionSpread) -> Vec<RunningRouter> {
    let mut out = Vec::new();
    for _ in 0..n {
        let mut cfg = config(replicas);
        cfg.policy = PolicyKind::ConsistentHash;
        cfg.hash.spread = spread;
        cfg.engine_load =
            Some(OverloadBound { interval: Duration::from_millis(100), ..OverloadBound::default() });
        out.push(router(cfg).await);
    }
    out
}

/// Send session `s` one request through `router`; the replica that served it.
async fn send(c: &reqwest::Client, router: &RunningRouter, s: usize) -> String {
    let url = format!("{}/v1/completions", base(router));
    let key = format!("agent-{s}");
    let body = json!({"model": "m", "prompt": "hi", "max_tokens": 4});
    let (status, replica, _) = post(c, &url, &body, &[("x-session-id", &key)]).await;
    assert_eq!(status, 200);
    replica.unwrap()
}

/// Every session through every instance, `rounds` times, each time in a random order
/// of instances; per session, the replicas that served it.
async fn serve(
    c: &reqwest::Client,
    routers: &[RunningRouter],
    sessions: usize,
    rounds: usize,
) -> Vec<BTreeMap<String, usize>> {
    let mut served = vec![BTreeMap::new(); sessions];
    for _ in 0..rounds {
        for (s, seen) in served.iter_mut().enumerate() {
            let mut order: Vec<&RunningRouter> = routers.iter().collect();
            fastrand::shuffle(&mut order);
            for router in order {
                *seen.entry(send(c, router, s).await).or_default() += 1;
            }
        }
    }
    served
}

/// The one replica each session went to, or a panic naming the session that split.
fn single_homes(served: &[BTreeMap<String, usize>]) -> Vec<String> {
    served
        .iter()
        .enumerate()
        .map(|(s, seen)| {
            assert_eq!(seen.len(), 1, "session {s} was served by {seen:?}");
            seen.keys().next().unwrap().clone()
        })
        .collect()
}

fn per_replica(homes: &[String]) -> BTreeMap<String, usize> {
    homes.iter().fold(BTreeMap::new(), |mut m, h| {
        *m.entry(h.clone()).or_default() += 1;
        m
    })
}

/// Once every instance has seen the sessions, their next plans (within 250 ms, made on
/// a blocking thread) place them for good: pass again until two passes agree.
async fn settled(c: &reqwest::Client, routers: &[RunningRouter], sessions: usize) {
    let mut last = serve(c, routers, sessions, 1).await;
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = serve(c, routers, sessions, 1).await;
        if now == last && now.iter().all(|seen| seen.len() == 1) {
            return;
        }
        last = now;
    }
    panic!("the instances' plans did not settle: {last:?}");
}

#[tokio::test]
async fn three_instances_agree_on_every_home_and_spread_few_sessions_evenly() {
    let replicas = mocks(4).await;
    let routers = instances(&replicas, 3, SessionSpread::Even).await;
    let c = client();
    settled(&c, &routers, 64).await;
    let served = serve(&c, &routers, 64, 2).await;
    let agreed = single_homes(&served);
    let spread = per_replica(&agreed);
    assert_eq!(
        spread.values().copied().collect::<Vec<_>>(),
        [16; 4],
        "64 sessions on 4 replicas: {spread:?}"
    );

    // Hashed one by one, the same sessions are not even: what the census is for.
    let hashed = instances(&replicas, 1, SessionSpread::Hash).await;
    let spread = per_replica(&single_homes(&homes_of(&c, &hashed, 64).await));
    assert_ne!(spread.values().copied().collect::<Vec<_>>(), [16; 4], "{spread:?}");

    // An instance started now computes the same homes once it has seen the sessions.
    let late = instances(&replicas, 1, SessionSpread::Even).await;
    settled(&c, &late, 64).await;
    assert_eq!(single_homes(&serve(&c, &late, 64, 1).await), agreed, "the late instance agrees");
}

async fn homes_of(
    c: &reqwest::Client,
    routers: &[RunningRouter],
    sessions: usize,
) -> Vec<BTreeMap<String, usize>> {
    serve(c, routers, sessions, 1).await
}

#[tokio::test]
async fn an_overloaded_engine_sends_its_sessions_to_the_same_next_replica_from_every_instance() {
    let replicas = mocks(4).await;
    replicas.iter().for_each(|r| r.set_engine_running(Some(10)));
    let routers = instances(&replicas, 3, SessionSpread::Even).await;
    let c = client();
    settled(&c, &routers, 32).await;
    let before = single_homes(&serve(&c, &routers, 32, 1).await);
    let on_r0: Vec<usize> = (0..32).filter(|&s| before[s] == "r0").collect();
    assert!(!on_r0.is_empty());

    let overloaded = |routers: &[RunningRouter], want: bool| {
        routers.iter().all(|r| r.registry.get(0).engine.is_overloaded() == want)
    };
    // r0's engine reports 40 running against 10 elsewhere: mean 17.5, the bound 30.25.
    replicas[0].set_engine_running(Some(40));
    eventually("every instance reads r0 as overloaded", || overloaded(&routers, true)).await;
    let during = single_homes(&serve(&c, &routers, 32, 1).await);
    let mut moved_to = HashMap::new();
    for s in 0..32 {
        if on_r0.contains(&s) {
            assert_ne!(during[s], "r0", "session {s} stayed on the overloaded engine");
            *moved_to.entry(during[s].clone()).or_insert(0) += 1;
        } else {
            assert_eq!(during[s], before[s], "session {s} moved though its home is fine");
        }
    }

    // 22 against 10: mean 13, entering at 23.5, leaving at 18.25: within the band, r0
    // stays overloaded and its sessions stay where they went.
    replicas[0].set_engine_running(Some(22));
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert!(overloaded(&routers, true), "hysteresis keeps r0 overloaded within the band");
    assert_eq!(single_homes(&serve(&c, &routers, 32, 1).await), during);

    replicas[0].set_engine_running(Some(10));
    eventually("every instance reads r0 as fine again", || overloaded(&routers, false)).await;
    assert_eq!(single_homes(&serve(&c, &routers, 32, 1).await), before, "r0's sessions come back");
    let text = routers[0].metrics.render();
    assert!(text.contains("router_engine_load{kind=\"overloaded\",replica=\""), "the reading is exported");
}

#[tokio::test]
async fn an_instance_shutting_down_says_draining_while_it_still_serves() {
    let replicas = mocks(2).await;
    let mut cfg = config(&replicas);
    cfg.shutdown_delay = Duration::from_millis(600);
    let instance = router(cfg).await;
    let c = client();
    let url = base(&instance);
    assert_eq!(c.get(format!("{url}/health")).send().await.unwrap().status(), 200);
    let stopping = tokio::spawn(instance.shutdown());
    tokio::time::sleep(Duration::from_millis(150)).await;
    // The load balancer sees it leave; a request that still comes is served.
    let health = c.get(format!("{url}/health")).send().await.unwrap();
    assert_eq!(health.status(), 503);
    let health: serde_json::Value = serde_json::from_slice(&health.bytes().await.unwrap()).unwrap();
    assert_eq!(health["status"], "draining");
    let body = json!({"model": "m", "prompt": "hi", "max_tokens": 4});
    let (status, _, _) = post(&c, &format!("{url}/v1/completions"), &body, &[]).await;
    assert_eq!(status, 200);
    stopping.await.unwrap();
    assert!(
        reqwest::Client::new().get(format!("{url}/health")).send().await.is_err(),
        "gone after the delay"
    );
}
