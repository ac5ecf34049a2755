//! The router's own answers: bad input, model-aware routing (a model no replica lists is
//! the engine's to answer) and the model list, health, metrics, unknown routes. Every
//! refusal is an OpenAI-style error with the right status, and never reaches a replica.

mod support;

use std::time::Duration;

use serde_json::json;
use support::*;

fn error_of(body: &[u8]) -> serde_json::Value {
    let v: serde_json::Value = serde_json::from_slice(body)
        .unwrap_or_else(|_| panic!("not JSON: {}", String::from_utf8_lossy(body)));
    let e = v["error"].clone();
    assert!(e["message"].is_string() && e["type"].is_string() && e["code"].is_number(), "{v}");
    e
}

async fn raw_post(c: &reqwest::Client, url: &str, body: impl Into<reqwest::Body>) -> (u16, bytes::Bytes) {
    let r = c.post(url).header("content-type", "application/json").body(body).send().await.unwrap();
    (r.status().as_u16(), r.bytes().await.unwrap())
}

#[tokio::test]
async fn bad_input_gets_400_or_413_with_an_openai_error() {
    let replicas = mocks(1).await;
    let mut cfg = config(&replicas);
    cfg.max_body_bytes = 4096;
    let router = router(cfg).await;
    let c = client();
    for path in ["/v1/completions", "/v1/chat/completions"] {
        let url = format!("{}{path}", base(&router));
        let cases: &[(&str, u16, Option<&str>)] = &[
            ("", 400, None),
            ("not json", 400, None),
            ("{\"model\": \"m\", ", 400, None),
            ("[1, 2, 3]", 400, None),
            ("{\"prompt\": \"hi\"}", 400, Some("model")),
            ("{\"model\": 42}", 400, Some("model")),
            ("{\"model\": \"m\", \"stream\": \"yes\"}", 400, Some("stream")),
            ("{\"model\": \"m\", \"session_id\": {\"a\": 1}}", 400, Some("session_id")),
            ("{\"model\": \"m\", \"user\": [1]}", 400, Some("user")),
            ("{\"model\": \"m\", \"session_params\": 3}", 400, Some("session_params")),
        ];
        for &(body, status, param) in cases {
            let (got, bytes) = raw_post(&c, &url, body.to_owned()).await;
            assert_eq!(got, status, "{path} {body:?}");
            let e = error_of(&bytes);
            assert_eq!(e["code"], status);
            assert_eq!(e["type"], "BadRequestError");
            if let Some(param) = param {
                assert_eq!(e["param"], param, "{body}");
            }
        }
        // Oversized: declared by Content-Length, and streamed without one.
        let big = format!("{{\"model\": \"m\", \"prompt\": \"{}\"}}", "x".repeat(10_000));
        let (got, bytes) = raw_post(&c, &url, big.clone()).await;
        assert_eq!(got, 413);
        assert_eq!(error_of(&bytes)["code"], 413);
        let chunks: Vec<Result<bytes::Bytes, std::io::Error>> =
            big.as_bytes().chunks(1000).map(|c| Ok(bytes::Bytes::copy_from_slice(c))).collect();
        let body = reqwest::Body::wrap_stream(tokio_stream::iter(chunks));
        let (got, _) = raw_post(&c, &url, body).await;
        assert_eq!(got, 413);
    }
    assert_eq!(replicas[0].request_count(), 0, "bad input must not reach a replica");
    router.shutdown().await;
}

#[tokio::test]
async fn models_are_the_union_and_requests_go_only_where_their_model_is() {
    let alpha = MockReplica::start("alpha-0", &["alpha"]).await;
    let beta = MockReplica::start("beta-0", &["beta", "beta-lora"]).await;
    let router = router(config(&[alpha.clone(), beta.clone()])).await;
    let c = client();
    let listed: serde_json::Value =
        c.get(format!("{}/v1/models", base(&router))).send().await.unwrap().json_value().await;
    let ids: Vec<&str> =
        listed["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["alpha", "beta", "beta-lora"]);
    assert_eq!(listed["object"], "list");
    assert_eq!(listed["data"][0]["max_model_len"], 4096, "cards are passed on whole");

    let url = format!("{}/v1/completions", base(&router));
    for _ in 0..10 {
        let (_, r, _) = post(&c, &url, &json!({"model": "beta-lora", "prompt": "x"}), &[]).await;
        assert_eq!(r.as_deref(), Some("beta-0"));
        let (_, r, _) = post(&c, &url, &json!({"model": "alpha", "prompt": "x"}), &[]).await;
        assert_eq!(r.as_deref(), Some("alpha-0"));
    }
    // A model no replica lists is the engine's to answer (vLLM's 404 names its models; a
    // LoRA adapter it resolves by name at run time is served): it reaches a replica.
    let (_, r, _) = post(&c, &url, &json!({"model": "gamma", "prompt": "x"}), &[]).await;
    assert!(r.is_some(), "an unknown model reaches a replica");

    // A model whose only replica is down is no longer listed.
    beta.set_healthy(false);
    eventually("beta marked unhealthy", || !router.registry.get(1).is_healthy()).await;
    let listed: serde_json::Value =
        c.get(format!("{}/v1/models", base(&router))).send().await.unwrap().json_value().await;
    assert_eq!(listed["data"].as_array().unwrap().len(), 1);
    router.shutdown().await;
}

#[tokio::test]
async fn health_follows_the_replicas() {
    let replicas = mocks(2).await;
    let router = router(config(&replicas)).await;
    let c = client();
    let health = format!("{}/health", base(&router));
    assert_eq!(c.get(&health).send().await.unwrap().status(), 200);
    replicas[0].set_healthy(false);
    eventually("r0 out", || !router.registry.get(0).is_healthy()).await;
    assert_eq!(c.get(&health).send().await.unwrap().status(), 200);
    replicas[1].kill();
    eventually("r1 out", || !router.registry.get(1).is_healthy()).await;
    let r = c.get(&health).send().await.unwrap();
    assert_eq!(r.status(), 503);
    // With nothing healthy, inference gets a clear 503, not a hang.
    let (status, _, body) =
        post(&c, &format!("{}/v1/completions", base(&router)), &json!({"model": "m", "prompt": "x"}), &[])
            .await;
    assert_eq!(status, 503);
    assert_eq!(error_of(&body)["type"], "ServiceUnavailableError");
    replicas[0].set_healthy(true);
    eventually("r0 back", || router.registry.get(0).is_healthy()).await;
    assert_eq!(c.get(&health).send().await.unwrap().status(), 200);
    router.shutdown().await;
}

#[tokio::test]
async fn metrics_expose_every_family() {
    let replicas = mocks(2).await;
    let router = router(config(&replicas)).await;
    let c = client();
    let stream = json!({"model": "m", "prompt": "x", "stream": true});
    post(&c, &format!("{}/v1/completions", base(&router)), &stream, &[]).await;
    post(&c, &format!("{}/v1/completions", base(&router)), &json!({"prompt": "no model"}), &[]).await;
    let r = c.get(format!("{}/metrics", base(&router))).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"].to_str().unwrap().starts_with("text/plain"));
    let text = r.text().await.unwrap();
    for family in [
        "router_requests_total",
        "router_request_duration_seconds",
        "router_time_to_first_event_seconds",
        "router_in_flight_requests",
        "router_replica_healthy",
        "router_routing_decisions_total",
        "router_retries_total",
        "router_upstream_errors_total",
        "router_client_disconnects_total",
    ] {
        assert!(text.contains(&format!("# TYPE {family} ")), "missing {family}");
    }
    let r0 = replicas[0].url();
    let r1 = replicas[1].url();
    let served = metric(
        &text,
        &format!(r#"router_requests_total{{endpoint="completions",replica="{r0}",status="200"}}"#),
    ) + metric(
        &text,
        &format!(r#"router_requests_total{{endpoint="completions",replica="{r1}",status="200"}}"#),
    );
    assert_eq!(served, 1.0);
    assert_eq!(
        metric(&text, r#"router_requests_total{endpoint="completions",replica="none",status="400"}"#),
        1.0
    );
    assert_eq!(metric(&text, r#"router_time_to_first_event_seconds_count{endpoint="completions"}"#), 1.0);
    assert_eq!(metric(&text, &format!(r#"router_replica_healthy{{replica="{r0}"}}"#)), 1.0);
    assert_eq!(metric(&text, &format!(r#"router_in_flight_requests{{replica="{r0}"}}"#)), 0.0);
    router.shutdown().await;
}

#[tokio::test]
async fn unknown_routes_and_methods_get_openai_errors() {
    let replicas = mocks(1).await;
    let router = router(config(&replicas)).await;
    let c = client();
    let r = c.get(format!("{}/nope", base(&router))).send().await.unwrap();
    assert_eq!(r.status(), 404);
    error_of(&r.bytes().await.unwrap());
    let r = c.get(format!("{}/v1/chat/completions", base(&router))).send().await.unwrap();
    assert_eq!(r.status(), 405);
    assert_eq!(error_of(&r.bytes().await.unwrap())["code"], 405);
    router.shutdown().await;
}

#[tokio::test]
async fn graceful_shutdown_lets_a_stream_finish() {
    let replicas = mocks(1).await;
    replicas[0].set_mode(Mode::Hold);
    let router = router(config(&replicas)).await;
    let response = client()
        .post(format!("{}/v1/completions", base(&router)))
        .body(json!({"model": "m", "prompt": "x", "stream": true}).to_string())
        .send()
        .await
        .unwrap();
    let addr = router.addr;
    let shutdown = tokio::spawn(router.shutdown());
    tokio::time::sleep(Duration::from_millis(100)).await;
    // No new connections once shutdown began...
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
    // ...but the stream in flight completes.
    replicas[0].release();
    let body = response.text().await.unwrap();
    assert!(body.ends_with("data: [DONE]\n\n"));
    tokio::time::timeout(Duration::from_secs(5), shutdown).await.unwrap().unwrap();
}

trait JsonValue {
    async fn json_value(self) -> serde_json::Value;
}

impl JsonValue for reqwest::Response {
    async fn json_value(self) -> serde_json::Value {
        serde_json::from_slice(&self.bytes().await.unwrap()).unwrap()
    }
}
