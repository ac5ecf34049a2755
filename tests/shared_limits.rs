//! Per-key limits shared by several router instances through a real `redis-server`
//! (`--state-store`), on 127.0.0.1: three instances together grant a key its limit, not
//! three times it; with the store gone each falls back to its share
//! (`--router-instances`) and says so in its metrics, and finds the store again when it
//! is back; a store that never answers, or answers nonsense, costs a request at most the
//! store timeout, never a hang or an error.
//!
//! Skipped without `redis-server` unless `REQUIRE_REDIS=1` (`bash .ci/packages.sh`
//! installs it).

mod support;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use llm_router::admission::load_api_keys_file;
use llm_router::config::{KeySource, RouterConfig, StateStoreConfig};
use llm_router::replicas::ReplicaUrl;
use llm_router::server::RunningRouter;
use llm_router::state_store::Target;
use serde_json::json;
use support::redis::RedisServer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use vllm_sim::{self as sim, RunningSim, SimConfig};

const MODEL: &str = "Qwen/Qwen3-0.6B-FP8";
const KEY: &str = "sk-shared-test";

fn keys_file(name: &str, limits: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("llm-router-shared-limits-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("keys.toml");
    std::fs::write(&path, format!("[[keys]]\nname = \"team-a\"\nkey = \"{KEY}\"\n{limits}\n")).unwrap();
    path
}

fn store(url: &str, instances: u32, timeout: Duration) -> StateStoreConfig {
    let mut target = Target::parse(url).unwrap();
    target.connect_timeout = Duration::from_millis(500);
    StateStoreConfig { target, timeout, prefix: format!("test-{}:", fastrand::u64(..)), instances }
}

/// `n` router instances in front of one fast simulated replica, each keeping the keys'
/// limits in `store` (or alone, when None).
async fn routers(
    n: usize,
    keys: &std::path::Path,
    store: Option<StateStoreConfig>,
) -> (Vec<RunningSim>, Vec<RunningRouter>) {
    let sims = sim::start_fleet(1, &SimConfig { time_scale: 50.0, ..SimConfig::default() }).await.unwrap();
    let mut routers = Vec::new();
    for _ in 0..n {
        let mut config = RouterConfig::new(vec![ReplicaUrl::parse(&sims[0].url()).unwrap()]);
        config.api_keys = load_api_keys_file(keys).unwrap();
        config.key_source = KeySource::from_file(keys.to_path_buf());
        config.state_store = store.clone();
        routers.push(llm_router::server::start(config).await.unwrap());
    }
    (sims, routers)
}

async fn complete(addr: std::net::SocketAddr, max_tokens: u32) -> u16 {
    reqwest::Client::new()
        .post(format!("http://{addr}/v1/completions"))
        .header("authorization", format!("Bearer {KEY}"))
        .header("content-type", "application/json")
        .body(json!({"model": MODEL, "prompt": "hello", "max_tokens": max_tokens}).to_string())
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// `per_router` requests at once on every router; how many were granted (200), with
/// every other answer a 429.
async fn burst(routers: &[RunningRouter], per_router: usize, max_tokens: u32) -> usize {
    let mut calls = tokio::task::JoinSet::new();
    for router in routers {
        for _ in 0..per_router {
            calls.spawn(complete(router.addr, max_tokens));
        }
    }
    let mut granted = 0;
    while let Some(status) = calls.join_next().await {
        match status.unwrap() {
            200 => granted += 1,
            429 => {}
            other => panic!("a keyed request got {other}"),
        }
    }
    granted
}

async fn metric(router: &RunningRouter, name: &str) -> f64 {
    let text = reqwest::Client::new()
        .get(format!("http://{}/metrics", router.addr))
        .header("authorization", format!("Bearer {KEY}"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .filter(|line| line.starts_with(name) && line[name.len()..].starts_with([' ', '{']))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Wait (at most `limit`) until every router's `router_state_store_up` reads `want`.
async fn store_up(routers: &[RunningRouter], want: f64, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let mut all = true;
        for router in routers {
            all &= metric(router, "router_state_store_up").await == want;
        }
        if all {
            return;
        }
        assert!(Instant::now() < deadline, "router_state_store_up did not read {want} within {limit:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The most a per-minute limit can grant in `elapsed`: a full minute's allowance, what
/// refilled since, and one request's allowance for the boundary.
fn bound(per_minute: f64, elapsed: Duration, one: f64) -> f64 {
    per_minute + per_minute * elapsed.as_secs_f64() / 60.0 + one
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_instances_together_grant_a_key_its_requests_per_minute() {
    let Some(redis) = RedisServer::start().await else { return };
    let keys = keys_file("rpm", "requests_per_minute = 30");
    let (_sims, shared) = routers(3, &keys, Some(store(&redis.url(), 3, Duration::from_millis(500)))).await;
    store_up(&shared, 1.0, Duration::from_secs(5)).await;
    let started = Instant::now();
    let granted = burst(&shared, 30, 2).await;
    let most = bound(30.0, started.elapsed(), 1.0);
    eprintln!(
        "3 instances, one store: {granted} of 90 granted (limit 30 a minute) in {:?}",
        started.elapsed()
    );
    assert!(
        granted >= 30 && granted as f64 <= most,
        "3 instances sharing the store granted {granted} of 90 (limit 30, at most {most:.1})"
    );
    for router in &shared {
        assert_eq!(metric(router, "router_state_store_fallbacks_total").await, 0.0);
        assert!(metric(router, "router_state_store_seconds_count").await > 0.0);
    }

    // Without the store, each instance holds the key to its whole limit: 3 times it.
    let (_sims, alone) = routers(3, &keys, None).await;
    assert_eq!(burst(&alone, 30, 2).await, 90, "per instance, as documented");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_instances_together_hold_a_key_to_its_tokens_per_minute() {
    let Some(redis) = RedisServer::start().await else { return };
    // Each request reserves its prompt (2 tokens estimated) and 98 of output: 100.
    let keys = keys_file("tpm", "tokens_per_minute = 3000");
    let config = store(&redis.url(), 3, Duration::from_millis(500));
    let (_sims, shared) = routers(3, &keys, Some(config.clone())).await;
    store_up(&shared, 1.0, Duration::from_secs(5)).await;
    let started = Instant::now();
    let granted = burst(&shared, 20, 98).await;
    let most = bound(3000.0, started.elapsed(), 100.0) / 100.0;
    eprintln!("3 instances, one store: {granted} of 60 granted (3,000 tokens a minute, 100 each)");
    assert!(
        granted >= 25 && granted as f64 <= most,
        "granted {granted} of 60 (3,000 tokens / 100, at most {most:.1})"
    );

    // Each response settled in the store what it used (the engines' usage) against
    // its reservation: the bucket holds 3,000 less what was used, plus what refilled.
    let mut used = 0.0;
    for router in &shared {
        used += metric(router, "router_key_tokens_total{key=\"team-a\",kind=\"prompt\"}").await;
        used += metric(router, "router_key_tokens_total{key=\"team-a\",kind=\"completion\"}").await;
    }
    assert!(used > 0.0);
    let hash = format!("{}team-a", config.prefix);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let reply = redis.command(&["HGET", &hash, "tl"]).await.unwrap();
        let level: f64 = reply.lines().nth(1).and_then(|l| l.parse().ok()).unwrap_or(f64::NAN);
        let refilled = 3000.0 * started.elapsed().as_secs_f64() / 60.0;
        let expected = 3000.0 - used;
        if level >= expected - 0.5 && level <= expected + refilled + 0.5 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the store holds {level} tokens, not 3,000 - {used} used (+ up to {refilled:.1} refilled)"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_the_store_each_instance_keeps_its_share_and_finds_the_store_again() {
    let Some(mut redis) = RedisServer::start().await else { return };
    let keys = keys_file("fallback", "requests_per_minute = 30");
    let (_sims, routers) = routers(3, &keys, Some(store(&redis.url(), 3, Duration::from_millis(200)))).await;
    store_up(&routers, 1.0, Duration::from_secs(5)).await;

    redis.kill();
    store_up(&routers, 0.0, Duration::from_secs(5)).await;
    let started = Instant::now();
    let granted = burst(&routers, 30, 2).await;
    let most = 3.0 * bound(10.0, started.elapsed(), 1.0);
    assert!(
        granted >= 30 && granted as f64 <= most,
        "each of 3 instances on its 10-per-minute share granted {granted} in all"
    );
    let mut fallbacks = 0.0;
    for router in &routers {
        fallbacks += metric(router, "router_state_store_fallbacks_total").await;
    }
    assert_eq!(fallbacks, 90.0, "every admission while the store was away is counted");

    redis.restart().await;
    store_up(&routers, 1.0, Duration::from_secs(15)).await;
    // The store is empty again (nothing was saved): a fresh minute, shared.
    let granted = burst(&routers, 20, 2).await;
    assert!((30..=32).contains(&granted), "back on the store: granted {granted} of 60");
}

/// A store that completes the handshake and then does what `answer` says with each
/// command: nothing at all, or bytes of its choosing.
async fn fake_store(answer: &'static [u8]) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("redis://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else { return };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                loop {
                    let Ok(n) = stream.read(&mut buf).await else { return };
                    if n == 0 {
                        return;
                    }
                    let text = String::from_utf8_lossy(&buf[..n]).to_string();
                    let reply: Vec<u8> = if text.contains("SCRIPT") {
                        // One SHA per SCRIPT LOAD in this read.
                        let loads = text.matches("SCRIPT").count();
                        format!("$40\r\n{}\r\n", "a".repeat(40)).repeat(loads).into_bytes()
                    } else {
                        answer.to_vec()
                    };
                    if stream.write_all(&reply).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    url
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_store_that_never_answers_or_answers_nonsense_costs_a_timeout_not_a_hang() {
    let keys = keys_file("hostile", "requests_per_minute = 1000");
    for (case, answer) in [
        ("silent", &b""[..]),
        ("a bulk string of 4 GB", &b"$4294967296\r\n"[..]),
        ("an unknown reply type", &b"!oops\r\n"[..]),
        ("a script error", &b"-ERR the script broke\r\n"[..]),
        ("a reply of the wrong shape", &b"+OK\r\n"[..]),
    ] {
        let url = fake_store(answer).await;
        let (_sims, routers) = routers(1, &keys, Some(store(&url, 2, Duration::from_millis(150)))).await;
        store_up(&routers, 1.0, Duration::from_secs(5)).await;
        let started = Instant::now();
        let granted = burst(&routers, 20, 2).await;
        assert_eq!(granted, 20, "{case}: each request decided by this instance's share (500 a minute)");
        assert!(started.elapsed() < Duration::from_secs(10), "{case}: took {:?}", started.elapsed());
        let errors = metric(&routers[0], "router_state_store_errors_total").await;
        let fallbacks = metric(&routers[0], "router_state_store_fallbacks_total").await;
        assert!(errors >= 1.0 && fallbacks == 20.0, "{case}: {errors} errors, {fallbacks} fallbacks");
    }
}
