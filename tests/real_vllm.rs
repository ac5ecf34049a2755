//! The router against real vLLM engines (vLLM's CPU build, a tiny random-weight Qwen3 made
//! here): what reaches the client is what the engine sent.
//!
//! The engines are started once for the whole suite by `bench-scripts/real_vllm.sh start 2`,
//! which writes `target/real-vllm/engine.env`; CI does that and sets `REQUIRE_REAL_VLLM=1`,
//! elsewhere a missing file skips these tests with a message. The P/D test starts two more
//! engines of its own with vLLM's NixlConnector (set `pd`) and stops them when it ends. The tests share the engines
//! (their prefix caches and metrics), so they take turns ([`SERIAL`]).
//!
//! Checked: chat and completions, streamed and not, with and without usage, byte for byte
//! against the same request sent to the engine directly (temperature 0; only `id` and
//! `created` differ); `/v1/models` and `/tokenize`; vLLM's own errors (unknown model, bad
//! parameters, a prompt longer than the context) with their status and body; a client that
//! goes away aborts the engine's request; consistent hashing keeps a session on one engine,
//! whose prefix cache then hits; kv-aware with the model's own tokenizer directory predicts
//! the engines' prefix-cache hits exactly, including through an engine restart; `--pd`
//! between two engines running vLLM's NixlConnector on CPU moves each prefill's KV over
//! NIXL and decodes from token ids; the router's chat rendering equals the engine's;
//! health checks against the real `/health` (every test waits for them).

mod support;

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use llm_router::server::RunningRouter;
use serde_json::{Value, json};
use support::*;
use tokio_stream::StreamExt;

/// One test at a time: they read the engines' counters and restart an engine.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const MODEL: &str = "tiny";

/// The engines `bench-scripts/real_vllm.sh start` brought up.
#[derive(Clone)]
struct Engines {
    urls: Vec<String>,
    kv: Vec<String>,
    replay: Vec<String>,
    model_dir: String,
    script: String,
}

fn engines() -> Option<Engines> {
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

fn parse_engines(text: &str) -> Engines {
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
struct PdEngines {
    engines: Engines,
}

impl PdEngines {
    async fn start(script: &str) -> PdEngines {
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

fn http() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(120)).build().unwrap()
}

async fn start_router(e: &Engines, extra: &[&str]) -> RunningRouter {
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

async fn until_all_healthy(router: &RunningRouter, n: usize) {
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

fn value(line: &str) -> Option<f64> {
    line.rsplit(' ').next()?.parse().ok()
}

async fn scrape(c: &reqwest::Client, base: &str) -> String {
    c.get(format!("{base}/metrics")).send().await.unwrap().text().await.unwrap()
}

/// The sum of a metric's samples whose label text contains every one of `labels`.
fn sum(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| labels.iter().all(|label| l.contains(label)))
        .filter_map(value)
        .sum()
}

/// An engine counter, read until two reads 300 ms apart agree (vLLM updates its
/// Prometheus counters from the engine loop, a moment after the response).
async fn settled(c: &reqwest::Client, url: &str, name: &str, labels: &[&str]) -> f64 {
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
async fn send(c: &reqwest::Client, url: &str, body: &Value, headers: &[(&str, &str)]) -> (u16, String) {
    let mut request = c.post(url).header("content-type", "application/json").body(body.to_string());
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await.unwrap();
    (response.status().as_u16(), response.text().await.unwrap())
}

/// Equal, or a panic showing where they part.
fn assert_same(routed: &str, direct: &str, what: &str) {
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
fn words(seed: u64, n: usize) -> String {
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
fn reading(body: &str, stream: bool) -> Value {
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
    for object in objects {
        for choice in object["choices"].as_array().unwrap() {
            for piece in [&choice["text"], &choice["delta"]["content"], &choice["message"]["content"]] {
                text.push_str(piece.as_str().unwrap_or(""));
            }
            if !choice["finish_reason"].is_null() {
                finish = choice["finish_reason"].clone();
            }
        }
        if !object["usage"].is_null() {
            usage = object["usage"].clone();
        }
    }
    json!({"text": text, "finish_reason": finish, "usage": usage})
}

/// The response id in an answer's first object.
fn response_id(body: &str) -> String {
    let at = body.find("\"id\":\"").expect("an id") + 6;
    body[at..at + body[at..].find('"').unwrap()].to_owned()
}

#[tokio::test]
async fn streams_and_answers_reach_the_client_byte_for_byte() {
    let Some(e) = engines() else { return };
    let _turn = SERIAL.lock().await;
    // The router reaches the engine through a tap that records what the engine sent.
    let tap = support::tap::Tap::start(e.urls[0].trim_start_matches("http://")).await;
    let router = start_router(&Engines { urls: vec![tap.url.clone()], ..e.clone() }, &[]).await;
    let c = http();
    let chat = json!({"model": MODEL, "messages": [{"role": "user", "content": words(1, 20)}],
        "max_tokens": 40, "temperature": 0});
    let completion = json!({"model": MODEL, "prompt": words(2, 20), "max_tokens": 40, "temperature": 0});
    for (path, base_body) in [("/v1/chat/completions", chat), ("/v1/completions", completion)] {
        for (stream, usage) in [(false, false), (true, false), (true, true)] {
            let mut body = base_body.clone();
            body["stream"] = json!(stream);
            if usage {
                body["stream_options"] = json!({"include_usage": true});
            }
            let what = format!("{path} stream={stream} usage={usage}");
            let (status, routed) = send(&c, &format!("{}{path}", base(&router)), &body, &[]).await;
            assert_eq!(status, 200, "{what}: {routed}");
            // Byte for byte what the engine sent for this very request.
            let sent = tap.response_body_containing(&response_id(&routed)).expect("the engine's answer");
            assert_same(&routed, &String::from_utf8(sent).unwrap(), &what);
            // And what a client reads equals what it reads from the engine directly (vLLM
            // groups tokens into events as its output loop keeps up, so events may differ).
            let (direct_status, direct) = send(&c, &format!("{}{path}", e.urls[0]), &body, &[]).await;
            assert_eq!(direct_status, 200, "{what}: {direct}");
            assert_eq!(reading(&routed, stream), reading(&direct, stream), "{what}");
            // The answer is worth comparing: text was generated, and usage is there when asked.
            let read = reading(&routed, stream);
            assert!(read["text"].as_str().unwrap().len() > 20, "{what}: {routed}");
            assert_eq!(read["finish_reason"], "length", "{what}");
            assert_eq!(read["usage"].is_object(), !stream || usage, "{what}: {routed}");
            if read["usage"].is_object() {
                assert_eq!(read["usage"]["completion_tokens"], 40, "{what}");
            }
            if stream {
                assert!(routed.ends_with("data: [DONE]\n\n"), "{what}: {routed}");
            }
        }
    }
    router.shutdown().await;
}

#[tokio::test]
async fn models_tokenize_and_the_engines_errors_pass_through() {
    let Some(e) = engines() else { return };
    let _turn = SERIAL.lock().await;
    let router = start_router(&e, &[]).await;
    let c = http();
    // /v1/models: the engines' model.
    let get = |url: String| {
        let c = c.clone();
        async move {
            serde_json::from_str::<Value>(&c.get(url).send().await.unwrap().text().await.unwrap()).unwrap()
        }
    };
    let models = get(format!("{}/v1/models", base(&router))).await;
    let direct = get(format!("{}/v1/models", e.urls[0])).await;
    let ids = |v: &Value| v["data"].as_array().unwrap().iter().map(|m| m["id"].clone()).collect::<Vec<_>>();
    assert_eq!(ids(&models), ids(&direct));
    assert_eq!(ids(&models), [json!(MODEL)]);
    // /tokenize, text and chat.
    for body in [
        json!({"model": MODEL, "prompt": words(3, 12)}),
        json!({"model": MODEL, "messages": [{"role": "user", "content": words(4, 12)}]}),
    ] {
        let (s1, direct) = send(&c, &format!("{}/tokenize", e.urls[0]), &body, &[]).await;
        let (s2, routed) = send(&c, &format!("{}/tokenize", base(&router)), &body, &[]).await;
        assert_eq!((s2, routed.as_str()), (s1, direct.as_str()));
        assert_eq!(s1, 200, "{direct}");
    }
    // vLLM's errors: status and body as the engine answers them.
    let long_prompt = words(5, 2000);
    let cases = [
        (
            "unknown model",
            "/v1/chat/completions",
            json!({"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]}),
        ),
        ("bad parameter", "/v1/completions", json!({"model": MODEL, "prompt": "hi", "temperature": -1})),
        (
            "bad parameter, streamed",
            "/v1/chat/completions",
            json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "n": 0, "stream": true}),
        ),
        (
            "context too long",
            "/v1/completions",
            json!({"model": MODEL, "prompt": long_prompt, "max_tokens": 4}),
        ),
        (
            "context too long, chat",
            "/v1/chat/completions",
            json!({"model": MODEL, "messages": [{"role": "user", "content": long_prompt}]}),
        ),
    ];
    for (what, path, body) in cases {
        let (s1, direct) = send(&c, &format!("{}{path}", e.urls[0]), &body, &[]).await;
        let (s2, routed) = send(&c, &format!("{}{path}", base(&router)), &body, &[]).await;
        assert!((400..500).contains(&s1), "{what}: the engine answered {s1} {direct}");
        assert_eq!(s2, s1, "{what}: {routed}");
        let direct: Value = serde_json::from_str(&direct).unwrap();
        let routed: Value = serde_json::from_str(&routed).unwrap_or_else(|_| panic!("{what}: {routed}"));
        assert_eq!(routed, direct, "{what}");
        assert!(routed["error"]["message"].is_string(), "{what}: {routed}");
    }
    router.shutdown().await;
}

#[tokio::test]
async fn the_routers_chat_rendering_equals_the_engines() {
    let Some(e) = engines() else { return };
    let _turn = SERIAL.lock().await;
    let c = http();
    let spec = llm_router::policy::prompt_tokens::TokenizerSpec::parse(&e.model_dir).unwrap();
    // The directory as transformers writes it: the template is in chat_template.jinja.
    assert!(std::path::Path::new(&e.model_dir).join("chat_template.jinja").is_file());
    let tokenizer = spec.load(None, 1 << 20).unwrap();
    let conversations = [
        json!([{"role": "user", "content": words(7, 30)}]),
        json!([{"role": "system", "content": words(8, 40)}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": " trailing space and\nnewline \u{e9}\u{4e2d} 42 "},
            {"role": "user", "content": words(9, 10)}]),
    ];
    for messages in conversations {
        let body = json!({"model": MODEL, "messages": messages});
        let (status, text) = send(&c, &format!("{}/tokenize", e.urls[0]), &body, &[]).await;
        assert_eq!(status, 200, "{text}");
        let engine: Value = serde_json::from_str(&text).unwrap();
        let engine: Vec<u32> =
            engine["tokens"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap() as u32).collect();
        let ours = tokenizer.tokens(messages.to_string().as_bytes()).unwrap();
        assert_eq!(ours, engine, "{messages}");
    }
    for prompt in [json!(words(10, 30)), json!(["ab cd"]), json!([5, 6, 7])] {
        let body = json!({"model": MODEL, "prompt": prompt});
        let (status, text) = send(&c, &format!("{}/tokenize", e.urls[0]), &body, &[]).await;
        if status != 200 {
            continue; // vLLM's /tokenize takes text prompts only
        }
        let engine: Value = serde_json::from_str(&text).unwrap();
        let engine: Vec<u32> =
            engine["tokens"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap() as u32).collect();
        assert_eq!(tokenizer.tokens(prompt.to_string().as_bytes()).unwrap(), engine, "{prompt}");
    }
}

#[tokio::test]
async fn a_client_that_goes_away_aborts_the_engines_request() {
    let Some(e) = engines() else { return };
    let _turn = SERIAL.lock().await;
    // One engine, so the request's engine is known.
    let router = start_router(&Engines { urls: vec![e.urls[0].clone()], ..e.clone() }, &[]).await;
    let c = http();
    let engine = &e.urls[0];
    let finished = |reason: &'static str| format!("finished_reason=\"{reason}\"");
    let length_before = settled(&c, engine, "vllm:request_success_total", &[&finished("length")]).await;
    // As many tokens as the context allows: seconds of generation on this CPU.
    let body = json!({"model": MODEL, "prompt": words(6, 8), "max_tokens": 1900, "ignore_eos": true,
        "temperature": 0, "stream": true});
    let response = c
        .post(format!("{}/v1/completions", base(&router)))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut stream = response.bytes_stream();
    stream.next().await.unwrap().unwrap();
    let running = sum(&scrape(&c, engine).await, "vllm:num_requests_running", &[]);
    assert_eq!(running, 1.0, "the engine is generating");
    drop(stream);
    let mut gone = false;
    for _ in 0..100 {
        if sum(&scrape(&c, engine).await, "vllm:num_requests_running", &[]) == 0.0 {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(gone, "the engine still runs the request of a client that left");
    // Gone, and not by running to its end (vLLM does not count aborted requests).
    assert_eq!(sum(&scrape(&c, engine).await, "vllm:num_requests_waiting", &[]), 0.0);
    let length = settled(&c, engine, "vllm:request_success_total", &[&finished("length")]).await;
    assert_eq!(length, length_before, "the request ran to its end");
    let text = scrape(&c, &base(&router)).await;
    assert!(sum(&text, "router_client_disconnects_total", &[]) >= 1.0, "{text}");
    router.shutdown().await;
}

/// Which engine served: the one whose `vllm:request_success_total` moved.
async fn serving_engine(c: &reqwest::Client, e: &Engines, before: &[f64]) -> (usize, Vec<f64>) {
    let mut after = Vec::new();
    for url in &e.urls {
        after.push(settled(c, url, "vllm:request_success_total", &[]).await);
    }
    let moved: Vec<usize> = (0..after.len()).filter(|&i| after[i] > before[i]).collect();
    assert_eq!(moved.len(), 1, "exactly one engine served: {before:?} -> {after:?}");
    (moved[0], after)
}

#[tokio::test]
async fn consistent_hashing_keeps_a_session_where_its_prefix_cache_is() {
    let Some(e) = engines() else { return };
    let _turn = SERIAL.lock().await;
    let router = start_router(&e, &["--policy", "consistent-hash"]).await;
    let c = http();
    let mut served = Vec::new();
    let mut counts = Vec::new();
    for url in &e.urls {
        counts.push(settled(&c, url, "vllm:request_success_total", &[]).await);
    }
    for session in 0..4u64 {
        let key = format!("session-{session}-{}", std::process::id());
        let mut history = vec![json!({"role": "system", "content": words(100 + session, 300)})];
        let mut engines_used = Vec::new();
        for turn in 0..3u64 {
            history.push(json!({"role": "user", "content": words(200 + session * 10 + turn, 30)}));
            let body = json!({"model": MODEL, "messages": history, "max_tokens": 8, "temperature": 0});
            let hits_before: Vec<f64> = {
                let mut v = Vec::new();
                for url in &e.urls {
                    v.push(settled(&c, url, "vllm:prefix_cache_hits_total", &[]).await);
                }
                v
            };
            let (status, text) =
                send(&c, &format!("{}/v1/chat/completions", base(&router)), &body, &[("x-session-id", &key)])
                    .await;
            assert_eq!(status, 200, "{text}");
            let (engine, after) = serving_engine(&c, &e, &counts).await;
            counts = after;
            engines_used.push(engine);
            let hits = settled(&c, &e.urls[engine], "vllm:prefix_cache_hits_total", &[]).await;
            if turn > 0 {
                // The system prompt alone is several of the CPU's 128-token blocks.
                assert!(hits - hits_before[engine] >= 256.0, "turn {turn} of {key} found no cached prefix");
            }
            let answer: Value = serde_json::from_str(&text).unwrap();
            history.push(answer["choices"][0]["message"].clone());
        }
        assert!(engines_used.iter().all(|&i| i == engines_used[0]), "{key} moved: {engines_used:?}");
        served.push(engines_used[0]);
    }
    router.shutdown().await;
    eprintln!("sessions' engines: {served:?}");
}

/// kv-aware: the router's belief of the chosen engine's cached prompt tokens, summed over
/// requests, against the engines' own `vllm:prefix_cache_hits_total`.
struct Prediction {
    routed_cached: f64,
    engine_hits: f64,
}

async fn predicted_and_hit(c: &reqwest::Client, e: &Engines, router: &RunningRouter) -> Prediction {
    let mut engine_hits = 0.0;
    for url in &e.urls {
        engine_hits += settled(c, url, "vllm:prefix_cache_hits_total", &[]).await;
    }
    let routed_cached = sum(&scrape(c, &base(router)).await, "router_routed_cached_tokens_total", &[]);
    Prediction { routed_cached, engine_hits }
}

async fn until_feeds_connected(c: &reqwest::Client, e: &Engines, router: &RunningRouter) {
    for _ in 0..300 {
        let text = scrape(c, &base(router)).await;
        if sum(&text, "router_kv_events_connected", &[]) == e.urls.len() as f64 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the router's KV event feeds never connected to the engines");
}

/// Wait until the router has taken in the engines' events: no new batch for 500 ms.
async fn events_settled(c: &reqwest::Client, router: &RunningRouter) {
    let mut last = -1.0;
    for _ in 0..40 {
        let now = sum(&scrape(c, &base(router)).await, "router_kv_event_batches_total", &[]);
        if now == last {
            return;
        }
        last = now;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    panic!("KV event batches never stopped arriving");
}

/// Conversations that grow turn by turn, without session keys: kv-aware places them. Each
/// request's predicted cached tokens must equal the engines' prefix-cache hits for it.
async fn conversations(c: &reqwest::Client, e: &Engines, router: &RunningRouter, seed: u64) {
    let mut histories: Vec<Vec<Value>> =
        (0..4).map(|i| vec![json!({"role": "system", "content": words(seed + i, 250)})]).collect();
    for turn in 0..3 {
        for (i, history) in histories.iter_mut().enumerate() {
            history.push(json!({"role": "user", "content": words(seed * 100 + i as u64 * 10 + turn, 25)}));
            let body = json!({"model": MODEL, "messages": history, "max_tokens": 8, "temperature": 0});
            let before = predicted_and_hit(c, e, router).await;
            let (status, text) = send(c, &format!("{}/v1/chat/completions", base(router)), &body, &[]).await;
            assert_eq!(status, 200, "{text}");
            let answer: Value = serde_json::from_str(&text).unwrap();
            history.push(answer["choices"][0]["message"].clone());
            events_settled(c, router).await;
            let after = predicted_and_hit(c, e, router).await;
            let predicted = after.routed_cached - before.routed_cached;
            let hit = after.engine_hits - before.engine_hits;
            assert_eq!(
                predicted, hit,
                "conversation {i} turn {turn} ({} prompt tokens)",
                answer["usage"]["prompt_tokens"]
            );
        }
    }
}

#[tokio::test]
async fn kv_aware_predicts_the_engines_prefix_cache_hits_exactly() {
    let Some(e) = engines() else { return };
    let _turn = SERIAL.lock().await;
    let mut extra: Vec<String> =
        vec!["--policy".into(), "kv-aware".into(), "--tokenizer".into(), e.model_dir.clone()];
    for (i, url) in e.urls.iter().enumerate() {
        extra.push("--kv-events-endpoint".into());
        extra.push(format!("{url}={}", e.kv[i]));
        extra.push("--kv-events-replay-endpoint".into());
        extra.push(format!("{url}={}", e.replay[i]));
    }
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let router = start_router(&e, &extra).await;
    let c = http();
    until_feeds_connected(&c, &e, &router).await;
    // What the engines already hold from earlier tests and runs is not in this router's
    // index: the conversations here are new to them.
    let run = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    let (seed, seed2) = (run * 1000, run * 1000 + 500);
    let start = predicted_and_hit(&c, &e, &router).await;
    conversations(&c, &e, &router, seed).await;
    let first = predicted_and_hit(&c, &e, &router).await;
    let predicted = first.routed_cached - start.routed_cached;
    let hit = first.engine_hits - start.engine_hits;
    eprintln!("kv-aware: predicted {predicted} cached tokens, the engines hit {hit}");
    assert!(hit >= 4.0 * 2.0 * 256.0, "later turns should hit the cache: {hit}");
    assert_eq!(predicted, hit, "the router's prediction against the engines' own count");

    // An engine restarts: its cache is empty, and the router must know.
    let restarted = e.urls.len() - 1;
    let script = e.script.clone();
    let status = tokio::task::spawn_blocking(move || {
        std::process::Command::new("bash").args([script, "restart".into(), restarted.to_string()]).status()
    })
    .await
    .unwrap()
    .unwrap();
    assert!(status.success(), "restarting engine {restarted}");
    until_all_healthy(&router, e.urls.len()).await;
    until_feeds_connected(&c, &e, &router).await;
    // The same conversations again (their prefixes are cached where they survived), then
    // new ones.
    let before = predicted_and_hit(&c, &e, &router).await;
    conversations(&c, &e, &router, seed).await;
    conversations(&c, &e, &router, seed2).await;
    let after = predicted_and_hit(&c, &e, &router).await;
    let predicted = after.routed_cached - before.routed_cached;
    let hit = after.engine_hits - before.engine_hits;
    eprintln!("kv-aware after a restart: predicted {predicted}, the engines hit {hit}");
    assert_eq!(predicted, hit, "after engine {restarted} restarted");
    router.shutdown().await;
}

#[tokio::test]
async fn pd_moves_the_prefill_over_nixl_and_decodes_from_token_ids() {
    let Some(e) = engines() else { return };
    let _turn = SERIAL.lock().await;
    // Engine 0 prefills, engine 1 decodes; both run vLLM's NixlConnector on CPU.
    let pd = PdEngines::start(&e.script).await;
    let e = &pd.engines;
    let (prefill, decode) = (&e.urls[0], &e.urls[1]);
    let (p, d) = (format!("prefill={prefill}"), format!("decode={decode}"));
    let args = ["router", "--host", "127.0.0.1", "--port", "0", "--pd", &p, &d, "--health-interval", "200ms"];
    let config = llm_router::config::Cli::parse_from(args).into_config().unwrap();
    let router = router(config).await;
    until_all_healthy(&router, 2).await;
    let c = http();
    // The first transfer between two engines starts with a NIXL handshake, which vLLM
    // gives 5 s (a fixed socket timeout in its NixlConnector); two NIXL engines on a
    // loaded 2-core machine can miss it, and the request then fails with the engine's
    // 500, which the router passes on. Warm the pair up first (bounded), then measure.
    let warm = json!({"model": MODEL, "prompt": words(299, 200), "max_tokens": 2, "temperature": 0});
    let mut warmed = false;
    for _ in 0..6 {
        if send(&c, &format!("{}/v1/completions", base(&router)), &warm, &[]).await.0 == 200 {
            warmed = true;
            break;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    assert!(warmed, "no P/D request succeeded in 6 tries: the NIXL handshake between the engines fails");
    let transfers = "vllm:nixl_xfer_time_seconds_count";
    let failed = "vllm:nixl_num_failed_transfers_total";
    let chat = json!({"model": MODEL, "messages": [{"role": "user", "content": words(300, 200)}],
        "max_tokens": 16, "temperature": 0});
    let completion = json!({"model": MODEL, "prompt": words(301, 200), "max_tokens": 16, "temperature": 0});
    for (path, base_body) in [("/v1/chat/completions", chat), ("/v1/completions", completion)] {
        for stream in [false, true] {
            let mut body = base_body.clone();
            body["stream"] = json!(stream);
            if stream {
                body["stream_options"] = json!({"include_usage": true});
            }
            let what = format!("P/D {path} stream={stream}");
            let moved = settled(&c, decode, transfers, &[]).await;
            let failed_before = settled(&c, decode, failed, &[]).await;
            let once =
                sum(&scrape(&c, &base(&router)).await, "router_pd_tokenize_once_total", &[r#"mode="on""#]);
            let (status, routed) = send(&c, &format!("{}{path}", base(&router)), &body, &[]).await;
            assert_eq!(status, 200, "{what}: {routed}");
            // The decode engine pulled the prefill's KV over NIXL, and was given token ids.
            assert_eq!(settled(&c, decode, transfers, &[]).await, moved + 1.0, "{what}: one NIXL transfer");
            assert_eq!(settled(&c, decode, failed, &[]).await, failed_before, "{what}: a failed transfer");
            let text = scrape(&c, &base(&router)).await;
            assert_eq!(sum(&text, "router_pd_tokenize_once_total", &[r#"mode="on""#]), once + 1.0, "{what}");
            assert_eq!(sum(&text, "router_pd_fallbacks_total", &[]), 0.0, "{what}");
            // What the client reads equals one engine doing it all.
            let (direct_status, direct) = send(&c, &format!("{decode}{path}"), &body, &[]).await;
            assert_eq!(direct_status, 200, "{what}: {direct}");
            assert_eq!(reading(&routed, stream), reading(&direct, stream), "{what}");
            if stream {
                assert!(routed.ends_with("data: [DONE]\n\n"), "{what}: {routed}");
            }
        }
    }
    router.shutdown().await;
}
