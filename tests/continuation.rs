//! Streams that survive a dead replica: simulated vLLM engines on 127.0.0.1, long
//! streamed chats and completions through the router, and the busiest engine killed
//! (its listener and every connection cut, as a crashed process) while they stream. With
//! continuation (the default) every client gets one whole stream: the same `id`
//! throughout, every token once, one finish reason, usage that counts its prompt once
//! and every token it received, no error event. With `--continuation off` the streams
//! on the dead engine end with an error event, as they did before continuation.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use llm_router::server::RunningRouter;
use serde_json::{Value, json};
use support::*;
use tokio_stream::StreamExt;
use vllm_sim::{self as sim, RunningSim, SimConfig};

const MODEL: &str = "Qwen/Qwen3-0.6B-FP8";
const STREAMS: usize = 32;
const TOKENS: u64 = 2000;

/// What one client read.
#[derive(Debug, Default)]
struct Read {
    ids: Vec<String>,
    tokens: u64,
    finishes: Vec<String>,
    usage: Option<Value>,
    errors: Vec<String>,
    done: usize,
    after_done: usize,
}

fn body(i: usize) -> Value {
    let words = format!("request {i}: the history of routers and their replicas, told at length");
    let mut body = json!({"model": MODEL, "stream": true, "max_tokens": TOKENS, "ignore_eos": true,
        "stream_options": {"include_usage": true}});
    if i.is_multiple_of(2) {
        body["messages"] = json!([{"role": "user", "content": words}]);
    } else {
        body["prompt"] = json!(words);
    }
    body
}

fn path(i: usize) -> &'static str {
    if i.is_multiple_of(2) { "/v1/chat/completions" } else { "/v1/completions" }
}

async fn stream(url: String, body: Value, events: Arc<AtomicUsize>) -> Read {
    let response = reqwest::Client::new()
        .post(url)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut read = Read::default();
    let mut text = String::new();
    let mut chunks = response.bytes_stream();
    while let Some(chunk) = chunks.next().await {
        let Ok(chunk) = chunk else { break };
        text.push_str(std::str::from_utf8(&chunk).unwrap());
        while let Some(end) = text.find("\n\n") {
            let event: String = text.drain(..end + 2).collect();
            let data =
                event.trim_end().strip_prefix("data: ").unwrap_or_else(|| panic!("not SSE: {event:?}"));
            if read.done > 0 {
                read.after_done += 1;
            }
            if data == "[DONE]" {
                read.done += 1;
                continue;
            }
            let value: Value = serde_json::from_str(data).unwrap_or_else(|e| panic!("{e}: {data}"));
            if let Some(error) = value.get("error") {
                read.errors.push(error.to_string());
                continue;
            }
            read.ids.push(value["id"].as_str().unwrap().to_owned());
            if !value["usage"].is_null() {
                read.usage = Some(value["usage"].clone());
            }
            for choice in value["choices"].as_array().unwrap() {
                let delta = &choice["delta"];
                let role_only =
                    delta.get("role").is_some() && delta["content"].as_str().unwrap_or("").is_empty();
                if !role_only || !choice["finish_reason"].is_null() {
                    read.tokens += 1;
                    events.fetch_add(1, Ordering::Relaxed);
                }
                if let Some(reason) = choice["finish_reason"].as_str() {
                    read.finishes.push(reason.to_owned());
                }
            }
        }
    }
    assert!(text.is_empty(), "a half event at the end: {text:?}");
    read
}

/// The prompt tokens an engine counts for request `i`, asked of a healthy engine.
async fn prompt_tokens(engine: &RunningSim, i: usize) -> u64 {
    let mut body = body(i);
    body["stream"] = json!(false);
    body["max_tokens"] = json!(1);
    body.as_object_mut().unwrap().remove("stream_options");
    let response = reqwest::Client::new()
        .post(format!("{}{}", engine.url(), path(i)))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    let value: Value = serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
    value["usage"]["prompt_tokens"].as_u64().unwrap()
}

/// Start 32 streams through the router, kill the engine with the most of them once
/// every stream is under way, and return what each client read.
async fn kill_mid_stream(router: &RunningRouter, engines: &[RunningSim]) -> (usize, Vec<Read>) {
    let events = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for i in 0..STREAMS {
        let url = format!("{}{}", base(router), path(i));
        clients.push(tokio::spawn(stream(url, body(i), events.clone())));
    }
    eventually("every stream under way", || events.load(Ordering::Relaxed) >= STREAMS * 60).await;
    let fleet = router.registry.fleet();
    let busiest = (0..fleet.replicas.len()).max_by_key(|&i| fleet.replicas[i].in_flight()).unwrap();
    let name = fleet.replicas[busiest].name().to_owned();
    let killed = engines.iter().position(|e| name.contains(&e.addr.to_string())).unwrap();
    assert!(fleet.replicas[busiest].in_flight() > 0);
    engines[killed].shutdown();
    let mut reads = Vec::new();
    for client in clients {
        reads.push(
            tokio::time::timeout(Duration::from_secs(120), client).await.expect("a stream hung").unwrap(),
        );
    }
    (killed, reads)
}

async fn fleet_and_router(continuation: bool) -> (Vec<RunningSim>, RunningRouter) {
    let engines = sim::start_fleet(4, &SimConfig { time_scale: 2.0, ..SimConfig::default() }).await.unwrap();
    let urls: Vec<String> = engines.iter().map(RunningSim::url).collect();
    let mut config = config_for(&urls);
    config.policy = llm_router::policy::PolicyKind::RoundRobin;
    if !continuation {
        config.continuation_attempts = 0;
    }
    let router = router(config).await;
    eventually("all four engines healthy", || router.registry.healthy_count() == 4).await;
    (engines, router)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_replica_costs_no_client_its_answer() {
    let (engines, router) = fleet_and_router(true).await;
    let (killed, reads) = kill_mid_stream(&router, &engines).await;
    let healthy = &engines[(killed + 1) % engines.len()];
    for (i, read) in reads.iter().enumerate() {
        assert!(read.errors.is_empty(), "stream {i} got an error event: {:?}", read.errors);
        assert_eq!(read.tokens, TOKENS, "stream {i}: every token once");
        assert_eq!(read.finishes, ["length"], "stream {i}: one finish reason");
        assert!(read.ids.iter().all(|id| id == &read.ids[0]), "stream {i}: one id");
        assert_eq!((read.done, read.after_done), (1, 0), "stream {i}: one [DONE], last");
        let usage = read.usage.as_ref().unwrap_or_else(|| panic!("stream {i}: no usage"));
        let prompt = prompt_tokens(healthy, i).await;
        assert_eq!(
            usage,
            &json!({"prompt_tokens": prompt, "completion_tokens": TOKENS, "total_tokens": prompt + TOKENS}),
            "stream {i}: the prompt once and every token received"
        );
    }
    let metrics = router.metrics.render();
    let continued: f64 = ["chat_completions", "completions"]
        .iter()
        .map(|e| {
            metric(&metrics, &format!(r#"router_continuations_total{{endpoint="{e}",outcome="continued"}}"#))
        })
        .sum();
    assert!(continued >= 1.0, "the killed engine's streams were continued: {continued}");
    router.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_continuation_the_killed_replicas_streams_end_with_an_error_event() {
    let (engines, router) = fleet_and_router(false).await;
    let (_, reads) = kill_mid_stream(&router, &engines).await;
    let broken = reads.iter().filter(|r| !r.errors.is_empty()).count();
    assert!(broken >= 1, "some streams were on the killed engine");
    for read in reads.iter().filter(|r| !r.errors.is_empty()) {
        assert!(read.tokens < TOKENS && read.finishes.is_empty() && read.done == 1, "{read:?}");
    }
    router.shutdown().await;
}

/// One request to the router, read whole.
async fn read_one(router: &RunningRouter, path: &str, body: Value) -> Read {
    stream(format!("{}{path}", base(router)), body, Arc::new(AtomicUsize::new(0))).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engines_error_event_is_continued_unless_the_request_cannot_be() {
    let engines = sim::start_fleet(2, &SimConfig { time_scale: 20.0, ..SimConfig::default() }).await.unwrap();
    engines[0]
        .faults()
        .set(vllm_sim::faults::FaultConfig { error_after_tokens: Some(5), ..Default::default() });
    let urls: Vec<String> = engines.iter().map(RunningSim::url).collect();
    let mut config = config_for(&urls);
    config.policy = llm_router::policy::PolicyKind::RoundRobin;
    let router = router(config).await;
    eventually("both engines healthy", || router.registry.healthy_count() == 2).await;
    for i in 0..4 {
        let mut request = body(i);
        request["max_tokens"] = json!(40);
        let read = read_one(&router, path(i), request).await;
        assert!(read.errors.is_empty(), "request {i}: {:?}", read.errors);
        assert_eq!((read.tokens, read.finishes.len(), read.done), (40, 1, 1), "request {i}: {read:?}");
        assert_eq!(read.usage.as_ref().unwrap()["completion_tokens"], 40);
    }
    // Token ids cannot be continued from text: the engine's failure reaches the client as
    // an error event, once, after the tokens it had.
    let mut errors = 0;
    for _ in 0..2 {
        let ids = json!({"model": MODEL, "prompt": [1, 2, 3, 4], "max_tokens": 40, "stream": true, "ignore_eos": true});
        let read = read_one(&router, "/v1/completions", ids).await;
        if !read.errors.is_empty() {
            errors += 1;
            assert_eq!((read.tokens, read.errors.len(), read.done), (5, 1, 1), "{read:?}");
            assert!(read.errors[0].contains("the engine failed"), "{:?}", read.errors);
        }
    }
    assert_eq!(errors, 1, "one of two requests went to the failing engine");
    let metrics = router.metrics.render();
    let outcome = |o: &str| {
        metric(&metrics, &format!(r#"router_continuations_total{{endpoint="completions",outcome="{o}"}}"#))
    };
    // Token ids are known not to be continuable when the request arrives: their stream
    // is not watched for it, and its break is an upstream error, not a refusal.
    assert!(outcome("continued") >= 1.0 && outcome("refused") == 0.0, "{metrics}");
    router.shutdown().await;
}
