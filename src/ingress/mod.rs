//! The ingress: the router's HTTP surface and the first phase of every request.
//!
//! Inference requests (`/v1/chat/completions`, `/v1/completions`) are read once, checked
//! for the fields routing needs (see [`crate::ingress::request_facts`]) and handed to the
//! [`Dispatcher`]. The other OpenAI endpoints vLLM serves ([`FORWARDED_BY_DEFAULT`],
//! plus `/tokenize`, `/detokenize`, and whatever `--forward-path` adds) are routed the
//! same way but their bodies are not judged: the replica does that. Nothing else under
//! `/v1/` reaches an engine: vLLM also serves administrative calls there (loading LoRA
//! adapters at run time, for one) that a client of the router must not make.
//! `GET /v1/models`, `/health` and `/metrics` are answered by the router itself.

pub mod body_budget;
pub(crate) mod client_io;
pub mod h2_streams;
pub(crate) mod keep_alive;
mod keyed;
pub mod multipart;
pub mod request_facts;
pub mod routing_key;
pub mod tls;

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use bytes::{Bytes, BytesMut};
use http::uri::PathAndQuery;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use http_body_util::BodyExt;

use crate::admission::key_limits::KeyLimits;
use crate::admission::{self, ApiKey, ApiKeys, Caller, Flow, Limiter};
use crate::dispatch::pd::members::Members;
use crate::dispatch::pd::{PdRequest, PrefillDecode};
use crate::dispatch::{Dispatcher, Route, ServedBy};
use crate::error::RouterError;
use crate::ingress::routing_key::KeyHeaders;
use crate::metrics::{ENDPOINTS, Metrics};
use crate::response::continued::{Continuation, ContinuedBody};
use crate::upstream::proxy::Outbound;
use request_facts::{BodyFacts, FactsError};

/// The `/v1/` paths forwarded besides chat and completions: vLLM's other OpenAI
/// endpoints. A trailing `*` matches any rest of the path.
pub const FORWARDED_BY_DEFAULT: [&str; 8] = [
    "/v1/embeddings",
    "/v1/responses",
    "/v1/responses/*",
    "/v1/audio/transcriptions",
    "/v1/audio/translations",
    "/v1/score",
    "/v1/rerank",
    "/v1/classify",
];

/// Whether `path` is one `rules` forward (exact, or a prefix ending in `*`).
pub fn forwarded(rules: &[String], path: &str) -> bool {
    rules.iter().any(|rule| match rule.strip_suffix('*') {
        Some(prefix) => path.starts_with(prefix),
        None => path == rule,
    })
}

/// Everything a request handler needs, shared by all of them.
pub struct Ingress {
    /// Shutting down: `/health` answers 503 `draining` while requests are still served
    /// (`--shutdown-delay`).
    pub draining: Arc<std::sync::atomic::AtomicBool>,
    /// Routes every request, or in P/D mode the decode stage and non-inference calls.
    pub dispatcher: Arc<Dispatcher>,
    /// P/D mode: the prefill stage of inference requests.
    pub pd: Option<PrefillDecode>,
    /// `--engine-api generate`: chat and completions through vLLM's generate endpoint.
    pub frontend: Option<crate::frontend::Frontend>,
    /// Continuations a broken stream gets (0: off; P/D streams are not continued).
    pub continuation_attempts: u32,
    pub keys: KeyHeaders,
    pub max_body_bytes: usize,
    /// Request bytes held at once, all requests together (`--max-buffered-request-bytes`).
    pub body_budget: Arc<body_budget::BodyBudget>,
    /// Longest a client may take to send its request body.
    pub body_read_timeout: std::time::Duration,
    pub metrics: Arc<Metrics>,
    /// `--max-concurrent-requests` and its queue; None means unlimited.
    pub limiter: Option<Limiter>,
    pub api_keys: ApiKeys,
    /// The keys' request and token buckets.
    pub rate_limits: KeyLimits,
    /// `/metrics` on the serving port (else on the admin listener only).
    pub metrics_on_serving: bool,
    /// Forward the client's `Authorization` header to replicas.
    pub forward_authorization: bool,
    /// Pass a client's `kv_transfer_params` on to the engines (`--trust-client-kv-params`).
    pub trust_client_kv_params: bool,
    /// The `/v1/` paths forwarded besides chat and completions.
    pub forward_paths: Vec<String>,
    /// `--access-log`.
    pub access_log: bool,
    /// `--otlp-endpoint`: a span per request.
    pub tracing: Option<Arc<crate::trace::Tracing>>,
}

/// Which kind of call a request is: a metrics label, and how strictly its body is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    ChatCompletions,
    Completions,
    Other,
}

impl Endpoint {
    fn label(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => ENDPOINTS[0],
            Endpoint::Completions => ENDPOINTS[1],
            Endpoint::Other => ENDPOINTS[2],
        }
    }
}

/// The serving routes, with the admin API's when it is served on this port.
pub fn routes(ingress: Arc<Ingress>, admin: Option<Router>) -> Router {
    let keys = ingress.api_keys.clone();
    let access_log = ingress.access_log;
    let tracing = ingress.tracing.clone();
    let router = Router::new()
        .route("/v1/chat/completions", post(chat_completions).fallback(method_not_allowed))
        .route("/v1/completions", post(completions).fallback(method_not_allowed))
        .route("/v1/models", get(models).fallback(method_not_allowed))
        .route("/v1/{*rest}", any(other_v1))
        .route("/tokenize", post(other).fallback(method_not_allowed))
        .route("/detokenize", post(other).fallback(method_not_allowed))
        .route("/health", get(health))
        .fallback(not_found)
        .with_state(ingress.clone());
    let router = if ingress.metrics_on_serving { router.merge(metrics_routes(ingress)) } else { router };
    let router = admin.map_or(router.clone(), |admin| router.merge(admin));
    // The access log sits inside admission, so it sees the request id admission gives.
    let router = if access_log {
        router.layer(axum::middleware::from_fn(crate::logging::access_layer))
    } else {
        router
    };
    // Outside the access log: the span covers the whole request.
    let router = match tracing {
        Some(tracing) => router.layer(axum::middleware::from_fn_with_state(tracing, crate::trace::layer)),
        None => router,
    };
    router.layer(axum::middleware::from_fn_with_state(keys, admission::admit))
}

/// `GET /metrics`, for the serving port or the admin listener.
pub fn metrics_routes(ingress: Arc<Ingress>) -> Router {
    Router::new().route("/metrics", get(metrics)).with_state(ingress)
}

async fn chat_completions(State(ingress): State<Arc<Ingress>>, request: Request) -> Response {
    ingress.proxy(Endpoint::ChatCompletions, request).await
}

async fn completions(State(ingress): State<Arc<Ingress>>, request: Request) -> Response {
    ingress.proxy(Endpoint::Completions, request).await
}

async fn other(State(ingress): State<Arc<Ingress>>, request: Request) -> Response {
    ingress.proxy(Endpoint::Other, request).await
}

async fn other_v1(State(ingress): State<Arc<Ingress>>, request: Request) -> Response {
    if !forwarded(&ingress.forward_paths, request.uri().path()) {
        return not_found(request).await;
    }
    ingress.proxy(Endpoint::Other, request).await
}

/// The fleet's models; for a key with an allow-list, the ones it may use.
async fn models(State(ingress): State<Arc<Ingress>>, request: Request) -> Response {
    let caller = request.extensions().get::<Caller>();
    let data: Vec<serde_json::Value> = ingress
        .dispatcher
        .registry
        .model_cards()
        .into_iter()
        .map(|c| c.card)
        .filter(|card| caller.is_none_or(|c| card["id"].as_str().is_some_and(|id| c.0.allows(id))))
        .collect();
    json(StatusCode::OK, serde_json::json!({"object": "list", "data": data}).to_string())
}

async fn health(State(ingress): State<Arc<Ingress>>) -> Response {
    let registry = &ingress.dispatcher.registry;
    if ingress.draining.load(std::sync::atomic::Ordering::Relaxed) {
        let body = serde_json::json!({"status": "draining", "replicas": registry.replicas().len()});
        return json(StatusCode::SERVICE_UNAVAILABLE, body.to_string());
    }
    // In P/D mode both stages must have a healthy replica.
    let prefill_healthy = ingress.pd.as_ref().is_none_or(|pd| pd.prefill.registry.healthy_count() > 0);
    let healthy = if prefill_healthy { registry.healthy_count() } else { 0 };
    let status = if healthy > 0 { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let body = serde_json::json!({
        "status": if healthy > 0 { "ok" } else { "unavailable" },
        "healthy_replicas": healthy,
        "replicas": registry.replicas().len(),
    });
    json(status, body.to_string())
}

/// `GET /metrics`. A caller with an API key (the serving port, keys configured) sees the
/// per-key series of its own key only; the admin listener, and a router without keys,
/// show all.
async fn metrics(State(ingress): State<Arc<Ingress>>, request: Request) -> Response {
    let registries = std::iter::once(&ingress.dispatcher.registry)
        .chain(ingress.pd.as_ref().map(|pd| &pd.prefill.registry));
    for index in registries.filter_map(|registry| registry.cache_index()) {
        for (replica, blocks) in index.sizes() {
            ingress.metrics.cache_index_blocks.with_label_values(&[&*replica]).set(blocks as i64);
        }
    }
    let text = ingress.metrics.render();
    let text = match request.extensions().get::<Caller>() {
        Some(caller) => crate::metrics::only_key(&text, &caller.0.name),
        None => text,
    };
    let mut response = text.into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"));
    response
}

async fn not_found(request: Request) -> Response {
    RouterError::RouteNotFound(request.uri().path().to_owned()).into_response()
}

async fn method_not_allowed(request: Request) -> Response {
    let (method, path) = (request.method().to_string(), request.uri().path().to_owned());
    RouterError::MethodNotAllowed { method, path }.into_response()
}

/// A JSON response.
pub(crate) fn json(status: StatusCode, body: String) -> Response {
    let mut response = (status, body).into_response();
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

impl Ingress {
    /// Read the body, check the key's limits, take a concurrency slot, route and
    /// forward. The slot is taken only once the body is here: a slow upload holds a
    /// connection, never a slot.
    async fn proxy(&self, endpoint: Endpoint, request: Request) -> Response {
        let started = Instant::now();
        let label = endpoint.label();
        let mut waiting = Waiting { metrics: &self.metrics, endpoint: label, armed: true };
        let caller = request.extensions().get::<Caller>().map(|c| c.0.clone());
        let response = self.admit_and_forward(endpoint, request, caller.as_deref(), started).await;
        waiting.armed = false;
        if let Some(caller) = &caller {
            self.metrics.key_requests.with_label_values(&[&*caller.name, response.status().as_str()]).inc();
        }
        response
    }

    async fn admit_and_forward(
        &self,
        endpoint: Endpoint,
        request: Request,
        caller: Option<&ApiKey>,
        started: Instant,
    ) -> Response {
        let label = endpoint.label();
        let (parts, body) = request.into_parts();
        let mut held = self.body_budget.hold();
        let read = tokio::time::timeout(
            self.body_read_timeout,
            read_body(body, &parts.headers, self.max_body_bytes, &mut held),
        )
        .await
        .unwrap_or(Err(RouterError::BodyTimeout(self.body_read_timeout)));
        let body = match read {
            Ok(body) => body,
            Err(error) => return self.refuse(label, error),
        };
        let generates = endpoint != Endpoint::Other || parts.uri.path() == "/v1/responses";
        let content_type = parts.headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok());
        let read = self.read_request(endpoint, generates, content_type, body, caller, started).await;
        let (body, facts, meter) = match read {
            Ok(read) => read,
            Err(error) => return self.refuse(label, error),
        };
        let slot = match &self.limiter {
            Some(limiter) => {
                let flow = match caller {
                    Some(caller) => Flow { key: caller.name.clone(), priority: caller.priority },
                    None => Flow { key: Arc::from(ANONYMOUS), priority: admission::Priority::Normal },
                };
                match limiter.admit(&flow).await {
                    Ok(slot) => Some(slot),
                    Err(error) => {
                        if let Some(meter) = &meter {
                            // Refused after all: the tokens charged come back.
                            self.rate_limits.settle(
                                &meter.key,
                                meter.ledger,
                                meter.reserved,
                                0,
                                Instant::now(),
                            );
                        }
                        return self.refuse(label, error);
                    }
                }
            }
            None => None,
        };
        if h2_streams::in_stream() {
            // Let hyper see a reset that came with or after the request (rapid reset):
            // a stream reset before it is dispatched is dropped here, never sent on.
            tokio::task::yield_now().await;
        }
        let served = match self.route_and_forward(endpoint, parts, body, facts, started).await {
            Ok(served) => {
                let status = served.response.status();
                self.metrics.requests.with_label_values(&[label, &served.replica, status.as_str()]).inc();
                let mut response = served.response;
                if self.access_log || self.tracing.is_some() {
                    let by =
                        ServedBy { replica: served.replica, reason: served.reason, prefill: served.prefill };
                    response.extensions_mut().insert(by);
                }
                match meter {
                    Some(meter) if status.is_success() => {
                        let (parts, body) = response.into_parts();
                        Response::from_parts(parts, crate::response::metered::metered(body, meter))
                    }
                    Some(meter) => {
                        meter.unused();
                        response
                    }
                    None => response,
                }
            }
            Err(error) => {
                if let Some(meter) = meter {
                    meter.unused();
                }
                self.refuse(label, error)
            }
        };
        // The slot and the body's bytes are held until the response ends.
        served.map(|body| crate::response::end::holding(body, (slot, held)))
    }

    /// The router's own answer to a request it will not forward, counted.
    pub(crate) fn refuse(&self, label: &'static str, error: RouterError) -> Response {
        tracing::debug!(endpoint = label, %error, detail = error.detail(), "request refused");
        let response = error.into_response();
        self.metrics.requests.with_label_values(&[label, "none", response.status().as_str()]).inc();
        response
    }

    async fn route_and_forward(
        &self,
        endpoint: Endpoint,
        mut parts: http::request::Parts,
        mut body: Bytes,
        mut facts: BodyFacts,
        started: Instant,
    ) -> Result<crate::dispatch::Served, RouterError> {
        if !self.forward_authorization {
            parts.headers.remove(header::AUTHORIZATION);
        }
        // KV transfer parameters name another engine's memory (host, port, block ids)
        // for this one to pull: only the router's P/D stages may set them.
        if facts.kv_transfer_params && endpoint != Endpoint::Other && !self.trust_client_kv_params {
            let members = Members::parse(&body).map_err(|e| FactsError::NotJson(e.to_string()))?;
            body = Bytes::from(members.rewrite(|key| key != "kv_transfer_params", &[]));
            facts = request_facts::parse_inference(&body)?;
            self.metrics.stripped_fields.with_label_values(&["kv_transfer_params"]).inc();
        }
        let key = self.keys.key(&parts.headers, facts.session);
        let path = parts.uri.path_and_query().cloned().unwrap_or_else(|| PathAndQuery::from_static("/"));
        if let Some(pd) = &self.pd
            && endpoint != Endpoint::Other
        {
            let request = PdRequest {
                endpoint: endpoint.label(),
                chat: endpoint == Endpoint::ChatCompletions,
                path,
                headers: parts.headers,
                body: &body,
                model: facts.model.as_deref(),
                key: key.as_ref(),
                prompt: facts.prompt.clone().map(|range| body.slice(range)),
                salt: facts.cache_salt.as_deref(),
                stream: facts.stream,
                started,
            };
            if let Some(frontend) = &self.frontend
                && let Some(call) =
                    frontend.prepare(endpoint.label(), request.chat, &body, &self.dispatcher.registry).await
            {
                return pd.handle_generate(&self.dispatcher, frontend, call, request).await;
            }
            return pd.handle(&self.dispatcher, request).await;
        }
        if let Some(frontend) = &self.frontend
            && endpoint != Endpoint::Other
            && let Some(call) = frontend
                .prepare(
                    endpoint.label(),
                    endpoint == Endpoint::ChatCompletions,
                    &body,
                    &self.dispatcher.registry,
                )
                .await
        {
            let request = crate::frontend::FrontendRequest {
                endpoint: endpoint.label(),
                headers: parts.headers,
                model: facts.model.as_deref(),
                key: key.as_ref(),
                prompt: facts.prompt.clone().map(|range| body.slice(range)),
                salt: facts.cache_salt.as_deref(),
                started,
            };
            return frontend.serve(&self.dispatcher, call, request).await;
        }
        let prompt = facts.prompt.clone().map(|range| body.slice(range));
        let outbound = Outbound::new(parts.method, path, parts.headers, body);
        // Whether a broken stream can be continued was judged as the body was read, from
        // its members (never the prompt): one that cannot be is never watched for it.
        let continuable = self.continuation_attempts > 0
            && facts.stream
            && match endpoint {
                Endpoint::ChatCompletions => facts.continuable.chat,
                Endpoint::Completions => facts.continuable.completion,
                Endpoint::Other => false,
            };
        let route = Route {
            endpoint: endpoint.label(),
            model: facts.model.as_deref(),
            key: key.as_ref(),
            prompt,
            prompt_ids: None,
            salt: facts.cache_salt.as_deref(),
            stream: facts.stream,
            started,
            phase: None,
            continuable,
            avoid: None,
        };
        let served = self.dispatcher.dispatch(&route, &outbound).await?;
        if !continuable || served.response.status() != StatusCode::OK {
            return Ok(served);
        }
        let next = Continuation {
            dispatcher: self.dispatcher.clone(),
            metrics: self.metrics.clone(),
            outbound,
            endpoint: endpoint.label(),
            chat: endpoint == Endpoint::ChatCompletions,
            model: facts.model,
            key,
            started,
            attempts: self.continuation_attempts,
        };
        let (parts, body) = served.response.into_parts();
        let body = ContinuedBody::new(body, served.replica.clone(), next);
        Ok(crate::dispatch::Served { response: Response::from_parts(parts, Body::new(body)), ..served })
    }
}

/// The flow name of requests without a key, in the queue and its metrics.
pub const ANONYMOUS: &str = "anonymous";

/// Counts a client that goes away while its request waits for a response: the handler
/// future is dropped, and with it any upstream request in flight.
struct Waiting<'a> {
    metrics: &'a Metrics,
    endpoint: &'static str,
    armed: bool,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.metrics.client_disconnects.with_label_values(&[self.endpoint, "waiting"]).inc();
        }
    }
}

/// Read the whole body, refusing more than `limit` bytes (early, if Content-Length says
/// so), each frame's bytes taken from the router's budget as they arrive (`held`). It is
/// held once: a body in one frame is kept as it came, a longer one gathered into a
/// buffer sized by its Content-Length (bounded by `limit`, so a false length reserves at
/// most that; the pages are touched only as bytes arrive).
async fn read_body(
    mut body: Body,
    headers: &HeaderMap,
    limit: usize,
    held: &mut body_budget::Held,
) -> Result<Bytes, RouterError> {
    let declared =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(RouterError::BodyTooLarge { limit });
    }
    let (mut first, mut gathered): (Option<Bytes>, Option<BytesMut>) = (None, None);
    let mut length = 0usize;
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame.map_err(|e| RouterError::BodyRead(e.to_string()))?.into_data() else { continue };
        length += data.len();
        if length > limit {
            return Err(RouterError::BodyTooLarge { limit });
        }
        if !held.take(data.len()) {
            return Err(RouterError::BodiesBuffered);
        }
        match (&mut first, &mut gathered) {
            (None, None) => first = Some(data),
            (Some(_), None) => {
                let head = first.take().expect("matched");
                let mut buffer = BytesMut::with_capacity(declared.map_or(length, |n| n as usize).max(length));
                buffer.extend_from_slice(&head);
                buffer.extend_from_slice(&data);
                gathered = Some(buffer);
            }
            (_, Some(buffer)) => buffer.extend_from_slice(&data),
        }
    }
    Ok(match (first, gathered) {
        (_, Some(buffer)) => buffer.freeze(),
        (Some(only), None) => only,
        (None, None) => Bytes::new(),
    })
}
