//! P/D on an agentic workload: 1 prefill + 1 decode simulated replica against 2
//! collocated ones, with tokenize-once on and off, measured in one process.
//!
//! Workload (scaled down from the study's so a run takes seconds): 8 concurrent
//! sessions x 6 turns; each session starts from its own ~12k-token context (code files)
//! and adds ~400 new tokens per turn plus the previous answer; 100 output tokens per
//! turn (`ignore_eos`); a session id header on every request, so the collocated router
//! (consistent-hash) and the prefill stage keep each session on one replica. Real-time
//! Qwen3-0.6B profile. Each setup starts from fresh replicas and runs three times;
//! medians are reported. Also measured: the time to tokenise each decode prompt, which
//! tokenize-once saves the decode replica.
//!
//! Run: `cargo bench --bench pd_agentic`; writes `artifacts/pd_agentic.json`.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use llm_router::config::{PdConfig, RouterConfig};
use llm_router::policy::PolicyKind;
use llm_router::replicas::ReplicaUrl;
use serde_json::{Value, json};
use vllm_sim::tokenizer::{self, ChatMessage};
use vllm_sim::{self as sim, Role, RunningSim, SimConfig};

const SESSIONS: usize = 8;
const TURNS: usize = 6;
const CONTEXT_TOKENS: usize = 12_000;
const NEW_TOKENS: usize = 400;
const OUTPUT_TOKENS: usize = 100;
const RUNS: usize = 3;

type HttpClient = Client<HttpConnector, Full<Bytes>>;

fn text_of(tokens: usize, session: usize, salt: &str) -> String {
    let mut text = String::new();
    let mut i = 0;
    while tokenizer::encode(&text).len() < tokens {
        for _ in 0..50 {
            text.push_str(&format!(
                "// {salt} s{session} item {i}\nfn handler_{session}_{i}(req: &Request) -> Result<Response, Error> {{ route(req, {i}) }}\n"
            ));
            i += 1;
        }
    }
    text
}

#[derive(Default, Clone)]
struct Sample {
    ttft: f64,
    e2e: f64,
    tokens: usize,
}

async fn chat_turn(client: &HttpClient, base: &str, session: usize, messages: &[Value]) -> (Sample, String) {
    let body = json!({"model": "Qwen/Qwen3-0.6B-FP8", "messages": messages, "max_tokens": OUTPUT_TOKENS,
        "ignore_eos": true, "stream": true, "stream_options": {"include_usage": true}});
    let request = http::Request::post(format!("{base}/v1/chat/completions"))
        .header("content-type", "application/json")
        .header("x-session-id", format!("session-{session}"))
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let start = Instant::now();
    let response = client.request(request).await.unwrap();
    assert!(response.status().is_success(), "status {}", response.status());
    let mut body = response.into_body();
    let mut buffer = Vec::new();
    let mut sample = Sample::default();
    let mut text = String::new();
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame.unwrap().into_data() else { continue };
        buffer.extend_from_slice(&data);
        while let Some(end) = buffer.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = buffer.drain(..end + 2).collect();
            let Some(payload) = event.strip_prefix(b"data: ") else { continue };
            let Ok(chunk) = serde_json::from_slice::<Value>(payload) else { continue };
            if let Some(content) = chunk.pointer("/choices/0/delta/content").and_then(Value::as_str)
                && !content.is_empty()
            {
                if sample.ttft == 0.0 {
                    sample.ttft = start.elapsed().as_secs_f64();
                }
                text.push_str(content);
            }
            if let Some(n) = chunk.pointer("/usage/completion_tokens").and_then(Value::as_u64) {
                sample.tokens = n as usize;
            }
        }
    }
    sample.e2e = start.elapsed().as_secs_f64();
    (sample, text)
}

/// Run every session's turns against `base`; returns samples, wall time and the decode
/// prompts (rendered) for the tokenisation measurement.
async fn workload(base: &str, contexts: &[String], news: &[Vec<String>]) -> (Vec<Sample>, f64, Vec<String>) {
    let client: HttpClient = Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    let start = Instant::now();
    let tasks: Vec<_> = (0..SESSIONS)
        .map(|s| {
            let (client, base) = (client.clone(), base.to_owned());
            let (context, news) = (contexts[s].clone(), news[s].clone());
            tokio::spawn(async move {
                let mut messages = vec![json!({"role": "system", "content": context})];
                let mut samples = Vec::new();
                let mut prompts = Vec::new();
                for new in news.iter().take(TURNS) {
                    messages.push(json!({"role": "user", "content": new}));
                    let rendered: Vec<(String, String)> = messages
                        .iter()
                        .map(|m| {
                            (
                                m["role"].as_str().unwrap().to_owned(),
                                m["content"].as_str().unwrap().to_owned(),
                            )
                        })
                        .collect();
                    let chat: Vec<ChatMessage> =
                        rendered.iter().map(|(r, c)| ChatMessage { role: r, content: c }).collect();
                    prompts.push(tokenizer::render_chat(&chat, true));
                    let (sample, answer) = chat_turn(&client, &base, s, &messages).await;
                    messages.push(json!({"role": "assistant", "content": answer}));
                    samples.push(sample);
                }
                (samples, prompts)
            })
        })
        .collect();
    let mut samples = Vec::new();
    let mut prompts = Vec::new();
    for t in tasks {
        let (s, p) = t.await.unwrap();
        samples.extend(s);
        prompts.extend(p);
    }
    (samples, start.elapsed().as_secs_f64(), prompts)
}

fn urls(sims: &[RunningSim]) -> Vec<ReplicaUrl> {
    sims.iter().map(|s| ReplicaUrl::parse(&s.url()).unwrap()).collect()
}

fn real_time(role: Role) -> SimConfig {
    SimConfig { role, request_log_size: 0, ..SimConfig::default() }
}

/// One run of one setup on fresh replicas: (samples, wall seconds, decode prompts tokenised from text).
async fn run(setup: &str, contexts: &[String], news: &[Vec<String>]) -> (Vec<Sample>, f64, Vec<String>, f64) {
    let (router_config, decode) = match setup {
        "collocated_2" => {
            let fleet = sim::start_fleet(2, &real_time(Role::Both)).await.unwrap();
            let mut c = RouterConfig::new(urls(&fleet));
            c.policy = PolicyKind::ConsistentHash;
            (c, fleet)
        }
        _ => {
            let prefill = sim::start_fleet(1, &real_time(Role::Prefill)).await.unwrap();
            let decode = sim::start_fleet(1, &real_time(Role::Decode)).await.unwrap();
            let mut c = RouterConfig::new(urls(&decode));
            c.pd = Some(PdConfig {
                prefill: urls(&prefill),
                prefill_policy: PolicyKind::ConsistentHash,
                decode_policy: PolicyKind::PowerOfTwo,
                tokenize_once: setup == "pd_1p1d_tokenize_once",
                sim_prefill: 0,
            });
            std::mem::forget(prefill); // serve until the process ends
            (c, decode)
        }
    };
    let router = llm_router::server::start(router_config).await.unwrap();
    let (samples, wall, prompts) = workload(&format!("http://{}", router.addr), contexts, news).await;
    let tokenised: f64 = decode
        .iter()
        .map(|d| {
            d.metrics()
                .render()
                .lines()
                .find_map(|l| l.strip_prefix("sim_prompts_tokenized_total ")?.parse::<f64>().ok())
                .unwrap_or(0.0)
        })
        .sum();
    router.shutdown().await;
    drop(decode);
    (samples, wall, prompts, tokenised)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn summary(samples: &[Sample], wall: f64) -> Value {
    let n = samples.len() as f64;
    let mut ttfts: Vec<f64> = samples.iter().map(|s| s.ttft).collect();
    ttfts.sort_by(f64::total_cmp);
    let tpot: Vec<f64> =
        samples.iter().filter(|s| s.tokens > 1).map(|s| (s.e2e - s.ttft) / (s.tokens - 1) as f64).collect();
    let tokens: usize = samples.iter().map(|s| s.tokens).sum();
    json!({
        "requests": samples.len(),
        "mean_ttft_ms": ttfts.iter().sum::<f64>() / n * 1e3,
        "median_ttft_ms": ttfts[ttfts.len() / 2] * 1e3,
        "p90_ttft_ms": ttfts[(ttfts.len() * 9 / 10).min(ttfts.len() - 1)] * 1e3,
        "mean_tpot_ms": tpot.iter().sum::<f64>() / tpot.len().max(1) as f64 * 1e3,
        "request_throughput": n / wall,
        "output_throughput": tokens as f64 / wall,
    })
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return; // built by `cargo test --all-targets`, run only by `cargo bench`
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        tokenizer::warm_up();
        let contexts: Vec<String> = (0..SESSIONS).map(|s| text_of(CONTEXT_TOKENS, s, "context")).collect();
        let news: Vec<Vec<String>> =
            (0..SESSIONS).map(|s| (0..TURNS).map(|t| text_of(NEW_TOKENS, s, &format!("turn {t}"))).collect()).collect();
        let mut results = serde_json::Map::new();
        let mut decode_prompts = Vec::new();
        for setup in ["collocated_2", "pd_1p1d_tokenize_once", "pd_1p1d_text"] {
            let mut runs = Vec::new();
            let mut tokenised = 0.0;
            for _ in 0..RUNS {
                let (samples, wall, prompts, t) = run(setup, &contexts, &news).await;
                runs.push(summary(&samples, wall));
                tokenised = t;
                decode_prompts = prompts;
            }
            let keys = ["mean_ttft_ms", "median_ttft_ms", "p90_ttft_ms", "mean_tpot_ms", "request_throughput", "output_throughput"];
            let mut medians = serde_json::Map::new();
            for k in keys {
                medians.insert(k.into(), json!(median(runs.iter().map(|r| r[k].as_f64().unwrap()).collect())));
            }
            println!("{setup}: {}", Value::Object(medians.clone()));
            results.insert(setup.into(), json!({"median_of_runs": medians, "runs": runs,
                "decode_prompts_tokenised_from_text_last_run": tokenised}));
        }
        // What tokenize-once saves decode per request: encoding the rendered prompt.
        let mut costs = Vec::new();
        for prompt in &decode_prompts {
            let t = Instant::now();
            let ids = tokenizer::encode(prompt);
            costs.push((t.elapsed().as_secs_f64() * 1e3, ids.len()));
        }
        let mean_ms = costs.iter().map(|c| c.0).sum::<f64>() / costs.len() as f64;
        let mean_tokens = costs.iter().map(|c| c.1).sum::<usize>() as f64 / costs.len() as f64;
        println!("tokenisation per decode prompt: {mean_ms:.2} ms for {mean_tokens:.0} tokens on average");
        let out = json!({
            "benchmark": "pd_agentic",
            "workload": {"sessions": SESSIONS, "turns": TURNS, "context_tokens": CONTEXT_TOKENS,
                "new_tokens_per_turn": NEW_TOKENS, "output_tokens": OUTPUT_TOKENS, "profile": "qwen3-0.6b-fp8-h100",
                "time_scale": 1.0, "runs": RUNS},
            "results": results,
            "tokenisation_saved_per_request": {"mean_ms": mean_ms, "mean_prompt_tokens": mean_tokens},
            "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        });
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/artifacts");
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(format!("{dir}/pd_agentic.json"), serde_json::to_string_pretty(&out).unwrap()).unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
    });
}
