//! `--policy kv-aware` end to end.
//!
//! Against an independent publisher (`tests/kv_publisher/publisher.py`: Python, pyzmq and
//! msgspec with vLLM's struct shapes, written apart from the simulator) in both of vLLM's
//! encodings: stored blocks attract a request whose token ids start with them, removed
//! and cleared blocks stop attracting, a sequence gap is filled from the replay endpoint
//! (and without one the replica's memory is forgotten), and a replica sent requests that
//! stays silent is forgotten. The publisher needs `target/kv-venv`
//! (`bench-scripts/kv_publisher_venv.sh`); CI makes it and sets `REQUIRE_KV_PUBLISHER=1`,
//! elsewhere its absence skips those tests with a message.
//!
//! Against the simulator (`router --sim N --policy kv-aware`, no other flag): growing
//! conversations without session ids stay where their KV is, distinct ones spread, the
//! engines' events fill the index, and a session key keeps a session's turns together.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::Duration;

use clap::Parser;
use llm_router::policy::PolicyKind;
use llm_router::policy::cache_index::FeedConfig;
use llm_router::policy::prompt_tokens::TokenizerSpec;
use serde_json::{Value, json};
use support::*;

fn publisher_python() -> Option<PathBuf> {
    let python = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/kv-venv/bin/python");
    if python.exists() {
        return Some(python);
    }
    if std::env::var("REQUIRE_KV_PUBLISHER").as_deref() == Ok("1") {
        panic!("{} is missing: run bench-scripts/kv_publisher_venv.sh", python.display());
    }
    eprintln!("skipped: {} is missing (bench-scripts/kv_publisher_venv.sh makes it)", python.display());
    None
}

/// One running publisher process.
struct Publisher {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    endpoint: String,
    replay: String,
}

impl Publisher {
    fn start(python: &PathBuf, encoding: &str, hashes: &str) -> Publisher {
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/kv_publisher/publisher.py");
        let mut child = Command::new(python)
            .arg(script)
            .args(["--encoding", encoding, "--hashes", hashes])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the publisher");
        let stdin = child.stdin.take().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        let hello: Value = serde_json::from_str(&line).expect("the publisher's endpoints");
        Publisher {
            child,
            stdin,
            stdout,
            endpoint: hello["endpoint"].as_str().unwrap().to_owned(),
            replay: hello["replay"].as_str().unwrap().to_owned(),
        }
    }

    /// Send one command; returns the batch's sequence number.
    fn send(&mut self, command: Value) -> u64 {
        writeln!(self.stdin, "{command}").unwrap();
        self.stdin.flush().unwrap();
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        serde_json::from_str::<Value>(&line).unwrap()["seq"].as_u64().unwrap()
    }

    fn stored(&mut self, hashes: &[u64], parent: Option<u64>, tokens: &[u32], skip: bool) -> u64 {
        self.send(json!({"op": "stored", "hashes": hashes, "parent": parent, "tokens": tokens, "skip": skip}))
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Distinct token ids: `blocks` blocks of 16 starting at `seed * 1000`.
fn tokens(seed: u32, blocks: usize) -> Vec<u32> {
    (0..(blocks * 16) as u32).map(|i| seed * 1000 + i).collect()
}

async fn scrape(c: &reqwest::Client, router: &llm_router::server::RunningRouter) -> String {
    c.get(format!("{}/metrics", base(router))).send().await.unwrap().text().await.unwrap()
}

/// Poll the router's metrics until `condition` holds on them (10 s at most).
async fn until_metrics(
    c: &reqwest::Client,
    router: &llm_router::server::RunningRouter,
    what: &str,
    condition: impl Fn(&str) -> bool,
) {
    for _ in 0..200 {
        if condition(&scrape(c, router).await) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for: {what}\n{}", scrape(c, router).await);
}

fn series(name: &str, replica: &str, extra: &str) -> String {
    if extra.is_empty() {
        format!("{name}{{replica=\"{replica}\"}}")
    } else {
        format!("{name}{{{extra},replica=\"{replica}\"}}")
    }
}

/// Route a completion whose prompt is these token ids; the mock that served it.
async fn route(c: &reqwest::Client, router: &llm_router::server::RunningRouter, ids: &[u32]) -> String {
    let body = json!({"model": "m", "prompt": ids, "max_tokens": 4});
    let (status, replica, _) = post(c, &format!("{}/v1/completions", base(router)), &body, &[]).await;
    assert_eq!(status, 200);
    replica.unwrap()
}

async fn publisher_router(
    replicas: &[std::sync::Arc<MockReplica>],
    publishers: &[&Publisher],
    replay: &[bool],
    silence: Duration,
) -> llm_router::server::RunningRouter {
    let mut cfg = config(replicas);
    cfg.policy = PolicyKind::KvAware;
    cfg.tokenizer = Some(std::sync::Arc::new(TokenizerSpec::Builtin.load(None, 1 << 20).unwrap()));
    let pair = |i: usize, endpoint: &str| (replicas[i].url(), endpoint.to_owned());
    cfg.kv_events = Some(FeedConfig {
        endpoints: publishers.iter().enumerate().map(|(i, p)| pair(i, &p.endpoint)).collect(),
        port: None,
        replay_endpoints: publishers
            .iter()
            .enumerate()
            .filter(|(i, _)| replay[*i])
            .map(|(i, p)| pair(i, &p.replay))
            .collect(),
        replay_port: None,
        topic: String::new(),
        silence,
        max_blocks: 1 << 16,
        limits: Default::default(),
    });
    router(cfg).await
}

/// Publish `AllBlocksCleared` until the router has applied one from each publisher (a SUB
/// socket's subscription reaches the PUB a moment after it connects).
async fn until_subscribed(
    c: &reqwest::Client,
    router: &llm_router::server::RunningRouter,
    replicas: &[std::sync::Arc<MockReplica>],
    publishers: &mut [&mut Publisher],
) {
    for (replica, publisher) in replicas.iter().zip(publishers.iter_mut()) {
        let applied = series("router_kv_event_batches_total", &replica.url(), "outcome=\"applied\"");
        let mut subscribed = false;
        for _ in 0..100 {
            publisher.send(json!({"op": "cleared"}));
            tokio::time::sleep(Duration::from_millis(50)).await;
            if metric(&scrape(c, router).await, &applied) >= 1.0 {
                subscribed = true;
                break;
            }
        }
        assert!(subscribed, "never subscribed to {}", replica.url());
    }
}

#[tokio::test]
async fn events_from_an_independent_publisher_steer_requests() {
    let Some(python) = publisher_python() else { return };
    let replicas = mocks(2).await;
    // r0 publishes the tagged-array encoding with integer hashes (vLLM 0.10/0.11), r1 the
    // map encoding with bytes hashes (later vLLM); only r1 has a replay endpoint.
    let mut p0 = Publisher::start(&python, "array", "int");
    let mut p1 = Publisher::start(&python, "map", "bytes");
    let router = publisher_router(&replicas, &[&p0, &p1], &[false, true], Duration::from_secs(60)).await;
    let c = client();
    let (r0, r1) = (replicas[0].url(), replicas[1].url());
    until_subscribed(&c, &router, &replicas, &mut [&mut p0, &mut p1]).await;
    let stored = |replica: &str| series("router_kv_event_blocks_total", replica, "kind=\"stored\"");
    let removed = |replica: &str| series("router_kv_event_blocks_total", replica, "kind=\"removed\"");

    // Stored blocks attract: 4 blocks on r1, the request has them and one token more.
    let t1 = tokens(1, 4);
    p1.stored(&[101, 102, 103, 104], None, &t1, false);
    until_metrics(&c, &router, "r1 stored 4", |m| metric(m, &stored(&r1)) >= 4.0).await;
    let mut ask = t1.clone();
    ask.push(7);
    assert_eq!(route(&c, &router, &ask).await, "r1");
    assert_eq!(decisions(&scrape(&c, &router).await, "cached"), 1.0);

    // A prompt stored as a parent and a child event on r0 (chained by the parent's hash).
    let t2 = tokens(2, 4);
    p0.stored(&[201, 202], None, &t2[..32], false);
    p0.stored(&[203, 204], Some(202), &t2[32..], false);
    until_metrics(&c, &router, "r0 stored 4", |m| metric(m, &stored(&r0)) >= 4.0).await;
    assert_eq!(route(&c, &router, &t2).await, "r0");
    assert_eq!(decisions(&scrape(&c, &router).await, "cached"), 2.0);

    // Removed blocks stop attracting: the next request with t1 matches nowhere.
    p1.send(json!({"op": "removed", "hashes": [101, 102, 103, 104]}));
    until_metrics(&c, &router, "r1 removed 4", |m| metric(m, &removed(&r1)) >= 4.0).await;
    route(&c, &router, &t1).await;
    assert_eq!(decisions(&scrape(&c, &router).await, "uncached"), 1.0);

    // Cleared blocks stop attracting.
    p0.send(json!({"op": "cleared"}));
    let cleared = series("router_kv_index_resets_total", &r0, "reason=\"cleared\"");
    let before = metric(&scrape(&c, &router).await, &cleared);
    p0.send(json!({"op": "cleared"}));
    until_metrics(&c, &router, "r0 cleared", |m| metric(m, &cleared) > before).await;
    route(&c, &router, &t2).await;
    assert_eq!(decisions(&scrape(&c, &router).await, "uncached"), 2.0);

    // A gap on r1 is filled from its replay endpoint: the batch never published
    // arrives by replay and its blocks attract.
    let t3 = tokens(3, 3);
    let t4 = tokens(4, 2);
    p1.stored(&[301, 302, 303], None, &t3, true);
    p1.stored(&[401, 402], None, &t4, false);
    let replayed = series("router_kv_event_batches_total", &r1, "outcome=\"replayed\"");
    until_metrics(&c, &router, "r1 replayed", |m| metric(m, &replayed) >= 1.0).await;
    let text = scrape(&c, &router).await;
    assert_eq!(metric(&text, &series("router_kv_event_gaps_total", &r1, "")), 1.0);
    assert_eq!(metric(&text, &series("router_kv_index_resets_total", &r1, "reason=\"gap\"")), 0.0);
    assert_eq!(route(&c, &router, &t3).await, "r1", "the replayed blocks attract");

    // A gap on r0, which has no replay endpoint: its memory is forgotten.
    let t5 = tokens(5, 2);
    p0.stored(&[501, 502], None, &t5, false);
    until_metrics(&c, &router, "r0 stored t5", |m| metric(m, &stored(&r0)) >= 6.0).await;
    p0.stored(&[601], None, &tokens(6, 1), true);
    p0.stored(&[701], None, &tokens(7, 1), false);
    let gap_reset = series("router_kv_index_resets_total", &r0, "reason=\"gap\"");
    until_metrics(&c, &router, "r0 reset after a gap", |m| metric(m, &gap_reset) >= 1.0).await;
    let uncached = decisions(&scrape(&c, &router).await, "uncached");
    route(&c, &router, &t5).await;
    assert_eq!(decisions(&scrape(&c, &router).await, "uncached"), uncached + 1.0);
    router.shutdown().await;
}

#[tokio::test]
async fn a_silent_replica_is_forgotten() {
    let Some(python) = publisher_python() else { return };
    let replicas = mocks(2).await;
    let mut p0 = Publisher::start(&python, "array", "int");
    let mut p1 = Publisher::start(&python, "array", "int");
    let router = publisher_router(&replicas, &[&p0, &p1], &[false, false], Duration::from_millis(500)).await;
    let c = client();
    until_subscribed(&c, &router, &replicas, &mut [&mut p0, &mut p1]).await;
    let r0 = replicas[0].url();
    let t = tokens(9, 4);
    p0.stored(&[1, 2, 3, 4], None, &t, false);
    let stored = series("router_kv_event_blocks_total", &r0, "kind=\"stored\"");
    until_metrics(&c, &router, "r0 stored", |m| metric(m, &stored) >= 4.0).await;
    assert_eq!(route(&c, &router, &t).await, "r0");
    // A prompt r0 holds whole brings its engine no new block to report: three silences
    // later, r0's quiet has not been taken for staleness.
    let silence = series("router_kv_index_resets_total", &r0, "reason=\"silence\"");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(metric(&scrape(&c, &router).await, &silence), 0.0, "a quiet engine is not silent");
    let cached = decisions(&scrape(&c, &router).await, "cached");
    assert_eq!(route(&c, &router, &t).await, "r0");
    assert_eq!(decisions(&scrape(&c, &router).await, "cached"), cached + 1.0);
    // A prompt with blocks r0 does not hold, and its engine publishes nothing: after the
    // silence r0's memory (including what the router noted on its own) is gone.
    let longer: Vec<u32> = t.iter().copied().chain(tokens(10, 2)).collect();
    assert_eq!(route(&c, &router, &longer).await, "r0");
    until_metrics(&c, &router, "r0 silent", |m| metric(m, &silence) >= 1.0).await;
    let uncached = decisions(&scrape(&c, &router).await, "uncached");
    route(&c, &router, &t).await;
    assert_eq!(decisions(&scrape(&c, &router).await, "uncached"), uncached + 1.0);
    router.shutdown().await;
}

async fn sim_router(extra: &[&str]) -> llm_router::server::RunningRouter {
    let mut args = vec!["router", "--host", "127.0.0.1", "--port", "0", "--sim", "4", "--policy", "kv-aware"];
    args.extend_from_slice(&["--sim-time-scale", "50"]);
    args.extend_from_slice(extra);
    let config = llm_router::config::Cli::parse_from(args).into_config().unwrap();
    router(config).await
}

/// A system prompt of about 600 tokens, distinct per `name`.
fn system(name: &str) -> Value {
    let text: String =
        (0..60).map(|i| format!("{name} rule {i}: state the error and its cause.\n")).collect();
    json!({"role": "system", "content": text})
}

#[tokio::test]
async fn simulated_conversations_stay_where_their_kv_is_without_session_ids() {
    let router = sim_router(&[]).await;
    let c = client();
    let model = router.sims[0].state.model.clone();
    let mut homes = std::collections::HashMap::new();
    // New conversations are placed by hash over the replicas' names (random ports here):
    // with 12 of them over 4 replicas, fewer than 3 homes happens 0.15% of the time by
    // chance (8 gave 2.3%, seen in CI).
    for agent in 0..12 {
        let mut history = vec![system(&format!("agent-{agent}"))];
        let mut served = Vec::new();
        for turn in 0..5 {
            history.push(json!({"role": "user", "content": format!("turn {turn}: run the tests again")}));
            let body = json!({"model": model, "messages": history, "max_tokens": 16});
            let (status, replica, body) = post_sim(&c, &router, &body, &[]).await;
            assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
            served.push(replica);
            let reply: Value = serde_json::from_slice(&body).unwrap();
            history.push(reply["choices"][0]["message"].clone());
        }
        assert!(served.iter().all(|r| *r == served[0]), "agent {agent} moved: {served:?}");
        *homes.entry(served[0].clone()).or_insert(0) += 1;
    }
    assert!(homes.len() >= 3, "distinct conversations should spread: {homes:?}");
    let text = scrape(&c, &router).await;
    assert_eq!(decisions(&text, "cached"), 48.0, "every later turn follows its KV: {text}");
    // The engines' own events filled the index.
    let stored: f64 = router
        .sims
        .iter()
        .map(|s| metric(&text, &series("router_kv_event_blocks_total", &s.url(), "kind=\"stored\"")))
        .sum();
    assert!(stored >= 8.0 * 30.0, "each system prompt's blocks were reported: {stored}");
    let cached = metric(&text, "router_routed_cached_tokens_total{policy=\"kv-aware\"}");
    let prompt = metric(&text, "router_routed_prompt_tokens_total{policy=\"kv-aware\"}");
    assert!(cached / prompt > 0.7, "expected cache hits {cached} / {prompt}");
    // The engines agree: their prefix cache served most of the prompts.
    let (mut hits, mut queries) = (0.0, 0.0);
    for sim in &router.sims {
        let m = c.get(format!("{}/metrics", sim.url())).send().await.unwrap().text().await.unwrap();
        hits += m
            .lines()
            .filter(|l| l.starts_with("vllm:prefix_cache_hits_total"))
            .filter_map(value)
            .sum::<f64>();
        queries += m
            .lines()
            .filter(|l| l.starts_with("vllm:prefix_cache_queries_total"))
            .filter_map(value)
            .sum::<f64>();
    }
    assert!(hits / queries > 0.6, "engine prefix cache hits {hits} / {queries}");
    router.shutdown().await;
}

fn value(line: &str) -> Option<f64> {
    line.rsplit(' ').next()?.parse().ok()
}

/// Responses per replica so far, from the router's `router_requests_total`.
async fn served(c: &reqwest::Client, router: &llm_router::server::RunningRouter) -> Vec<(String, f64)> {
    let text = scrape(c, router).await;
    router
        .sims
        .iter()
        .map(|s| {
            let url = s.url();
            let n = text
                .lines()
                .filter(|l| {
                    l.starts_with("router_requests_total{") && l.contains(&format!("replica=\"{url}\""))
                })
                .filter_map(value)
                .sum();
            (url, n)
        })
        .collect()
}

/// POST and return the status and which simulated replica served it.
async fn post_sim(
    c: &reqwest::Client,
    router: &llm_router::server::RunningRouter,
    body: &Value,
    headers: &[(&str, &str)],
) -> (u16, String, bytes::Bytes) {
    let before = served(c, router).await;
    let url = format!("{}/v1/chat/completions", base(router));
    let (status, _, body) = post(c, &url, body, headers).await;
    let after = served(c, router).await;
    let replica =
        before.iter().zip(&after).find(|(b, a)| a.1 > b.1).map(|(_, a)| a.0.clone()).unwrap_or_default();
    (status, replica, body)
}

#[tokio::test]
async fn a_session_key_keeps_turns_together_whatever_their_prompt() {
    let router = sim_router(&["--session-header", "x-session-id"]).await;
    let c = client();
    let model = router.sims[0].state.model.clone();
    let ask = |system: Value| json!({"model": model, "messages": [system, {"role": "user", "content": "go"}], "max_tokens": 4});
    let (_, home, _) = post_sim(&c, &router, &ask(system("first")), &[("x-session-id", "s1")]).await;
    // Unrelated prompts in the same session follow it ...
    for i in 0..4 {
        let (status, replica, _) =
            post_sim(&c, &router, &ask(system(&format!("other-{i}"))), &[("x-session-id", "s1")]).await;
        assert_eq!((status, &replica), (200, &home));
    }
    // ... and without the key they spread (each new prompt goes where least is held).
    // (8 of them over 4 replicas: all on one happens 0.006% of the time by chance; 4 gave
    // 1.6%.)
    let mut seen = std::collections::HashSet::new();
    for i in 0..8 {
        let (_, replica, _) = post_sim(&c, &router, &ask(system(&format!("free-{i}"))), &[]).await;
        seen.insert(replica);
    }
    assert!(seen.len() >= 2, "{seen:?}");
    assert_eq!(decisions(&scrape(&c, &router).await, "affinity"), 4.0);
    router.shutdown().await;
}
