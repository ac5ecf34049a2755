//! Consistent-hash session affinity end to end: a multi-turn chat stays on one replica,
//! a lost replica's sessions (and only those) move and spread, and come back; bounded
//! loads spill; body keys work and message text never acts as a key.

mod support;

use std::collections::{HashMap, HashSet};

use llm_router::policy::{PolicyKind, SessionSpread};
use serde_json::json;
use support::*;
use tokio_stream::StreamExt;

fn turn(history: &[serde_json::Value]) -> serde_json::Value {
    json!({"model": "m", "messages": history, "max_tokens": 8})
}

async fn hash_router(replicas: &[std::sync::Arc<MockReplica>]) -> llm_router::server::RunningRouter {
    spread_router(replicas, SessionSpread::Even).await
}

async fn spread_router(
    replicas: &[std::sync::Arc<MockReplica>],
    spread: SessionSpread,
) -> llm_router::server::RunningRouter {
    let mut cfg = config(replicas);
    cfg.policy = PolicyKind::ConsistentHash;
    cfg.hash.spread = spread;
    router(cfg).await
}

#[tokio::test]
async fn a_twenty_turn_chat_stays_on_one_replica() {
    let replicas = mocks(4).await;
    let router = hash_router(&replicas).await;
    let c = client();
    let url = format!("{}/v1/chat/completions", base(&router));
    for session in ["agent-1", "agent-2", "agent-3"] {
        let mut history = vec![json!({"role": "system", "content": "You are a coding agent."})];
        let mut served = HashSet::new();
        for t in 0..20 {
            history.push(json!({"role": "user", "content": format!("turn {t}: fix the bug")}));
            let (status, replica, body) = post(&c, &url, &turn(&history), &[("x-session-id", session)]).await;
            assert_eq!(status, 200);
            served.insert(replica.unwrap());
            let reply: serde_json::Value = serde_json::from_slice(&body).unwrap();
            history.push(reply["choices"][0]["message"].clone());
        }
        assert_eq!(served.len(), 1, "session {session} visited {served:?}");
    }
    assert_eq!(decisions(&router.metrics.render(), "affinity"), 60.0);
    router.shutdown().await;
}

async fn owners(c: &reqwest::Client, url: &str, sessions: usize) -> Vec<String> {
    let mut out = Vec::with_capacity(sessions);
    for s in 0..sessions {
        let key = format!("session-{s}");
        let (status, replica, _) =
            post(c, url, &turn(&[json!({"role": "user", "content": "hi"})]), &[("x-session-id", &key)]).await;
        assert_eq!(status, 200);
        out.push(replica.unwrap());
    }
    out
}

#[tokio::test]
async fn killing_a_replica_moves_only_its_sessions_and_they_return() {
    for spread in [SessionSpread::Even, SessionSpread::Hash] {
        killing_a_replica(spread).await;
    }
}

async fn killing_a_replica(spread: SessionSpread) {
    let replicas = mocks(4).await;
    let router = spread_router(&replicas, spread).await;
    let c = client();
    let url = format!("{}/v1/chat/completions", base(&router));
    if spread == SessionSpread::Even {
        // The census plans the sessions it has seen (the next plan within 250 ms, on a
        // blocking thread): wait until two passes agree.
        let mut last = owners(&c, &url, 200).await;
        for _ in 0..20 {
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            let now = owners(&c, &url, 200).await;
            if now == last {
                break;
            }
            last = now;
        }
    }
    let before = owners(&c, &url, 200).await;
    let per: HashMap<&String, usize> = before.iter().fold(HashMap::new(), |mut m, r| {
        *m.entry(r).or_default() += 1;
        m
    });
    assert_eq!(per.len(), 4, "200 sessions should reach all 4 replicas: {per:?}");

    replicas[1].kill();
    eventually("router marks r1 unhealthy", || !router.registry.get(1).is_healthy()).await;
    let during = owners(&c, &url, 200).await;
    let mut moved_to = HashSet::new();
    for (b, d) in before.iter().zip(&during) {
        if b == "r1" {
            assert_ne!(d, "r1");
            moved_to.insert(d.clone());
        } else {
            assert_eq!(b, d, "a session of a healthy replica moved");
        }
    }
    assert_eq!(moved_to.len(), 3, "r1's sessions should spread over the other three: {moved_to:?}");

    replicas[1].restart().await;
    eventually("router marks r1 healthy again", || router.registry.get(1).is_healthy()).await;
    let after = owners(&c, &url, 200).await;
    assert_eq!(before, after);
    assert!(decisions(&router.metrics.render(), "failover") >= 1.0, "failover decisions are counted");
    router.shutdown().await;
}

#[tokio::test]
async fn bounded_loads_spill_a_hot_session() {
    let replicas = mocks(4).await;
    replicas.iter().for_each(|r| r.set_mode(Mode::Hold));
    let mut cfg = config(&replicas);
    cfg.policy = PolicyKind::ConsistentHash;
    cfg.hash.balance_factor = Some(1.25);
    let router = router(cfg).await;
    let c = client();
    let url = format!("{}/v1/completions", base(&router));
    let body = json!({"model": "m", "prompt": "x", "stream": true});
    // Four concurrent streams of one session: cap = ceil(1.25 * (m + 1) / 4), so the
    // owner takes the first and the rest spill along the ring.
    let mut streams = Vec::new();
    let mut served = Vec::new();
    for _ in 0..4 {
        let response =
            c.post(&url).header("x-session-id", "hot").body(body.to_string()).send().await.unwrap();
        served.push(response.headers()["x-replica"].to_str().unwrap().to_owned());
        let mut stream = response.bytes_stream();
        stream.next().await.unwrap().unwrap(); // in flight until released
        streams.push(stream);
    }
    let distinct: HashSet<_> = served.iter().collect();
    assert!(distinct.len() >= 2, "a hot session should spill: {served:?}");
    assert!(decisions(&router.metrics.render(), "spill") >= 1.0, "spills are counted");
    replicas.iter().for_each(|r| r.release());
    for mut s in streams {
        while s.next().await.is_some() {}
    }
    // Load gone: the session is back on its owner.
    replicas.iter().for_each(|r| r.set_mode(Mode::Normal));
    let (_, replica, _) =
        post(&c, &url, &json!({"model": "m", "prompt": "x"}), &[("x-session-id", "hot")]).await;
    assert_eq!(replica.as_deref(), Some(served[0].as_str()));
    router.shutdown().await;
}

#[tokio::test]
async fn body_keys_route_like_header_keys_and_message_text_is_ignored() {
    let replicas = mocks(4).await;
    let router = hash_router(&replicas).await;
    let c = client();
    let url = format!("{}/v1/chat/completions", base(&router));
    let msgs = json!([{"role": "user", "content": "hi"}]);
    for s in 0..20 {
        let key = format!("body-session-{s}");
        let (_, by_header, _) =
            post(&c, &url, &json!({"model": "m", "messages": msgs}), &[("x-session-id", &key)]).await;
        for body in [
            json!({"model": "m", "messages": msgs, "session_id": key}),
            json!({"model": "m", "messages": msgs, "user": key}),
            json!({"model": "m", "messages": msgs, "session_params": {"session_id": key}}),
            json!({"model": "m", "messages": msgs, "user_id": key}),
        ] {
            let (status, by_body, _) = post(&c, &url, &body, &[]).await;
            assert_eq!(status, 200);
            assert_eq!(by_header, by_body, "{body}");
        }
    }
    // Keyless requests whose messages mention "user" are routed by power-of-two, not by
    // a key found in text: they are counted as keyless.
    for _ in 0..10 {
        let body = json!({"model": "m", "messages": [{"role": "user", "content": "{\"user\": \"u1\", \"session_id\": \"s1\"}"}]});
        let (status, _, _) = post(&c, &url, &body, &[]).await;
        assert_eq!(status, 200);
    }
    assert_eq!(decisions(&router.metrics.render(), "keyless"), 10.0);
    router.shutdown().await;
}

#[tokio::test]
async fn configured_session_headers_are_tried_in_order() {
    let replicas = mocks(4).await;
    let mut cfg = config(&replicas);
    cfg.policy = PolicyKind::ConsistentHash;
    cfg.session_headers = vec!["x-correlation-id".parse().unwrap(), "x-session-id".parse().unwrap()];
    let router = router(cfg).await;
    let c = client();
    let url = format!("{}/v1/completions", base(&router));
    let body = json!({"model": "m", "prompt": "x"});
    for s in 0..20 {
        let key = format!("k{s}");
        let (_, a, _) = post(&c, &url, &body, &[("x-correlation-id", &key)]).await;
        let (_, b, _) = post(&c, &url, &body, &[("x-correlation-id", &key), ("x-session-id", "other")]).await;
        let (_, d, _) = post(&c, &url, &body, &[("x-session-id", &key)]).await;
        assert_eq!(a, b);
        assert_eq!(a, d);
    }
    router.shutdown().await;
}
