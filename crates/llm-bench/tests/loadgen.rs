//! The load generator (`llm-bench`) against simulated replicas on 127.0.0.1, directly
//! and through the router: exact token accounting, the per-token timings, the warm-up
//! split, agentic sessions that keep their replica and send each response back, failures
//! counted as failures, and the binary's JSON result keys.

use std::sync::Arc;
use std::time::Duration;

use http::HeaderName;
use llm_bench::client::{Client, Spread, parse_base};
use llm_bench::progress::Progress;
use llm_bench::random::RandomWorkload;
use llm_bench::report;
use llm_bench::runner::{self, Limit, Pacing, SessionWork, Work};
use llm_bench::trace::{self, TraceSession};
use llm_router::config::RouterConfig;
use llm_router::policy::PolicyKind;
use llm_router::replicas::ReplicaUrl;
use serde_json::Value;
use vllm_sim::faults::FaultConfig;
use vllm_sim::{self as sim, RunningSim, SimConfig};

const MODEL: &str = "Qwen/Qwen3-0.6B-FP8";

async fn sims(n: usize) -> Vec<RunningSim> {
    sim::start_fleet(n, &SimConfig { time_scale: 20.0, ..SimConfig::default() }).await.unwrap()
}

fn client(bases: &[String], spread: Spread) -> Arc<Client> {
    let bases = bases.iter().map(|b| parse_base(b).unwrap()).collect();
    Arc::new(Client::new(bases, spread, HeaderName::from_static("x-correlation-id"), Duration::from_secs(30)))
}

fn random(isl: usize, osl: usize) -> Work {
    Work::Random(RandomWorkload { model: MODEL.into(), isl, osl, seed: 42, chat: false })
}

#[tokio::test]
async fn random_requests_are_counted_exactly_and_timed_per_token() {
    let fleet = sims(2).await;
    let bases: Vec<String> = fleet.iter().map(|s| s.url()).collect();
    let run = runner::run(
        client(&bases, Spread::RoundRobin),
        random(300, 12),
        Pacing::Concurrency(4),
        (Some(Limit::Requests(4)), Limit::Requests(10)),
        None,
        Arc::new(Progress::default()),
    )
    .await;
    assert_eq!((run.warmup.len(), run.recorded.len()), (4, 10));
    for o in &run.recorded {
        assert!(o.ok(), "{:?}", o.error);
        assert_eq!((o.prompt_tokens, o.output_tokens), (300, 12), "usage as the server counted it");
        assert_eq!(o.itl_us.len(), 11, "one gap between each of the 12 token events");
        assert!(o.ttft.unwrap() <= o.latency);
    }
    let m = report::summarize(&run.recorded, run.duration);
    assert_eq!(m["completed"], 10);
    assert_eq!(m["total_output_tokens"], 120);
    assert!(m["mean_tpot_ms"].as_f64().unwrap() > 0.0);
    assert!(
        fleet.iter().all(|s| s.state.log.entries().len() == 7),
        "round-robin split the 14 requests evenly"
    );
}

#[tokio::test]
async fn a_failing_replica_counts_as_failures_not_successes() {
    let fleet = sims(1).await;
    fleet[0].faults().set(FaultConfig { drop_after_tokens: Some(3), ..Default::default() });
    let run = runner::run(
        client(&[fleet[0].url()], Spread::RoundRobin),
        random(50, 10),
        Pacing::Concurrency(2),
        (None, Limit::Requests(4)),
        None,
        Arc::new(Progress::default()),
    )
    .await;
    assert_eq!(run.recorded.len(), 4);
    assert!(run.recorded.iter().all(|o| !o.ok()), "cut streams are failures");
    let m = report::summarize(&run.recorded, run.duration);
    assert_eq!((m["completed"].as_u64(), m["failed"].as_u64()), (Some(0), Some(4)));
    fleet[0].faults().set(FaultConfig { fail_500: true, ..Default::default() });
    let run = runner::run(
        client(&[fleet[0].url()], Spread::RoundRobin),
        random(50, 10),
        Pacing::Concurrency(1),
        (None, Limit::Requests(1)),
        None,
        Arc::new(Progress::default()),
    )
    .await;
    assert!(run.recorded[0].error.as_deref().unwrap().starts_with("HTTP 500"), "{:?}", run.recorded[0].error);
}

/// A small trace in the study's shape: every session starts with the same 4 blocks
/// (a shared prefix), then its own; later turns add a block and wait a little.
fn small_trace() -> Vec<TraceSession> {
    let mut rows = String::new();
    for s in 0..6u64 {
        let own = 100 + s * 10;
        rows += &format!(
            "{{\"session_id\":\"sess-{s}\",\"input_length\":380,\"output_length\":8,\"hash_ids\":[0,1,2,3,{own},{}]}}\n",
            own + 1
        );
        for t in 0..3u64 {
            rows += &format!(
                "{{\"session_id\":\"sess-{s}\",\"input_length\":40,\"output_length\":6,\"hash_ids\":[{}],\"delay\":5.0}}\n",
                own + 2 + t
            );
        }
    }
    trace::read_trace(rows.as_bytes(), 64).unwrap()
}

#[tokio::test]
async fn trace_sessions_keep_their_replica_and_reuse_their_prefix() {
    let fleet = sims(3).await;
    let urls = fleet.iter().map(|s| ReplicaUrl::parse(&s.url()).unwrap()).collect();
    let mut config = RouterConfig::new(urls);
    config.policy = PolicyKind::ConsistentHash;
    // Pure affinity: the check below is that every turn of a session lands on one replica.
    config.hash.balance_factor = None;
    config.session_headers = vec![HeaderName::from_static("x-correlation-id")];
    let router = llm_router::server::start(config).await.unwrap();
    let sessions = small_trace();
    let work = SessionWork {
        sessions: Arc::new(sessions.clone()),
        model: MODEL.into(),
        block_size: 64,
        ramp: Duration::from_millis(30),
        time_scale: 20.0,
    };
    let run = runner::run(
        client(&[format!("http://{}", router.addr)], Spread::RoundRobin),
        Work::Sessions(work),
        Pacing::Concurrency(3),
        (None, Limit::Requests(usize::MAX)),
        None,
        Arc::new(Progress::default()),
    )
    .await;
    assert_eq!(run.recorded.len(), 24, "6 sessions x 4 turns");
    assert!(run.recorded.iter().all(|o| o.ok()), "{:?}", run.recorded.iter().find(|o| !o.ok()));
    assert!(run.recorded.iter().all(|o| o.output_tokens == 8 || o.output_tokens == 6));
    assert_eq!(run.sessions_started, 6);
    // Every request of a session went to one replica, with its session header.
    for session in &sessions {
        let holders: Vec<usize> = fleet
            .iter()
            .enumerate()
            .filter(|(_, s)| {
                s.state.log.entries().iter().any(|e| {
                    e.headers.iter().any(|(k, v)| k == "x-correlation-id" && v == &session.session_id)
                })
            })
            .map(|(i, _)| i)
            .collect();
        assert_eq!(holders.len(), 1, "{} went to {holders:?}", session.session_id);
    }
    // The engines saw the history come back whole (responses included) and the shared
    // blocks as one prefix: far more prompt tokens hit the cache than were computed.
    let counter = |name: &str| -> f64 {
        fleet
            .iter()
            .map(|s| {
                s.metrics()
                    .render()
                    .lines()
                    .find_map(|l| l.strip_prefix(name)?.rsplit(' ').next()?.parse::<f64>().ok())
                    .unwrap_or(0.0)
            })
            .sum()
    };
    let (hits, queries) =
        (counter("vllm:prefix_cache_hits_total"), counter("vllm:prefix_cache_queries_total"));
    assert!(hits > 0.6 * queries, "prefix hits {hits} of {queries}");
}

#[test]
fn the_binary_writes_vllm_bench_serve_keys() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let sim = runtime.block_on(sims(1)).remove(0);
    let dir = std::env::temp_dir().join(format!("llm-bench-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let result = dir.join("result.json");
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_llm-bench"))
        .args(["run", "--base-url", &sim.url(), "--isl", "64", "--osl", "4", "--max-concurrency", "2"])
        .args(["--num-prompts", "6", "--warmup-requests", "2", "--no-progress", "--label", "sim"])
        .arg("--result-file")
        .arg(&result)
        .output()
        .unwrap();
    assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
    let stdout = String::from_utf8_lossy(&status.stdout);
    assert!(stdout.contains("Serving Benchmark Result") && stdout.contains("Mean TTFT (ms):"), "{stdout}");
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&result).unwrap()).unwrap();
    for key in [
        "duration",
        "completed",
        "failed",
        "total_input_tokens",
        "total_output_tokens",
        "request_throughput",
        "output_throughput",
        "total_token_throughput",
        "mean_ttft_ms",
        "median_ttft_ms",
        "p90_ttft_ms",
        "p99_ttft_ms",
        "mean_tpot_ms",
        "p99_tpot_ms",
        "mean_itl_ms",
        "mean_e2el_ms",
        "p99_e2el_ms",
        "max_concurrency",
        "model_id",
        "date",
    ] {
        assert!(v.get(key).is_some(), "missing {key}");
    }
    assert_eq!(v["completed"], 6);
    assert_eq!(v["total_output_tokens"], 24);
    assert_eq!(v["total_input_tokens"], 6 * 64);
    assert_eq!(v["model_id"], MODEL);
    assert_eq!(v["warmup"]["completed"], 2);
    assert_eq!(v["label"], "sim");
    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_llm-bench"))
        .args(["run", "--base-url", "http://127.0.0.1:1", "--max-concurrency", "1", "--num-prompts", "1"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("error:"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn clients_that_hang_up_are_counted_apart_and_abort_upstream() {
    let fleet = sim::start_fleet(1, &SimConfig { time_scale: 1.0, ..SimConfig::default() }).await.unwrap();
    let bases = vec![parse_base(&fleet[0].url()).unwrap()];
    let cancel =
        llm_bench::client::Cancellation { fraction: 1.0, max_after: Duration::from_millis(100), seed: 1 };
    let client = Arc::new(
        Client::new(
            bases,
            Spread::RoundRobin,
            HeaderName::from_static("x-session-id"),
            Duration::from_secs(30),
        )
        .with_cancellation(Some(cancel)),
    );
    let run = runner::run(
        client,
        random(50, 2000),
        Pacing::Concurrency(4),
        (None, Limit::Requests(8)),
        None,
        Arc::new(Progress::default()),
    )
    .await;
    assert!(run.recorded.iter().all(|o| o.cancelled && !o.failed()));
    let m = report::summarize(&run.recorded, run.duration);
    assert_eq!(
        (m["completed"].as_u64(), m["failed"].as_u64(), m["cancelled"].as_u64()),
        (Some(0), Some(0), Some(8))
    );
    // The replica saw every one of them go: it aborted the generations.
    let aborted = || {
        fleet[0]
            .metrics()
            .render()
            .lines()
            .find_map(|l| l.strip_prefix("sim_requests_aborted_total ")?.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    for _ in 0..100 {
        if aborted() >= 8.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(aborted(), 8.0);
}
