//! Hostile clients: one that stops reading a stream, one that uploads its body slowly.
//! Neither may hold a concurrency slot, an upstream request or the engine's work past
//! its time limit; other clients are served meanwhile.

mod support;

use std::sync::Arc;
use std::time::Duration;

use llm_router::config::RouterConfig;
use llm_router::replicas::ReplicaUrl;
use llm_router::server::RunningRouter;
use serde_json::json;
use support::raw_replica::{Act, RawReplica, SSE_HEAD, chunk, json_response};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn raw_config(replica: &RawReplica) -> RouterConfig {
    config_for(&[replica.url()])
}

/// Streams flood SSE events until the router hangs up; anything else is answered at once.
fn flood_or_answer() -> support::raw_replica::Script {
    Arc::new(|request| {
        if request.json()["stream"] == true {
            let event = chunk(
                format!("data: {{\"choices\":[{{\"text\":\"{}\"}}]}}\n\n", "x".repeat(16_000)).as_bytes(),
            );
            vec![Act::Write(SSE_HEAD.to_vec()), Act::Flood(event)]
        } else {
            vec![Act::Write(json_response(200, r#"{"choices":[{"text":"ok"}]}"#))]
        }
    })
}

/// A client socket with a small receive buffer that sends a request and never reads.
async fn non_reader(router: &RunningRouter, body: &str) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stream = socket.connect(router.addr).await.unwrap();
    let request = format!(
        "POST /v1/completions HTTP/1.1\r\nhost: r\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    stream
}

async fn in_flight(router: &RunningRouter, replica: &RawReplica) -> f64 {
    let text = client().get(format!("{}/metrics", base(router))).send().await.unwrap().text().await.unwrap();
    metric(&text, &format!("router_in_flight_requests{{replica=\"{}\"}}", replica.url()))
}

#[tokio::test]
async fn clients_that_stop_reading_lose_their_streams_and_free_their_slots() {
    let replica = RawReplica::start(flood_or_answer()).await;
    let mut config = raw_config(&replica);
    config.limit = Some((2, 8, Duration::from_millis(500)));
    config.client_idle_timeout = Duration::from_secs(1);
    let router = router(config).await;
    let stream = json!({"model": "m", "prompt": "p", "max_tokens": 100000, "stream": true}).to_string();
    let _stalled = [non_reader(&router, &stream).await, non_reader(&router, &stream).await];
    eventually("both streams reach the replica", || replica.inference_count() == 2).await;

    // Both slots are taken while the sockets fill.
    let body = json!({"model": "m", "prompt": "p", "max_tokens": 1});
    let (status, _, _) = post(&client(), &format!("{}/v1/completions", base(&router)), &body, &[]).await;
    assert_eq!(status, 503, "the fleet's slots are held by the two streams for now");

    // Within the client idle limit (plus the time to fill the buffers), the router cuts
    // both clients, cancels both upstream requests and frees both slots.
    for _ in 0..300 {
        if replica.closed_while_hanging() == 2 && in_flight(&router, &replica).await == 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(replica.closed_while_hanging(), 2, "both upstream requests cancelled");
    assert_eq!(in_flight(&router, &replica).await, 0.0);
    let (status, _, _) = post(&client(), &format!("{}/v1/completions", base(&router)), &body, &[]).await;
    assert_eq!(status, 200, "a slot is free again");
    router.shutdown().await;
}

#[tokio::test]
async fn a_slow_upload_does_not_hold_a_slot() {
    let replica = RawReplica::start(flood_or_answer()).await;
    let mut config = raw_config(&replica);
    config.limit = Some((1, 8, Duration::from_millis(300)));
    config.body_read_timeout = Duration::from_secs(1);
    let router = router(config).await;
    // Announces 100 kB, sends 10 bytes, then nothing.
    let mut slow = TcpStream::connect(router.addr).await.unwrap();
    slow.write_all(b"POST /v1/completions HTTP/1.1\r\nhost: r\r\ncontent-type: application/json\r\ncontent-length: 100000\r\n\r\n{\"model\":").await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let body = json!({"model": "m", "prompt": "p", "max_tokens": 1});
    let (status, _, _) = post(&client(), &format!("{}/v1/completions", base(&router)), &body, &[]).await;
    assert_eq!(status, 200, "the slow upload holds no slot");
    // The slow client gets 408 when its time to send the body is up.
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), slow.read_to_end(&mut answer)).await;
    assert!(read.is_ok(), "the router answers and closes");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("RequestTimeoutError"), "{answer}");
    router.shutdown().await;
}

async fn post_raw(router: &RunningRouter, path: &str, body: &serde_json::Value) -> (u16, serde_json::Value) {
    let response = client()
        .post(format!("{}{path}", base(router)))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, serde_json::from_slice(&response.bytes().await.unwrap()).unwrap_or_default())
}

#[tokio::test]
async fn clients_cannot_reach_engine_administration_or_steer_kv_transfers() {
    let replica = RawReplica::start(flood_or_answer()).await;
    let router = router(raw_config(&replica)).await;
    // vLLM's runtime LoRA loading and other administrative calls are not forwarded.
    for path in
        ["/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/v1/../reset_prefix_cache", "/v1/anything"]
    {
        let (status, body) = post_raw(&router, path, &json!({"lora_name": "x", "lora_path": "/etc"})).await;
        assert_eq!(status, 404, "{path}");
        assert_eq!(body["error"]["type"], "NotFoundError", "{path}");
    }
    // The OpenAI endpoints vLLM serves are.
    let (status, _) = post_raw(&router, "/v1/embeddings", &json!({"model": "m", "input": "x"})).await;
    assert_eq!(status, 200);
    assert!(replica.requests().iter().all(|r| r.path != "/v1/load_lora_adapter"));

    // A client's kv_transfer_params (a host and port for the engine to pull KV blocks
    // from) never reach the engine.
    let body = json!({"model": "m", "prompt": "p", "max_tokens": 1,
        "kv_transfer_params": {"do_remote_prefill": true, "remote_host": "10.9.9.9", "remote_port": 5600}});
    assert_eq!(post_raw(&router, "/v1/completions", &body).await.0, 200);
    let sent = replica.requests().last().unwrap().json();
    assert!(sent.get("kv_transfer_params").is_none(), "{sent}");
    assert_eq!(sent["prompt"], "p", "the rest as sent");
    router.shutdown().await;

    // Unless the operator trusts clients with them, and with an explicit extra path.
    let mut config = raw_config(&replica);
    config.trust_client_kv_params = true;
    config.forward_paths.push("/v1/load_lora_adapter".into());
    let router = support::router(config).await;
    assert_eq!(post_raw(&router, "/v1/completions", &body).await.0, 200);
    assert_eq!(replica.requests().last().unwrap().json()["kv_transfer_params"]["remote_port"], 5600);
    assert_eq!(post_raw(&router, "/v1/load_lora_adapter", &json!({})).await.0, 200);
    router.shutdown().await;
}

#[tokio::test]
async fn error_bodies_name_no_replica_and_no_os_error() {
    // A replica that breaks the protocol, and one that is not there at all.
    let broken = RawReplica::start(Arc::new(|_| vec![Act::Write(b"NOT HTTP\r\n\r\n".to_vec())])).await;
    for replicas in [vec![broken.url()], vec!["http://127.0.0.1:1".to_owned()]] {
        let mut config = RouterConfig::new(replicas.iter().map(|u| ReplicaUrl::parse(u).unwrap()).collect());
        config.outliers.panic_threshold = 100;
        let router = router(config).await;
        let (status, body) =
            post_raw(&router, "/v1/completions", &json!({"model": "m", "prompt": "p"})).await;
        let text = body.to_string();
        assert!(status == 502 || status == 503, "{status} {text}");
        assert_eq!(body["error"]["code"], status);
        assert!(
            !text.contains("127.0.0.1") && !text.contains("os error") && !text.contains("refused"),
            "{text}"
        );
        router.shutdown().await;
    }
}

/// Whether the router closes `stream` within 10 s (bounded wait).
async fn closed_by_router(stream: &mut TcpStream) -> bool {
    let mut buf = vec![0u8; 65536];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

#[tokio::test]
async fn idle_connections_are_closed_and_a_long_answer_keeps_its_own() {
    let mocks = mocks(1).await;
    let mut config = config(&mocks);
    config.client_keep_alive_timeout = Duration::from_millis(300);
    let router = support::router(config).await;
    // A connection that never sends a request.
    let mut silent = TcpStream::connect(router.addr).await.unwrap();
    assert!(closed_by_router(&mut silent).await, "a silent connection is closed");
    // A keep-alive connection after its request.
    let mut keep_alive = TcpStream::connect(router.addr).await.unwrap();
    keep_alive.write_all(b"GET /health HTTP/1.1\r\nhost: r\r\n\r\n").await.unwrap();
    assert!(closed_by_router(&mut keep_alive).await, "an idle keep-alive connection is closed");
    // An HTTP/2 connection with no stream open (the server's pings are not use).
    let mut h2 = TcpStream::connect(router.addr).await.unwrap();
    h2.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00").await.unwrap();
    assert!(closed_by_router(&mut h2).await, "an idle HTTP/2 connection is closed");
    // A non-streamed answer the replica holds for 3x the limit: its connection stays.
    mocks[0].set_mode(Mode::Hold);
    let body = json!({"model": "m", "prompt": "hi"}).to_string();
    let mut waiting = TcpStream::connect(router.addr).await.unwrap();
    let request = format!(
        "POST /v1/completions HTTP/1.1\r\nhost: r\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    waiting.write_all(request.as_bytes()).await.unwrap();
    eventually("the request reached the replica", || mocks[0].request_count() == 1).await;
    tokio::time::sleep(Duration::from_millis(900)).await;
    mocks[0].release();
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&answer).contains("\"choices\"") {
        let n = tokio::time::timeout(Duration::from_secs(10), waiting.read(&mut buf)).await.unwrap().unwrap();
        assert!(n > 0, "closed while its request was in flight: {}", String::from_utf8_lossy(&answer));
        answer.extend_from_slice(&buf[..n]);
    }
    assert!(String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200"));
    router.shutdown().await;
}

#[tokio::test]
async fn connections_past_the_limit_wait_to_be_accepted_and_are_served_when_one_closes() {
    let mocks = mocks(1).await;
    let mut config = config(&mocks);
    config.max_client_connections = 3;
    let router = router(config).await;
    // Three connections that send nothing hold every place.
    let mut idle = Vec::new();
    for _ in 0..3 {
        idle.push(TcpStream::connect(router.addr).await.unwrap());
    }
    eventually("three connections open", || {
        metric(&router.metrics.render(), "router_client_connections") == 3.0
    })
    .await;
    // A fourth connects (the kernel's backlog takes it) but is not served yet.
    let mut fourth = TcpStream::connect(router.addr).await.unwrap();
    fourth.write_all(b"GET /health HTTP/1.1\r\nhost: r\r\nconnection: close\r\n\r\n").await.unwrap();
    let mut answer = Vec::new();
    let early = tokio::time::timeout(Duration::from_millis(300), fourth.read_to_end(&mut answer)).await;
    assert!(early.is_err(), "served past the connection limit: {:?}", String::from_utf8_lossy(&answer));
    assert_eq!(metric(&router.metrics.render(), "router_client_connections"), 3.0);
    // One closes: the fourth is accepted and answered.
    drop(idle.pop());
    tokio::time::timeout(Duration::from_secs(10), fourth.read_to_end(&mut answer)).await.unwrap().unwrap();
    assert!(answer.starts_with(b"HTTP/1.1 200"), "{:?}", String::from_utf8_lossy(&answer));
    router.shutdown().await;
}

#[tokio::test]
async fn request_bytes_held_at_once_are_capped_across_clients() {
    let mocks = mocks(1).await;
    let mut config = config(&mocks);
    config.max_buffered_request_bytes = 1 << 20;
    let router = router(config).await;
    // A slow upload: 800 kB of a declared 900 kB, then nothing.
    let mut slow = TcpStream::connect(router.addr).await.unwrap();
    let head = "POST /v1/completions HTTP/1.1\r\nhost: r\r\ncontent-type: application/json\r\ncontent-length: 900000\r\n\r\n";
    slow.write_all(head.as_bytes()).await.unwrap();
    slow.write_all(&vec![b' '; 800_000]).await.unwrap();
    eventually("800 kB held", || metric(&router.metrics.render(), "router_request_bytes_held") >= 800_000.0)
        .await;
    let url = format!("{}/v1/completions", base(&router));
    let body = |bytes: usize| json!({"model": "m", "prompt": "x".repeat(bytes)});
    // 300 kB more would pass the cap: refused, to be retried; 100 kB fits.
    let refused = client()
        .post(&url)
        .header("content-type", "application/json")
        .body(body(300_000).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 503);
    assert!(refused.headers().contains_key("retry-after"));
    let (status, _, _) = post(&client(), &url, &body(100_000), &[]).await;
    assert_eq!(status, 200);
    // The slow client leaves: its bytes are given back.
    drop(slow);
    eventually("nothing held", || metric(&router.metrics.render(), "router_request_bytes_held") == 0.0).await;
    let (status, _, _) = post(&client(), &url, &body(300_000), &[]).await;
    assert_eq!(status, 200);
    router.shutdown().await;
}
