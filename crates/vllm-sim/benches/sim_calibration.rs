//! Calibration harness: the study's points replayed on simulated replicas in virtual time.
//!
//! The real engine and API-server code of `vllm-sim` runs here under tokio's paused clock
//! (time jumps to the next timer whenever every task waits), driven by closed-loop clients
//! that behave as the study's benchmark clients did, without HTTP. A point that took the
//! study minutes of GPU time takes a second of CPU, so a profile's constants can be fitted
//! by trying them. `bench-scripts/fidelity.py` then re-measures the same points for real,
//! over HTTP through vllm-router, in real time.
//!
//! One replica stands for the fleet: with 8 replicas behind round-robin (or consistent
//! hashing of 8c sessions) each gets 1/8 of the streams and sessions, so the harness runs
//! c/8 of them on one replica and multiplies its throughput by 8. P/D runs one prefill rank
//! and one decode rank of the study's DP4EP4 replicas with c/4 sessions.
//!
//! - prefill-heavy / decode-heavy: `vllm bench serve` with 4096 prompts, max concurrency
//!   c, from an idle engine: 512 requests on one replica, c/8 at a time; throughput is
//!   requests over the whole run, TTFT and TPOT are means over requests.
//! - agentic: AIPerf's replay of the study's trace (sessions 0, 8, 16, ... of the first
//!   8c), c/8 session slots opened over AIPerf's ramp, 2c/8 warm-up requests first.
//! - agentic-pd-4p4d: the same sessions, every turn a prefill-only request on the prefill
//!   rank then a decode request on the decode rank that pulls the KV it lacks.
//!
//! ```text
//! cargo bench --bench sim_calibration -- [--points prefill-heavy,decode-heavy,agentic,agentic-pd-4p4d]
//!     [--concurrency 64,128,256] [--profile NAME] [--set name=value ...] [--pd-set name=value ...]
//!     [--dataset PATH] [--json OUT]
//! ```
//!
//! The agentic points run with the API server's fastokens tokenizer, as the study's agentic
//! runs did (`VLLM_USE_FASTOKENS=1` in `bench/run_agentic_8x.sh`); the others without.
//!
//! It prints, per point, the simulated and the study's mean TTFT, mean TPOT (AIPerf's ITL
//! for the agentic points) and request throughput, and their ratios.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use llm_bench::text::hash_block_ids;
use llm_bench::trace::{self, TraceSession, TurnPrompt};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::time::Instant;
use vllm_sim::api_server::ApiServer;
use vllm_sim::engine::{Engine, EngineConfig, EngineRequest, Event, Kind};
use vllm_sim::faults::Faults;
use vllm_sim::metrics::SimMetrics;
use vllm_sim::pd::block_transfer_time;
use vllm_sim::profile::{Profile, PromptForm};
use vllm_sim::tokenizer;

struct Options {
    points: Vec<String>,
    concurrency: Vec<usize>,
    profile: Profile,
    pd_profile: Profile,
    dataset: String,
    json: Option<String>,
}

fn options() -> Options {
    let mut o = Options {
        points: vec![
            "prefill-heavy".into(),
            "decode-heavy".into(),
            "agentic".into(),
            "agentic-pd-4p4d".into(),
        ],
        concurrency: vec![64, 128, 256],
        profile: Profile::by_name("qwen3-0.6b-fp8-h100").unwrap(),
        pd_profile: Profile::by_name("phi-tiny-moe-dp4ep4-h100").unwrap(),
        dataset: std::env::var("AGENTIC_DATASET").unwrap_or_else(|_| {
            format!(
                "{}/../../target/bench-data/agentic_loop_2200s_seed42/dataset.jsonl",
                env!("CARGO_MANIFEST_DIR")
            )
        }),
        json: None,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    let value = |i: &mut usize| {
        *i += 1;
        args.get(*i).cloned().unwrap_or_else(|| panic!("{} needs a value", args[*i - 1]))
    };
    while i < args.len() {
        match args[i].as_str() {
            "--points" => o.points = value(&mut i).split(',').map(str::to_owned).collect(),
            "--concurrency" => o.concurrency = value(&mut i).split(',').map(|c| c.parse().unwrap()).collect(),
            "--profile" => o.profile = Profile::by_name(&value(&mut i)).expect("known profile"),
            "--set" => o.profile.set(&value(&mut i)).unwrap(),
            "--pd-set" => o.pd_profile.set(&value(&mut i)).unwrap(),
            "--dataset" => o.dataset = value(&mut i),
            "--json" => o.json = Some(value(&mut i)),
            _ => {} // cargo bench's own flags
        }
        i += 1;
    }
    o
}

/// One simulated replica: its API server and engine, without HTTP.
struct Replica {
    engine: Engine,
    api: ApiServer,
    metrics: Arc<SimMetrics>,
}

impl Replica {
    fn start(profile: &Profile) -> Arc<Replica> {
        let faults = Arc::new(Faults::new(Default::default()));
        let api = ApiServer::start(profile.api, 1.0, faults.clone());
        let config = EngineConfig {
            profile: profile.clone(),
            max_num_seqs: profile.max_num_seqs,
            max_num_batched_tokens: profile.max_num_batched_tokens,
            num_gpu_blocks: profile.num_gpu_blocks,
            time_scale: 1.0,
            kv_events: None,
        };
        let metrics = Arc::new(SimMetrics::new(profile.model));
        let engine = Engine::start(config, metrics.clone(), faults, api.clone());
        Arc::new(Replica { engine, api, metrics })
    }

    /// One request, timed from the moment it reaches the API server.
    async fn send(&self, prompt: Vec<u32>, form: PromptForm, max_tokens: usize, kind: Kind) -> Sample {
        let start = Instant::now();
        self.api.intake(prompt.len(), form).await;
        let (tx, mut rx) = mpsc::unbounded_channel();
        self.engine.submit(EngineRequest {
            prompt,
            max_tokens,
            min_tokens: 0,
            ignore_eos: true,
            seed: None,
            stop: Vec::new(),
            kind,
            arrived: Instant::now(),
            events: tx,
            output_weight: self.api.costs().token_weight(form),
            cache_salt: None,
        });
        let mut sample = Sample { start: Some(start), ..Sample::default() };
        while let Some(event) = rx.recv().await {
            match event {
                Event::Token { id, finish } => {
                    if sample.ids.is_empty() {
                        sample.ttft = start.elapsed();
                    }
                    sample.ids.push(id);
                    if finish.is_some() {
                        sample.latency = start.elapsed();
                        return sample;
                    }
                }
                Event::PrefillBlocks(_) => {}
                Event::Rejected(why) => panic!("rejected: {why}"),
            }
        }
        panic!("the engine dropped a request");
    }
}

#[derive(Default, Clone)]
struct Sample {
    start: Option<Instant>,
    ttft: Duration,
    latency: Duration,
    ids: Vec<u32>,
}

/// What a point measured, in the study's terms.
struct Measured {
    mean_ttft_ms: f64,
    mean_tpot_ms: f64,
    request_throughput: f64,
    requests: usize,
}

fn measure(samples: &[Sample], fleet: usize) -> Measured {
    let n = samples.len().max(1) as f64;
    let first = samples.iter().filter_map(|s| s.start).min().expect("samples");
    let last = samples.iter().map(|s| s.start.unwrap() + s.latency).max().unwrap();
    let tpots: Vec<f64> = samples
        .iter()
        .filter(|s| s.ids.len() > 1)
        .map(|s| (s.latency - s.ttft).as_secs_f64() / (s.ids.len() - 1) as f64)
        .collect();
    Measured {
        mean_ttft_ms: samples.iter().map(|s| s.ttft.as_secs_f64()).sum::<f64>() / n * 1e3,
        mean_tpot_ms: tpots.iter().sum::<f64>() / tpots.len().max(1) as f64 * 1e3,
        request_throughput: samples.len() as f64 / (last - first).as_secs_f64() * fleet as f64,
        requests: samples.len(),
    }
}

/// `vllm bench serve` on one of 8 replicas: 512 prompts of `isl` random tokens, `streams`
/// at a time, each generating `osl`.
async fn random_point(profile: &Profile, isl: usize, osl: usize, streams: usize) -> Measured {
    let replica = Replica::start(profile);
    let remaining = Arc::new(Mutex::new(0..512u64));
    let samples = Arc::new(Mutex::new(Vec::new()));
    let mut workers = Vec::new();
    for _ in 0..streams {
        let (replica, remaining, samples) = (replica.clone(), remaining.clone(), samples.clone());
        workers.push(tokio::spawn(async move {
            loop {
                let Some(i) = remaining.lock().unwrap().next() else { return };
                let mut rng = fastrand::Rng::with_seed(i.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ isl as u64);
                let prompt = (0..isl).map(|_| rng.u32(..tokenizer::VOCAB_SIZE)).collect();
                let sample = replica.send(prompt, PromptForm::Text, osl, Kind::Local).await;
                samples.lock().unwrap().push(sample);
            }
        }));
    }
    for w in workers {
        w.await.unwrap();
    }
    let samples = samples.lock().unwrap();
    let m = measure(&samples, 8);
    report_busy(&replica.api, &samples);
    m
}

/// The API-server loop's utilisation over the run (when asked for, with BUSY=1).
fn report_busy(api: &ApiServer, samples: &[Sample]) {
    if std::env::var("BUSY").is_err() {
        return;
    }
    let first = samples.iter().filter_map(|s| s.start).min().unwrap();
    let last = samples.iter().map(|s| s.start.unwrap() + s.latency).max().unwrap();
    eprintln!("  api loop busy {:.0}%", 100.0 * api.busy().as_secs_f64() / (last - first).as_secs_f64());
}

/// The chat template's tokens around messages, as the simulator's template renders them.
struct Template {
    user: Vec<u32>,
    assistant: Vec<u32>,
    end: Vec<u32>,
    generation: Vec<u32>,
}

impl Template {
    fn new() -> Template {
        Template {
            user: tokenizer::encode("<|start|>user<|message|>"),
            assistant: tokenizer::encode("<|start|>assistant<|message|>"),
            end: tokenizer::encode("<|end|>"),
            generation: tokenizer::encode("<|start|>assistant<|message|>"),
        }
    }
}

/// How one turn of a session is served.
#[derive(Clone)]
enum Stack {
    Collocated(Arc<Replica>),
    /// Prefill rank, decode rank, time to pull one KV block.
    PrefillDecode(Arc<Replica>, Arc<Replica>, Duration),
}

impl Stack {
    async fn turn(&self, prompt: Vec<u32>, output: usize) -> Sample {
        match self {
            Stack::Collocated(replica) => replica.send(prompt, PromptForm::Chat, output, Kind::Local).await,
            Stack::PrefillDecode(prefill, decode, per_block) => {
                // vllm-router: prefill with max_tokens 1, then decode with the original
                // messages (tokenised again) and the prefill's kv_transfer_params.
                let start = Instant::now();
                prefill.send(prompt.clone(), PromptForm::Chat, 1, Kind::PrefillOnly).await;
                let mut sample = decode
                    .send(prompt, PromptForm::Chat, output, Kind::RemoteKv { per_block: *per_block })
                    .await;
                let before_decode = sample.start.unwrap() - start;
                sample.ttft += before_decode;
                sample.latency += before_decode;
                sample.start = Some(start);
                sample
            }
        }
    }
}

/// AIPerf's replay of the study's trace on one replica (or one P/D rank pair): `slots`
/// session slots opened over `ramp`, `warmup` first turns beforehand.
async fn agentic_point(
    sessions: Vec<TraceSession>,
    warmup: Vec<TraceSession>,
    slots: usize,
    ramp: Duration,
    stack: Stack,
    fleet: usize,
) -> Measured {
    let template = Arc::new(Template::new());
    // Warm-up: first turns only, not recorded.
    let warm = Arc::new(Mutex::new(VecDeque::from(warmup)));
    let mut tasks = Vec::new();
    for _ in 0..slots {
        let (warm, stack, template) = (warm.clone(), stack.clone(), template.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let Some(session) = warm.lock().unwrap().pop_front() else { return };
                let mut history = Vec::new();
                let turn = &session.turns[0];
                let prompt = prompt_of(&template, &mut history, turn);
                stack.turn(prompt, turn.output_length).await;
            }
        }));
    }
    for t in tasks.drain(..) {
        t.await.unwrap();
    }
    let queue = Arc::new(Mutex::new(VecDeque::from(sessions)));
    let samples = Arc::new(Mutex::new(Vec::new()));
    for slot in 0..slots {
        let (queue, samples, stack, template) =
            (queue.clone(), samples.clone(), stack.clone(), template.clone());
        let open_at = ramp.mul_f64(slot as f64 / slots as f64);
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep(open_at).await;
            loop {
                let Some(session) = queue.lock().unwrap().pop_front() else { return };
                let mut history: Vec<u32> = Vec::new();
                for turn in &session.turns {
                    tokio::time::sleep(turn.delay).await;
                    let prompt = prompt_of(&template, &mut history, turn);
                    let sample = stack.turn(prompt, turn.output_length).await;
                    history.extend_from_slice(&template.assistant);
                    history.extend_from_slice(&sample.ids);
                    history.extend_from_slice(&template.end);
                    samples.lock().unwrap().push(sample);
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let samples = samples.lock().unwrap();
    if std::env::var("BUSY").is_ok() {
        let replicas = match &stack {
            Stack::Collocated(r) => vec![("replica", r)],
            Stack::PrefillDecode(p, d, _) => vec![("prefill", p), ("decode", d)],
        };
        for (name, r) in replicas {
            let text = r.metrics.render();
            let get = |metric: &str| {
                text.lines()
                    .find_map(|l| l.strip_prefix(metric)?.rsplit(' ').next()?.parse::<f64>().ok())
                    .unwrap_or(0.0)
            };
            report_busy(&r.api, &samples);
            eprintln!(
                "  {name}: prefix hits {:.1}% of {:.0} prompt tokens, preemptions {}",
                100.0 * get("vllm:prefix_cache_hits_total") / get("vllm:prefix_cache_queries_total").max(1.0),
                get("vllm:prefix_cache_queries_total"),
                get("vllm:num_preemptions_total")
            );
        }
    }
    measure(&samples, fleet)
}

/// The turn's user message joins the history; the prompt is the history plus the
/// generation prompt.
fn prompt_of(template: &Template, history: &mut Vec<u32>, turn: &trace::TraceTurn) -> Vec<u32> {
    history.extend_from_slice(&template.user);
    match &turn.prompt {
        TurnPrompt::Blocks(ids) => {
            let last = ids.len() - 1;
            for (i, &id) in ids.iter().enumerate() {
                let n = if i == last { turn.input_length - last * 64 } else { 64 };
                hash_block_ids(id, n, history);
            }
        }
        _ => panic!("the study's trace names blocks"),
    }
    history.extend_from_slice(&template.end);
    let mut prompt = history.clone();
    prompt.extend_from_slice(&template.generation);
    prompt
}

fn study<'a>(points: &'a Value, workload: &str, c: usize) -> Option<&'a Value> {
    points["points"]
        .as_array()?
        .iter()
        .find(|p| p["workload"] == workload && p["concurrency"] == c && p["stack"] == "vllm-router")
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        // `cargo test --all-targets` builds and runs this; a calibration is a measurement
        // (minutes, and the agentic dataset), so only `cargo bench` runs it.
        return;
    }
    let o = options();
    let mut fastokens = o.profile.clone();
    fastokens.api.per_prompt_token /= vllm_sim::FASTOKENS_SPEEDUP;
    let published: Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../bench-scripts/study_points.json"
        ))
        .unwrap(),
    )
    .unwrap();
    let needs_trace = o.points.iter().any(|p| p.starts_with("agentic"));
    let trace = needs_trace.then(|| {
        let bytes = std::fs::read(&o.dataset)
            .unwrap_or_else(|e| panic!("{}: {e} (bench-scripts/agentic_dataset.sh)", o.dataset));
        trace::read_trace(&bytes[..], 64).unwrap()
    });
    let mut rows = Vec::new();
    println!(
        "{:<16} {:>4} | {:>9} {:>9} {:>6} | {:>8} {:>8} {:>6} | {:>8} {:>8} {:>6}",
        "point",
        "c",
        "TTFT sim",
        "study",
        "ratio",
        "TPOT sim",
        "study",
        "ratio",
        "req/s sim",
        "study",
        "ratio"
    );
    for point in &o.points {
        for &c in &o.concurrency {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .start_paused(true)
                .build()
                .unwrap();
            let wall = std::time::Instant::now();
            let m = runtime.block_on(async {
                match point.as_str() {
                    "prefill-heavy" => random_point(&o.profile, 8000, 50, c / 8).await,
                    "decode-heavy" => random_point(&o.profile, 50, 500, c / 8).await,
                    "agentic" | "agentic-pd-4p4d" => {
                        let trace = trace.as_ref().unwrap();
                        let (fleet, ranks) = if point == "agentic" { (8, 8) } else { (4, 4) };
                        // Consistent hashing spreads the study's 8c sessions over the
                        // replicas: this one gets every `ranks`-th.
                        let sessions: Vec<TraceSession> =
                            trace[..8 * c].iter().step_by(ranks).cloned().collect();
                        let warmup: Vec<TraceSession> =
                            trace.iter().rev().take(2 * c / ranks).cloned().collect();
                        let ramp = Duration::from_secs_f64((0.25 * c as f64).clamp(5.0, 60.0));
                        let stack = if point == "agentic" {
                            Stack::Collocated(Replica::start(&fastokens))
                        } else {
                            let per_block = block_transfer_time(
                                o.pd_profile.kv_bytes_per_token,
                                o.pd_profile.kv_transfer_bytes_per_sec,
                            );
                            Stack::PrefillDecode(
                                Replica::start(&o.pd_profile),
                                Replica::start(&o.pd_profile),
                                per_block,
                            )
                        };
                        agentic_point(sessions, warmup, c / ranks, ramp, stack, fleet).await
                    }
                    other => panic!("unknown point {other}"),
                }
            });
            let s = study(&published, point, c);
            let theirs = |k: &str| s.and_then(|s| s[k].as_f64()).unwrap_or(f64::NAN);
            let (t, p, r) = (theirs("mean_ttft_ms"), theirs("mean_tpot_ms"), theirs("request_throughput"));
            println!(
                "{:<16} {:>4} | {:>9.1} {:>9.1} {:>6.3} | {:>8.2} {:>8.2} {:>6.3} | {:>8.1} {:>8.1} {:>6.3}   ({} requests, {:.1}s)",
                point,
                c,
                m.mean_ttft_ms,
                t,
                m.mean_ttft_ms / t,
                m.mean_tpot_ms,
                p,
                m.mean_tpot_ms / p,
                m.request_throughput,
                r,
                m.request_throughput / r,
                m.requests,
                wall.elapsed().as_secs_f64()
            );
            rows.push(json!({"point": point, "concurrency": c, "mean_ttft_ms": m.mean_ttft_ms,
                "mean_tpot_ms": m.mean_tpot_ms, "request_throughput": m.request_throughput,
                "study": {"mean_ttft_ms": t, "mean_tpot_ms": p, "request_throughput": r}}));
        }
    }
    if let Some(path) = &o.json {
        let profile = format!("{:?}", o.profile);
        std::fs::write(
            path,
            serde_json::to_string_pretty(&json!({"profile": profile, "rows": rows})).unwrap(),
        )
        .unwrap();
    }
}
