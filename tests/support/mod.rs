//! Test support: a small mock vLLM replica on 127.0.0.1 that tests control exactly, a
//! router started in-process against such replicas, and bounded waiting.
//!
//! The mock answers `/health`, `/v1/models`, `/v1/completions` and
//! `/v1/chat/completions` (streaming and not) with deterministic bytes, names itself in
//! an `x-replica` header, records every request, and counts requests whose client went
//! away before the answer was complete. It can be killed (listener and every open
//! connection closed) and restarted on the same port.

#![allow(dead_code)]

pub mod corpus;
pub mod raw_replica;
pub mod real_vllm;
pub mod redis;
pub mod tap;
pub mod zmq_publisher;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post as route_post};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use llm_router::config::RouterConfig;
use llm_router::replicas::ReplicaUrl;
use llm_router::server::RunningRouter;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_stream::wrappers::ReceiverStream;

/// How the mock answers inference requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Answer at once.
    Normal,
    /// Answer 500 with an error body.
    Fail500,
    /// Answer 400 with an error body, as vLLM does for invalid parameters.
    Fail400,
    /// Streams: send the first event, then wait for [`MockReplica::release`].
    /// Non-streaming: wait for the release before answering.
    Hold,
}

#[derive(Debug, Clone)]
pub struct Recorded {
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

pub struct MockState {
    pub name: String,
    pub models: Mutex<Vec<String>>,
    pub healthy: AtomicBool,
    pub mode: Mutex<Mode>,
    pub requests: Mutex<Vec<Recorded>>,
    /// Requests whose client (the router) went away before the answer was complete.
    pub cancelled: AtomicUsize,
    /// Responses fully sent.
    pub completed: AtomicUsize,
    pub events: usize,
    /// What `/metrics` says of the engine's running requests (vLLM's gauge); without a
    /// value, `/metrics` answers 404, as a server that is not vLLM.
    pub engine_running: Mutex<Option<u32>>,
    released: watch::Sender<bool>,
}

pub struct MockReplica {
    pub addr: SocketAddr,
    pub state: Arc<MockState>,
    server: Mutex<Option<JoinSet<()>>>,
}

impl MockReplica {
    pub async fn start(name: &str, models: &[&str]) -> Arc<MockReplica> {
        Self::start_on(name, models, "127.0.0.1:0".parse().unwrap()).await
    }

    /// A mock listening on `addr` (another loopback address, a chosen port).
    pub async fn start_on(name: &str, models: &[&str], addr: SocketAddr) -> Arc<MockReplica> {
        let state = Arc::new(MockState {
            name: name.to_owned(),
            models: Mutex::new(models.iter().map(|m| m.to_string()).collect()),
            healthy: AtomicBool::new(true),
            mode: Mutex::new(Mode::Normal),
            requests: Mutex::new(Vec::new()),
            cancelled: AtomicUsize::new(0),
            completed: AtomicUsize::new(0),
            events: 5,
            engine_running: Mutex::new(None),
            released: watch::channel(false).0,
        });
        let listener = bind(addr).await;
        let addr = listener.local_addr().unwrap();
        let mock = Arc::new(MockReplica { addr, state, server: Mutex::new(None) });
        mock.serve(listener);
        mock
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set_mode(&self, mode: Mode) {
        *self.state.mode.lock().unwrap() = mode;
    }

    /// Have `/metrics` report this many running requests (None: no `/metrics`).
    pub fn set_engine_running(&self, running: Option<u32>) {
        *self.state.engine_running.lock().unwrap() = running;
    }

    pub fn set_healthy(&self, healthy: bool) {
        self.state.healthy.store(healthy, Ordering::SeqCst);
    }

    /// Let held responses continue.
    pub fn release(&self) {
        self.state.released.send_replace(true);
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.state.requests.lock().unwrap().clone()
    }

    pub fn request_count(&self) -> usize {
        self.state.requests.lock().unwrap().len()
    }

    pub fn cancelled(&self) -> usize {
        self.state.cancelled.load(Ordering::SeqCst)
    }

    /// Close the listener and every open connection, like a crashed process.
    pub fn kill(&self) {
        if let Some(mut tasks) = self.server.lock().unwrap().take() {
            tasks.abort_all();
        }
    }

    /// Listen again on the same address.
    pub async fn restart(&self) {
        let listener = bind(self.addr).await;
        self.serve(listener);
    }

    fn serve(&self, listener: TcpListener) {
        let app = Router::new()
            .route("/health", get(health))
            .route("/v1/models", get(models))
            .route("/v1/completions", route_post(inference))
            .route("/v1/chat/completions", route_post(inference))
            .route("/tokenize", route_post(inference))
            .route("/metrics", get(engine_metrics))
            .with_state(self.state.clone());
        let mut tasks = JoinSet::new();
        tasks.spawn(async move {
            let mut connections = JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else { break };
                let _ = stream.set_nodelay(true);
                let service = TowerToHyperService::new(app.clone());
                connections.spawn(async move {
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .http1_only()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        *self.server.lock().unwrap() = Some(tasks);
    }
}

impl Drop for MockReplica {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn bind(addr: SocketAddr) -> TcpListener {
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_reuseaddr(true).unwrap();
    socket.bind(addr).unwrap();
    socket.listen(1024).unwrap()
}

async fn engine_metrics(State(state): State<Arc<MockState>>) -> Response {
    match *state.engine_running.lock().unwrap() {
        Some(running) => format!(
            "# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running{{engine=\"0\",model_name=\"m\"}} {running}.0\nvllm:num_requests_waiting{{engine=\"0\",model_name=\"m\"}} 0.0\n"
        )
        .into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn health(State(state): State<Arc<MockState>>) -> StatusCode {
    if state.healthy.load(Ordering::SeqCst) { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE }
}

async fn models(State(state): State<Arc<MockState>>) -> Response {
    let data: Vec<_> = state
        .models
        .lock()
        .unwrap()
        .iter()
        .map(|m| serde_json::json!({"id": m, "object": "model", "owned_by": state.name, "max_model_len": 4096}))
        .collect();
    json(StatusCode::OK, serde_json::json!({"object": "list", "data": data}).to_string(), &state.name)
}

fn json(status: StatusCode, body: String, name: &str) -> Response {
    let mut r = (status, body).into_response();
    r.headers_mut().insert("content-type", "application/json".parse().unwrap());
    r.headers_mut().insert("x-replica", name.parse().unwrap());
    r
}

/// Counts the request as cancelled if dropped before it is disarmed.
struct CancelGuard(Arc<MockState>, bool);

impl Drop for CancelGuard {
    fn drop(&mut self) {
        if !self.1 {
            self.0.cancelled.fetch_add(1, Ordering::SeqCst);
        }
    }
}

async fn inference(State(state): State<Arc<MockState>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, usize::MAX).await.unwrap();
    state.requests.lock().unwrap().push(Recorded {
        path: parts.uri.path().to_owned(),
        headers: parts.headers.clone(),
        body: body.clone(),
    });
    let mode = *state.mode.lock().unwrap();
    if mode == Mode::Fail500 {
        let err =
            r#"{"error":{"message":"engine exploded","type":"InternalServerError","param":null,"code":500}}"#;
        return json(StatusCode::INTERNAL_SERVER_ERROR, err.into(), &state.name);
    }
    if mode == Mode::Fail400 {
        let err = r#"{"error":{"message":"max_tokens must be at least 1","type":"BadRequestError","param":"max_tokens","code":400}}"#;
        return json(StatusCode::BAD_REQUEST, err.into(), &state.name);
    }
    let request: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let chat = parts.uri.path() == "/v1/chat/completions";
    let stream = request["stream"].as_bool().unwrap_or(false);
    if !stream {
        let mut guard = CancelGuard(state.clone(), false);
        if mode == Mode::Hold {
            let mut released = state.released.subscribe();
            let _ = released.wait_for(|r| *r).await;
        }
        guard.1 = true;
        state.completed.fetch_add(1, Ordering::SeqCst);
        return json(StatusCode::OK, full_body(&state.name, chat, state.events), &state.name);
    }
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    let task_state = state.clone();
    tokio::spawn(async move {
        let state = task_state;
        for (i, event) in sse_events(&state.name, chat, state.events).into_iter().enumerate() {
            if i == 1 && mode == Mode::Hold {
                let mut released = state.released.subscribe();
                tokio::select! {
                    _ = released.wait_for(|r| *r) => {}
                    _ = tx.closed() => {
                        state.cancelled.fetch_add(1, Ordering::SeqCst);
                        return;
                    }
                }
            }
            if tx.send(Ok(Bytes::from(event))).await.is_err() {
                state.cancelled.fetch_add(1, Ordering::SeqCst);
                return;
            }
        }
        state.completed.fetch_add(1, Ordering::SeqCst);
    });
    let mut r = Response::new(Body::from_stream(ReceiverStream::new(rx)));
    r.headers_mut().insert("content-type", "text/event-stream".parse().unwrap());
    r.headers_mut().insert("x-replica", state.name.parse().unwrap());
    r
}

/// The SSE events of a stream, one `data:` event each, ending with `[DONE]`.
pub fn sse_events(name: &str, chat: bool, n: usize) -> Vec<String> {
    let mut events: Vec<String> = (0..n)
        .map(|i| {
            let chunk = if chat {
                serde_json::json!({"id": format!("chatcmpl-{name}"), "object": "chat.completion.chunk", "created": 1,
                    "model": "m", "choices": [{"index": 0, "delta": {"content": format!(" tok{i}")}, "finish_reason": null}]})
            } else {
                serde_json::json!({"id": format!("cmpl-{name}"), "object": "text_completion", "created": 1,
                    "model": "m", "choices": [{"index": 0, "text": format!(" tok{i}"), "finish_reason": null}]})
            };
            format!("data: {chunk}\n\n")
        })
        .collect();
    events.push("data: [DONE]\n\n".to_owned());
    events
}

fn full_body(name: &str, chat: bool, n: usize) -> String {
    let text: String = (0..n).map(|i| format!(" tok{i}")).collect();
    let v = if chat {
        serde_json::json!({"id": format!("chatcmpl-{name}"), "object": "chat.completion", "created": 1, "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": n, "total_tokens": 3 + n}})
    } else {
        serde_json::json!({"id": format!("cmpl-{name}"), "object": "text_completion", "created": 1, "model": "m",
            "choices": [{"index": 0, "text": text, "finish_reason": "length"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": n, "total_tokens": 3 + n}})
    };
    v.to_string()
}

/// Start mocks named r0, r1, ... serving model `m`.
pub async fn mocks(n: usize) -> Vec<Arc<MockReplica>> {
    let mut out = Vec::new();
    for i in 0..n {
        out.push(MockReplica::start(&format!("r{i}"), &["m"]).await);
    }
    out
}

/// A router config for these mocks with fast health checks (tests wait for them).
pub fn config(mocks: &[Arc<MockReplica>]) -> RouterConfig {
    config_for(&mocks.iter().map(|m| m.url()).collect::<Vec<_>>())
}

/// A router config for replicas at these URLs with fast health checks.
pub fn config_for(urls: &[String]) -> RouterConfig {
    let urls = urls.iter().map(|u| ReplicaUrl::parse(u).unwrap()).collect();
    let mut config = RouterConfig::new(urls);
    config.health.interval = Duration::from_millis(100);
    config.health.timeout = Duration::from_millis(500);
    config.thresholds.unhealthy = 1;
    config.thresholds.healthy = 1;
    config.connect_timeout = Duration::from_millis(500);
    config.drain_timeout = Duration::from_secs(2);
    config
}

pub async fn router(config: RouterConfig) -> RunningRouter {
    llm_router::server::start(config).await.unwrap()
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(20)).build().unwrap()
}

pub fn base(router: &RunningRouter) -> String {
    format!("http://{}", router.addr)
}

/// Poll `condition` every 20 ms for up to 10 s; panic with `what` if it never holds.
pub async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    for _ in 0..500 {
        if condition() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for: {what}");
}

/// POST a JSON body, return status, the serving replica's name and the body.
pub async fn post(
    client: &reqwest::Client,
    url: &str,
    body: &serde_json::Value,
    headers: &[(&str, &str)],
) -> (u16, Option<String>, Bytes) {
    let mut request = client.post(url).header("content-type", "application/json").body(body.to_string());
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let replica = response.headers().get("x-replica").map(|v| v.to_str().unwrap().to_owned());
    (status, replica, response.bytes().await.unwrap())
}

/// The value of a metric sample (exact label text), or 0 when absent.
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series).and_then(|rest| rest.trim().parse().ok()))
        .unwrap_or(0.0)
}

/// Routing decisions with this reason, summed over policies and replicas.
pub fn decisions(text: &str, reason: &str) -> f64 {
    let label = format!(r#"reason="{reason}""#);
    text.lines()
        .filter(|l| l.starts_with("router_routing_decisions_total{") && l.contains(&label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
