//! The vLLM simulator against real HTTP clients on 127.0.0.1: exact usage, determinism,
//! the engine model (prefix caching, KV exhaustion, aborts), P/D handoffs and every fault
//! switch. Its wire shapes against vLLM's are in wire_shapes.rs.

mod support;

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::*;
use tokio_stream::StreamExt;
use vllm_sim::{self as sim, Role, RunningSim, SimConfig};

#[tokio::test]
async fn usage_is_exact_and_output_deterministic() {
    let s = sim_with(config()).await;
    let prompt = "Count the tokens of this prompt exactly, please.";
    let body = json!({"model": MODEL, "prompt": prompt, "max_tokens": 30, "ignore_eos": true, "return_token_ids": true});
    let (_, a) = post(&s, "/v1/completions", &body).await;
    let (_, b) = post(&s, "/v1/completions", &body).await;
    let a: Value = serde_json::from_str(&a).unwrap();
    let b: Value = serde_json::from_str(&b).unwrap();
    assert_eq!(a["choices"][0]["text"], b["choices"][0]["text"], "same request, same text");
    let tok: Value =
        serde_json::from_str(&post(&s, "/tokenize", &json!({"prompt": prompt})).await.1).unwrap();
    assert_eq!(a["usage"]["prompt_tokens"], tok["count"]);
    assert_eq!(a["choices"][0]["prompt_token_ids"], tok["tokens"]);
    assert_eq!(a["usage"]["completion_tokens"], 30);
    assert_eq!(a["choices"][0]["token_ids"].as_array().unwrap().len(), 30);
    // The text is what the ids decode to.
    let detok: Value = serde_json::from_str(
        &post(&s, "/detokenize", &json!({"tokens": a["choices"][0]["token_ids"]})).await.1,
    )
    .unwrap();
    assert_eq!(detok["prompt"], a["choices"][0]["text"]);
    // A different seed gives different text; the same prompt as ids gives the same text.
    let (_, c) = post(
        &s,
        "/v1/completions",
        &json!({"model": MODEL, "prompt": prompt, "max_tokens": 30, "ignore_eos": true, "seed": 7}),
    )
    .await;
    assert_ne!(serde_json::from_str::<Value>(&c).unwrap()["choices"][0]["text"], a["choices"][0]["text"]);
    let (_, d) = post(
        &s,
        "/v1/completions",
        &json!({"model": MODEL, "prompt": tok["tokens"], "max_tokens": 30, "ignore_eos": true}),
    )
    .await;
    assert_eq!(serde_json::from_str::<Value>(&d).unwrap()["choices"][0]["text"], a["choices"][0]["text"]);
    assert_eq!(metric(&s, "sim_prompts_token_ids_total"), 1.0);
    assert!(metric(&s, "sim_prompts_tokenized_total") >= 3.0);
}

#[tokio::test]
async fn stop_strings_min_tokens_and_eos() {
    let s = sim_with(config()).await;
    let base = json!({"model": MODEL, "prompt": "The router", "max_tokens": 40, "ignore_eos": true});
    let (_, full) = post(&s, "/v1/completions", &base).await;
    let full: Value = serde_json::from_str(&full).unwrap();
    let text = full["choices"][0]["text"].as_str().unwrap().to_owned();
    let words: Vec<&str> = text.split_whitespace().collect();
    let stop = words[5];
    let mut body = base.clone();
    body["stop"] = json!([stop]);
    let (_, stopped) = post(&s, "/v1/completions", &body).await;
    let stopped: Value = serde_json::from_str(&stopped).unwrap();
    let cut = &text[..text.find(stop).unwrap()];
    assert_eq!(stopped["choices"][0]["text"], cut);
    assert_eq!(stopped["choices"][0]["finish_reason"], "stop");
    assert_eq!(stopped["choices"][0]["stop_reason"], stop);
    // Without ignore_eos the model stops by itself (finish_reason "stop"), never before min_tokens.
    let (_, natural) = post(
        &s,
        "/v1/completions",
        &json!({"model": MODEL, "prompt": "x", "max_tokens": 2000, "min_tokens": 300}),
    )
    .await;
    let natural: Value = serde_json::from_str(&natural).unwrap();
    assert_eq!(natural["choices"][0]["finish_reason"], "stop");
    assert!(natural["usage"]["completion_tokens"].as_u64().unwrap() >= 300);
}

#[tokio::test]
async fn errors_have_vllm_shape_and_status() {
    let s = sim_with(SimConfig { max_model_len: 64, ..config() }).await;
    for (path, body, status) in [
        ("/v1/completions", json!({"model": "other", "prompt": "x"}), 404),
        ("/v1/completions", json!({"model": MODEL, "prompt": " hello".repeat(100)}), 400),
        ("/v1/completions", json!({"model": MODEL, "prompt": "x", "n": 3}), 400),
        ("/v1/chat/completions", json!({"model": MODEL}), 400),
    ] {
        let (got, text) = post(&s, path, &body).await;
        assert_eq!(got, status, "{body}: {text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["error"]["code"], status);
        assert!(v["error"]["message"].is_string() && v["error"]["type"].is_string());
    }
    let r = client().post(format!("{}/v1/completions", s.url())).body("{nope").send().await.unwrap();
    assert_eq!(r.status(), 400);
}

/// Time to the first streamed chunk of a completion.
async fn ttft(s: &RunningSim, body: &Value) -> Duration {
    let start = Instant::now();
    let r = client().post(format!("{}/v1/completions", s.url())).json_body(body).send().await.unwrap();
    let mut stream = r.bytes_stream();
    stream.next().await.unwrap().unwrap();
    let t = start.elapsed();
    while stream.next().await.is_some() {}
    t
}

#[tokio::test]
async fn chat_role_chunk_comes_with_the_first_token_not_before_prefill() {
    // Slowed 100x, the prefill step of this prompt takes over a second: the role chunk
    // must wait for it (vLLM sends it with the engine's first output), so a client's time
    // to first chunk measures prefill.
    let s = sim_with(SimConfig { time_scale: 1.0, ..SimConfig::default() }).await;
    s.faults().set(sim::faults::FaultConfig { slowdown: 100.0, ..Default::default() });
    let body = json!({"model": MODEL, "messages": [{"role": "user", "content": " word".repeat(2000)}],
        "max_tokens": 1, "stream": true});
    let r = client().post(format!("{}/v1/chat/completions", s.url())).json_body(&body).send().await.unwrap();
    let mut stream = r.bytes_stream();
    let early = tokio::time::timeout(Duration::from_millis(300), stream.next()).await;
    assert!(early.is_err(), "a chunk arrived before prefill could have finished");
    let mut text = String::new();
    while let Some(chunk) = stream.next().await {
        text.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
    }
    let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
    assert!(events[0].contains(r#""role":"assistant""#), "{}", events[0]);
    assert!(events[1].contains(r#""finish_reason":"length""#), "{}", events[1]);
}

#[tokio::test]
async fn prefix_cache_hits_shorten_ttft() {
    // The saving is a prefill of ~6000 tokens (~17 ms on the profile), slowed 5x and
    // without the API server's costs, so that it stands well clear of scheduling noise.
    let mut config = SimConfig { time_scale: 0.2, ..SimConfig::default() };
    config.profile.api = sim::profile::ApiCosts::NONE;
    let s = sim_with(config).await;
    let prompt = "fn main() { let x = 1; } ".repeat(600);
    let body = json!({"model": MODEL, "prompt": prompt, "max_tokens": 2, "stream": true});
    let cold = ttft(&s, &body).await;
    let warm = ttft(&s, &body).await;
    assert!(metric(&s, "vllm:prefix_cache_hits_total") > 5000.0);
    assert!(warm < cold, "cached prefix should be faster: cold {cold:?}, warm {warm:?}");
}

#[tokio::test]
async fn kv_exhaustion_queues_requests() {
    // 20 blocks = 320 tokens of KV: two 200-token requests cannot run together.
    let s = sim_with(SimConfig { num_gpu_blocks: 20, time_scale: 5.0, ..SimConfig::default() }).await;
    let body = |salt: &str| {
        json!({"model": MODEL, "prompt": format!("{salt} {}", " word".repeat(150)),
        "max_tokens": 40, "ignore_eos": true})
    };
    let url = format!("{}/v1/completions", s.url());
    let a = tokio::spawn(client().post(url.clone()).json_body(&body("a")).send());
    let b = tokio::spawn(client().post(url).json_body(&body("b")).send());
    let mut saw_waiting = false;
    for _ in 0..200 {
        if metric(&s, "vllm:num_requests_waiting") >= 1.0 && metric(&s, "vllm:num_requests_running") == 1.0 {
            saw_waiting = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(saw_waiting, "the second request should wait for KV blocks");
    assert_eq!(a.await.unwrap().unwrap().status(), 200);
    assert_eq!(b.await.unwrap().unwrap().status(), 200);
    // A request larger than the whole cache is refused, not queued forever.
    let huge = json!({"model": MODEL, "prompt": " word".repeat(400), "max_tokens": 2});
    let (status, _) = post(&s, "/v1/completions", &huge).await;
    assert_eq!(status, 400);
}

#[tokio::test]
async fn client_abort_frees_blocks() {
    let s = sim_with(SimConfig { time_scale: 1.0, ..SimConfig::default() }).await;
    let body = json!({"model": MODEL, "prompt": "long story", "max_tokens": 5000, "ignore_eos": true, "stream": true});
    let r = client().post(format!("{}/v1/completions", s.url())).json_body(&body).send().await.unwrap();
    let mut stream = r.bytes_stream();
    stream.next().await.unwrap().unwrap();
    assert!(metric(&s, "vllm:kv_cache_usage_perc") > 0.0);
    drop(stream);
    eventually("abort counted", || metric(&s, "sim_requests_aborted_total") == 1.0).await;
    eventually("blocks freed", || {
        metric(&s, "vllm:kv_cache_usage_perc") == 0.0 && metric(&s, "vllm:num_requests_running") == 0.0
    })
    .await;
}

#[tokio::test]
async fn pd_params_round_trip_and_match_collocated_output() {
    let prefill = sim_with(SimConfig { role: Role::Prefill, ..config() }).await;
    let decode = sim_with(SimConfig { role: Role::Decode, ..config() }).await;
    let both = sim_with(config()).await;
    let prompt = "Explain prefill and decode disaggregation in one paragraph. ".repeat(20);
    let p_body = json!({"model": MODEL, "prompt": prompt, "max_tokens": 1, "stream": false, "return_token_ids": true,
        "kv_transfer_params": {"do_remote_decode": true, "do_remote_prefill": false, "remote_engine_id": null,
            "remote_block_ids": null, "remote_host": null, "remote_port": null}});
    let (status, p) = post(&prefill, "/v1/completions", &p_body).await;
    assert_eq!(status, 200);
    let p: Value = serde_json::from_str(&p).unwrap();
    assert_eq!(p["usage"]["completion_tokens"], 1);
    let kv = &p["kv_transfer_params"];
    for field in [
        "do_remote_prefill",
        "remote_engine_id",
        "remote_block_ids",
        "remote_host",
        "remote_port",
        "remote_request_id",
        "tp_size",
    ] {
        assert!(!kv[field].is_null(), "missing {field} in {kv}");
    }
    assert_eq!(kv["do_remote_prefill"], true);
    let prompt_ids = p["choices"][0]["prompt_token_ids"].clone();
    let d_body = json!({"model": MODEL, "prompt": prompt_ids, "max_tokens": 20, "ignore_eos": true, "kv_transfer_params": kv});
    let (status, d) = post(&decode, "/v1/completions", &d_body).await;
    assert_eq!(status, 200, "{d}");
    assert_eq!(metric(&decode, "sim_pd_handoffs_accepted_total"), 1.0);
    assert_eq!(metric(&decode, "sim_prompts_token_ids_total"), 1.0);
    assert_eq!(
        metric(&decode, "vllm:prompt_tokens_total"),
        1.0,
        "decode computed only the last prompt token"
    );
    let (_, c) = post(
        &both,
        "/v1/completions",
        &json!({"model": MODEL, "prompt": prompt, "max_tokens": 20, "ignore_eos": true}),
    )
    .await;
    let d: Value = serde_json::from_str(&d).unwrap();
    let c: Value = serde_json::from_str(&c).unwrap();
    assert_eq!(d["choices"][0]["text"], c["choices"][0]["text"], "P/D output equals collocated output");
    // Params naming an unknown engine: full local prefill, counted. (A fresh prompt: the
    // accepted handoff left the first prompt's blocks in the decode replica's cache.)
    let mut bad = d_body.clone();
    bad["prompt"] = json!(format!("A different question entirely. {prompt}"));
    bad["kv_transfer_params"]["remote_engine_id"] = json!("not-a-sim-engine");
    let (status, _) = post(&decode, "/v1/completions", &bad).await;
    assert_eq!(status, 200);
    assert_eq!(metric(&decode, "sim_pd_handoffs_rejected_total"), 1.0);
    assert!(metric(&decode, "vllm:prompt_tokens_total") > 100.0);
    // The request log saw ids, not text, on the decode replica.
    let log: Value =
        client().get(format!("{}/sim/requests", decode.url())).send().await.unwrap().json_value().await;
    assert_eq!(log[0]["prompt_from_text"], false);
    assert!(!log[0]["kv_transfer_params"].is_null());
}

#[tokio::test]
async fn fault_switches() {
    let s = sim_with(config()).await;
    let url = format!("{}/v1/completions", s.url());
    let body = json!({"model": MODEL, "prompt": "x", "max_tokens": 10, "ignore_eos": true, "stream": true});
    let set = |faults: Value| {
        let url = format!("{}/sim/faults", s.url());
        async move { client().post(url).json_body(&faults).send().await.unwrap().status() }
    };

    assert_eq!(set(json!({"fail_500": true})).await, 200);
    let (status, _) = post(&s, "/v1/completions", &body).await;
    assert_eq!(status, 500);
    set(json!({})).await;

    set(json!({"stall_after_tokens": 3})).await;
    let r = client().post(&url).json_body(&body).send().await.unwrap();
    let mut stream = r.bytes_stream();
    let mut chunks = 0;
    loop {
        match tokio::time::timeout(Duration::from_millis(500), stream.next()).await {
            Ok(Some(Ok(_))) => chunks += 1,
            Ok(other) => panic!("stream ended instead of stalling: {other:?}"),
            Err(_) => break, // stalled
        }
    }
    assert_eq!(chunks, 3);
    drop(stream);
    set(json!({})).await;

    set(json!({"drop_after_tokens": 2})).await;
    let r = client().post(&url).json_body(&body).send().await.unwrap();
    let mut stream = r.bytes_stream();
    let mut got = 0;
    let mut failed = false;
    let mut received = Vec::new();
    while let Some(item) = stream.next().await {
        match item {
            Ok(bytes) => {
                got += 1;
                received.extend_from_slice(&bytes);
            }
            Err(_) => failed = true,
        }
    }
    let text = String::from_utf8_lossy(&received).into_owned();
    assert!(failed, "the connection is cut");
    assert_eq!(
        text.matches("data: ").count(),
        2,
        "exactly the 2 tokens before the cut: {text} ({got} reads)"
    );
    set(json!({})).await;

    let plain = json!({"model": MODEL, "prompt": "x", "max_tokens": 20, "ignore_eos": true});
    let t = Instant::now();
    post(&s, "/v1/completions", &plain).await;
    let normal = t.elapsed();
    set(json!({"slowdown": 50.0})).await;
    let t = Instant::now();
    post(&s, "/v1/completions", &plain).await;
    let slow = t.elapsed();
    assert!(slow > normal * 2, "slowdown: normal {normal:?}, slow {slow:?}");
    set(json!({})).await;

    set(json!({"refuse_connections_ms": 500})).await;
    tokio::time::sleep(Duration::from_millis(150)).await;
    let refused = reqwest::Client::new().get(format!("{}/health", s.url())).send().await;
    assert!(refused.is_err_and(|e| e.is_connect()), "connections are refused");
    eventually("listening again", || std::net::TcpStream::connect(s.addr).is_ok()).await;
    assert!(metric(&s, "sim_faults_injected_total") >= 1.0);
}
