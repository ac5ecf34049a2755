//! Hostile replicas at the byte level: responses whose framing lies or breaks (RFC 9112
//! §6.3), heads that never end, bodies cut short. Each case asserts what the client
//! gets: the whole body, or a clear error (an OpenAI-style 502, an SSE error event, or a
//! broken connection for a body already under way), never a shortened 200.

mod support;

use std::sync::Arc;
use std::time::Duration;

use llm_router::config::RouterConfig;
use llm_router::server::RunningRouter;
use serde_json::{Value, json};
use support::raw_replica::{Act, RawReplica, SSE_HEAD, chunk};
use support::*;

fn raw_config(replicas: &[&RawReplica]) -> RouterConfig {
    config_for(&replicas.iter().map(|r| r.url()).collect::<Vec<_>>())
}

fn script(acts: Vec<Act>) -> support::raw_replica::Script {
    Arc::new(move |_| acts.clone())
}

async fn send(router: &RunningRouter, stream: bool) -> reqwest::Result<reqwest::Response> {
    client()
        .post(format!("{}/v1/completions", base(router)))
        .header("content-type", "application/json")
        .body(json!({"model": "m", "prompt": "hi", "max_tokens": 4, "stream": stream}).to_string())
        .send()
        .await
}

async fn completion(router: &RunningRouter, stream: bool) -> reqwest::Response {
    send(router, stream).await.unwrap()
}

/// The client learns that the response failed: the connection breaks before the head
/// is whole, or the body fails. A complete 200 would be a silent loss.
async fn assert_cut(router: &RunningRouter) {
    match send(router, false).await {
        Err(_) => {}
        Ok(response) => {
            assert_eq!(response.status(), 200);
            assert!(response.bytes().await.is_err(), "the client sees the body fail, not end");
        }
    }
}

async fn healthy(router: &RunningRouter, replica: &RawReplica) -> f64 {
    let text = client().get(format!("{}/metrics", base(router))).send().await.unwrap().text().await.unwrap();
    metric(&text, &format!("router_replica_healthy{{replica=\"{}\"}}", replica.url()))
}

#[tokio::test]
async fn transfer_encoding_wins_over_a_conflicting_content_length() {
    let mut bytes =
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\ncontent-length: 5\r\n\r\n"
            .to_vec();
    bytes.extend(chunk(b"hello world"));
    bytes.extend_from_slice(b"0\r\n\r\n");
    let replica = RawReplica::start(script(vec![Act::Write(bytes)])).await;
    let router = support::router(raw_config(&[&replica])).await;
    let response = completion(&router, false).await;
    assert_eq!(response.status(), 200);
    let length = response.headers().get("content-length").map(|v| v.to_str().unwrap().to_owned());
    assert!(length.is_none() || length.as_deref() == Some("11"), "content-length {length:?}");
    assert_eq!(response.bytes().await.unwrap(), "hello world", "the whole body, not the first 5 bytes");
    router.shutdown().await;
}

#[tokio::test]
async fn a_length_that_is_not_only_digits_is_refused_with_a_clear_error() {
    for length in ["+5", "5 5", "-1", "0x5", "5, 6"] {
        let bytes = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {length}\r\n\r\nhello"
        );
        let replica = RawReplica::start(script(vec![Act::Write(bytes.into_bytes())])).await;
        let router = support::router(raw_config(&[&replica])).await;
        let response = completion(&router, false).await;
        assert_eq!(response.status(), 502, "content-length `{length}`");
        let body: Value = serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
        assert_eq!(body["error"]["type"], "BadGatewayError", "{body}");
        assert_eq!(body["error"]["code"], 502);
        router.shutdown().await;
    }
}

#[tokio::test]
async fn a_stray_crlf_after_the_last_chunk_keeps_the_body_and_the_replica() {
    let mut bytes =
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
    bytes.extend(chunk(br#"{"choices":[]}"#));
    bytes.extend_from_slice(b"0\r\n\r\n\r\n");
    let replica = RawReplica::start(script(vec![Act::Write(bytes)])).await;
    let router = support::router(raw_config(&[&replica])).await;
    for _ in 0..2 {
        let response = completion(&router, false).await;
        assert_eq!(response.status(), 200);
        assert_eq!(response.bytes().await.unwrap(), r#"{"choices":[]}"#);
    }
    assert_eq!(healthy(&router, &replica).await, 1.0, "a complete body does not eject the replica");
    let text = client().get(format!("{}/metrics", base(&router))).send().await.unwrap().text().await.unwrap();
    let mid_body = format!("router_upstream_errors_total{{kind=\"mid_body\",replica=\"{}\"}}", replica.url());
    assert_eq!(metric(&text, &mid_body), 0.0);
    // The connection with stray bytes on it was not reused for the second request.
    assert_eq!(replica.inference_count(), 2);
    router.shutdown().await;
}

#[tokio::test]
async fn a_body_cut_short_is_an_error_never_a_short_200() {
    // Content-Length 100, 50 bytes, then the close.
    let head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n".to_vec();
    let replica =
        RawReplica::start(script(vec![Act::Write(head), Act::Write(vec![b'x'; 50]), Act::Close])).await;
    let router = support::router(raw_config(&[&replica])).await;
    assert_cut(&router).await;
    router.shutdown().await;

    // A chunked JSON body cut before its last chunk.
    let mut bytes =
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
    bytes.extend(chunk(br#"{"choices":"#));
    let replica = RawReplica::start(script(vec![Act::Write(bytes), Act::Close])).await;
    let router = support::router(raw_config(&[&replica])).await;
    assert_cut(&router).await;
    router.shutdown().await;

    // An SSE stream cut mid-way: the events so far, an error event, [DONE].
    let mut bytes = SSE_HEAD.to_vec();
    bytes.extend(chunk(b"data: {\"choices\":[{\"text\":\"a\"}]}\n\n"));
    let replica = RawReplica::start(script(vec![Act::Write(bytes), Act::Close])).await;
    let router = support::router(raw_config(&[&replica])).await;
    let text = completion(&router, true).await.text().await.unwrap();
    let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
    assert_eq!(events.len(), 3, "{text}");
    assert!(events[0].contains("\"a\""));
    let error: Value = serde_json::from_str(events[1].strip_prefix("data: ").unwrap()).unwrap();
    assert_eq!(error["error"]["code"], 502);
    assert_eq!(events[2], "data: [DONE]");
    router.shutdown().await;
}

#[tokio::test]
async fn broken_heads_and_absurd_chunk_sizes_are_clear_errors() {
    // A head that never ends (past the 64 kB bound), a status line that is not HTTP, a
    // switch of protocols nobody asked for, a coding we cannot decode.
    let mut endless = b"HTTP/1.1 200 OK\r\nx-filler: ".to_vec();
    endless.extend(vec![b'a'; 100 * 1024]);
    for bytes in [
        endless,
        b"HELLO\r\n\r\n".to_vec(),
        b"HTTP/1.1 101 Switching Protocols\r\nupgrade: h2c\r\n\r\n".to_vec(),
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\nxyz".to_vec(),
    ] {
        let replica = RawReplica::start(script(vec![Act::Write(bytes), Act::Hang])).await;
        let router = support::router(raw_config(&[&replica])).await;
        let response = completion(&router, false).await;
        assert_eq!(response.status(), 502);
        let body: Value = serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
        assert_eq!(body["error"]["type"], "BadGatewayError");
        router.shutdown().await;
    }
    // A chunk announcing 2^64 - 1 bytes: streamed as it comes, never reserved; the
    // replica then closes, and the client's body fails.
    let mut bytes =
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
    bytes.extend_from_slice(b"ffffffffffffffff\r\nabc");
    let replica = RawReplica::start(script(vec![Act::Write(bytes), Act::Close])).await;
    let router = support::router(raw_config(&[&replica])).await;
    assert_cut(&router).await;
    // The router still answers, and its lone replica stays in rotation.
    assert_eq!(client().get(format!("{}/health", base(&router))).send().await.unwrap().status(), 200);
    router.shutdown().await;
}

/// A stream that breaks after its first event.
fn breaking_stream() -> support::raw_replica::Script {
    let mut bytes = SSE_HEAD.to_vec();
    bytes.extend(chunk(b"data: {\"choices\":[{\"text\":\"a\"}]}\n\n"));
    script(vec![Act::Write(bytes), Act::Close])
}

async fn scrape(router: &RunningRouter) -> String {
    client().get(format!("{}/metrics", base(router))).send().await.unwrap().text().await.unwrap()
}

fn counted(text: &str, family: &str, label: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(family) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn failing_streams_never_eject_more_than_the_ceiling() {
    let replicas = [
        RawReplica::start(breaking_stream()).await,
        RawReplica::start(breaking_stream()).await,
        RawReplica::start(breaking_stream()).await,
        RawReplica::start(breaking_stream()).await,
    ];
    let all: Vec<&RawReplica> = replicas.iter().collect();
    let mut config = raw_config(&all);
    config.health.interval = Duration::from_secs(3600); // only the first check
    config.policy = llm_router::policy::PolicyKind::RoundRobin;
    let router = support::router(config).await;
    // Every stream breaks: an overloaded fleet looks like this. Each client gets its
    // event, an error event and [DONE], never a 503.
    for _ in 0..12 {
        let text = completion(&router, true).await.text().await.unwrap();
        assert!(
            text.contains("\"a\"") && text.contains("\"code\":502") && text.ends_with("data: [DONE]\n\n"),
            "{text}"
        );
    }
    let text = scrape(&router).await;
    assert_eq!(counted(&text, "router_replica_ejected{", ""), 2.0, "50% of 4 at most");
    assert_eq!(counted(&text, "router_ejections_total{", "result=\"ejected\""), 2.0);
    assert!(counted(&text, "router_ejections_total{", "result=\"refused\"") >= 1.0);
    assert_eq!(client().get(format!("{}/health", base(&router))).send().await.unwrap().status(), 200);
    router.shutdown().await;
}

#[tokio::test]
async fn with_too_few_in_rotation_requests_go_to_every_replica_not_down() {
    let ok = || {
        script(vec![Act::Write(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}".to_vec(),
        )])
    };
    let replicas =
        [RawReplica::start(ok()).await, RawReplica::start(ok()).await, RawReplica::start(ok()).await];
    let all: Vec<&RawReplica> = replicas.iter().collect();
    let mut config = raw_config(&all);
    config.health.timeout = Duration::from_millis(200);
    config.policy = llm_router::policy::PolicyKind::RoundRobin;
    let router = support::router(config).await;
    // Two replicas too busy to answer their health checks in time, the third explicitly
    // failing its own: none in rotation.
    replicas[0].set_health(support::raw_replica::Health::Silent);
    replicas[1].set_health(support::raw_replica::Health::Silent);
    replicas[2].set_health(support::raw_replica::Health::Failing);
    eventually("all three out of rotation", || router.registry.healthy_count() == 0).await;
    // Without panic routing this would be 503 for everyone; the two busy ones serve,
    // the one that says it is broken does not.
    let before: Vec<usize> = replicas.iter().map(RawReplica::inference_count).collect();
    for _ in 0..6 {
        assert_eq!(completion(&router, false).await.status(), 200);
    }
    let served: Vec<usize> = replicas.iter().zip(&before).map(|(r, b)| r.inference_count() - b).collect();
    assert_eq!(served[2], 0, "{served:?}");
    assert_eq!(served[0] + served[1], 6, "{served:?}");
    let text = scrape(&router).await;
    assert_eq!(counted(&text, "router_panic_routing_total{", "endpoint=\"completions\""), 6.0);
    // Panic routing off: a clear 503.
    router.shutdown().await;
    let mut config = raw_config(&all);
    config.health.timeout = Duration::from_millis(200);
    config.outliers.panic_threshold = 0;
    let router = support::router(config).await;
    assert_eq!(completion(&router, false).await.status(), 503);
    router.shutdown().await;
}

#[tokio::test]
async fn a_queued_request_waits_for_its_first_byte_and_never_ejects_its_replica() {
    // The first event comes 600 ms after the headers: longer than the idle limit, well
    // within the first-byte one.
    let mut late = SSE_HEAD.to_vec();
    late.extend(chunk(b"data: {\"choices\":[{\"text\":\"late\"}]}\n\n"));
    late.extend(chunk(b"data: [DONE]\n\n"));
    late.extend_from_slice(b"0\r\n\r\n");
    let replica = RawReplica::start(script(vec![
        Act::Write(SSE_HEAD.to_vec()),
        Act::Sleep(Duration::from_millis(600)),
        Act::Write(late[SSE_HEAD.len()..].to_vec()),
    ]))
    .await;
    let mut config = raw_config(&[&replica]);
    config.timeouts.stream_idle = Duration::from_millis(200);
    config.timeouts.first_byte = Duration::from_secs(2);
    let router = support::router(config).await;
    let text = completion(&router, true).await.text().await.unwrap();
    assert!(text.contains("\"late\"") && !text.contains("error"), "{text}");

    // Nothing at all within the first-byte limit: an error event, the replica kept.
    replica.set_script(script(vec![Act::Write(SSE_HEAD.to_vec()), Act::Hang]));
    let text = completion(&router, true).await.text().await.unwrap();
    assert!(text.contains("\"code\":502") && text.ends_with("data: [DONE]\n\n"), "{text}");
    let metrics = scrape(&router).await;
    assert_eq!(counted(&metrics, "router_upstream_errors_total{", "kind=\"first_byte_timeout\""), 1.0);
    assert_eq!(counted(&metrics, "router_ejections_total{", ""), 0.0, "busy is not broken");
    eventually("the upstream request is cancelled", || replica.closed_while_hanging() == 1).await;
    router.shutdown().await;
}

#[tokio::test]
async fn idle_connections_the_replica_closed_or_to_a_replica_that_left_are_reaped() {
    let answer = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}".to_vec();
    // `closing` answers and then closes, as vLLM closes idle keep-alive connections
    // after a few seconds; `keeping` keeps its connections open.
    let closing = RawReplica::start(script(vec![Act::Write(answer.clone()), Act::Close])).await;
    let keeping = RawReplica::start(script(vec![Act::Write(answer)])).await;
    let mut config = raw_config(&[&closing, &keeping]);
    config.policy = llm_router::policy::PolicyKind::RoundRobin;
    let router = support::router(config).await;
    for _ in 0..4 {
        assert_eq!(completion(&router, false).await.status(), 200);
    }
    let idle = "router_upstream_idle_connections ";
    // Within a reaping interval or two, only `keeping`'s connection is left: the socket
    // `closing` closed is not left in CLOSE_WAIT.
    let mut left = f64::NAN;
    for _ in 0..150 {
        left = metric(&scrape(&router).await, idle);
        if left == 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(left, 1.0, "one idle connection left, to the replica that keeps it");
    assert_eq!(keeping.inference_connections(), (1, 0));
    // The replica leaves the set: its idle connection is closed.
    router.registry.remove(&keeping.url()).unwrap();
    eventually("keeping's idle connection closed", || keeping.inference_connections() == (1, 1)).await;
    for _ in 0..150 {
        if metric(&scrape(&router).await, idle) == 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(metric(&scrape(&router).await, idle), 0.0);
    router.shutdown().await;
}
