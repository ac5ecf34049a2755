//! Per-request routing costs: finding the routing facts and key, snapshotting the
//! replicas, and each policy's decision, for a fleet of 8 replicas; for `prefix-aware`,
//! the whole decision for an agentic prompt of the study's mean size (37k tokens,
//! ~150 kB of chat JSON) against an index holding 64 such conversations; for `kv-aware`,
//! the same with the prompt tokenised in the router: a new turn of a session whose
//! earlier turns were seen (the segment cache holds them), and a prompt never seen.
//! Before the criterion groups, the kv-aware per-turn routing cost is also sampled 2,000
//! times and its p50 / p99 / max printed (criterion reports means and medians only).
//!
//! Run: `cargo bench --bench routing`. Figures are reported in README.

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group};
use http::HeaderMap;
use llm_router::metrics::Metrics;
use std::sync::Arc;

use llm_router::ingress::request_facts;
use llm_router::ingress::routing_key::{KeyHeaders, RoutingKey};
use llm_router::policy::cache_index::{CacheIndex, IndexLimits};
use llm_router::policy::prompt_tokens::{BuiltinTokenizer, PromptTokenizer};
use llm_router::policy::{
    CacheScope, Candidate, HashOptions, Policy, PolicyKind, PolicyOptions, PolicyState,
};
use llm_router::replicas::{Registry, RegistryConfig, ReplicaUrl};

/// A chat body of about `bytes` bytes: many turns, as an agent sends.
fn chat_body(bytes: usize) -> Vec<u8> {
    let mut messages = vec![serde_json::json!({"role": "system", "content": "You are a coding agent."})];
    let mut size = 100;
    let mut turn = 0;
    while size < bytes {
        let content = format!("turn {turn}: {}", "fn main() { println!(\"hello\"); } ".repeat(8));
        size += content.len() + 40;
        messages.push(
            serde_json::json!({"role": if turn % 2 == 0 { "user" } else { "assistant" }, "content": content}),
        );
        turn += 1;
    }
    serde_json::json!({"model": "Qwen/Qwen3-0.6B-FP8", "messages": messages, "stream": true,
        "max_tokens": 256, "user": "agent-42"})
    .to_string()
    .into_bytes()
}

fn key_extraction(c: &mut Criterion) {
    let mut group = c.benchmark_group("key_extraction");
    let keys = KeyHeaders::default();
    let mut headers = HeaderMap::new();
    headers.insert("content-type", "application/json".parse().unwrap());
    headers.insert("authorization", "Bearer sk-123".parse().unwrap());
    headers.insert("x-session-id", "session-0123456789".parse().unwrap());
    group.bench_function("header", |b| b.iter(|| keys.find(black_box(&headers))));
    for size in [300, 8_000, 100_000] {
        let body = chat_body(size);
        group.throughput(Throughput::Bytes(body.len() as u64));
        group.bench_with_input(BenchmarkId::new("body_facts", body.len()), &body, |b, body| {
            b.iter(|| request_facts::parse_inference(black_box(body)).unwrap())
        });
    }
    group.finish();
}

fn names(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("http://10.0.0.{i}:8000")).collect()
}

fn policies(c: &mut Criterion) {
    let mut group = c.benchmark_group("policy_8_replicas");
    let candidates: Vec<Candidate> = (0..8)
        .map(|i| Candidate { eligible: true, in_flight: (i * 7) % 5, in_flight_tokens: 0, overloaded: false })
        .collect();
    let key = RoutingKey::from("session-0123456789".to_owned());
    for kind in [
        PolicyKind::RoundRobin,
        PolicyKind::Random,
        PolicyKind::PowerOfTwo,
        PolicyKind::LeastLoaded,
        PolicyKind::ConsistentHash,
    ] {
        let policy = kind.build(&names(8), &PolicyOptions::default(), &PolicyState::default());
        group.bench_function(policy.name(), |b| {
            b.iter(|| policy.choose(Some(black_box(&key)), black_box(&candidates)))
        });
    }
    let bounded_options = PolicyOptions {
        hash: HashOptions { virtual_nodes: 160, balance_factor: Some(1.25), ..HashOptions::default() },
        ..Default::default()
    };
    let bounded = PolicyKind::ConsistentHash.build(&names(8), &bounded_options, &PolicyState::default());
    group.bench_function("consistent-hash/bounded-1.25", |b| {
        b.iter(|| bounded.choose(Some(black_box(&key)), black_box(&candidates)))
    });
    // The default spread: the census's plan (64 sessions, then 100,000), made before
    // the measurement; a request looks its session up and records the sight.
    for sessions in [64usize, 100_000] {
        let even = PolicyOptions {
            hash: HashOptions { spread: llm_router::policy::SessionSpread::Even, ..HashOptions::default() },
            ..Default::default()
        };
        let state = PolicyState::default();
        let policy = PolicyKind::ConsistentHash.build(&names(8), &even, &state);
        let keys: Vec<RoutingKey> = (0..sessions).map(|i| RoutingKey::from(format!("session-{i}"))).collect();
        for k in &keys {
            let _ = policy.choose(Some(k), &candidates);
        }
        std::thread::sleep(std::time::Duration::from_millis(300));
        let planned = std::time::Instant::now();
        policy.choose(Some(&keys[0]), &candidates);
        eprintln!("census of {sessions} sessions planned in {:?}", planned.elapsed());
        let mut i = 0;
        group.bench_function(format!("consistent-hash/even-{sessions}-sessions"), |b| {
            b.iter(|| {
                i = (i + 1) % sessions;
                policy.choose(Some(black_box(&keys[i])), black_box(&candidates))
            })
        });
    }
    let plain =
        PolicyKind::ConsistentHash.build(&names(8), &PolicyOptions::default(), &PolicyState::default());
    let owner = plain.choose(Some(&key), &candidates).unwrap().replica;
    let mut failover = candidates.clone();
    failover[owner].eligible = false;
    group.bench_function("consistent-hash/owner-down", |b| {
        b.iter(|| plain.choose(Some(black_box(&key)), black_box(&failover)))
    });
    group.finish();

    let urls = names(8).iter().map(|n| ReplicaUrl::parse(n).unwrap()).collect();
    let registry = Registry::new(urls, RegistryConfig::default(), std::sync::Arc::new(Metrics::new()));
    for r in registry.replicas() {
        registry.record(&r, true);
    }
    c.bench_function("registry_snapshot_8_replicas", |b| {
        b.iter(|| registry.fleet().candidates(Some(black_box("any-model")), &[]).unwrap())
    });
}

/// The `messages` JSON of an agentic conversation: a 48 kB prefix shared by every
/// session (the study's 12k shared tokens), then the session's own turns up to `bytes`.
fn agentic_messages(session: usize, bytes: usize) -> Vec<u8> {
    let shared: String = (0..1200).map(|i| format!("tool spec {i:04}: read_file(path) ")).collect();
    let mut messages = vec![serde_json::json!({"role": "system", "content": shared})];
    let mut size = 48_000;
    let mut turn = 0;
    while size < bytes {
        let content = format!("session {session} turn {turn}: {}", "let x = compute(y); ".repeat(100));
        size += content.len() + 40;
        messages.push(
            serde_json::json!({"role": if turn % 2 == 0 { "user" } else { "assistant" }, "content": content}),
        );
        turn += 1;
    }
    serde_json::to_vec(&messages).unwrap()
}

fn prefix_aware(c: &mut Criterion) {
    let state =
        PolicyState { index: Some(Arc::new(CacheIndex::new(IndexLimits::default()))), ..Default::default() };
    let policy = PolicyKind::PrefixAware.build(&names(8), &PolicyOptions::default(), &state);
    let idle: Vec<Candidate> = (0..8)
        .map(|i| Candidate { eligible: true, in_flight: (i * 7) % 5, in_flight_tokens: 0, overloaded: false })
        .collect();
    // 64 conversations already placed, each one turn shorter than the one measured.
    for session in 0..64 {
        let earlier = agentic_messages(session, 140_000);
        let blocks = policy.prompt_blocks(CacheScope::model("m"), &earlier).unwrap();
        policy.choose_for_prompt(None, &blocks, &idle).unwrap();
    }
    let prompt = agentic_messages(7, 150_000);
    let mut group = c.benchmark_group("prefix_aware_8_replicas");
    group.throughput(Throughput::Bytes(prompt.len() as u64));
    group.bench_function("hash_prompt_150kB", |b| {
        b.iter(|| policy.prompt_blocks(CacheScope::model("m"), black_box(&prompt)))
    });
    let blocks = policy.prompt_blocks(CacheScope::model("m"), &prompt).unwrap();
    group.bench_function("choose_150kB", |b| {
        b.iter(|| policy.choose_for_prompt(None, black_box(&blocks), black_box(&idle)))
    });
    group.finish();
}

/// A kv-aware policy over 8 replicas whose caches hold 64 conversations one turn shorter
/// than the ones measured, and the request to route: session 7's next turn.
fn kv_aware_setup() -> (Box<dyn Policy>, Vec<Candidate>) {
    let index =
        Arc::new(CacheIndex::new(IndexLimits { blocks_per_replica: 1 << 20, ..IndexLimits::default() }));
    let state = PolicyState {
        index: Some(index),
        tokenizer: Some(Arc::new(PromptTokenizer::Builtin(BuiltinTokenizer::new(16 << 20)))),
        ..Default::default()
    };
    let policy = PolicyKind::KvAware.build(&names(8), &PolicyOptions::default(), &state);
    let idle: Vec<Candidate> = (0..8)
        .map(|i| Candidate {
            eligible: true,
            in_flight: (i * 7) % 5,
            in_flight_tokens: ((i * 7) % 5) * 30_000,
            overloaded: false,
        })
        .collect();
    for session in 0..64 {
        let earlier = agentic_messages(session, 148_000);
        let blocks = policy.prompt_blocks(CacheScope::model("m"), &earlier).unwrap();
        let decision = policy.choose_for_prompt(None, &blocks, &idle).unwrap();
        policy.routed(None, &blocks, decision);
    }
    (policy, idle)
}

/// Session 7's conversation with a new last message (`n` makes it unique, as a real
/// turn's new content is).
fn next_turn(n: usize) -> Vec<u8> {
    let mut messages: Vec<serde_json::Value> = serde_json::from_slice(&agentic_messages(7, 148_000)).unwrap();
    messages.push(serde_json::json!({"role": "user", "content": format!("turn {n}: {}", "cargo test -- --nocapture; ".repeat(60))}));
    serde_json::to_vec(&messages).unwrap()
}

fn kv_aware(c: &mut Criterion) {
    let (policy, idle) = kv_aware_setup();
    let prompt = next_turn(0);
    let tokens = policy.prompt_blocks(CacheScope::model("m"), &prompt).unwrap().tokens;
    let mut group = c.benchmark_group(format!("kv_aware_8_replicas_{}k_tokens", tokens / 1000));
    group.throughput(Throughput::Bytes(prompt.len() as u64));
    let mut n = 1;
    group.bench_function("route_new_turn", |b| {
        b.iter_batched(
            || {
                n += 1;
                next_turn(n)
            },
            |prompt| {
                let blocks = policy.prompt_blocks(CacheScope::model("m"), &prompt).unwrap();
                let decision = policy.choose_for_prompt(None, &blocks, &idle).unwrap();
                policy.routed(None, &blocks, decision)
            },
            criterion::BatchSize::LargeInput,
        )
    });
    group.bench_function("tokenize_unseen_prompt", |b| {
        b.iter_batched(
            || BuiltinTokenizer::new(16 << 20),
            |tokenizer| tokenizer.tokens(black_box(&prompt)).unwrap().len(),
            criterion::BatchSize::LargeInput,
        )
    });
    group.finish();
}

/// p50 / p99 / max of the whole kv-aware decision (tokenise, key, choose) for a new turn.
fn kv_aware_percentiles() {
    let (policy, idle) = kv_aware_setup();
    let prompts: Vec<Vec<u8>> = (0..2_000).map(|n| next_turn(10_000 + n)).collect();
    let mut samples: Vec<std::time::Duration> = prompts
        .iter()
        .map(|prompt| {
            let started = std::time::Instant::now();
            let blocks = policy.prompt_blocks(CacheScope::model("m"), prompt).unwrap();
            let decision = policy.choose_for_prompt(None, &blocks, &idle).unwrap();
            black_box(policy.routed(None, &blocks, decision));
            started.elapsed()
        })
        .collect();
    samples.sort();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q) as usize];
    let tokens = policy.prompt_blocks(CacheScope::model("m"), &prompts[0]).unwrap().tokens;
    println!(
        "kv_aware route_new_turn ({tokens} tokens, {} kB), {} samples: p50 {:?}, p99 {:?}, max {:?}",
        prompts[0].len() / 1000,
        samples.len(),
        at(0.5),
        at(0.99),
        at(1.0)
    );
}

criterion_group!(benches, key_extraction, policies, prefix_aware, kv_aware);

fn main() {
    // Only when benchmarking (not when cargo lists or tests the benches).
    if std::env::args().any(|a| a == "--bench") {
        kv_aware_percentiles();
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
