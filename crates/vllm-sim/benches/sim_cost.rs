//! What the simulator costs: 8 `vllm-sim` processes (real-time Qwen3-0.6B profile)
//! serve 8 x 32 concurrent streams of 500 tokens (ISL ~50, `ignore_eos`), driven from
//! this process. The simulators' CPU time is read from /proc before and after, so the
//! figure excludes the load driver. Reports CPU seconds per 1000 generated tokens and
//! the average number of cores the simulators used, and writes
//! `artifacts/sim_cost.json`.
//!
//! Run: `cargo bench --bench sim_cost` (or `bench-scripts/sim_cost.sh`).

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

const REPLICAS: usize = 8;
const STREAMS_PER_REPLICA: usize = 32;
const OUTPUT_TOKENS: usize = 500;
const WAVES: usize = 2;

fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which is in parentheses): utime is the 12th, stime the 13th.
    let rest = stat.rsplit_once(") ").map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    fields.get(11).and_then(|u| u.parse::<u64>().ok()).unwrap_or(0)
        + fields.get(12).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0)
}

struct Sims(Vec<Child>);

impl Drop for Sims {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return; // `cargo test --all-targets` builds this; only `cargo bench` runs it.
    }
    let base_port: u16 = 18_400;
    let sims = Sims(
        (0..REPLICAS)
            .map(|i| {
                Command::new(env!("CARGO_BIN_EXE_vllm-sim"))
                    .args(["--port", &(base_port + i as u16).to_string(), "--request-log-size", "0"])
                    .env("RUST_LOG", "warn")
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("start vllm-sim")
            })
            .collect(),
    );
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let client: Client<HttpConnector, Full<Bytes>> =
            Client::builder(TokioExecutor::new()).build(HttpConnector::new());
        for i in 0..REPLICAS {
            let uri: http::Uri = format!("http://127.0.0.1:{}/health", base_port + i as u16).parse().unwrap();
            for attempt in 0..200 {
                let req = http::Request::get(uri.clone()).body(Full::new(Bytes::new())).unwrap();
                if client.request(req).await.is_ok() {
                    break;
                }
                assert!(attempt < 199, "vllm-sim {i} did not start");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        let prompt =
            "Write a detailed explanation of how continuous batching works in an LLM engine. ".repeat(3);
        let before: u64 = sims.0.iter().map(|c| cpu_ticks(c.id())).sum();
        let started = Instant::now();
        let mut tokens = 0usize;
        for _ in 0..WAVES {
            let mut tasks = Vec::new();
            for i in 0..REPLICAS * STREAMS_PER_REPLICA {
                let client = client.clone();
                let port = base_port + (i % REPLICAS) as u16;
                let body =
                    serde_json::json!({"model": "Qwen/Qwen3-0.6B-FP8", "prompt": format!("{i} {prompt}"),
                    "max_tokens": OUTPUT_TOKENS, "ignore_eos": true, "stream": true})
                    .to_string();
                tasks.push(tokio::spawn(async move {
                    let req = http::Request::post(format!("http://127.0.0.1:{port}/v1/completions"))
                        .header("content-type", "application/json")
                        .body(Full::new(Bytes::from(body)))
                        .unwrap();
                    let mut body = client.request(req).await.unwrap().into_body();
                    let mut events = 0usize;
                    while let Some(frame) = body.frame().await {
                        if let Some(data) = frame.unwrap().data_ref() {
                            events += data.windows(6).filter(|w| w == b"data: ").count();
                        }
                    }
                    events - 1 // [DONE]
                }));
            }
            for t in tasks {
                tokens += t.await.unwrap();
            }
        }
        let wall = started.elapsed().as_secs_f64();
        let after: u64 = sims.0.iter().map(|c| cpu_ticks(c.id())).sum();
        let ticks_per_sec = 100.0; // USER_HZ on Linux
        let cpu = (after - before) as f64 / ticks_per_sec;
        let result = serde_json::json!({
            "benchmark": "sim_cost",
            "replicas": REPLICAS, "streams_per_replica": STREAMS_PER_REPLICA, "output_tokens": OUTPUT_TOKENS,
            "waves": WAVES, "generated_tokens": tokens, "wall_seconds": wall,
            "sim_cpu_seconds": cpu, "sim_cpu_seconds_per_1000_tokens": cpu / tokens as f64 * 1000.0,
            "sim_cores_used": cpu / wall,
            "commit": Command::new("git").args(["rev-parse", "HEAD"]).output().ok()
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned()),
            "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        });
        println!("{}", serde_json::to_string_pretty(&result).unwrap());
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../artifacts");
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(format!("{dir}/sim_cost.json"), serde_json::to_string_pretty(&result).unwrap())
            .unwrap();
    });
}
