//! Prefill/decode disaggregation: each inference request is prefilled on a prefill
//! replica, and its tokens are generated on a decode replica that pulls the KV cache.
//!
//! The phases of one request:
//! 1. prefill: the rewritten request ([`requests::prefill_request`]) goes to a prefill
//!    replica chosen by `--prefill-policy` (a session key keeps a session's prefill on
//!    the replica that holds its prefix). Connection failures and 5xx are retried once
//!    on another prefill replica by the shared [`Dispatcher`]; if that fails too the
//!    client gets a 502. A 4xx (the client's request is invalid) passes through.
//! 2. handoff: from the prefill response, `kv_transfer_params` and the prompt's token ids.
//!    A response without `kv_transfer_params` (prefill replica not running a KV
//!    connector) falls back to a full request on decode, counted and logged once per
//!    replica.
//! 3. decode: the decode request ([`requests::decode_request`]) goes to a decode replica
//!    chosen by `--decode-policy`, retried once on another with the same parameters if it
//!    fails before its first byte. Its stream goes to the client, converted to chat
//!    chunks when a chat request was decoded from token ids ([`chat_stream`]).
//!
//! A client that disconnects drops this future or the response body, which cancels
//! whichever upstream request is in flight. Each stage is sent at most twice and only
//! one response ever reaches the client.
//!
//! Memory stays a small multiple of the body: the body is never parsed into a tree,
//! each stage's request is the client's bytes with a few top-level members rewritten
//! ([`members`]), the prefill response (at most [`MAX_PREFILL_RESPONSE`]) is read for
//! two fields as slices, and the prefill request is dropped before decode is built.

pub mod chat_convert;
pub mod chat_stream;
pub mod members;
pub mod requests;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::body::Body;
use axum::response::Response;
use bytes::Bytes;
use http::uri::PathAndQuery;
use http::{HeaderMap, Method, header};
use http_body_util::{BodyExt, Limited};

use crate::dispatch::{Dispatcher, Route, Served};
use crate::error::RouterError;
use crate::frontend::{Frontend, GenerateCall, Stage};
use crate::ingress::routing_key::RoutingKey;
use crate::metrics::Metrics;
use crate::response::body::PhaseTimers;
use crate::upstream::proxy::Outbound;
use members::Members;

/// The `endpoint` label of prefill-stage traffic in the router's metrics.
pub const PREFILL_ENDPOINT: &str = "prefill";

/// Prefill responses (and decode bodies converted to chat) larger than this are refused
/// (a 128k-token prompt's ids are ~1 MB).
pub const MAX_PREFILL_RESPONSE: usize = 64 << 20;

pub struct PrefillDecode {
    pub prefill: Dispatcher,
    pub tokenize_once: bool,
    pub metrics: Arc<Metrics>,
    /// Prefill replicas already warned about for answering without kv_transfer_params.
    warned: Mutex<HashSet<String>>,
}

/// The parts of a client request the P/D flow needs.
pub struct PdRequest<'a> {
    pub endpoint: &'static str,
    pub chat: bool,
    pub path: PathAndQuery,
    pub headers: HeaderMap,
    pub body: &'a Bytes,
    pub model: Option<&'a str>,
    pub key: Option<&'a RoutingKey>,
    /// The raw JSON of the request's `messages` or `prompt` (a slice of `body`).
    pub prompt: Option<bytes::Bytes>,
    /// Its `cache_salt`.
    pub salt: Option<&'a str>,
    pub stream: bool,
    pub started: Instant,
}

impl PrefillDecode {
    pub fn new(prefill: Dispatcher, tokenize_once: bool, metrics: Arc<Metrics>) -> Self {
        PrefillDecode { prefill, tokenize_once, metrics, warned: Mutex::new(HashSet::new()) }
    }

    /// Both stages get the client's headers, so both carry the one `x-request-id` that
    /// admission gave the request, as vLLM's reference proxy sends it: older
    /// NixlConnector versions match the KV transfer by it.
    pub async fn handle(&self, decode: &Dispatcher, request: PdRequest<'_>) -> Result<Served, RouterError> {
        let body = Members::parse(request.body).map_err(|e| {
            RouterError::BadRequest(crate::ingress::request_facts::FactsError::NotJson(e.to_string()))
        })?;

        // 1. Prefill.
        let prefill_route = Route {
            endpoint: PREFILL_ENDPOINT,
            model: request.model,
            key: request.key,
            prompt: request.prompt.clone(),
            prompt_ids: None,
            salt: request.salt,
            stream: false,
            started: request.started,
            phase: None,
            continuable: false,
            avoid: None,
        };
        let outbound = Outbound::new(
            Method::POST,
            request.path.clone(),
            request.headers.clone(),
            Bytes::from(requests::prefill_request(&body)),
        );
        let (prefill_replica, prefill_bytes) = match self.prefill_stage(&prefill_route, outbound).await? {
            Prefilled::Refused(served) => return Ok(served),
            Prefilled::Answered { replica, bytes } => (replica, bytes),
        };
        let prefilled = Instant::now();
        let result = match requests::read_prefill_response(&prefill_bytes) {
            Some(result) => result,
            None => {
                return Err(RouterError::Prefill {
                    replica: prefill_replica,
                    reason: "a response without a usable body".into(),
                });
            }
        };

        // 2. Handoff.
        let (path, decode_body, token_ids, convert) = match result.kv_transfer_params {
            Some(kv) => {
                let max_model_len = request.model.and_then(|m| decode.registry.max_model_len(m));
                let d = requests::decode_request(
                    &body,
                    request.chat,
                    kv,
                    result.prompt_token_ids,
                    self.tokenize_once,
                    max_model_len,
                );
                (d.path, Bytes::from(d.body), d.token_ids, d.convert_to_chat)
            }
            None => {
                self.fallback(&prefill_replica);
                let path = if request.chat { "/v1/chat/completions" } else { "/v1/completions" };
                (path, request.body.clone(), false, false)
            }
        };
        drop(prefill_bytes);
        let mode = match (token_ids, self.tokenize_once) {
            (true, _) => "on",
            (false, false) => "off",
            (false, true) => "unavailable",
        };
        self.metrics.pd_tokenize_once.with_label_values(&[mode]).inc();

        // 3. Decode.
        let decode_start = Instant::now();
        self.metrics
            .pd_phase
            .with_label_values(&["handoff"])
            .observe((decode_start - prefilled).as_secs_f64());
        let decode_route = Route {
            endpoint: request.endpoint,
            model: request.model,
            key: request.key,
            prompt: request.prompt.clone(),
            prompt_ids: None,
            salt: request.salt,
            stream: request.stream,
            started: request.started,
            phase: Some(PhaseTimers {
                first_token: self.metrics.pd_phase.with_label_values(&["decode_ttft"]),
                total: self.metrics.pd_phase.with_label_values(&["total"]),
                since: decode_start,
            }),
            continuable: false,
            avoid: None,
        };
        let outbound =
            Outbound::new(Method::POST, PathAndQuery::from_static(path), request.headers, decode_body);
        let served = decode.dispatch(&decode_route, &outbound).await?;
        drop(outbound);
        self.metrics.pd_decisions.with_label_values(&[&prefill_replica, &served.replica]).inc();
        if !convert || !served.response.status().is_success() {
            return Ok(Served { prefill: Some(prefill_replica), ..served });
        }
        let (replica, reason) = (served.replica, served.reason);
        let (mut parts, body) = served.response.into_parts();
        parts.headers.remove(header::CONTENT_LENGTH);
        let body = if request.stream {
            Body::new(chat_stream::chat_stream(body))
        } else {
            let unreadable = || RouterError::Upstream {
                replica: replica.clone(),
                reason: "decode returned an unreadable body".into(),
            };
            let completion =
                read_bounded(Response::from_parts(parts.clone(), body)).await.ok_or_else(unreadable)?;
            Body::from(chat_convert::convert_body(&completion).ok_or_else(unreadable)?)
        };
        Ok(Served {
            response: Response::from_parts(parts, body),
            replica,
            reason,
            prefill: Some(prefill_replica),
        })
    }

    /// `--engine-api generate`: both stages through the engines' generate endpoint with
    /// the router's token ids (tokenised once, for routing and both stages); the decode's
    /// token stream becomes the client's OpenAI answer ([`Frontend::answer`]).
    pub async fn handle_generate(
        &self,
        decode: &Dispatcher,
        frontend: &Frontend,
        call: GenerateCall,
        request: PdRequest<'_>,
    ) -> Result<Served, RouterError> {
        let route = |endpoint, stream, phase| Route {
            endpoint,
            model: request.model,
            key: request.key,
            prompt: request.prompt.clone(),
            prompt_ids: Some(&call.prompt_ids),
            salt: request.salt,
            stream,
            started: request.started,
            phase,
            continuable: false,
            avoid: None,
        };
        let path = PathAndQuery::from_static(crate::frontend::GENERATE_PATH);
        let prefill_kv = std::str::from_utf8(requests::PREFILL_KV_PARAMS).expect("ASCII");
        let body = call.body(Stage { kv_transfer_params: Some(prefill_kv), prefill: true });
        let outbound = Outbound::new(Method::POST, path.clone(), request.headers.clone(), Bytes::from(body));
        let (prefill_replica, prefill_bytes) =
            match self.prefill_stage(&route(PREFILL_ENDPOINT, false, None), outbound).await? {
                Prefilled::Refused(served) => return Ok(served),
                Prefilled::Answered { replica, bytes } => (replica, bytes),
            };
        let prefilled = Instant::now();
        let kv = requests::read_prefill_response(&prefill_bytes).and_then(|r| r.kv_transfer_params);
        if kv.is_none() {
            self.fallback(&prefill_replica);
        }
        let body = call.body(Stage { kv_transfer_params: kv.map(|kv| kv.get()), prefill: false });
        drop(prefill_bytes);
        self.metrics.pd_tokenize_once.with_label_values(&["on"]).inc();
        let decode_start = Instant::now();
        self.metrics
            .pd_phase
            .with_label_values(&["handoff"])
            .observe((decode_start - prefilled).as_secs_f64());
        let phase = PhaseTimers {
            first_token: self.metrics.pd_phase.with_label_values(&["decode_ttft"]),
            total: self.metrics.pd_phase.with_label_values(&["total"]),
            since: decode_start,
        };
        let outbound = Outbound::new(Method::POST, path, request.headers, Bytes::from(body));
        let served =
            decode.dispatch(&route(request.endpoint, request.stream, Some(phase)), &outbound).await?;
        drop(outbound);
        self.metrics.pd_decisions.with_label_values(&[&prefill_replica, &served.replica]).inc();
        let served = frontend.answer(served, call, None).await?;
        Ok(Served { prefill: Some(prefill_replica), ..served })
    }

    fn fallback(&self, prefill_replica: &str) {
        self.metrics.pd_fallbacks.with_label_values(&[prefill_replica, "no_kv_transfer_params"]).inc();
        if self.warned.lock().expect("warned lock").insert(prefill_replica.to_owned()) {
            tracing::warn!(
                replica = prefill_replica,
                "prefill response has no kv_transfer_params (is the replica running a KV connector?): \
                 sending full requests to decode"
            );
        }
    }
}

/// What the prefill stage came to.
enum Prefilled {
    /// A 4xx: the client's request is invalid, as the prefill replica said.
    Refused(Served),
    /// A 2xx response's body (at most [`MAX_PREFILL_RESPONSE`]).
    Answered { replica: String, bytes: Bytes },
}

impl PrefillDecode {
    /// Send the prefill stage and read its answer; a failure is the prefill's 502.
    async fn prefill_stage(&self, route: &Route<'_>, outbound: Outbound) -> Result<Prefilled, RouterError> {
        let served = self.prefill.dispatch(route, &outbound).await.map_err(|e| match e {
            RouterError::Upstream { replica, reason } => RouterError::Prefill { replica, reason },
            other => other,
        })?;
        drop(outbound);
        let status = served.response.status();
        if status.is_client_error() {
            return Ok(Prefilled::Refused(served));
        }
        let replica = served.replica.clone();
        let bytes = read_bounded(served.response).await;
        self.metrics
            .pd_phase
            .with_label_values(&["prefill"])
            .observe((Instant::now() - route.started).as_secs_f64());
        match bytes {
            Some(bytes) if status.is_success() => Ok(Prefilled::Answered { replica, bytes }),
            _ => Err(RouterError::Prefill {
                replica,
                reason: format!("status {status} without a usable response"),
            }),
        }
    }
}

/// A response body read whole, up to [`MAX_PREFILL_RESPONSE`].
async fn read_bounded(response: Response) -> Option<Bytes> {
    Some(Limited::new(response.into_body(), MAX_PREFILL_RESPONSE).collect().await.ok()?.to_bytes())
}
