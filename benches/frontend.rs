//! What `--engine-api generate` costs the router per request: turning an OpenAI request
//! into a generate call (the chat template rendered and tokenised, the sampling
//! parameters mapped, the body written) for a short chat and for a new turn of an agentic
//! conversation of the study's mean size (~37k tokens, the history in the segment cache);
//! and turning the engine's token stream back into an OpenAI stream (detokenising, stop
//! strings, one chunk per event), per token, for a decode-heavy answer of 500 tokens.
//!
//! Run: `cargo bench --bench frontend`. Figures are in docs/performance.md.

use std::hint::black_box;
use std::sync::Arc;

use axum::body::Body;
use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group};
use http_body_util::BodyExt;
use llm_router::frontend::SamplingDefaults;
use llm_router::frontend::generate_stream::{Answer, openai_stream};
use llm_router::frontend::openai_request::generate_call;
use llm_router::policy::prompt_tokens::{BuiltinTokenizer, PromptTokenizer};

fn conversation(turns: usize) -> Vec<serde_json::Value> {
    let mut messages = vec![serde_json::json!({"role": "system", "content": "You are a coding agent."})];
    for turn in 0..turns {
        let content = format!("turn {turn}: {}", "fn main() { println!(\"hello\"); } ".repeat(8));
        messages.push(
            serde_json::json!({"role": if turn % 2 == 0 { "user" } else { "assistant" }, "content": content}),
        );
    }
    messages
}

fn body(messages: &[serde_json::Value]) -> Vec<u8> {
    serde_json::json!({"model": "Qwen/Qwen3-0.6B-FP8", "messages": messages, "stream": true, "max_tokens": 256,
        "temperature": 0.7, "stop": ["</answer>"]})
    .to_string()
    .into_bytes()
}

fn requests(c: &mut Criterion) {
    let tokenizer = PromptTokenizer::Builtin(BuiltinTokenizer::new(64 << 20));
    let defaults = SamplingDefaults::default();
    let mut group = c.benchmark_group("generate_call");
    let short = body(&conversation(1));
    group.bench_function("short_chat", |b| {
        b.iter(|| generate_call(&tokenizer, &defaults, true, black_box(&short)).unwrap())
    });
    // ~150 kB of chat JSON (~37k tokens); every turn new to the call, the history cached.
    let mut messages = conversation(500);
    let warm = body(&messages);
    let prompt_tokens = generate_call(&tokenizer, &defaults, true, &warm).unwrap().prompt_ids.len();
    eprintln!("agentic prompt: {} bytes, {prompt_tokens} tokens", warm.len());
    messages.push(serde_json::json!({"role": "user", "content": "and now the tests"}));
    let turn = body(&messages);
    group.bench_function("agentic_new_turn", |b| {
        b.iter(|| generate_call(&tokenizer, &defaults, true, black_box(&turn)).unwrap())
    });
    group.finish();
}

/// The engine's events for `n` tokens, one per event, the last ending at the length.
fn engine_stream(n: usize) -> Bytes {
    let words = llm_common::tokenizer::single_token_words();
    let mut out = String::new();
    for i in 0..n {
        let finish = if i + 1 == n { "\"length\"" } else { "null" };
        out.push_str(&format!(
            "data: {{\"request_id\":\"r\",\"usage\":null,\"output_mode\":\"tokens\",\"choices\":[{{\"index\":0,\"finish_reason\":{finish},\"stop_reason\":null,\"token_ids\":[{}],\"routed_experts\":null,\"sampling_mask\":null,\"weight_versions\":null,\"logprobs\":null}}]}}\n\n",
            words[i % words.len()].id
        ));
    }
    out.push_str("data: [DONE]\n\n");
    Bytes::from(out)
}

fn answers(c: &mut Criterion) {
    let tokenizer = Arc::new(PromptTokenizer::Builtin(BuiltinTokenizer::new(1 << 20)));
    let defaults = SamplingDefaults::default();
    let call = generate_call(&tokenizer, &defaults, true, &body(&conversation(1))).unwrap();
    let stream = engine_stream(500);
    // The engine's events arrive one per frame, as it writes them.
    let frames: Vec<Bytes> = stream
        .split(|&b| b == b'\n')
        .collect::<Vec<_>>()
        .chunks(2)
        .map(|c| Bytes::from([c[0], b"\n\n"].concat()))
        .collect();
    let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let mut group = c.benchmark_group("openai_stream");
    group.throughput(Throughput::Elements(500));
    group.bench_function("chat_500_tokens", |b| {
        b.to_async(&runtime).iter(|| async {
            let answer = Answer::new(tokenizer.clone(), call.plan.clone(), &call.prompt_ids);
            let frames: Vec<Result<Bytes, std::io::Error>> = frames.iter().cloned().map(Ok).collect();
            let upstream = Body::from_stream(tokio_stream::iter(frames));
            openai_stream(upstream, answer, None).collect().await.unwrap().to_bytes()
        })
    });
    group.finish();
}

criterion_group!(benches, requests, answers);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
}
