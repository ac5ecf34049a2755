//! Engines that misbehave in `--engine-api generate`, played at the byte level: one that
//! streams token ids without end, one that dies mid-answer. The router ends generation
//! at the request's `max_tokens` itself, keeps its memory bounded whatever the engine
//! sends, and finishes a broken answer on another replica. Stop strings beyond the
//! router's bounds are refused before any engine sees them.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use llm_router::config::RouterConfig;
use llm_router::policy::prompt_tokens::{BuiltinTokenizer, PromptTokenizer};
use serde_json::{Value, json};
use support::raw_replica::{Act, RawReplica, SSE_HEAD, chunk};
use support::*;

fn generate_config(replicas: &[&RawReplica]) -> RouterConfig {
    let mut config = config_for(&replicas.iter().map(|r| r.url()).collect::<Vec<_>>());
    config.engine_api = llm_router::frontend::EngineApi::Generate;
    config.tokenizer = Some(Arc::new(PromptTokenizer::Builtin(BuiltinTokenizer::new(1 << 16))));
    config
}

/// One generate event carrying `ids`, with a finish reason when given.
fn token_event(ids: &[u32], finish: Option<&str>) -> Vec<u8> {
    let event = json!({"request_id": "r", "choices": [{"index": 0, "finish_reason": finish,
        "stop_reason": null, "token_ids": ids}]});
    chunk(format!("data: {event}\n\n").as_bytes())
}

/// The ids of " word" in the built-in tokenizer (one token).
fn word() -> u32 {
    let ids = llm_common::tokenizer::encode(" word");
    assert_eq!(ids.len(), 1);
    ids[0]
}

fn events(body: &str) -> Vec<Value> {
    body.split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .filter(|e| *e != "[DONE]")
        .map(|e| serde_json::from_str(e).unwrap())
        .collect()
}

#[tokio::test]
async fn an_engine_that_never_stops_is_stopped_at_max_tokens() {
    let flood: support::raw_replica::Script =
        Arc::new(|_| vec![Act::Write(SSE_HEAD.to_vec()), Act::Flood(token_event(&[word(); 3], None))]);
    let engine = RawReplica::start(flood).await;
    let router = router(generate_config(&[&engine])).await;
    let url = format!("{}/v1/completions", base(&router));
    // Streamed: 20 tokens, finish `length`, [DONE], and the engine's request aborted.
    let body = json!({"model": "m", "prompt": "hi", "max_tokens": 20, "stream": true,
        "stream_options": {"include_usage": true}});
    let (status, _, answer) = post(&client(), &url, &body, &[]).await;
    let answer = String::from_utf8(answer.to_vec()).unwrap();
    assert_eq!(status, 200, "{answer}");
    assert!(answer.ends_with("data: [DONE]\n\n"), "{answer}");
    let events = events(&answer);
    let text: String = events.iter().filter_map(|e| e["choices"][0]["text"].as_str()).collect();
    assert_eq!(text, " word".repeat(20));
    let last = &events[events.len() - 2];
    assert_eq!(last["choices"][0]["finish_reason"], "length", "{last}");
    assert_eq!(events[events.len() - 1]["usage"]["completion_tokens"], 20);
    eventually("the engine's request is aborted", || {
        engine.counters.closed_while_hanging.load(Ordering::SeqCst) >= 1
    })
    .await;
    // Not streamed, and no max_tokens: what the model's context (4,096) leaves.
    let body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
    let (status, _, answer) =
        post(&client(), &format!("{}/v1/chat/completions", base(&router)), &body, &[]).await;
    assert_eq!(status, 200);
    let answer: Value = serde_json::from_slice(&answer).unwrap();
    assert_eq!(answer["choices"][0]["finish_reason"], "length");
    let prompt = answer["usage"]["prompt_tokens"].as_u64().unwrap();
    assert_eq!(answer["usage"]["completion_tokens"].as_u64().unwrap(), 4096 - prompt);
    eventually("that request is aborted too", || {
        engine.counters.closed_while_hanging.load(Ordering::SeqCst) >= 2
    })
    .await;
}

#[tokio::test]
async fn stop_strings_past_the_bounds_are_refused_before_any_engine() {
    let engine = RawReplica::start(Arc::new(|_| vec![Act::Hang])).await;
    let router = router(generate_config(&[&engine])).await;
    let url = format!("{}/v1/chat/completions", base(&router));
    for stop in [json!(vec!["x"; 300]), json!(vec!["y".repeat(4000); 2000]), json!("z".repeat(70_000))] {
        let body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "stop": stop});
        let (status, _, answer) = post(&client(), &url, &body, &[]).await;
        assert_eq!(status, 400, "{}", String::from_utf8_lossy(&answer));
        let error: Value = serde_json::from_slice(&answer).unwrap();
        assert_eq!(error["error"]["param"], "stop", "{error}");
    }
    let inference = engine.seen.lock().unwrap().iter().filter(|r| r.path.starts_with("/v1/chat")).count();
    assert_eq!(inference, 0);
}

#[tokio::test]
async fn a_generate_answer_whose_engine_dies_is_finished_on_another() {
    // The first generate request gets 5 tokens, then its engine dies; the continuation
    // gets the rest.
    let calls = Arc::new(AtomicUsize::new(0));
    let script = {
        let calls = calls.clone();
        Arc::new(move |_: &support::raw_replica::RawRequest| {
            let mut acts = vec![Act::Write(SSE_HEAD.to_vec())];
            if calls.fetch_add(1, Ordering::SeqCst) == 0 {
                for _ in 0..5 {
                    acts.push(Act::Write(token_event(&[word()], None)));
                }
                acts.push(Act::Close);
            } else {
                for i in 0..3 {
                    acts.push(Act::Write(token_event(&[word()], (i == 2).then_some("length"))));
                }
                acts.push(Act::Write(chunk(b"data: [DONE]\n\n")));
                acts.push(Act::Write(b"0\r\n\r\n".to_vec()));
            }
            acts
        }) as support::raw_replica::Script
    };
    let a = RawReplica::start(script.clone()).await;
    let b = RawReplica::start(script).await;
    let router = router(generate_config(&[&a, &b])).await;
    eventually("both engines healthy", || router.registry.healthy_count() == 2).await;
    for stream in [true, false] {
        // The engine that died is ejected until its health checks pass again.
        eventually("no engine ejected", || {
            let metrics = router.metrics.render();
            [&a, &b].iter().all(|r| {
                metric(&metrics, &format!(r#"router_replica_ejected{{replica="{}"}}"#, r.url())) == 0.0
            })
        })
        .await;
        calls.store(0, Ordering::SeqCst);
        a.seen.lock().unwrap().clear();
        b.seen.lock().unwrap().clear();
        let body = json!({"model": "m", "prompt": "hi", "max_tokens": 8, "stream": stream});
        let (status, _, answer) =
            post(&client(), &format!("{}/v1/completions", base(&router)), &body, &[]).await;
        let answer = String::from_utf8(answer.to_vec()).unwrap();
        assert_eq!(status, 200, "{answer}");
        let text: String = if stream {
            assert!(answer.ends_with("data: [DONE]\n\n") && !answer.contains("error"), "{answer}");
            events(&answer).iter().filter_map(|e| e["choices"][0]["text"].as_str()).collect()
        } else {
            let answer: Value = serde_json::from_str(&answer).unwrap();
            assert_eq!(answer["usage"]["completion_tokens"], 8, "{answer}");
            answer["choices"][0]["text"].as_str().unwrap().to_owned()
        };
        assert_eq!(text, " word".repeat(8), "every token once ({stream})");
        // The continuation asked for the rest after the prompt and the 5 tokens sent.
        let seen: Vec<_> =
            a.seen.lock().unwrap().iter().chain(b.seen.lock().unwrap().iter()).cloned().collect();
        let second = seen
            .iter()
            .filter(|r| r.path == "/inference/v1/generate")
            .map(|r| r.json())
            .max_by_key(|r| r["token_ids"].as_array().map_or(0, Vec::len))
            .unwrap();
        let ids = second["token_ids"].as_array().unwrap();
        assert!(ids.ends_with(&vec![json!(word()); 5]), "{second}");
        assert_eq!(second["sampling_params"]["max_tokens"], 3);
    }
    let metrics = router.metrics.render();
    assert_eq!(
        metric(&metrics, r#"router_continuations_total{endpoint="completions",outcome="continued"}"#),
        2.0,
        "{metrics}"
    );
}
