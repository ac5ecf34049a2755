//! `--policy prefix-aware` end to end, without session ids: a growing conversation stays
//! where its prefix went, conversations sharing a long prefix are kept together, distinct
//! ones spread, an overloaded holder passes the excess on, and a lost replica's
//! conversations go elsewhere.

mod support;

use std::collections::{HashMap, HashSet};

use llm_router::policy::PolicyKind;
use serde_json::json;
use support::*;
use tokio_stream::StreamExt;

async fn prefix_router(replicas: &[std::sync::Arc<MockReplica>]) -> llm_router::server::RunningRouter {
    let mut cfg = config(replicas);
    cfg.policy = PolicyKind::PrefixAware;
    router(cfg).await
}

/// A system prompt of about 2 kB (8 blocks of 256 bytes), distinct per `name`.
fn system(name: &str) -> serde_json::Value {
    let text: String = (0..40).map(|i| format!("{name} rule {i}: be precise. ")).collect();
    json!({"role": "system", "content": text})
}

/// A conversation of `turns` turns on `system`, each turn sent with the whole history;
/// returns the replicas that served it.
async fn converse(c: &reqwest::Client, url: &str, system: serde_json::Value, turns: usize) -> Vec<String> {
    let mut history = vec![system];
    let mut served = Vec::new();
    for t in 0..turns {
        history.push(json!({"role": "user", "content": format!("turn {t}: fix the next bug please")}));
        let body = json!({"model": "m", "messages": history, "max_tokens": 8});
        let (status, replica, body) = post(c, url, &body, &[]).await;
        assert_eq!(status, 200);
        served.push(replica.unwrap());
        let reply: serde_json::Value = serde_json::from_slice(&body).unwrap();
        history.push(reply["choices"][0]["message"].clone());
    }
    served
}

#[tokio::test]
async fn conversations_stay_without_session_ids_and_distinct_ones_spread() {
    let replicas = mocks(4).await;
    let router = prefix_router(&replicas).await;
    let c = client();
    let url = format!("{}/v1/chat/completions", base(&router));
    let mut homes = HashMap::new();
    for agent in 0..8 {
        let served = converse(&c, &url, system(&format!("agent-{agent}")), 10).await;
        let distinct: HashSet<_> = served.iter().collect();
        assert_eq!(distinct.len(), 1, "agent {agent} moved: {served:?}");
        *homes.entry(served[0].clone()).or_insert(0) += 1;
    }
    // Eight distinct prefixes, each placed by its own leading blocks (a rendezvous hash,
    // the same on every router instance): they spread.
    assert!(homes.len() >= 2, "distinct prefixes should spread: {homes:?}");
    // Scraped over HTTP: the index sizes are read when /metrics is served.
    let text = c.get(format!("{}/metrics", base(&router))).send().await.unwrap().text().await.unwrap();
    assert_eq!(decisions(&text, "uncached"), 8.0, "one new prefix per agent");
    assert_eq!(decisions(&text, "cached"), 72.0, "every later turn follows its prefix");
    let blocks: f64 = (1..=4)
        .map(|i| {
            metric(&text, &format!("router_cache_index_blocks{{replica=\"{}\"}}", replicas[i - 1].url()))
        })
        .sum();
    assert!(blocks >= 8.0 * 8.0, "the index holds at least each system prompt: {blocks}");
    router.shutdown().await;
}

#[tokio::test]
async fn a_shared_long_prefix_keeps_requests_together() {
    let replicas = mocks(4).await;
    let router = prefix_router(&replicas).await;
    let c = client();
    let url = format!("{}/v1/chat/completions", base(&router));
    // Twelve conversations whose shared system prompt is most of their first request.
    let mut served = HashSet::new();
    for user in 0..12 {
        let body = json!({"model": "m", "messages": [system("shared"), {"role": "user", "content": format!("user {user}")}]});
        let (status, replica, _) = post(&c, &url, &body, &[]).await;
        assert_eq!(status, 200);
        served.insert(replica.unwrap());
    }
    assert_eq!(served.len(), 1, "a shared prefix should stay on one replica: {served:?}");
    router.shutdown().await;
}

#[tokio::test]
async fn an_overloaded_holder_passes_requests_on() {
    let replicas = mocks(4).await;
    let router = prefix_router(&replicas).await;
    let c = client();
    let url = format!("{}/v1/chat/completions", base(&router));
    let body =
        json!({"model": "m", "messages": [system("hot"), {"role": "user", "content": "go"}], "stream": true});
    let (_, home, _) = post(&c, &url, &json!({"model": "m", "messages": body["messages"]}), &[]).await;
    let home = home.unwrap();
    replicas.iter().for_each(|r| r.set_mode(Mode::Hold));
    // Ten concurrent streams of the same prompt: the holder takes them until it has
    // more than min + 4 in flight (the others idle), then they go elsewhere.
    let mut streams = Vec::new();
    let mut served = Vec::new();
    for _ in 0..10 {
        let response = c.post(&url).body(body.to_string()).send().await.unwrap();
        served.push(response.headers()["x-replica"].to_str().unwrap().to_owned());
        let mut stream = response.bytes_stream();
        stream.next().await.unwrap().unwrap(); // in flight until released
        streams.push(stream);
    }
    let at_home = served.iter().filter(|r| **r == home).count();
    assert_eq!(at_home, 5, "the holder takes 5 (0..=4 in flight) before it is overloaded: {served:?}");
    assert!(decisions(&router.metrics.render(), "overloaded") >= 1.0);
    replicas.iter().for_each(|r| r.release());
    for mut s in streams {
        while s.next().await.is_some() {}
    }
    router.shutdown().await;
}

#[tokio::test]
async fn a_lost_replicas_conversations_move_and_stay_moved() {
    let replicas = mocks(3).await;
    let router = prefix_router(&replicas).await;
    let c = client();
    let url = format!("{}/v1/chat/completions", base(&router));
    let first = converse(&c, &url, system("agent-x"), 2).await;
    let home = replicas.iter().position(|r| r.state.name == first[0]).unwrap();
    replicas[home].kill();
    eventually("router marks the home unhealthy", || !router.registry.get(home).is_healthy()).await;
    let after = converse(&c, &url, system("agent-x"), 4).await;
    assert!(after.iter().all(|r| *r == after[0] && *r != first[0]), "{first:?} then {after:?}");
    router.shutdown().await;
}

#[tokio::test]
async fn two_instances_without_shared_memory_place_every_conversation_alike() {
    let replicas = mocks(4).await;
    let (a, b) = (prefix_router(&replicas).await, prefix_router(&replicas).await);
    let c = client();
    let urls = [format!("{}/v1/chat/completions", base(&a)), format!("{}/v1/chat/completions", base(&b))];
    for agent in 0..8 {
        // Turns alternate between the instances: each knows only half of them.
        let mut history = vec![system(&format!("agent-{agent}"))];
        let mut served = HashSet::new();
        for t in 0..6 {
            history.push(json!({"role": "user", "content": format!("turn {t}: and the next bug")}));
            let body = json!({"model": "m", "messages": history, "max_tokens": 8});
            let (status, replica, body) = post(&c, &urls[(agent + t) % 2], &body, &[]).await;
            assert_eq!(status, 200);
            served.insert(replica.unwrap());
            let reply: serde_json::Value = serde_json::from_slice(&body).unwrap();
            history.push(reply["choices"][0]["message"].clone());
        }
        assert_eq!(served.len(), 1, "agent {agent} was served by {served:?}");
    }
    a.shutdown().await;
    b.shutdown().await;
}
