//! Prefill/decode mode end to end: the router in front of simulated prefill and decode
//! replicas. Decode receives token ids (tokenize-once), prefill gets `max_tokens: 1`
//! and `do_remote_decode`, streams match a collocated run token for token, and every
//! failure case either recovers or answers clearly, exactly once.

use std::time::Duration;

use llm_router::config::{PdConfig, RouterConfig};
use llm_router::policy::PolicyKind;
use llm_router::replicas::ReplicaUrl;
use llm_router::server::RunningRouter;
use serde_json::{Value, json};
use tokio_stream::StreamExt;
use vllm_sim::faults::FaultConfig;
use vllm_sim::{self as sim, Role, RunningSim, SimConfig};

const MODEL: &str = "Qwen/Qwen3-0.6B-FP8";

async fn sims(n: usize, role: Role) -> Vec<RunningSim> {
    sim::start_fleet(n, &SimConfig { role, time_scale: 20.0, ..SimConfig::default() }).await.unwrap()
}

fn urls(sims: &[RunningSim]) -> Vec<ReplicaUrl> {
    sims.iter().map(|s| ReplicaUrl::parse(&s.url()).unwrap()).collect()
}

async fn pd_router(prefill: &[RunningSim], decode: &[RunningSim], tokenize_once: bool) -> RunningRouter {
    let mut config = RouterConfig::new(urls(decode));
    config.policy = PolicyKind::RoundRobin;
    config.health.interval = Duration::from_millis(100);
    config.pd = Some(PdConfig {
        prefill: urls(prefill),
        prefill_policy: PolicyKind::RoundRobin,
        decode_policy: PolicyKind::RoundRobin,
        tokenize_once,
        sim_prefill: 0,
    });
    llm_router::server::start(config).await.unwrap()
}

fn client() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap()
}

async fn post(base: &str, path: &str, body: &Value) -> (u16, String) {
    let r = client()
        .post(format!("{base}{path}"))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

fn metric(text: &str, series: &str) -> f64 {
    text.lines().find_map(|l| l.strip_prefix(series)?.trim().parse().ok()).unwrap_or(0.0)
}

fn sim_metric(sim: &RunningSim, name: &str) -> f64 {
    metric(&sim.metrics().render(), &format!("{name} "))
}

async fn log(sim: &RunningSim) -> Vec<Value> {
    let r = client().get(format!("{}/sim/requests", sim.url())).send().await.unwrap();
    serde_json::from_str(&r.text().await.unwrap()).unwrap()
}

/// The text of an SSE stream: completion `text` or chat `delta.content`, concatenated.
fn stream_text(sse: &str) -> String {
    sse.split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .filter(|p| *p != "[DONE]")
        .map(|p| serde_json::from_str::<Value>(p).unwrap())
        .filter_map(|c| {
            let choice = c["choices"].get(0)?.clone();
            Some(choice["text"].as_str().or(choice["delta"]["content"].as_str()).unwrap_or("").to_owned())
        })
        .collect()
}

fn chat(stream: bool) -> Value {
    json!({"model": MODEL, "messages": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Explain KV caches."}],
           "max_tokens": 24, "ignore_eos": true, "stream": stream, "stream_options": if stream { json!({"include_usage": true}) } else { Value::Null }})
}

fn completion(stream: bool) -> Value {
    json!({"model": MODEL, "prompt": "Disaggregated serving splits prefill and decode.", "max_tokens": 24,
           "ignore_eos": true, "stream": stream})
}

#[tokio::test]
async fn decode_gets_token_ids_and_output_matches_collocated() {
    let prefill = sims(1, Role::Prefill).await;
    let decode = sims(1, Role::Decode).await;
    let collocated = sims(1, Role::Both).await;
    let router = pd_router(&prefill, &decode, true).await;
    let base = format!("http://{}", router.addr);
    for (path, body) in [
        ("/v1/chat/completions", chat(true)),
        ("/v1/chat/completions", chat(false)),
        ("/v1/completions", completion(true)),
        ("/v1/completions", completion(false)),
    ] {
        let (status, pd) = post(&base, path, &body).await;
        assert_eq!(status, 200, "{pd}");
        let (_, direct) = post(&collocated[0].url(), path, &body).await;
        if body["stream"] == true {
            assert!(pd.ends_with("data: [DONE]\n\n"));
            assert_eq!(stream_text(&pd), stream_text(&direct), "{path}");
            let first: Value =
                serde_json::from_str(pd.split("\n\n").next().unwrap().strip_prefix("data: ").unwrap())
                    .unwrap();
            let direct_first: Value =
                serde_json::from_str(direct.split("\n\n").next().unwrap().strip_prefix("data: ").unwrap())
                    .unwrap();
            assert_eq!(
                first["object"], direct_first["object"],
                "{path}: chunk type follows the client's endpoint"
            );
            if path.contains("chat") {
                assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
                let usage = pd.split("\n\n").filter(|e| e.contains("\"usage\"")).last().unwrap();
                assert!(usage.contains("\"completion_tokens\":24"), "{usage}");
            }
        } else {
            let (a, b): (Value, Value) =
                (serde_json::from_str(&pd).unwrap(), serde_json::from_str(&direct).unwrap());
            assert_eq!(a["object"], b["object"]);
            assert_eq!(a["usage"], b["usage"]);
            let text = |v: &Value| {
                v["choices"][0]["text"]
                    .as_str()
                    .or(v["choices"][0]["message"]["content"].as_str())
                    .unwrap()
                    .to_owned()
            };
            assert_eq!(text(&a), text(&b), "{path}");
        }
    }
    // Decode never tokenised: every prompt arrived as ids, every handoff was accepted.
    assert_eq!(sim_metric(&decode[0], "sim_prompts_token_ids_total"), 4.0);
    assert_eq!(sim_metric(&decode[0], "sim_prompts_tokenized_total"), 0.0);
    assert_eq!(sim_metric(&decode[0], "sim_pd_handoffs_accepted_total"), 4.0);
    // Prefill saw the protocol's request; both stages carried the same request id.
    let request_id = |entry: &Value| {
        entry["headers"].as_array().unwrap().iter().find(|h| h[0] == "x-request-id").map(|h| h[1].clone())
    };
    let decode_log = log(&decode[0]).await;
    for (p, d) in log(&prefill[0]).await.iter().zip(&decode_log) {
        assert_eq!(p["max_tokens"], 1);
        assert_eq!(p["stream"], false);
        assert_eq!(p["kv_transfer_params"]["do_remote_decode"], true);
        assert!(request_id(p).is_some());
        assert_eq!(request_id(p), request_id(d));
    }
    let text = router.metrics.render();
    assert_eq!(metric(&text, r#"router_pd_tokenize_once_total{mode="on"}"#), 4.0);
    for phase in ["prefill", "handoff", "decode_ttft", "total"] {
        assert_eq!(
            metric(&text, &format!(r#"router_pd_phase_seconds_count{{phase="{phase}"}}"#)),
            4.0,
            "{phase}"
        );
    }
    router.shutdown().await;
}

#[tokio::test]
async fn without_tokenize_once_decode_gets_text_and_tools_use_the_chat_endpoint() {
    let prefill = sims(1, Role::Prefill).await;
    let decode = sims(1, Role::Decode).await;
    let router = pd_router(&prefill, &decode, false).await;
    let base = format!("http://{}", router.addr);
    assert_eq!(post(&base, "/v1/chat/completions", &chat(true)).await.0, 200);
    assert_eq!(sim_metric(&decode[0], "sim_prompts_tokenized_total"), 1.0);
    assert_eq!(sim_metric(&decode[0], "sim_pd_handoffs_accepted_total"), 1.0);
    router.shutdown().await;

    let router = pd_router(&prefill, &decode, true).await;
    let base = format!("http://{}", router.addr);
    let mut with_tools = chat(false);
    with_tools["tools"] = json!([{"type": "function", "function": {"name": "f", "parameters": {}}}]);
    assert_eq!(post(&base, "/v1/chat/completions", &with_tools).await.0, 200);
    let last = log(&decode[0]).await.pop().unwrap();
    assert_eq!(last["path"], "/v1/chat/completions");
    assert_eq!(last["prompt_from_text"], true);
    assert_eq!(metric(&router.metrics.render(), r#"router_pd_tokenize_once_total{mode="unavailable"}"#), 1.0);
    router.shutdown().await;
}

#[tokio::test]
async fn prefill_failures_retry_then_502() {
    let prefill = sims(2, Role::Prefill).await;
    let decode = sims(1, Role::Decode).await;
    let router = pd_router(&prefill, &decode, true).await;
    let base = format!("http://{}", router.addr);
    prefill[0].faults().set(FaultConfig { fail_500: true, ..Default::default() });
    for _ in 0..4 {
        let (status, body) = post(&base, "/v1/completions", &completion(false)).await;
        assert_eq!(status, 200, "{body}");
    }
    assert_eq!(sim_metric(&decode[0], "sim_pd_handoffs_accepted_total"), 4.0);
    prefill[1].faults().set(FaultConfig { fail_500: true, ..Default::default() });
    let (status, body) = post(&base, "/v1/completions", &completion(true)).await;
    assert_eq!(status, 502);
    let err: Value = serde_json::from_str(&body).unwrap();
    assert!(err["error"]["message"].as_str().unwrap().contains("prefill failed"), "{err}");
    assert_eq!(
        sim_metric(&decode[0], "sim_pd_handoffs_accepted_total"),
        4.0,
        "no decode after a failed prefill"
    );
    assert_eq!(log(&decode[0]).await.len(), 4);
    router.shutdown().await;
}

#[tokio::test]
async fn prefill_without_kv_params_falls_back_to_a_full_decode() {
    // A "prefill" replica that does not run a KV connector: it answers normally.
    let prefill = sims(1, Role::Decode).await;
    let decode = sims(1, Role::Decode).await;
    let router = pd_router(&prefill, &decode, true).await;
    let base = format!("http://{}", router.addr);
    let (status, body) = post(&base, "/v1/chat/completions", &chat(true)).await;
    assert_eq!(status, 200);
    assert!(stream_text(&body).len() > 10);
    assert_eq!(sim_metric(&decode[0], "sim_pd_handoffs_rejected_total"), 1.0, "decode prefilled locally");
    let text = router.metrics.render();
    let series = format!(
        r#"router_pd_fallbacks_total{{prefill="{}",reason="no_kv_transfer_params"}}"#,
        prefill[0].url()
    );
    assert_eq!(metric(&text, &series), 1.0);
    router.shutdown().await;
}

#[tokio::test]
async fn decode_failure_is_retried_with_the_same_params() {
    let prefill = sims(1, Role::Prefill).await;
    let decode = sims(2, Role::Decode).await;
    decode[0].faults().set(FaultConfig { fail_500: true, ..Default::default() });
    let router = pd_router(&prefill, &decode, true).await;
    let base = format!("http://{}", router.addr);
    for _ in 0..4 {
        let (status, body) = post(&base, "/v1/chat/completions", &chat(true)).await;
        assert_eq!(status, 200, "{body}");
        assert!(body.ends_with("data: [DONE]\n\n"));
    }
    assert_eq!(sim_metric(&decode[1], "sim_pd_handoffs_accepted_total"), 4.0);
    assert_eq!(sim_metric(&prefill[0], "sim_pd_prefills_total"), 4.0, "each request prefilled exactly once");
    router.shutdown().await;
}

#[tokio::test]
async fn client_disconnect_cancels_decode() {
    let prefill = sims(1, Role::Prefill).await;
    let decode =
        sim::start_fleet(1, &SimConfig { role: Role::Decode, time_scale: 1.0, ..SimConfig::default() })
            .await
            .unwrap();
    let router = pd_router(&prefill, &decode, true).await;
    let mut body = chat(true);
    body["max_tokens"] = json!(5000);
    let r = client()
        .post(format!("http://{}/v1/chat/completions", router.addr))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    let mut stream = r.bytes_stream();
    stream.next().await.unwrap().unwrap();
    drop(stream);
    for _ in 0..250 {
        if sim_metric(&decode[0], "sim_requests_aborted_total") == 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(sim_metric(&decode[0], "sim_requests_aborted_total"), 1.0);
    router.shutdown().await;
}

#[tokio::test]
async fn client_disconnect_during_prefill_cancels_prefill() {
    let prefill = sims(1, Role::Prefill).await;
    prefill[0].faults().set(FaultConfig { slowdown: 100_000.0, ..Default::default() });
    let decode = sims(1, Role::Decode).await;
    let router = pd_router(&prefill, &decode, true).await;
    let url = format!("http://{}/v1/completions", router.addr);
    let request = tokio::spawn(async move {
        client()
            .post(url)
            .header("content-type", "application/json")
            .body(completion(true).to_string())
            .send()
            .await
    });
    for _ in 0..250 {
        if sim_metric(&prefill[0], "vllm:num_requests_running") == 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    request.abort();
    for _ in 0..250 {
        if sim_metric(&prefill[0], "sim_requests_aborted_total") == 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(sim_metric(&prefill[0], "sim_requests_aborted_total"), 1.0);
    assert!(log(&decode[0]).await.is_empty(), "decode never saw the abandoned request");
    router.shutdown().await;
}

#[tokio::test]
async fn router_sim_pd_starts_an_embedded_pd_fleet() {
    let cli = <llm_router::config::Cli as clap::Parser>::parse_from([
        "router",
        "--sim-pd",
        "1:2",
        "--sim-time-scale",
        "20",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
    ]);
    let router = llm_router::server::start(cli.into_config().unwrap()).await.unwrap();
    assert_eq!(router.prefill_registry.as_ref().unwrap().replicas().len(), 1);
    assert_eq!(router.registry.replicas().len(), 2);
    let (status, body) = post(&format!("http://{}", router.addr), "/v1/completions", &completion(true)).await;
    assert_eq!(status, 200, "{body}");
    let text = router.metrics.render();
    assert_eq!(metric(&text, r#"router_pd_tokenize_once_total{mode="on"}"#), 1.0);
    router.shutdown().await;
}
