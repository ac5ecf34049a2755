//! What the real-vLLM suites share: the engines `bench-scripts/real_vllm.sh` started, a
//! router in front of them, and ways to read what the engines and the router say.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use super::*;
use clap::Parser;
use llm_router::server::RunningRouter;
use serde_json::{Value, json};

/// One test at a time: they read the engines' counters and restart an engine.
pub static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

pub const MODEL: &str = "tiny";

/// The engines `bench-scripts/real_vllm.sh start` brought up.
#[derive(Clone)]
pub struct Engines {
    pub urls: Vec<String>,
    pub kv: Vec<String>,
    pub replay: Vec<String>,
    pub model_dir: String,
    pub script: String,
}

pub fn engines() -> Option<Engines> {
    let path = std::env::var("REAL_VLLM_ENV")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/real-vllm/engine.env"));
    let Ok(text) = std::fs::read_to_string(&path) else {
        if std::env::var("REQUIRE_REAL_VLLM").as_deref() == Ok("1") {
            panic!("{} is missing: run bash bench-scripts/real_vllm.sh start 2", path.display());
        }
        eprintln!(
            "skipped: no real vLLM engines ({} is missing; bench-scripts/real_vllm.sh start 2)",
            path.display()
        );
        return None;
    };
    Some(parse_engines(&text))
}

pub fn parse_engines(text: &str) -> Engines {
    let vars: HashMap<&str, &str> = text.lines().filter_map(|l| l.split_once('=')).collect();
    let list = |name: &str| -> Vec<String> { vars[name].split(',').map(str::to_owned).collect() };
    Engines {
        urls: list("REAL_VLLM_URLS"),
        kv: list("REAL_VLLM_KV"),
        replay: list("REAL_VLLM_REPLAY"),
        model_dir: vars["REAL_VLLM_MODEL"].to_owned(),
        script: vars["REAL_VLLM_SCRIPT"].to_owned(),
    }
}

/// Two engines with vLLM's NixlConnector (set `pd`), stopped when dropped.
pub struct PdEngines {
    pub engines: Engines,
}

impl PdEngines {
    pub async fn start(script: &str) -> PdEngines {
        let script = script.to_owned();
        let env_file = tokio::task::spawn_blocking(move || {
            let status = std::process::Command::new("bash")
                .args([script.as_str(), "start", "2", "18110"])
                .env("REAL_VLLM_SET", "pd")
                .env("REAL_VLLM_NIXL", "1")
                .status()
                .unwrap();
            assert!(status.success(), "starting the NIXL engines");
            PathBuf::from(script).parent().unwrap().parent().unwrap().join("target/real-vllm/pd.env")
        })
        .await
        .unwrap();
        PdEngines { engines: parse_engines(&std::fs::read_to_string(env_file).unwrap()) }
    }
}

impl Drop for PdEngines {
    fn drop(&mut self) {
        let _ = std::process::Command::new("bash")
            .args([self.engines.script.as_str(), "stop"])
            .env("REAL_VLLM_SET", "pd")
            .status();
    }
}

pub fn http() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(120)).build().unwrap()
}

pub async fn start_router(e: &Engines, extra: &[&str]) -> RunningRouter {
    let replicas = e.urls.join(",");
    let mut args = vec!["router", "--host", "127.0.0.1", "--port", "0", "--replicas", &replicas];
    args.extend_from_slice(&[
        "--health-interval",
        "200ms",
        "--healthy-threshold",
        "1",
        "--unhealthy-threshold",
        "1",
    ]);
    args.extend_from_slice(extra);
    let config = llm_router::config::Cli::parse_from(args).into_config().unwrap();
    let router = router(config).await;
    until_all_healthy(&router, e.urls.len()).await;
    router
}

pub async fn until_all_healthy(router: &RunningRouter, n: usize) {
    let c = http();
    for _ in 0..600 {
        let text = scrape(&c, &base(router)).await;
        let healthy: f64 =
            text.lines().filter(|l| l.starts_with("router_replica_healthy{")).filter_map(value).sum();
        if healthy as usize == n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the router never saw all {n} engines healthy");
}

pub fn value(line: &str) -> Option<f64> {
    line.rsplit(' ').next()?.parse().ok()
}

pub async fn scrape(c: &reqwest::Client, base: &str) -> String {
    c.get(format!("{base}/metrics")).send().await.unwrap().text().await.unwrap()
}

/// The sum of a metric's samples whose label text contains every one of `labels`.
pub fn sum(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| labels.iter().all(|label| l.contains(label)))
        .filter_map(value)
        .sum()
}

/// An engine counter, read until two reads 300 ms apart agree (vLLM updates its
/// Prometheus counters from the engine loop, a moment after the response).
pub async fn settled(c: &reqwest::Client, url: &str, name: &str, labels: &[&str]) -> f64 {
    let mut last = f64::NAN;
    for _ in 0..50 {
        let now = sum(&scrape(c, url).await, name, labels);
        if now == last {
            return now;
        }
        last = now;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    panic!("{name} at {url} never settled");
}

/// Raw response: status and body text.
pub async fn send(c: &reqwest::Client, url: &str, body: &Value, headers: &[(&str, &str)]) -> (u16, String) {
    let mut request = c.post(url).header("content-type", "application/json").body(body.to_string());
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await.unwrap();
    (response.status().as_u16(), response.text().await.unwrap())
}

/// Equal, or a panic showing where they part.
pub fn assert_same(routed: &str, direct: &str, what: &str) {
    if routed == direct {
        return;
    }
    let at = routed.bytes().zip(direct.bytes()).take_while(|(a, b)| a == b).count();
    let from = routed[..at].rfind("data: ").unwrap_or(at.saturating_sub(200));
    let end = |s: &str| (at + 200).min(s.len());
    panic!(
        "{what}: the router's answer differs from the engine's at byte {at}\nrouter: {:?}\nengine: {:?}",
        &routed[from..end(routed)],
        &direct[from..end(direct)]
    );
}

/// Made-up words (the tiny model's tokenizer was trained on such text), distinct per seed.
pub fn words(seed: u64, n: usize) -> String {
    let syllables = ["ba", "ko", "mi", "tu", "ze", "ra", "fo", "li", "ne", "su", "da", "vi"];
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    let mut out = String::new();
    for i in 0..n {
        let mut word = String::new();
        for _ in 0..2 + (x >> 60) % 2 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            word.push_str(syllables[(x >> 59) as usize % syllables.len()]);
        }
        out.push_str(&word);
        out.push(if i % 9 == 8 { '.' } else { ' ' });
    }
    out
}

/// What a client reads from an answer, streamed or not: the text, the finish reason and the
/// usage.
pub fn reading(body: &str, stream: bool) -> Value {
    let objects: Vec<Value> = if stream {
        body.split("\n\n")
            .filter_map(|event| event.strip_prefix("data: "))
            .filter(|data| *data != "[DONE]")
            .map(|data| serde_json::from_str(data).unwrap())
            .collect()
    } else {
        vec![serde_json::from_str(body).unwrap()]
    };
    let (mut text, mut finish, mut usage) = (String::new(), Value::Null, Value::Null);
    let mut stop_reason = Value::Null;
    for object in objects {
        for choice in object["choices"].as_array().unwrap() {
            for piece in [&choice["text"], &choice["delta"]["content"], &choice["message"]["content"]] {
                text.push_str(piece.as_str().unwrap_or(""));
            }
            if !choice["finish_reason"].is_null() {
                finish = choice["finish_reason"].clone();
                stop_reason = choice["stop_reason"].clone();
            }
        }
        if !object["usage"].is_null() {
            usage = object["usage"].clone();
        }
    }
    json!({"text": text, "finish_reason": finish, "stop_reason": stop_reason, "usage": usage})
}

/// The response id in an answer's first object.
pub fn response_id(body: &str) -> String {
    let at = body.find("\"id\":\"").expect("an id") + 6;
    body[at..at + body[at..].find('"').unwrap()].to_owned()
}
