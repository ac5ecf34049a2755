//! Tenants that try to reach what their key does not allow: a model by leaving `model`
//! out or null, by an endpoint whose body is a form, or by a path the router matches one
//! way and an engine resolves another; a queue they may not jump by asking the engines
//! for a better `priority`. Each is refused before any replica sees it, or rewritten to
//! what the key's band allows.

mod support;

use std::sync::Arc;

use llm_router::admission::load_api_keys_file;
use llm_router::config::KeySource;
use serde_json::{Value, json};
use support::raw_replica::{Act, RawReplica, json_response};
use support::*;

const KEYS: &str = r#"
[[keys]]
name = "kept"
key = "sk-kept"
models = ["m"]

[[keys]]
name = "vip"
key = "sk-vip"
priority = "high"
"#;

async fn setup() -> (RawReplica, llm_router::server::RunningRouter) {
    let engine =
        RawReplica::start(Arc::new(|_| vec![Act::Write(json_response(200, r#"{"ok":true}"#))])).await;
    // A file of its own per test: tests run at once, and a file another test is
    // rewriting reads empty.
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("llm-router-tenants-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let keys = dir.join("keys.toml");
    std::fs::write(&keys, KEYS).unwrap();
    let mut config = config_for(&[engine.url()]);
    config.api_keys = load_api_keys_file(&keys).unwrap();
    config.key_source = KeySource::from_file(keys);
    let router = router(config).await;
    eventually("the engine healthy", || router.registry.healthy_count() == 1).await;
    (engine, router)
}

/// The requests the engine got on `path` (its health checks and model lists aside).
fn reached(engine: &RawReplica, path: &str) -> Vec<Value> {
    engine.seen.lock().unwrap().iter().filter(|r| r.path == path).map(|r| r.json()).collect()
}

async fn send(
    router: &llm_router::server::RunningRouter,
    key: &str,
    path: &str,
    body: &Value,
) -> (u16, Value) {
    let response = client()
        .post(format!("{}{path}", base(router)))
        .header("authorization", format!("Bearer {key}"))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, serde_json::from_slice(&response.bytes().await.unwrap()).unwrap_or(Value::Null))
}

#[tokio::test]
async fn a_key_kept_to_a_model_must_name_it_on_every_endpoint() {
    let (engine, router) = setup().await;
    for (path, body) in [
        ("/v1/embeddings", json!({"input": "x"})),
        ("/v1/embeddings", json!({"model": null, "input": "x"})),
        ("/v1/responses", json!({"input": "x"})),
        ("/v1/responses", json!({"model": null, "input": "x"})),
    ] {
        let (status, error) = send(&router, "sk-kept", path, &body).await;
        assert_eq!(status, 400, "{path} {body}: {error}");
        assert_eq!(error["error"]["param"], "model", "{error}");
    }
    let (status, _) =
        send(&router, "sk-kept", "/v1/embeddings", &json!({"model": "other", "input": "x"})).await;
    assert_eq!(status, 404);
    assert!(reached(&engine, "/v1/embeddings").is_empty() && reached(&engine, "/v1/responses").is_empty());
    let (status, _) = send(&router, "sk-kept", "/v1/embeddings", &json!({"model": "m", "input": "x"})).await;
    assert_eq!(status, 200);
    assert_eq!(reached(&engine, "/v1/embeddings").len(), 1);
    // A stored response's retrieval runs no model: it passes.
    let got = client()
        .get(format!("{}/v1/responses/resp_123", base(&router)))
        .header("authorization", "Bearer sk-kept")
        .send()
        .await
        .unwrap();
    assert_eq!(got.status(), 200);
}

fn form(model: Option<&str>) -> (String, Vec<u8>) {
    let boundary = "----router-test-7f3a";
    let mut body = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\nContent-Type: audio/wav\r\n\r\n"
    )
    .into_bytes();
    body.extend_from_slice(b"RIFF\x00\x00model=m\r\n");
    if let Some(model) = model {
        body.extend_from_slice(
            format!("--{boundary}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\n{model}\r\n")
                .as_bytes(),
        );
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

#[tokio::test]
async fn a_form_names_its_model_like_a_json_body() {
    let (engine, router) = setup().await;
    let url = format!("{}/v1/audio/transcriptions", base(&router));
    for (model, expected) in [(Some("other"), 404), (None, 400), (Some("m"), 200)] {
        let (content_type, body) = form(model);
        let response = client()
            .post(&url)
            .header("authorization", "Bearer sk-kept")
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), expected, "{model:?}");
    }
    let forwarded =
        engine.seen.lock().unwrap().iter().filter(|r| r.path == "/v1/audio/transcriptions").count();
    assert_eq!(forwarded, 1, "only the allowed model's form reached the engine");
}

#[tokio::test]
async fn a_key_cannot_ask_the_engines_to_serve_it_before_its_band() {
    let (engine, router) = setup().await;
    let chat = |priority: Value| json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "priority": priority});
    for (key, asked, sent) in [
        ("sk-kept", json!(-100), json!(0)),
        ("sk-kept", json!(5), json!(5)),
        ("sk-vip", json!(-100), json!(-100)),
    ] {
        let (status, _) = send(&router, key, "/v1/chat/completions", &chat(asked.clone())).await;
        assert_eq!(status, 200);
        let last = reached(&engine, "/v1/chat/completions").pop().unwrap();
        assert_eq!(last["priority"], sent, "{key} asked {asked}");
        assert_eq!(last["messages"][0]["content"], "x", "the rest of the body as sent");
    }
}

#[tokio::test]
async fn paths_that_resolve_elsewhere_are_refused() {
    let (engine, router) = setup().await;
    for path in [
        "/v1/responses/../load_lora_adapter",
        "/v1/responses/%2e%2e/load_lora_adapter",
        "/v1/responses/..%2Fload_lora_adapter",
        "/v1/responses/./x",
        "/v1//responses",
        "/v1/responses/x%5c..%5cload_lora_adapter",
    ] {
        // Sent as written: a raw request line, as a hostile client would.
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut socket = tokio::net::TcpStream::connect(router.addr).await.unwrap();
        let request = format!(
            "POST {path} HTTP/1.1\r\nhost: r\r\nauthorization: Bearer sk-vip\r\ncontent-type: application/json\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{{}}"
        );
        socket.write_all(request.as_bytes()).await.unwrap();
        let mut answer = String::new();
        socket.read_to_string(&mut answer).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 400"), "{path}: {answer}");
    }
    let forwarded = engine
        .seen
        .lock()
        .unwrap()
        .iter()
        .filter(|r| !r.path.starts_with("/health") && r.path != "/v1/models")
        .count();
    assert_eq!(forwarded, 0);
}
