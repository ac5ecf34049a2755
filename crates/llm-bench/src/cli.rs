//! The `llm-bench` command line: `run` a benchmark pass against an OpenAI-compatible
//! endpoint, or print a trace dataset's `dataset-stats`.

use std::io::{BufReader, Read};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use http::{HeaderName, Uri};
use serde_json::{Map, Value, json};

use super::client::{Cancellation, Client, Spread, parse_base};
use super::progress::Progress;
use super::random::RandomWorkload;
use super::report;
use super::runner::{self, Limit, Pacing, SessionWork, Work};
use super::trace::{self, TraceSession};
use sha2::{Digest, Sha256};

/// A load generator for OpenAI-compatible LLM servers and routers, measuring what
/// `vllm bench serve` measures (TTFT, TPOT, ITL, E2E latency, throughput) on the
/// study's workloads.
#[derive(Debug, Parser)]
#[command(name = "llm-bench", version)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a warm-up phase (discarded), then the recorded phase; print and save the results.
    Run(Box<RunArgs>),
    /// Print the statistics of a trace dataset (AIPerf mooncake-trace JSONL) as JSON.
    DatasetStats {
        /// The JSONL dataset.
        path: PathBuf,
        /// Tokens per hash id.
        #[arg(long, default_value_t = trace::DEFAULT_BLOCK_SIZE)]
        isl_block_size: usize,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum WorkloadKind {
    /// Independent requests of exactly --isl prompt tokens and --osl output tokens.
    Random,
    /// Multi-turn sessions replayed from an AIPerf mooncake-trace --dataset (the study's
    /// agentic workload: bench-scripts/agentic_dataset.sh).
    Agentic,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum EndpointKind {
    Completions,
    Chat,
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Base URL to send to (http://host:port). Several (repeat, or separate with commas)
    /// spread the requests over them: how a client goes straight to the engines.
    #[arg(long = "base-url", required = true, num_args = 1.., value_delimiter = ',', value_parser = parse_base)]
    pub base_urls: Vec<Uri>,
    /// How requests are spread over several base URLs.
    #[arg(long, value_enum, default_value_t = Spread::Session)]
    pub spread: Spread,
    /// Model name (default: the first model the first base URL lists).
    #[arg(long)]
    pub model: Option<String>,
    #[arg(long, value_enum, default_value_t = WorkloadKind::Random)]
    pub workload: WorkloadKind,
    /// Random workload: prompt tokens per request.
    #[arg(long, default_value_t = 8000)]
    pub isl: usize,
    /// Random workload: output tokens per request.
    #[arg(long, default_value_t = 50)]
    pub osl: usize,
    /// Random workload: the endpoint to send to.
    #[arg(long, value_enum, default_value_t = EndpointKind::Completions)]
    pub endpoint: EndpointKind,
    /// Agentic workload: the trace (AIPerf mooncake-trace JSONL).
    #[arg(long, required_if_eq("workload", "agentic"))]
    pub dataset: Option<PathBuf>,
    /// Agentic workload: replay only the trace's first N sessions (the study sliced 8 per
    /// unit of concurrency). Without --num-prompts or --duration, the run ends when they
    /// have all been replayed, as AIPerf's does.
    #[arg(long)]
    pub num_sessions: Option<usize>,
    /// Agentic workload: tokens per hash id (AIPerf's --isl-block-size).
    #[arg(long, default_value_t = trace::DEFAULT_BLOCK_SIZE, value_parser = parse_block_size)]
    pub isl_block_size: usize,
    /// Agentic workload: start the --max-concurrency session slots spread over this long
    /// (AIPerf's --concurrency-ramp-duration).
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    pub ramp_up: Duration,
    /// The engines run this many times faster than real time (vllm-sim --time-scale).
    /// Inter-turn delays are scaled to match, and every reported time is converted to the
    /// engines' clock, so a run at --time-scale 0.25 reports what a real-time run would.
    #[arg(long, default_value_t = 1.0, value_parser = parse_time_scale)]
    pub time_scale: f64,
    /// Requests in flight at once (sessions, for the agentic workload).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_concurrency: Option<u32>,
    /// Mean requests per second, Poisson arrivals (sessions per second, agentic);
    /// `inf` sends as fast as --max-concurrency allows.
    #[arg(long, default_value = "inf", value_parser = parse_rate)]
    pub request_rate: f64,
    /// Requests in the recorded phase (default 1000 unless --duration is given).
    #[arg(long, conflicts_with = "duration")]
    pub num_prompts: Option<usize>,
    /// Length of the recorded phase (e.g. 60s); requests in flight at its end complete.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,
    /// Requests in the warm-up phase, whose results are discarded (default:
    /// --max-concurrency, else 16; 0 skips it). The recorded phase follows without a
    /// pause, so it starts with the servers busy.
    #[arg(long, conflicts_with = "warmup_duration")]
    pub warmup_requests: Option<usize>,
    /// Length of the warm-up phase instead of a request count.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub warmup_duration: Option<Duration>,
    /// After the recorded phase, how long requests still running may take to finish;
    /// then they are cancelled and counted as `unfinished` (default: wait for all, as
    /// `vllm bench serve` does). Bounds a run whose workload has a long tail.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub drain_timeout: Option<Duration>,
    /// Seed of prompts and arrivals.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Header carrying the session id of agentic requests (AIPerf's X-Correlation-ID).
    #[arg(long, default_value = "x-correlation-id")]
    pub session_header: HeaderName,
    /// Send requests over HTTP/2 with prior knowledge (h2c), as streams on shared
    /// connections, instead of HTTP/1.1.
    #[arg(long)]
    pub http2: bool,
    /// Send `Authorization: Bearer <KEY>` (a router's client API key).
    #[arg(long, value_name = "KEY", env = "LLM_BENCH_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Longest a request may take, stream included.
    #[arg(long, default_value = "600s", value_parser = humantime::parse_duration)]
    pub request_timeout: Duration,
    /// Write the results as JSON here.
    #[arg(long)]
    pub result_file: Option<PathBuf>,
    /// A label recorded with the results (e.g. the contender's name).
    #[arg(long)]
    pub label: Option<String>,
    /// Extra `key=value` recorded with the results (repeatable).
    #[arg(long = "metadata", value_name = "KEY=VALUE", value_parser = parse_metadata)]
    pub metadata: Vec<(String, String)>,
    /// Hang up on this fraction of requests (0 to 1) at a random time up to
    /// --cancel-after-max: clients that go away, for soak tests.
    #[arg(long, default_value_t = 0.0)]
    pub cancel_fraction: f64,
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub cancel_after_max: Duration,
    /// Also save every request's timings (`start_times`, `ttfts`, `itls`, `latencies`,
    /// `input_lens`, `output_lens`, `errors`) with the results, as `vllm bench serve
    /// --save-detailed` does.
    #[arg(long)]
    pub save_detailed: bool,
    /// Also save the failed requests alone (`failures`: start time, latency and error of
    /// each, in seconds), cheap enough for an hour of soak where --save-detailed is not.
    #[arg(long)]
    pub save_failures: bool,
    /// No progress display.
    #[arg(long)]
    pub no_progress: bool,
}

fn parse_rate(text: &str) -> Result<f64, String> {
    match text {
        "inf" => Ok(f64::INFINITY),
        _ => text
            .parse::<f64>()
            .ok()
            .filter(|r| *r > 0.0)
            .ok_or_else(|| format!("`{text}` is not a rate above 0 or `inf`")),
    }
}

fn parse_metadata(text: &str) -> Result<(String, String), String> {
    let (k, v) = text.split_once('=').ok_or_else(|| format!("`{text}` is not KEY=VALUE"))?;
    Ok((k.to_owned(), v.to_owned()))
}

fn parse_block_size(text: &str) -> Result<usize, String> {
    text.parse::<usize>()
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("`{text}` is not a block size above 0"))
}

fn parse_time_scale(text: &str) -> Result<f64, String> {
    text.parse::<f64>()
        .ok()
        .filter(|x| x.is_finite() && *x > 0.0)
        .ok_or_else(|| format!("`{text}` is not a time scale above 0"))
}

/// A trace and its sha256 (recorded with every result that used it).
fn load_trace(path: &PathBuf, block_size: usize) -> Result<(Vec<TraceSession>, String), String> {
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| BufReader::new(f).read_to_end(&mut bytes))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let sha256 = format!("{:x}", Sha256::digest(&bytes));
    let sessions =
        trace::read_trace(&bytes[..], block_size).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok((sessions, sha256))
}

pub fn dataset_stats(path: &PathBuf, block_size: usize) -> Result<(), String> {
    let (sessions, sha256) = load_trace(path, block_size)?;
    let mut stats = serde_json::to_value(trace::stats(&sessions)).expect("stats serialise");
    stats["sha256"] = json!(sha256);
    println!("{}", serde_json::to_string_pretty(&stats).expect("stats serialise"));
    Ok(())
}

/// The benchmark: warm-up pass, recorded pass, summary, results file.
pub async fn run(args: RunArgs) -> Result<(), String> {
    let concurrency = args.max_concurrency.map(|n| n as usize);
    let pacing = |seed: u64| {
        if args.request_rate.is_finite() {
            Pacing::Rate { per_second: args.request_rate, max_concurrency: concurrency, seed }
        } else {
            Pacing::Concurrency(concurrency.unwrap_or(1))
        }
    };
    if !args.request_rate.is_finite() && concurrency.is_none() {
        return Err("--request-rate inf needs --max-concurrency (or give a finite --request-rate)".into());
    }
    // Durations on the command line are in the engines' clock; the run itself is timed
    // by the wall clock.
    let wall = |d: Duration| d.div_f64(args.time_scale);
    let agentic = args.workload == WorkloadKind::Agentic;
    let limit = match (args.duration, args.num_prompts) {
        (Some(d), _) => Limit::Duration(wall(d)),
        (None, Some(n)) => Limit::Requests(n),
        // A trace is replayed to its end unless told otherwise, as AIPerf replays it.
        (None, None) if agentic => Limit::Requests(usize::MAX),
        (None, None) => Limit::Requests(1000),
    };
    let warmup = match (args.warmup_duration, args.warmup_requests) {
        (Some(d), _) => Some(Limit::Duration(wall(d))),
        (None, Some(0)) => None,
        (None, n) => Some(Limit::Requests(n.unwrap_or(concurrency.unwrap_or(16)))),
    };
    if !(0.0..=1.0).contains(&args.cancel_fraction) {
        return Err(format!("--cancel-fraction {} is not between 0 and 1", args.cancel_fraction));
    }
    let cancellation = (args.cancel_fraction > 0.0).then_some(Cancellation {
        fraction: args.cancel_fraction,
        max_after: wall(args.cancel_after_max),
        seed: args.seed,
    });
    let client = Arc::new(
        Client::new(
            args.base_urls.clone(),
            args.spread,
            args.session_header.clone(),
            wall(args.request_timeout),
        )
        .with_cancellation(cancellation)
        .http2(args.http2)
        .with_api_key(args.api_key.as_deref())?,
    );
    let model = match &args.model {
        Some(m) => m.clone(),
        None => client.first_model().await?,
    };
    let dataset = match args.workload {
        WorkloadKind::Agentic => {
            let path = args.dataset.as_ref().expect("clap requires --dataset for agentic");
            let (mut sessions, sha256) = load_trace(path, args.isl_block_size)?;
            if let Some(n) = args.num_sessions {
                if n > sessions.len() {
                    return Err(format!(
                        "--num-sessions {n}: {} has only {}",
                        path.display(),
                        sessions.len()
                    ));
                }
                sessions.truncate(n);
            }
            Some((Arc::new(sessions), sha256))
        }
        WorkloadKind::Random => None,
    };
    let work = match &dataset {
        Some((sessions, _)) => Work::Sessions(SessionWork {
            sessions: sessions.clone(),
            model: model.clone(),
            block_size: args.isl_block_size,
            ramp: wall(args.ramp_up),
            time_scale: args.time_scale,
        }),
        None => Work::Random(RandomWorkload {
            model: model.clone(),
            isl: args.isl,
            osl: args.osl,
            seed: args.seed,
            chat: args.endpoint == EndpointKind::Chat,
        }),
    };

    let progress = Arc::new(Progress::default());
    let total = match (warmup, limit) {
        (None | Some(Limit::Requests(_)), Limit::Requests(n)) if n != usize::MAX => {
            Some(n + limit_total(warmup.unwrap_or(Limit::Requests(0))).unwrap_or(0))
        }
        _ => None,
    };
    let ticker = progress.ticker("llm-bench", total, !args.no_progress);
    let mut run = runner::run(
        client.clone(),
        work,
        pacing(args.seed),
        (warmup, limit),
        args.drain_timeout.map(wall),
        progress,
    )
    .await;
    drop(ticker);
    run.rescale(args.time_scale);
    if let Some((sessions, _)) = &dataset
        && run.exhausted
        && limit != Limit::Requests(usize::MAX)
    {
        eprintln!(
            "warning: the dataset ran out after {} sessions, before the run's end; \
             the results cover a shorter run than asked",
            sessions.len()
        );
    }
    let mut metrics = report::summarize(&run.recorded, run.duration);
    let steady = report::steady_throughput(&run.recorded, &run.warmup, run.warmup_duration, run.window);
    metrics.insert("steady_request_throughput".into(), json!(steady));
    metrics.insert("window".into(), json!(run.window.as_secs_f64()));
    metrics.insert("unfinished".into(), json!(run.unfinished));
    print_summary(&metrics, &args, &model);
    if let Some(path) = &args.result_file {
        let mut result = parameters(&args, &model, limit, warmup);
        let warm = report::summarize(&run.warmup, run.warmup_duration);
        result.insert(
            "warmup".into(),
            json!({"completed": warm["completed"], "failed": warm["failed"], "duration": run.warmup_duration.as_secs_f64()}),
        );
        if let Some((_, sha256)) = &dataset {
            result.insert("sessions".into(), json!(run.sessions_started));
            result.insert("dataset_sha256".into(), json!(sha256));
        }
        result.extend(metrics);
        if args.save_detailed {
            result.extend(report::detailed(&run.recorded));
        }
        if args.save_failures {
            result.insert("failures".into(), report::failures(&run.recorded));
        }
        let text = serde_json::to_string_pretty(&Value::Object(result)).expect("results serialise");
        std::fs::write(path, text + "\n").map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(())
}

fn limit_total(limit: Limit) -> Option<usize> {
    match limit {
        Limit::Requests(n) => Some(n),
        Limit::Duration(_) => None,
    }
}

/// The run's parameters, under `vllm bench serve`'s keys where it has them.
fn parameters(args: &RunArgs, model: &str, limit: Limit, warmup: Option<Limit>) -> Map<String, Value> {
    let limit_json = |l: Option<Limit>| match l {
        Some(Limit::Requests(usize::MAX)) => json!("the whole dataset"),
        Some(Limit::Requests(n)) => json!({"requests": n}),
        Some(Limit::Duration(d)) => json!({"seconds": d.as_secs_f64() * args.time_scale}),
        None => Value::Null,
    };
    let mut p = Map::new();
    p.insert("date".into(), json!(utc_now()));
    p.insert("tool".into(), json!(concat!("llm-bench ", env!("CARGO_PKG_VERSION"))));
    p.insert("label".into(), json!(args.label));
    p.insert(
        "backend".into(),
        json!(match (args.workload, args.endpoint) {
            (WorkloadKind::Random, EndpointKind::Completions) => "openai",
            _ => "openai-chat",
        }),
    );
    p.insert("base_urls".into(), json!(args.base_urls.iter().map(|u| u.to_string()).collect::<Vec<_>>()));
    p.insert("spread".into(), json!(format!("{:?}", args.spread).to_lowercase()));
    p.insert("model_id".into(), json!(model));
    p.insert("workload".into(), json!(format!("{:?}", args.workload).to_lowercase()));
    if args.workload == WorkloadKind::Random {
        p.insert("random_input_len".into(), json!(args.isl));
        p.insert("random_output_len".into(), json!(args.osl));
    } else {
        p.insert("dataset_path".into(), json!(args.dataset.as_ref().map(|d| d.display().to_string())));
        p.insert("num_sessions_limit".into(), json!(args.num_sessions));
        p.insert("isl_block_size".into(), json!(args.isl_block_size));
        p.insert("session_header".into(), json!(args.session_header.as_str()));
        p.insert("ramp_up_s".into(), json!(args.ramp_up.as_secs_f64()));
    }
    // Every time in the results is in the engines' clock; a time scale other than 1 says
    // the run itself took 1/time_scale as long.
    p.insert("time_scale".into(), json!(args.time_scale));
    p.insert(
        "request_rate".into(),
        if args.request_rate.is_finite() { json!(args.request_rate) } else { json!("inf") },
    );
    p.insert("burstiness".into(), json!(1.0));
    p.insert("max_concurrency".into(), json!(args.max_concurrency));
    if let Limit::Requests(n) = limit
        && n != usize::MAX
    {
        p.insert("num_prompts".into(), json!(n));
    }
    p.insert("limit".into(), limit_json(Some(limit)));
    p.insert("warmup_limit".into(), limit_json(warmup));
    p.insert("seed".into(), json!(args.seed));
    p.insert("percentiles".into(), json!(report::PERCENTILES));
    let metadata: Map<String, Value> = args.metadata.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
    p.insert("metadata".into(), Value::Object(metadata));
    p
}

/// Now, as an RFC 3339 UTC timestamp.
fn utc_now() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

fn print_summary(m: &Map<String, Value>, args: &RunArgs, model: &str) {
    let f = |k: &str| m.get(k).and_then(Value::as_f64).unwrap_or(0.0);
    let mut out = String::new();
    out.push_str(&format!("{:=^50}\n", " Serving Benchmark Result "));
    out.push_str(&format!("{:<40} {}\n", "Model:", model));
    out.push_str(&format!("{:<40} {}\n", "Successful requests:", m["completed"]));
    out.push_str(&format!("{:<40} {}\n", "Failed requests:", m["failed"]));
    if m["cancelled"].as_u64().unwrap_or(0) > 0 {
        out.push_str(&format!("{:<40} {}\n", "Cancelled by the client:", m["cancelled"]));
    }
    if let Some(c) = args.max_concurrency {
        out.push_str(&format!("{:<40} {c}\n", "Maximum request concurrency:"));
    }
    out.push_str(&format!("{:<40} {:.2}\n", "Benchmark duration (s):", f("duration")));
    out.push_str(&format!("{:<40} {}\n", "Total input tokens:", m["total_input_tokens"]));
    out.push_str(&format!("{:<40} {}\n", "Total generated tokens:", m["total_output_tokens"]));
    out.push_str(&format!("{:<40} {:.2}\n", "Request throughput (req/s):", f("request_throughput")));
    out.push_str(&format!("{:<40} {:.2}\n", "Output token throughput (tok/s):", f("output_throughput")));
    out.push_str(&format!("{:<40} {:.2}\n", "Total token throughput (tok/s):", f("total_token_throughput")));
    for (key, name, header) in [
        ("ttft", "TTFT", "Time to First Token"),
        ("tpot", "TPOT", "Time per Output Token (excl. 1st token)"),
        ("itl", "ITL", "Inter-token Latency"),
        ("e2el", "E2EL", "End-to-end Latency"),
    ] {
        out.push_str(&format!("{header:-^50}\n"));
        out.push_str(&format!("{:<40} {:.2}\n", format!("Mean {name} (ms):"), f(&format!("mean_{key}_ms"))));
        out.push_str(&format!(
            "{:<40} {:.2}\n",
            format!("Median {name} (ms):"),
            f(&format!("median_{key}_ms"))
        ));
        for p in report::PERCENTILES {
            out.push_str(&format!(
                "{:<40} {:.2}\n",
                format!("P{p} {name} (ms):"),
                f(&format!("p{p}_{key}_ms"))
            ));
        }
    }
    if let Some(errors) = m.get("error_counts").and_then(Value::as_object).filter(|e| !e.is_empty()) {
        out.push_str(&format!("{:-^50}\n", "Errors"));
        for (error, count) in errors {
            out.push_str(&format!("{count:>6}  {error}\n"));
        }
    }
    out.push_str(&"=".repeat(50));
    println!("{out}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_utc_rfc3339() {
        let now = utc_now();
        assert_eq!(now.len(), 20, "{now}");
        assert!(now.starts_with("20") && now.ends_with('Z'));
    }

    #[test]
    fn args_parse_and_agentic_needs_a_dataset() {
        let parse =
            |args: &[&str]| Cli::try_parse_from(std::iter::once("llm-bench").chain(args.iter().copied()));
        assert!(parse(&["run", "--base-url", "http://a:1,http://b:2", "--max-concurrency", "8"]).is_ok());
        assert!(parse(&["run", "--base-url", "http://a:1", "--workload", "agentic"]).is_err());
        assert!(parse(&["run", "--base-url", "ftp://a:1"]).is_err());
        assert!(parse(&["run", "--base-url", "http://a:1", "--request-rate", "0"]).is_err());
        assert!(
            parse(&["run", "--base-url", "http://a:1", "--num-prompts", "5", "--duration", "5s"]).is_err()
        );
    }
}
