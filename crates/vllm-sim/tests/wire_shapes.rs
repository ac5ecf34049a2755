//! The simulator speaks vLLM's wire format: golden bytes of every response kind, and the
//! shapes of vLLM 0.32.0's responses as captured from the real engine
//! (`bench-scripts/vllm/sim_vs_vllm.py --write-golden`).

mod support;

use serde_json::{Value, json};
use support::*;
use vllm_sim::SimConfig;

/// Replace the per-response id, timestamp and the server's fingerprint so bytes can be
/// compared with a golden file.
fn normalise(text: &str) -> String {
    let mut out = String::new();
    for line in text.split_inclusive('\n') {
        let mut line = line.to_owned();
        for key in ["\"id\":\"", "\"created\":", "\"system_fingerprint\":\"vllm-0.32.0-"] {
            if let Some(start) = line.find(key) {
                let from = start + key.len();
                let end = line[from..].find([',', '"']).map(|e| from + e).unwrap_or(line.len());
                line.replace_range(from..end, "X");
            }
        }
        out.push_str(&line);
    }
    out
}

fn golden(name: &str, actual: &str) {
    let path = format!("{}/tests/golden/{name}", env!("CARGO_MANIFEST_DIR"));
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::create_dir_all(format!("{}/tests/golden", env!("CARGO_MANIFEST_DIR"))).unwrap();
        std::fs::write(&path, actual).unwrap();
    }
    let expected = std::fs::read_to_string(&path)
        .unwrap_or_else(|_| panic!("missing golden {path}; run with UPDATE_GOLDEN=1"));
    assert_eq!(actual, expected, "{name} differs from its golden file");
}

#[tokio::test]
async fn golden_wire_shapes() {
    let s = sim_with(config()).await;
    let completion = json!({"model": MODEL, "prompt": "The router", "max_tokens": 4, "ignore_eos": true});
    let chat = json!({"model": MODEL, "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 4, "ignore_eos": true});
    let with = |base: &Value, extra: Value| {
        let mut v = base.clone();
        v.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        v
    };
    let cases = [
        ("completion.json", "/v1/completions", completion.clone()),
        ("completion_stream.sse", "/v1/completions", with(&completion, json!({"stream": true}))),
        (
            "completion_stream_usage.sse",
            "/v1/completions",
            with(
                &completion,
                json!({"stream": true, "stream_options": {"include_usage": true, "continuous_usage_stats": true}}),
            ),
        ),
        (
            "completion_token_ids.json",
            "/v1/completions",
            with(&completion, json!({"return_token_ids": true})),
        ),
        ("chat.json", "/v1/chat/completions", chat.clone()),
        ("chat_stream.sse", "/v1/chat/completions", with(&chat, json!({"stream": true}))),
        (
            "chat_stream_usage.sse",
            "/v1/chat/completions",
            with(&chat, json!({"stream": true, "stream_options": {"include_usage": true}})),
        ),
    ];
    for (name, path, body) in cases {
        let (status, text) = post(&s, path, &body).await;
        assert_eq!(status, 200, "{name}: {text}");
        golden(name, &normalise(&text));
    }
}

/// Member names and value types, not values; a list is the shape of its first item (as
/// `bench-scripts/vllm/sim_vs_vllm.py` takes them from the real engine).
fn shape(value: &Value) -> Value {
    match value {
        Value::Object(members) => {
            let mut sorted: Vec<_> = members.iter().collect();
            sorted.sort_by(|a, b| a.0.cmp(b.0));
            Value::Object(sorted.into_iter().map(|(k, v)| (k.clone(), shape(v))).collect())
        }
        Value::Array(items) => Value::Array(items.first().map(shape).into_iter().collect()),
        Value::Bool(_) => json!("bool"),
        Value::Number(n) if n.is_f64() => json!("float"),
        Value::Number(_) => json!("int"),
        Value::Null => json!("null"),
        Value::String(_) => json!("str"),
    }
}

/// A stream's kinds of event: first, a middle one, the last with a finish reason, usage.
fn stream_shapes(text: &str) -> Value {
    let events: Vec<Value> = text
        .split("\n\n")
        .filter_map(|e| {
            e.strip_prefix("data: {").map(|rest| serde_json::from_str(&format!("{{{rest}")).unwrap())
        })
        .collect();
    let has_choices = |e: &&Value| e["choices"].as_array().is_some_and(|c| !c.is_empty());
    let content: Vec<&Value> = events.iter().filter(has_choices).collect();
    let mut out = json!({"first": shape(&events[0]), "done": text.trim_end().ends_with("data: [DONE]")});
    if content.len() > 2 {
        out["middle"] = shape(content[1]);
    }
    let finished = content
        .iter()
        .rfind(|e| e["choices"].as_array().unwrap().iter().any(|c| !c["finish_reason"].is_null()));
    if let Some(e) = finished {
        out["finish"] = shape(e);
    }
    if let Some(e) = events.iter().rfind(|e| !has_choices(e) && !e["usage"].is_null()) {
        out["usage"] = shape(e);
    }
    out
}

#[tokio::test]
async fn speaks_vllm_0_32_as_captured_from_the_real_engine() {
    let golden_path = format!("{}/tests/golden/vllm-0.32.0/shapes.json", env!("CARGO_MANIFEST_DIR"));
    let golden: Value = serde_json::from_str(&std::fs::read_to_string(golden_path).unwrap()).unwrap();
    assert_eq!(golden["vllm_version"], "0.32.0");
    let s = sim_with(SimConfig { max_model_len: 2048, ..config() }).await;
    let chat = json!({"model": MODEL, "messages": [{"role": "user", "content": "say something"}], "max_tokens": 8, "temperature": 0});
    let completion = json!({"model": MODEL, "prompt": "say something", "max_tokens": 8, "temperature": 0});
    let with = |base: &Value, extra: Value| {
        let mut body = base.clone();
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        body
    };
    let usage = json!({"stream": true, "stream_options": {"include_usage": true}});
    let probes = [
        ("chat", "/v1/chat/completions", chat.clone(), false),
        ("chat_stream", "/v1/chat/completions", with(&chat, json!({"stream": true})), true),
        ("chat_stream_usage", "/v1/chat/completions", with(&chat, usage.clone()), true),
        ("completion", "/v1/completions", completion.clone(), false),
        ("completion_stream", "/v1/completions", with(&completion, json!({"stream": true})), true),
        ("completion_stream_usage", "/v1/completions", with(&completion, usage), true),
        (
            "completion_token_ids",
            "/v1/completions",
            with(&completion, json!({"prompt": [1, 2, 3, 4]})),
            false,
        ),
        (
            "error_unknown_model",
            "/v1/chat/completions",
            with(&chat, json!({"model": "no-such-model"})),
            false,
        ),
        ("error_bad_parameter", "/v1/completions", with(&completion, json!({"temperature": -1})), false),
        (
            "error_too_long",
            "/v1/completions",
            with(&completion, json!({"prompt": "word ".repeat(5000)})),
            false,
        ),
        ("tokenize", "/tokenize", json!({"model": MODEL, "prompt": "say something"}), false),
    ];
    for (name, path, body, stream) in probes {
        let (status, text) = post(&s, path, &body).await;
        let got = if stream && status == 200 {
            stream_shapes(&text)
        } else {
            shape(&serde_json::from_str(&text).unwrap())
        };
        assert_eq!(status, golden[name]["status"], "{name}: {text}");
        assert_eq!(
            got, golden[name]["shape"],
            "{name}: the simulator's shape differs from vLLM 0.32.0's\n{text}"
        );
    }
    let models: Value = serde_json::from_str(
        &client().get(format!("{}/v1/models", s.url())).send().await.unwrap().text().await.unwrap(),
    )
    .unwrap();
    assert_eq!(shape(&models), golden["models"]["shape"], "/v1/models");
    // Every metric the simulator exports is one vLLM exports, and the ones routers read are there.
    let engine: Vec<&str> =
        golden["metrics"]["names"].as_array().unwrap().iter().map(|n| n.as_str().unwrap()).collect();
    let ours = s.metrics().render();
    for line in ours.lines().filter(|l| l.starts_with("vllm:")) {
        let name = line.split(['{', ' ']).next().unwrap();
        assert!(engine.contains(&name), "vllm-sim exports {name}, which vLLM 0.32.0 does not");
    }
    for name in [
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:prefix_cache_hits_total",
        "vllm:prefix_cache_queries_total",
    ] {
        assert!(ours.lines().any(|l| l.starts_with(name)), "vllm-sim lacks {name}");
    }
}

#[tokio::test]
async fn generate_speaks_vllm_0_32_scale_out_as_captured_from_the_real_engine() {
    let golden_path = format!("{}/tests/golden/vllm-0.32.0/shapes.json", env!("CARGO_MANIFEST_DIR"));
    let golden: Value = serde_json::from_str(&std::fs::read_to_string(golden_path).unwrap()).unwrap();
    let s = sim_with(SimConfig { max_model_len: 2048, enable_scale_out: true, ..config() }).await;
    let generate = json!({"model": MODEL, "token_ids": [1, 2, 3, 4], "sampling_params": {"max_tokens": 8, "temperature": 0}});
    let with = |extra: Value| {
        let mut body = generate.clone();
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        body
    };
    let probes = [
        ("generate", generate.clone(), false),
        ("generate_stream", with(json!({"stream": true})), true),
        (
            "generate_stream_usage",
            with(json!({"stream": true, "stream_options": {"include_usage": true}})),
            true,
        ),
        ("generate_stream_prompt_ids", with(json!({"stream": true, "return_token_ids": true})), true),
        ("generate_prompt_ids", with(json!({"return_token_ids": true})), false),
        (
            "error_generate_bad_parameter",
            with(json!({"sampling_params": {"max_tokens": 8, "temperature": -1}})),
            false,
        ),
        ("error_generate_unknown_model", with(json!({"model": "no-such-model"})), false),
    ];
    for (name, body, stream) in probes {
        let (status, text) = post(&s, "/inference/v1/generate", &body).await;
        let got = if stream && status == 200 {
            stream_shapes(&text)
        } else {
            shape(&serde_json::from_str(&text).unwrap())
        };
        assert_eq!(status, golden[name]["status"], "{name}: {text}");
        assert_eq!(
            got, golden[name]["shape"],
            "{name}: the simulator's shape differs from vLLM 0.32.0's\n{text}"
        );
    }
    // The token ids and usage agree with each other.
    let (_, text) = post(
        &s,
        "/inference/v1/generate",
        &with(json!({"stream": true, "stream_options": {"include_usage": true}})),
    )
    .await;
    let events: Vec<Value> = text
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: {").map(|r| serde_json::from_str(&format!("{{{r}")).unwrap()))
        .collect();
    let tokens: usize =
        events.iter().filter_map(|e| e["choices"][0]["token_ids"].as_array()).map(Vec::len).sum();
    let usage = &events.last().unwrap()["usage"];
    assert_eq!(
        (usage["prompt_tokens"].as_u64(), usage["completion_tokens"].as_u64()),
        (Some(4), Some(tokens as u64))
    );
    assert_eq!(events[events.len() - 2]["choices"][0]["weight_versions"][0]["end"], tokens);
    // An empty prompt is refused, as vLLM's validation refuses it.
    let (status, _) = post(&s, "/inference/v1/generate", &with(json!({"token_ids": []}))).await;
    assert_eq!(status, 400);
}

#[tokio::test]
async fn generate_is_forbidden_without_enable_scale_out_as_in_vllm() {
    let s = sim_with(config()).await;
    let body = json!({"token_ids": [1, 2], "sampling_params": {"max_tokens": 2}});
    let (status, text) = post(&s, "/inference/v1/generate", &body).await;
    assert_eq!(status, 403);
    let error: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(error["error"]["type"], "PermissionDeniedError");
    assert_eq!(error["error"]["code"], 403);
    assert!(error["error"]["message"].as_str().unwrap().contains("--enable-scale-out"), "{text}");
}
