//! Direct streaming through the router: byte-identical responses, events delivered as
//! they are produced, client disconnects reaching the replica, and retries before the
//! first byte.

mod support;

use std::time::Duration;

use serde_json::json;
use support::*;
use tokio_stream::StreamExt;

fn completion(stream: bool) -> serde_json::Value {
    json!({"model": "m", "prompt": "hello", "max_tokens": 5, "stream": stream})
}

fn chat(stream: bool) -> serde_json::Value {
    json!({"model": "m", "messages": [{"role": "user", "content": "hello"}], "stream": stream})
}

#[tokio::test]
async fn responses_are_byte_identical_to_going_direct() {
    let replicas = mocks(1).await;
    let router = router(config(&replicas)).await;
    let c = client();
    for (path, body) in [
        ("/v1/completions", completion(true)),
        ("/v1/completions", completion(false)),
        ("/v1/chat/completions", chat(true)),
        ("/v1/chat/completions", chat(false)),
    ] {
        let (s1, _, direct) = post(&c, &format!("{}{path}", replicas[0].url()), &body, &[]).await;
        let (s2, replica, routed) = post(&c, &format!("{}{path}", base(&router)), &body, &[]).await;
        assert_eq!((s1, s2), (200, 200));
        assert_eq!(replica.as_deref(), Some("r0"));
        assert_eq!(direct, routed, "{path} {body}");
    }
    // The stream really is SSE ending in [DONE].
    let (_, _, stream) = post(&c, &format!("{}/v1/chat/completions", base(&router)), &chat(true), &[]).await;
    let text = String::from_utf8(stream.to_vec()).unwrap();
    assert!(text.starts_with("data: {") && text.ends_with("data: [DONE]\n\n"), "{text}");
    // Upstream headers come through (content type, the replica's own header).
    let response = c
        .post(format!("{}/v1/completions", base(&router)))
        .body(completion(true).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    assert_eq!(response.headers()["x-replica"], "r0");
    router.shutdown().await;
}

#[tokio::test]
async fn events_reach_the_client_before_the_replica_finishes() {
    let replicas = mocks(1).await;
    replicas[0].set_mode(Mode::Hold);
    let router = router(config(&replicas)).await;
    let response = client()
        .post(format!("{}/v1/completions", base(&router)))
        .body(completion(true).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut stream = response.bytes_stream();
    // The replica holds everything after its first event until released: a router that
    // buffered would deliver nothing here and the timeout would fire.
    let mut got = Vec::new();
    while !got.windows(2).any(|w| w == b"\n\n") {
        let chunk = tokio::time::timeout(Duration::from_secs(5), stream.next())
            .await
            .expect("first event not delivered while the replica held the rest")
            .unwrap()
            .unwrap();
        got.extend_from_slice(&chunk);
    }
    assert!(String::from_utf8_lossy(&got).contains(" tok0"));
    assert_eq!(replicas[0].state.completed.load(std::sync::atomic::Ordering::SeqCst), 0);
    replicas[0].release();
    while let Some(chunk) = stream.next().await {
        got.extend_from_slice(&chunk.unwrap());
    }
    let expected: String = sse_events("r0", false, 5).concat();
    assert_eq!(String::from_utf8(got).unwrap(), expected);
    router.shutdown().await;
}

#[tokio::test]
async fn client_disconnect_mid_stream_cancels_upstream() {
    let replicas = mocks(1).await;
    replicas[0].set_mode(Mode::Hold);
    let router = router(config(&replicas)).await;
    let response = client()
        .post(format!("{}/v1/chat/completions", base(&router)))
        .body(chat(true).to_string())
        .send()
        .await
        .unwrap();
    let mut stream = response.bytes_stream();
    stream.next().await.unwrap().unwrap();
    drop(stream);
    let mock = replicas[0].clone();
    eventually("replica sees the stream cancelled", || mock.cancelled() == 1).await;
    let metrics = router.metrics.clone();
    eventually("disconnect counted", || {
        metric(
            &metrics.render(),
            r#"router_client_disconnects_total{endpoint="chat_completions",stage="streaming"}"#,
        ) == 1.0
    })
    .await;
    eventually("in-flight returns to zero", || router.registry.get(0).in_flight() == 0).await;
    router.shutdown().await;
}

#[tokio::test]
async fn client_disconnect_while_waiting_cancels_upstream() {
    let replicas = mocks(1).await;
    replicas[0].set_mode(Mode::Hold);
    let router = router(config(&replicas)).await;
    let url = format!("{}/v1/completions", base(&router));
    let request =
        tokio::spawn(async move { client().post(url).body(completion(false).to_string()).send().await });
    let mock = replicas[0].clone();
    eventually("replica receives the request", || mock.request_count() == 1).await;
    request.abort();
    eventually("replica sees the non-streaming request cancelled", || mock.cancelled() == 1).await;
    let metrics = router.metrics.clone();
    eventually("disconnect counted", || {
        metric(
            &metrics.render(),
            r#"router_client_disconnects_total{endpoint="completions",stage="waiting"}"#,
        ) == 1.0
    })
    .await;
    router.shutdown().await;
}

#[tokio::test]
async fn a_500_is_retried_once_on_another_replica() {
    let replicas = mocks(2).await;
    replicas[0].set_mode(Mode::Fail500);
    let mut cfg = config(&replicas);
    cfg.policy = llm_router::policy::PolicyKind::RoundRobin;
    let router = router(cfg).await;
    let c = client();
    for _ in 0..4 {
        let (status, replica, _) =
            post(&c, &format!("{}/v1/completions", base(&router)), &completion(false), &[]).await;
        assert_eq!((status, replica.as_deref()), (200, Some("r1")));
    }
    // Every attempt on r0 failed and was retried exactly once, on r1.
    let failed = replicas[0].request_count();
    assert!(failed >= 1);
    assert_eq!(replicas[1].request_count(), 4);
    let text = router.metrics.render();
    assert_eq!(metric(&text, r#"router_retries_total{endpoint="completions"}"#), failed as f64);
    let r0 = replicas[0].url();
    let errors = format!(r#"router_upstream_errors_total{{kind="status_5xx",replica="{r0}"}}"#);
    assert_eq!(metric(&text, &errors), failed as f64);
    router.shutdown().await;
}

#[tokio::test]
async fn when_every_attempt_fails_the_client_gets_the_upstream_error() {
    let replicas = mocks(3).await;
    replicas.iter().for_each(|r| r.set_mode(Mode::Fail500));
    let router = router(config(&replicas)).await;
    let (status, _, body) =
        post(&client(), &format!("{}/v1/completions", base(&router)), &completion(true), &[]).await;
    assert_eq!(status, 500);
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["error"]["message"], "engine exploded");
    // Exactly one retry: two attempts, never three.
    let attempts: usize = replicas.iter().map(|r| r.request_count()).sum();
    assert_eq!(attempts, 2);
    router.shutdown().await;
}

#[tokio::test]
async fn refused_connection_is_retried_and_all_refused_is_a_502() {
    let replicas = mocks(2).await;
    let mut cfg = config(&replicas);
    cfg.policy = llm_router::policy::PolicyKind::RoundRobin;
    // Slow health checks: the proxy, not the checker, must find the dead replica.
    cfg.health.interval = Duration::from_secs(60);
    cfg.thresholds.unhealthy = 1000;
    let router = router(cfg).await;
    replicas[0].kill();
    let c = client();
    for _ in 0..4 {
        let (status, replica, _) =
            post(&c, &format!("{}/v1/completions", base(&router)), &completion(false), &[]).await;
        assert_eq!((status, replica.as_deref()), (200, Some("r1")));
    }
    replicas[1].kill();
    let (status, _, body) =
        post(&c, &format!("{}/v1/completions", base(&router)), &completion(false), &[]).await;
    assert_eq!(status, 502);
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["error"]["code"], 502);
    assert_eq!(v["error"]["type"], "BadGatewayError");
    // What failed is for the router's log; the client reads no address and no OS error.
    let message = v["error"]["message"].as_str().unwrap();
    assert!(message.contains("failed before responding"), "{v}");
    assert!(!message.contains("127.0.0.1") && !message.contains("refused"), "{v}");
    router.shutdown().await;
}

#[tokio::test]
async fn upstream_4xx_passes_through_and_is_not_retried() {
    let replicas = mocks(3).await;
    replicas.iter().for_each(|r| r.set_mode(Mode::Fail400));
    let router = router(config(&replicas)).await;
    let c = client();
    let body = json!({"model": "m", "prompt": "x", "max_tokens": 0});
    let (status, _, routed) = post(&c, &format!("{}/v1/completions", base(&router)), &body, &[]).await;
    assert_eq!(status, 400);
    let (_, _, direct) = post(&c, &format!("{}/v1/completions", replicas[0].url()), &body, &[]).await;
    assert_eq!(routed, direct, "the replica's error body passes through unchanged");
    let attempts: usize = replicas.iter().map(|r| r.request_count()).sum();
    assert_eq!(attempts, 2, "one routed attempt (no retry) plus the direct request");
    let text = router.metrics.render();
    assert_eq!(metric(&text, r#"router_retries_total{endpoint="completions"}"#), 0.0);
    router.shutdown().await;
}

#[tokio::test]
async fn other_endpoints_are_proxied_with_body_and_query() {
    let replicas = mocks(1).await;
    let router = router(config(&replicas)).await;
    let body = json!({"model": "m", "prompt": "count me"});
    let (status, replica, _) = post(&client(), &format!("{}/tokenize", base(&router)), &body, &[]).await;
    assert_eq!((status, replica.as_deref()), (200, Some("r0")));
    let recorded = replicas[0].requests();
    assert_eq!(recorded[0].path, "/tokenize");
    assert_eq!(recorded[0].body, body.to_string().into_bytes());
    router.shutdown().await;
}

#[tokio::test]
async fn an_exhausted_retry_budget_passes_the_first_failure_through() {
    let replicas = mocks(2).await;
    replicas[0].set_mode(Mode::Fail500);
    let mut cfg = config(&replicas);
    cfg.policy = llm_router::policy::PolicyKind::RoundRobin;
    cfg.breaker.failures = 1000;
    cfg.retries = llm_router::dispatch::retry_budget::RetrySettings {
        ratio: 0.0,
        floor_per_sec: 0.0,
        backoff: Duration::ZERO,
    };
    let router = router(cfg).await;
    let c = client();
    let mut statuses = Vec::new();
    for _ in 0..4 {
        statuses
            .push(post(&c, &format!("{}/v1/completions", base(&router)), &completion(false), &[]).await.0);
    }
    let failed = replicas[0].request_count();
    assert!(failed >= 1);
    assert_eq!(statuses.iter().filter(|&&s| s == 500).count(), failed, "no budget, no retry: {statuses:?}");
    let text = router.metrics.render();
    assert_eq!(metric(&text, r#"router_retries_total{endpoint="completions"}"#), 0.0);
    assert_eq!(metric(&text, r#"router_retries_denied_total{endpoint="completions"}"#), failed as f64);
    router.shutdown().await;
}
