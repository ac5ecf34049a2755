//! The relay against a replica that speaks HTTP/1.1 byte by byte (a scripted TCP server
//! on 127.0.0.1): what one upstream read brings leaves as one chunk, pooled connections
//! the replica closed are not a client's failure, and every body framing passes through.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use llm_router::config::RouterConfig;
use llm_router::replicas::ReplicaUrl;
use serde_json::json;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// How the scripted replica answers `POST /v1/completions`.
#[derive(Clone, Copy, PartialEq)]
enum Script {
    /// An SSE stream of 20 events and `[DONE]`, each its own chunk, all in one write.
    Burst,
    /// A keep-alive JSON response, then the connection is closed 50 ms later (an idle
    /// timeout shorter than the router's).
    CloseWhenIdle,
    /// The first request on a connection is answered with keep-alive; the next one on the
    /// same connection is read and the connection closed without a response.
    DropSecond,
    /// No length and no chunking: the body ends when the connection closes.
    UntilClose,
}

struct Scripted {
    addr: std::net::SocketAddr,
    /// Connections that carried a completion request.
    completion_connections: AtomicUsize,
    completions: AtomicUsize,
}

impl Scripted {
    async fn start(script: Script) -> Arc<Scripted> {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let me = Arc::new(Scripted {
            addr: listener.local_addr().unwrap(),
            completion_connections: AtomicUsize::new(0),
            completions: AtomicUsize::new(0),
        });
        let state = me.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(serve(stream, script, state.clone()));
            }
        });
        me
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// Read one request (head and content-length body); its path, or None at EOF.
async fn read_request(stream: &mut TcpStream, buffer: &mut Vec<u8>) -> Option<String> {
    loop {
        if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buffer[..end]).to_string();
            let length = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_owned())
                })
                .map_or(0, |v| v.parse::<usize>().unwrap());
            while buffer.len() < end + 4 + length {
                let mut more = [0u8; 4096];
                let n = stream.read(&mut more).await.ok()?;
                if n == 0 {
                    return None;
                }
                buffer.extend_from_slice(&more[..n]);
            }
            buffer.drain(..end + 4 + length);
            return Some(head.split(' ').nth(1)?.to_owned());
        }
        let mut more = [0u8; 4096];
        let n = stream.read(&mut more).await.ok()?;
        if n == 0 {
            return None;
        }
        buffer.extend_from_slice(&more[..n]);
    }
}

fn json_response(body: &str, close: bool) -> String {
    let connection = if close { "connection: close\r\n" } else { "" };
    format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{connection}\r\n{body}",
        body.len()
    )
}

async fn serve(mut stream: TcpStream, script: Script, state: Arc<Scripted>) {
    let mut buffer = Vec::new();
    let mut completions_here = 0;
    while let Some(path) = read_request(&mut stream, &mut buffer).await {
        let reply = match path.as_str() {
            "/health" => json_response("", false),
            "/v1/models" => json_response(r#"{"object":"list","data":[{"id":"m","object":"model"}]}"#, false),
            _ => {
                completions_here += 1;
                if completions_here == 1 {
                    state.completion_connections.fetch_add(1, Ordering::SeqCst);
                }
                state.completions.fetch_add(1, Ordering::SeqCst);
                match script {
                    Script::Burst => {
                        let mut text = String::from(
                            "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n",
                        );
                        for event in sse_events("r0", false, 20) {
                            text.push_str(&format!("{:x}\r\n{event}\r\n", event.len()));
                        }
                        text.push_str("0\r\n\r\n");
                        text
                    }
                    Script::CloseWhenIdle => {
                        let _ = stream.write_all(json_response(r#"{"ok":1}"#, false).as_bytes()).await;
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        return;
                    }
                    Script::DropSecond if completions_here >= 2 => return,
                    Script::DropSecond => json_response(r#"{"ok":1}"#, false),
                    Script::UntilClose => {
                        let _ = stream
                            .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\r\n{\"ok\":")
                            .await;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        let _ = stream.write_all(b"\"until close\"}").await;
                        return;
                    }
                }
            }
        };
        if stream.write_all(reply.as_bytes()).await.is_err() {
            return;
        }
    }
}

fn config_for(replica: &Scripted) -> RouterConfig {
    let mut config = RouterConfig::new(vec![ReplicaUrl::parse(&replica.url()).unwrap()]);
    config.connect_timeout = Duration::from_millis(500);
    config.drain_timeout = Duration::from_secs(2);
    config
}

fn completion(stream: bool) -> serde_json::Value {
    json!({"model": "m", "prompt": "hello", "max_tokens": 5, "stream": stream})
}

#[tokio::test]
async fn events_read_together_leave_as_one_chunk() {
    let replica = Scripted::start(Script::Burst).await;
    let router = router(config_for(&replica)).await;
    let mut response = client()
        .post(format!("{}/v1/completions", base(&router)))
        .header("content-type", "application/json")
        .body(completion(true).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut chunks = Vec::new();
    while let Some(chunk) = response.chunk().await.unwrap() {
        chunks.push(chunk);
    }
    let body: Vec<u8> = chunks.concat();
    assert_eq!(String::from_utf8(body).unwrap(), sse_events("r0", false, 20).concat());
    // 21 chunks arrived in one write; a relay that forwards event by event would send
    // 21. One read may rarely end inside the burst, hence "at most 2".
    assert!(chunks.len() <= 2, "{} chunks for one upstream write", chunks.len());
    router.shutdown().await;
}

#[tokio::test]
async fn a_pooled_connection_the_replica_closed_is_not_a_failure() {
    let replica = Scripted::start(Script::CloseWhenIdle).await;
    let router = router(config_for(&replica)).await;
    let client = client();
    let url = format!("{}/v1/completions", base(&router));
    for round in 0..3 {
        let (status, _, body) = post(&client, &url, &completion(false), &[]).await;
        assert_eq!((status, &body[..]), (200, &br#"{"ok":1}"#[..]), "round {round}");
        // The replica closes the connection after 50 ms; the router must notice.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(replica.completions.load(Ordering::SeqCst), 3, "each request sent once");
    assert_eq!(replica.completion_connections.load(Ordering::SeqCst), 3, "a new connection each time");
    let metrics =
        client.get(format!("{}/metrics", base(&router))).send().await.unwrap().text().await.unwrap();
    assert_eq!(metric(&metrics, "router_retries_total{endpoint=\"completions\"}"), 0.0);
    router.shutdown().await;
}

#[tokio::test]
async fn a_reused_connection_closed_without_a_response_is_retried_on_a_new_one() {
    let replica = Scripted::start(Script::DropSecond).await;
    let router = router(config_for(&replica)).await;
    let client = client();
    let url = format!("{}/v1/completions", base(&router));
    for round in 0..4 {
        let (status, _, body) = post(&client, &url, &completion(false), &[]).await;
        assert_eq!((status, &body[..]), (200, &br#"{"ok":1}"#[..]), "round {round}");
    }
    // Rounds 2-4 each found the pooled connection, lost it without a response, and were
    // sent again on a new one: 4 + 3 requests over 4 connections.
    assert_eq!(replica.completions.load(Ordering::SeqCst), 7);
    assert_eq!(replica.completion_connections.load(Ordering::SeqCst), 4);
    router.shutdown().await;
}

#[tokio::test]
async fn a_body_delimited_by_close_passes_through_whole() {
    let replica = Scripted::start(Script::UntilClose).await;
    let router = router(config_for(&replica)).await;
    let client = client();
    let url = format!("{}/v1/completions", base(&router));
    for _ in 0..2 {
        let (status, _, body) = post(&client, &url, &completion(false), &[]).await;
        assert_eq!((status, &body[..]), (200, &br#"{"ok":"until close"}"#[..]));
    }
    assert_eq!(replica.completion_connections.load(Ordering::SeqCst), 2, "never reused");
    router.shutdown().await;
}
