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
//! health checks against the real `/health` (every test waits for them); `--engine-api
//! generate` (the engines run with `--enable-scale-out`) reads the same as the engines' own
//! endpoints over a corpus of requests.
//!
//! This file: the relay, errors, rendering, aborts and consistent hashing; kv-aware and P/D
//! are in real_vllm_cache.rs.

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::real_vllm::*;
use support::*;
use tokio_stream::StreamExt;

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

#[tokio::test]
async fn a_stream_survives_its_engine_killed_mid_answer() {
    let Some(e) = engines() else { return };
    let _turn = SERIAL.lock().await;
    let router = start_router(&e, &["--policy", "round-robin", "--explain-routing"]).await;
    until_all_healthy(&router, e.urls.len()).await;
    let c = http();
    // Long enough that the engine is still generating when it is killed (at ~500 tokens a
    // second here: ~3.5 s after the kill is sent, on a loaded machine too).
    const TOKENS: u64 = 1800;
    let messages = json!([{"role": "user", "content": words(4242, 40)}]);
    let body = json!({"model": MODEL, "messages": messages, "max_tokens": TOKENS, "ignore_eos": true,
        "temperature": 0, "stream": true, "stream_options": {"include_usage": true}});
    let response = c
        .post(format!("{}/v1/chat/completions", base(&router)))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let serving = response.headers()["x-router-replica"].to_str().unwrap().to_owned();
    let killed = e.urls.iter().position(|u| u == &serving).expect("the serving engine is one of ours");
    let mut restart = None;
    let mut killed_at = None;
    let (mut text, mut tokens, mut finishes, mut ids, mut usage, mut errors, mut done) =
        (String::new(), 0u64, Vec::new(), Vec::new(), Value::Null, Vec::new(), 0);
    let mut chunks = response.bytes_stream();
    while let Some(chunk) =
        tokio::time::timeout(Duration::from_secs(120), chunks.next()).await.expect("stream hung")
    {
        text.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
        while let Some(end) = text.find("\n\n") {
            let event: String = text.drain(..end + 2).collect();
            let data = event.trim_end().strip_prefix("data: ").unwrap().to_owned();
            if data == "[DONE]" {
                done += 1;
                continue;
            }
            let value: Value = serde_json::from_str(&data).unwrap();
            if value.get("error").is_some() {
                errors.push(value);
                continue;
            }
            ids.push(value["id"].as_str().unwrap().to_owned());
            if !value["usage"].is_null() {
                usage = value["usage"].clone();
            }
            for choice in value["choices"].as_array().unwrap() {
                let role_only =
                    choice["delta"].get("role").is_some() && choice["delta"]["content"].as_str() == Some("");
                if !role_only {
                    tokens += 1;
                }
                if let Some(reason) = choice["finish_reason"].as_str() {
                    finishes.push(reason.to_owned());
                }
            }
            // Some tokens in: the engine serving the stream crashes (SIGKILL; then it starts again).
            if tokens == 20 && restart.is_none() {
                killed_at = Some(std::time::Instant::now());
                let script = e.script.clone();
                restart = Some(tokio::task::spawn_blocking(move || {
                    std::process::Command::new("bash")
                        .args([script, "crash".into(), killed.to_string()])
                        .status()
                }));
            }
        }
    }
    assert!(restart.is_some(), "the stream ended before the kill");
    eprintln!(
        "stream ended {:?} after the kill; {tokens} events",
        killed_at.map(|t: std::time::Instant| t.elapsed())
    );
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!((finishes.as_slice(), done), (&["length".to_owned()][..], 1), "{usage}");
    // vLLM streams one event per engine step; in a continued chat some events carry two
    // tokens (about 2% here), so the events are fewer than the tokens; usage counts them.
    assert!((TOKENS * 9 / 10..=TOKENS).contains(&tokens), "{tokens} events for {TOKENS} tokens");
    assert!(ids.iter().all(|id| id == &ids[0]), "one id");
    let direct = json!({"model": MODEL, "messages": messages, "max_tokens": 1});
    let other = &e.urls[(killed + 1) % e.urls.len()];
    let (_, answer) = send(&c, &format!("{other}/v1/chat/completions"), &direct, &[]).await;
    let prompt = serde_json::from_str::<Value>(&answer).unwrap()["usage"]["prompt_tokens"].as_u64().unwrap();
    assert_eq!(usage["prompt_tokens"].as_u64(), Some(prompt), "{usage}");
    assert_eq!(usage["completion_tokens"].as_u64(), Some(TOKENS), "{usage}");
    assert_eq!(usage["total_tokens"].as_u64(), Some(prompt + TOKENS), "{usage}");
    let continued =
        sum(&scrape(&c, &base(&router)).await, "router_continuations_total", &["outcome=\"continued\""]);
    assert_eq!(continued, 1.0);
    let status = restart.unwrap().await.unwrap().unwrap();
    assert!(status.success(), "restarting engine {killed}");
    until_all_healthy(&router, e.urls.len()).await;
    router.shutdown().await;
}

/// `--engine-api generate` against the real engine (started with `--enable-scale-out`):
/// the router renders the model's chat template, tokenises with its tokenizer, sends token
/// ids to `/inference/v1/generate`, detokenises and applies stop strings itself, and the
/// client reads what vLLM's own chat and completions endpoints say for the same request
/// (the corpus in support/corpus.rs: ASCII and multi-byte prompts, answers with characters
/// split across tokens, stop strings (kept or not, held off by min_tokens), a stop token
/// id, max_tokens, the model's EOS), streamed and not.
#[tokio::test]
async fn generate_mode_reads_the_same_as_the_engines_own_endpoints() {
    let Some(e) = engines() else { return };
    let _turn = SERIAL.lock().await;
    let router = start_router(&e, &["--engine-api", "generate", "--tokenizer", &e.model_dir]).await;
    let c = http();
    let coverage = support::corpus::run(&c, &e.urls[0], &base(&router), MODEL, false).await;
    eprintln!("{coverage:?}");
    assert!(coverage.compared >= 60, "{coverage:?}");
    assert!(
        coverage.by_length > 0 && coverage.by_stop_string > 0 && coverage.by_stop_token > 0,
        "{coverage:?}"
    );
    assert!(coverage.by_eos > 0 && coverage.multi_byte > 0, "{coverage:?}");
    let text = scrape(&c, &base(&router)).await;
    assert_eq!(sum(&text, "router_engine_api_requests_total", &[r#"path="fallback""#]), 0.0);
    assert!(
        sum(&text, "router_engine_api_requests_total", &[r#"path="generate""#]) >= coverage.compared as f64
    );
    // What does not fit the context is refused as the engine's chat endpoint refuses it
    // (its generate endpoint would not check): the router sends it there.
    let long = json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4000});
    let routed = send(&c, &format!("{}/v1/chat/completions", base(&router)), &long, &[]).await;
    let direct = send(&c, &format!("{}/v1/chat/completions", e.urls[0]), &long, &[]).await;
    assert_eq!(routed, direct);
    assert_eq!(routed.0, 400, "{}", routed.1);
    let text = scrape(&c, &base(&router)).await;
    assert_eq!(sum(&text, "router_engine_api_requests_total", &[r#"reason="context_length""#]), 1.0);
    router.shutdown().await;
}
