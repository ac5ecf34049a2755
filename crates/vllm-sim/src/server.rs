//! The simulated replica's HTTP server: vLLM's OpenAI-compatible endpoints, plus the
//! simulator's own `/sim/*` endpoints for tests (request log, fault switches).
//!
//! Inference requests are validated like vLLM validates them, given to the engine, and
//! answered as a JSON body or an SSE stream built from the engine's token events.
//! Connections are served by hyper's HTTP/1 server with TCP_NODELAY; the accept loop
//! also implements the "refuse connections" fault by closing its listener for a while.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http::{HeaderValue, StatusCode, header};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::api_server::ApiServer;
use super::engine::{Engine, EngineRequest, Kind};
use super::faults::{FaultConfig, Faults};
use super::metrics::SimMetrics;
use super::pd::{self, Handoff};
use super::profile::PromptForm;
use super::request::{self, GenRequest};
use super::request_log::{LoggedRequest, RequestLog};
use super::responses::{self, Meta, SseStream};
use super::{Role, SimConfig, SimError};
use llm_common::tokenizer;

pub struct SimState {
    pub config: SimConfig,
    pub model: String,
    pub engine: Engine,
    pub api: ApiServer,
    pub metrics: Arc<SimMetrics>,
    pub faults: Arc<Faults>,
    pub log: RequestLog,
    pub engine_id: String,
    pub addr: SocketAddr,
    next_id: AtomicU64,
    warned_rejected_handoff: AtomicBool,
}

impl SimState {
    pub fn new(
        config: SimConfig,
        engine: Engine,
        api: ApiServer,
        metrics: Arc<SimMetrics>,
        faults: Arc<Faults>,
        addr: SocketAddr,
    ) -> Self {
        SimState {
            api,
            model: config.served_model_name.clone(),
            log: RequestLog::new(config.request_log_size),
            engine_id: pd::engine_id(addr.port()),
            config,
            engine,
            metrics,
            faults,
            addr,
            next_id: AtomicU64::new(fastrand::u64(..) >> 16),
            warned_rejected_handoff: AtomicBool::new(false),
        }
    }
}

pub fn routes(state: Arc<SimState>) -> Router {
    Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/inference/v1/generate", post(generate_tokens))
        .route("/health", get(|| async { StatusCode::OK }))
        .route("/version", get(version))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .route("/metrics", get(metrics))
        .route("/sim/requests", get(request_log))
        .route("/sim/faults", get(get_faults).post(set_faults))
        .fallback(|r: Request| async move { SimError::NotFound(r.uri().path().to_owned()).into_response() })
        .with_state(state)
}

async fn completions(State(s): State<Arc<SimState>>, request: Request) -> Response {
    generate(s, request, false).await.unwrap_or_else(IntoResponse::into_response)
}

async fn chat_completions(State(s): State<Arc<SimState>>, request: Request) -> Response {
    generate(s, request, true).await.unwrap_or_else(IntoResponse::into_response)
}

/// `POST /inference/v1/generate`: token ids in, token ids out ([`crate::generate`]).
async fn generate_tokens(State(s): State<Arc<SimState>>, request: Request) -> Response {
    tokens_in_tokens_out(s, request).await.unwrap_or_else(IntoResponse::into_response)
}

async fn tokens_in_tokens_out(s: Arc<SimState>, request: Request) -> Result<Response, SimError> {
    if !s.config.enable_scale_out {
        return Err(SimError::Forbidden(crate::generate::DISABLED));
    }
    let arrived = Instant::now();
    let (parts, body) = read_json(request).await?;
    let parsed = crate::generate::parse(&body, &s.model, s.config.max_model_len);
    s.log.push(LoggedRequest {
        path: parts.uri.path().to_owned(),
        headers: logged_headers(&parts.headers),
        model: body.get("model").and_then(Value::as_str).map(str::to_owned),
        stream: body.get("stream").and_then(Value::as_bool),
        max_tokens: body.pointer("/sampling_params/max_tokens").cloned(),
        session_id: None,
        user: None,
        prompt_from_text: Some(false),
        prompt_tokens: parsed.as_ref().ok().map(|r| r.prompt_ids.len()),
        kv_transfer_params: body.get("kv_transfer_params").cloned(),
    });
    if s.faults.fail_500() {
        s.metrics.faults.with_label_values(&["fail_500"]).inc();
        return Err(SimError::Internal("injected fault: fail_500".into()));
    }
    let mut job = parsed?;
    s.metrics.prompts_from_ids.inc();
    let kind = resolve_handoff(&s, &mut job);
    let waiting = AbortOnDrop(&s.metrics);
    s.api.intake(job.prompt_ids.len(), PromptForm::Generate).await;
    std::mem::forget(waiting);
    let rx = submit(&s, &job, kind, arrived, PromptForm::Generate);
    let n = s.next_id.fetch_add(1, Ordering::Relaxed);
    let id = format!("generate-tokens-{n:016x}");
    if job.stream {
        let body = Body::from_stream(crate::generate::GenerateStream::new(id, job, rx));
        let mut response = Response::new(body);
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream; charset=utf-8"));
        return Ok(response);
    }
    let created = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let (host, port) = (s.addr.ip().to_string(), s.addr.port());
    let value = crate::generate::collect(&id, created, &job, rx, |blocks| {
        Some(pd::prefill_response(&s.engine_id, &host, port, &id, blocks))
    })
    .await
    .map_err(SimError::BadRequest)?;
    Ok(json_response(StatusCode::OK, value.to_string()))
}

const MAX_BODY: usize = 64 << 20;

async fn read_json(request: Request) -> Result<(http::request::Parts, Value), SimError> {
    let (parts, body) = request.into_parts();
    let bytes = axum::body::to_bytes(body, MAX_BODY)
        .await
        .map_err(|e| SimError::BadRequest(format!("could not read the body: {e}")))?;
    Ok((parts, request::json_body(&bytes)?))
}

async fn generate(s: Arc<SimState>, request: Request, chat: bool) -> Result<Response, SimError> {
    let arrived = Instant::now();
    let (parts, body) = read_json(request).await?;
    let parsed = request::parse(&body, chat, &s.model, s.config.max_model_len);
    s.log.push(LoggedRequest {
        path: parts.uri.path().to_owned(),
        headers: logged_headers(&parts.headers),
        model: body.get("model").and_then(Value::as_str).map(str::to_owned),
        stream: body.get("stream").and_then(Value::as_bool),
        max_tokens: body.get("max_tokens").cloned(),
        session_id: body.get("session_id").cloned(),
        user: body.get("user").cloned(),
        prompt_from_text: parsed.as_ref().ok().map(|r| r.from_text),
        prompt_tokens: parsed.as_ref().ok().map(|r| r.prompt_ids.len()),
        kv_transfer_params: body.get("kv_transfer_params").cloned(),
    });
    if s.faults.fail_500() {
        s.metrics.faults.with_label_values(&["fail_500"]).inc();
        return Err(SimError::Internal("injected fault: fail_500".into()));
    }
    let mut job = parsed?;
    if job.from_text {
        s.metrics.prompts_from_text.inc();
    } else {
        s.metrics.prompts_from_ids.inc();
    }
    let kind = resolve_handoff(&s, &mut job);
    // A client that leaves while its request waits to be taken in aborts it there.
    let waiting = AbortOnDrop(&s.metrics);
    let form = match (job.from_text, chat) {
        (false, _) => PromptForm::Ids,
        (true, true) => PromptForm::Chat,
        (true, false) => PromptForm::Text,
    };
    s.api.intake(job.prompt_ids.len(), form).await;
    std::mem::forget(waiting);
    let rx = submit(&s, &job, kind, arrived, form);
    let n = s.next_id.fetch_add(1, Ordering::Relaxed);
    let id = format!("{}-{n:016x}", if chat { "chatcmpl" } else { "cmpl" });
    let created = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let stream = job.stream;
    let meta = Meta { id, created, request: job };
    if stream {
        let body = Body::from_stream(SseStream::new(meta, rx, s.faults.clone()));
        let mut response = Response::new(body);
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream; charset=utf-8"));
        return Ok(response);
    }
    let host = s.addr.ip().to_string();
    let port = s.addr.port();
    let value = responses::collect(&meta, rx, |blocks| {
        Some(pd::prefill_response(&s.engine_id, &host, port, &meta.id, blocks))
    })
    .await
    .map_err(SimError::BadRequest)?;
    Ok(json_response(StatusCode::OK, value.to_string()))
}

/// Hand `job` to the engine; its tokens come on the returned channel.
fn submit(
    s: &SimState,
    job: &GenRequest,
    kind: Kind,
    arrived: Instant,
    form: PromptForm,
) -> mpsc::UnboundedReceiver<crate::events::Event> {
    let (tx, rx) = mpsc::unbounded_channel();
    s.engine.submit(EngineRequest {
        prompt: job.prompt_ids.clone(),
        max_tokens: job.max_tokens,
        min_tokens: job.min_tokens,
        ignore_eos: job.ignore_eos,
        seed: job.seed,
        stop: job.stop.clone(),
        kind,
        arrived,
        events: tx,
        output_weight: s.api.costs().token_weight(form),
        cache_salt: job.cache_salt.clone(),
    });
    rx
}

fn logged_headers(headers: &http::HeaderMap) -> Vec<(String, String)> {
    headers.iter().map(|(k, v)| (k.to_string(), String::from_utf8_lossy(v.as_bytes()).into_owned())).collect()
}

/// Counts an abort if dropped: the handler's future was dropped (its client went away)
/// before the request reached the engine.
struct AbortOnDrop<'a>(&'a SimMetrics);

impl Drop for AbortOnDrop<'_> {
    fn drop(&mut self) {
        self.0.aborted.inc();
    }
}

/// Decide how this request's KV comes to be, from its `kv_transfer_params` and the
/// replica's role; count the P/D outcome.
fn resolve_handoff(s: &SimState, job: &mut GenRequest) -> Kind {
    let role = s.config.role;
    match pd::classify(job.kv_transfer_params.as_ref(), job.prompt_ids.len()) {
        Handoff::Prefill if role != Role::Decode => {
            s.metrics.pd_prefills.inc();
            job.max_tokens = 1;
            Kind::PrefillOnly
        }
        Handoff::Decode { .. } if role != Role::Prefill => {
            s.metrics.pd_accepted.inc();
            let profile = &s.config.profile;
            Kind::RemoteKv {
                per_block: pd::block_transfer_time(profile.kv_bytes_per_token, s.config.kv_bandwidth),
            }
        }
        Handoff::Invalid(reason) => {
            s.metrics.pd_rejected.inc();
            if !s.warned_rejected_handoff.swap(true, Ordering::Relaxed) {
                tracing::warn!(%reason, "kv_transfer_params rejected: prefilling locally");
            }
            Kind::Local
        }
        Handoff::None if role == Role::Decode => {
            s.metrics.pd_rejected.inc();
            Kind::Local
        }
        _ => Kind::Local,
    }
}

fn json_response(status: StatusCode, body: String) -> Response {
    let mut response = (status, body).into_response();
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

async fn version() -> Response {
    json_response(
        StatusCode::OK,
        json!({"version": concat!("vllm-sim ", env!("CARGO_PKG_VERSION"))}).to_string(),
    )
}

async fn models(State(s): State<Arc<SimState>>) -> Response {
    let created = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let body = json!({"object": "list", "data": [{
        "id": s.model, "object": "model", "created": created, "owned_by": "vllm", "root": s.model,
        "parent": null, "max_model_len": s.config.max_model_len,
        "permission": [{"id": format!("modelperm-{}", s.engine_id), "object": "model_permission",
            "created": created, "allow_create_engine": false, "allow_sampling": true, "allow_logprobs": true,
            "allow_search_indices": false, "allow_view": true, "allow_fine_tuning": false,
            "organization": "*", "group": null, "is_blocking": false}],
    }]});
    json_response(StatusCode::OK, body.to_string())
}

async fn tokenize(State(s): State<Arc<SimState>>, request: Request) -> Result<Response, SimError> {
    let (_, body) = read_json(request).await?;
    check_model(&s, &body)?;
    let (ids, _) = if body.get("messages").is_some() {
        request::chat_prompt(&body)?
    } else {
        request::completion_prompt(&body)?
    };
    let out = json!({"count": ids.len(), "max_model_len": s.config.max_model_len, "tokens": ids, "token_strs": null});
    Ok(json_response(StatusCode::OK, out.to_string()))
}

async fn detokenize(State(s): State<Arc<SimState>>, request: Request) -> Result<Response, SimError> {
    let (_, body) = read_json(request).await?;
    check_model(&s, &body)?;
    let ids: Vec<u32> = body
        .get("tokens")
        .and_then(Value::as_array)
        .ok_or_else(|| SimError::BadRequest("`tokens` must be a list of token ids".into()))?
        .iter()
        .map(|v| v.as_u64().filter(|&id| id < tokenizer::VOCAB_SIZE as u64).map(|id| id as u32))
        .collect::<Option<_>>()
        .ok_or_else(|| SimError::BadRequest("token ids must be integers within the vocabulary".into()))?;
    let text = tokenizer::decode(&ids).map_err(SimError::BadRequest)?;
    Ok(json_response(StatusCode::OK, json!({"prompt": text}).to_string()))
}

fn check_model(s: &SimState, body: &Value) -> Result<(), SimError> {
    match body.get("model").and_then(Value::as_str) {
        Some(m) if m != s.model => {
            Err(SimError::ModelNotFound { model: m.to_owned(), served: s.model.clone() })
        }
        _ => Ok(()),
    }
}

async fn metrics(State(s): State<Arc<SimState>>) -> Response {
    let mut response = s.metrics.render().into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"));
    response
}

async fn request_log(State(s): State<Arc<SimState>>) -> Response {
    json_response(StatusCode::OK, serde_json::to_string(&s.log.entries()).unwrap_or_else(|_| "[]".into()))
}

async fn get_faults(State(s): State<Arc<SimState>>) -> Response {
    json_response(StatusCode::OK, serde_json::to_string(&s.faults.get()).unwrap_or_default())
}

async fn set_faults(State(s): State<Arc<SimState>>, request: Request) -> Result<Response, SimError> {
    let (_, body) = read_json(request).await?;
    let config: FaultConfig =
        serde_json::from_value(body).map_err(|e| SimError::BadRequest(format!("faults: {e}")))?;
    s.faults.set(config);
    Ok(json_response(StatusCode::OK, serde_json::to_string(&s.faults.get()).unwrap_or_default()))
}

/// Accept connections until the task is aborted; while the refuse fault is on, the
/// listener is closed so connections are refused, then reopened on the same address.
/// When `killed` turns true every open connection is cut, as if the process died.
pub async fn accept_loop(
    mut listener: TcpListener,
    app: Router,
    faults: Arc<Faults>,
    killed: tokio::sync::watch::Receiver<bool>,
) {
    let addr = listener.local_addr().expect("bound listener");
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new()).http1_only();
    loop {
        if let Some(until) = faults.refusing_until() {
            drop(listener);
            tokio::time::sleep_until(until.into()).await;
            listener = loop {
                match bind(addr) {
                    Ok(l) => break l,
                    Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            };
        }
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = tokio::time::sleep(Duration::from_millis(100)) => continue,
        };
        let Ok((stream, _)) = accepted else { continue };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(app.clone());
        let connection = builder.serve_connection(TokioIo::new(stream), service).into_owned();
        let mut killed = killed.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = connection => {}
                _ = killed.wait_for(|k| *k) => {}
            }
        });
    }
}

pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(4096)
}
