//! Memory per request is a small multiple of the body in every mode. The router binary
//! runs against byte-level fake replicas and is sent one 31 MB body (the default limit is 32 MiB) whose prompt is a
//! long array of small numbers (the shape that cost 75 times its size when P/D parsed
//! bodies into JSON trees); its peak RSS (VmHWM, from /proc) is read before and after.

mod support;

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use support::raw_replica::{Act, RawReplica, json_response};

const BODY_BYTES: usize = 31 << 20;

struct Router {
    child: Child,
    port: u16,
}

impl Drop for Router {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Router {
    async fn start(args: &[&str]) -> Router {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = Command::new(env!("CARGO_BIN_EXE_router"))
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let router = Router { child, port };
        let health = format!("http://127.0.0.1:{port}/health");
        for _ in 0..200 {
            if let Ok(r) = support::client().get(&health).send().await
                && r.status() == 200
            {
                return router;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the router did not become healthy");
    }

    fn status_kb(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let line = status.lines().find(|l| l.starts_with(field)).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    /// Send the big body; the status.
    async fn send(&self, path: &str, body: Vec<u8>) -> u16 {
        let response = reqwest::Client::builder()
            .timeout(Duration::from_secs(120))
            .build()
            .unwrap()
            .post(format!("http://127.0.0.1:{}{path}", self.port))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let _ = response.bytes().await;
        status
    }
}

/// `{"model":"m","prompt":[1,1,...],"max_tokens":1}` of about `BODY_BYTES`.
fn big_prompt(chat: bool) -> Vec<u8> {
    let mut body = Vec::with_capacity(BODY_BYTES + 64);
    body.extend_from_slice(br#"{"model":"m","max_tokens":1,"#);
    if chat {
        body.extend_from_slice(br#""messages":[{"role":"user","content":["#);
    } else {
        body.extend_from_slice(br#""prompt":["#);
    }
    while body.len() < BODY_BYTES {
        body.extend_from_slice(b"1,");
    }
    body.extend_from_slice(b"1]");
    if chat {
        body.extend_from_slice(b"}]");
    }
    body.push(b'}');
    body
}

/// A streamed chat of about `BODY_BYTES` in many short messages.
fn many_messages() -> Vec<u8> {
    let mut body = Vec::with_capacity(BODY_BYTES + 256);
    body.extend_from_slice(br#"{"model":"m","stream":true,"max_tokens":10,"messages":["#);
    while body.len() < BODY_BYTES {
        body.extend_from_slice(br#"{"role":"user","content":"a short message, one of many"},"#);
    }
    body.extend_from_slice(br#"{"role":"user","content":"last"}]}"#);
    body
}

fn answer(body: &'static str) -> support::raw_replica::Script {
    Arc::new(move |_| vec![Act::Write(json_response(200, body))])
}

/// Peak RSS growth of one big request, in multiples of the body.
async fn growth(router: &Router, path: &str, body: Vec<u8>) -> f64 {
    // Start the high-water mark again from the present (Linux: 5 > clear_refs).
    std::fs::write(format!("/proc/{}/clear_refs", router.child.id()), "5").unwrap();
    let before = router.status_kb("VmHWM:");
    assert_eq!(router.send(path, body).await, 200);
    let after = router.status_kb("VmHWM:");
    let growth = (after.saturating_sub(before) * 1024) as f64 / BODY_BYTES as f64;
    println!("{path}: peak RSS {before} kB -> {after} kB, {growth:.2}x the body");
    growth
}

/// The bound README states: a request costs at most this many times its body.
const BOUND: f64 = 4.0;

#[tokio::test]
async fn a_31_mb_body_costs_a_small_multiple_of_itself_in_every_mode() {
    let completion = r#"{"id":"cmpl-1","object":"text_completion","created":1,"model":"m","choices":[{"index":0,"text":"x","finish_reason":"length","stop_reason":null}],"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}"#;
    let replica = RawReplica::start(answer(completion)).await;

    // Plain proxying.
    let router = Router::start(&["--replicas", &replica.url()]).await;
    let plain = growth(&router, "/v1/completions", big_prompt(false)).await;
    drop(router);

    // kv-aware: a prompt this long is not tokenised (routed by load).
    let router = Router::start(&[
        "--replicas",
        &replica.url(),
        "--policy",
        "kv-aware",
        "--tokenizer",
        "builtin",
        "--kv-events-port",
        "1",
    ])
    .await;
    let kv = growth(&router, "/v1/completions", big_prompt(false)).await;
    drop(router);

    // P/D: prefill answers with KV parameters and the prompt's ids (a short list: the
    // cost measured is the router's rewrite of the client's body), decode with a
    // completion that a chat client gets converted.
    let prefill = RawReplica::start(answer(
        r#"{"id":"cmpl-p","choices":[{"index":0,"text":"x","prompt_token_ids":[1,2,3]}],"kv_transfer_params":{"remote_engine_id":"e","remote_block_ids":[1]}}"#,
    ))
    .await;
    let pd = format!("prefill={}", prefill.url());
    let decode = format!("decode={}", replica.url());
    let router = Router::start(&["--pd", &pd, &decode]).await;
    let pd_completion = growth(&router, "/v1/completions", big_prompt(false)).await;
    let pd_chat = growth(&router, "/v1/chat/completions", big_prompt(true)).await;
    drop(router);
    // The prefill stage got the whole prompt; decode only the ids.
    assert!(prefill.requests().iter().all(|r| r.body.len() > BODY_BYTES));
    assert!(replica.requests().last().unwrap().body.len() < 4096);

    // A stream that breaks mid-answer and is continued on another replica: the
    // continuation is written from the request's raw members (many small messages: the
    // shape a JSON tree costs most for).
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let breaking: support::raw_replica::Script = {
        let calls = calls.clone();
        Arc::new(move |request| {
            use support::raw_replica::{SSE_HEAD, chunk};
            if request.path == "/tokenize" {
                return vec![Act::Write(json_response(200, r#"{"count":5}"#))];
            }
            let event = |text: &str, finish: &str| {
                chunk(format!("data: {{\"id\":\"c\",\"created\":1,\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{text}\"}},\"finish_reason\":{finish}}}]}}\n\n").as_bytes())
            };
            if calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst).is_multiple_of(2) {
                vec![Act::Write(SSE_HEAD.to_vec()), Act::Write(event("a", "null")), Act::Close]
            } else {
                vec![
                    Act::Write(SSE_HEAD.to_vec()),
                    Act::Write(event("b", "\"length\"")),
                    Act::Write(chunk(b"data: [DONE]\n\n")),
                    Act::Write(b"0\r\n\r\n".to_vec()),
                ]
            }
        })
    };
    let (first, second) = (RawReplica::start(breaking.clone()).await, RawReplica::start(breaking).await);
    let router = Router::start(&["--replicas", &format!("{},{}", first.url(), second.url())]).await;
    let continued = growth(&router, "/v1/chat/completions", many_messages()).await;
    assert!(calls.load(std::sync::atomic::Ordering::SeqCst) >= 2, "the stream was continued");
    drop(router);

    for (mode, g) in [
        ("plain", plain),
        ("kv-aware", kv),
        ("P/D completion", pd_completion),
        ("P/D chat", pd_chat),
        ("continued stream", continued),
    ] {
        assert!(g <= BOUND, "{mode}: peak RSS grew {g:.2}x the body (bound {BOUND}x)");
    }
}
