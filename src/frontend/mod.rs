//! `--engine-api generate`: the router as the engines' frontend. vLLM's OpenAI
//! endpoints render the chat template, tokenise, detokenise and frame one SSE event per
//! token in one Python event loop per replica, which sets the clients' time to first
//! token under load. With `generate`, the router does that work in Rust and talks to
//! the engine in token ids through vLLM's `POST /inference/v1/generate` (served with
//! `vllm serve --enable-scale-out`):
//! 1. [`openai_request`]: the OpenAI request becomes token ids (tokenised once; the same
//!    ids route the request under `--policy kv-aware`) and vLLM sampling parameters,
//!    or falls back to the engine's OpenAI endpoint, unchanged, counted by reason;
//! 2. the generate call is dispatched like any request (policy, retry before the first
//!    byte, health, breakers);
//! 3. [`generate_stream`]: the engine's token ids become the OpenAI answer
//!    ([`output_text`] detokenises and applies stop strings as vLLM does,
//!    [`openai_shapes`] writes vLLM's members).

pub mod generate_resume;
pub mod generate_stream;
pub mod openai_request;
pub mod openai_shapes;
pub mod output_text;
pub mod stop_strings;

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::response::Response;
use bytes::Bytes;
use http::uri::PathAndQuery;
use http::{HeaderMap, HeaderValue, Method, StatusCode, header};

use crate::dispatch::{Dispatcher, Route, Served};
use crate::error::RouterError;
use crate::ingress::routing_key::RoutingKey;
use crate::metrics::Metrics;
use crate::policy::prompt_tokens::{PromptTokenizer, TokenizePool};
use crate::response::body::EndedByRouter;
use crate::upstream::proxy::Outbound;
use generate_resume::Resume;
use generate_stream::{Answer, CollectError, collect, openai_stream};
pub use openai_request::{GenerateCall, SamplingDefaults, Stage};

/// vLLM's token-in, token-out endpoint.
pub const GENERATE_PATH: &str = "/inference/v1/generate";

/// How the router talks to the engines (`--engine-api`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum EngineApi {
    /// The engines' OpenAI endpoints, requests passed through.
    #[default]
    Openai,
    /// Token ids through `/inference/v1/generate`; the router renders, tokenises and
    /// detokenises.
    Generate,
}

pub struct Frontend {
    /// Continuations a broken generate stream gets (`--continuation-attempts`; 0: off).
    pub continuation_attempts: u32,
    pub tokenizer: Arc<PromptTokenizer>,
    /// Where requests are rendered and tokenised (off the async workers).
    pub pool: Arc<TokenizePool>,
    pub defaults: Arc<SamplingDefaults>,
    pub metrics: Arc<Metrics>,
}

/// What continuing a generate answer elsewhere needs of its request.
pub struct Later {
    pub dispatcher: Arc<Dispatcher>,
    pub headers: HeaderMap,
    pub endpoint: &'static str,
    pub key: Option<RoutingKey>,
    pub started: Instant,
}

/// The request a generate call is made for.
pub struct FrontendRequest<'a> {
    pub endpoint: &'static str,
    pub headers: HeaderMap,
    pub model: Option<&'a str>,
    pub key: Option<&'a RoutingKey>,
    pub prompt: Option<Bytes>,
    pub salt: Option<&'a str>,
    pub started: Instant,
}

impl Frontend {
    /// The generate call for a chat (`chat`) or completions body; `None` (counted with its
    /// reason) when it goes through the engine's OpenAI endpoint instead. A request that
    /// does not fit the model's context as the replicas report it (`max_model_len`) goes
    /// there too: vLLM's OpenAI endpoints refuse it with their own message, its generate
    /// endpoint does not check. The request is rendered and tokenised on the tokenizer's
    /// threads; when they are too busy to take it, it goes to the OpenAI endpoint too
    /// (`tokenizer_busy`).
    pub async fn prepare(
        &self,
        endpoint: &'static str,
        chat: bool,
        body: &Bytes,
        registry: &crate::replicas::Registry,
    ) -> Option<GenerateCall> {
        let (tokenizer, defaults, body) = (self.tokenizer.clone(), self.defaults.clone(), body.clone());
        let call = self
            .pool
            .run(move || openai_request::generate_call(&tokenizer, &defaults, chat, &body))
            .await
            .unwrap_or(Err("tokenizer_busy"))
            .and_then(|mut call| {
                let context = call.model().and_then(|m| registry.max_model_len(m));
                match context {
                    Some(context) if !call.fits(context) => Err("context_length"),
                    Some(context) => {
                        call.bound_by_context(context);
                        Ok(call)
                    }
                    None => Ok(call),
                }
            });
        match call {
            Ok(call) => {
                self.metrics.engine_api_requests.with_label_values(&[endpoint, "generate", ""]).inc();
                Some(call)
            }
            Err(reason) => {
                self.metrics.engine_api_requests.with_label_values(&[endpoint, "fallback", reason]).inc();
                tracing::debug!(endpoint, reason, "served through the engine's OpenAI endpoint");
                None
            }
        }
    }

    /// Dispatch a generate call and answer in OpenAI's shape. An engine's error response
    /// passes through as it came; a stream that breaks later is continued on another
    /// replica ([`generate_resume`]).
    pub async fn serve(
        &self,
        dispatcher: &Arc<Dispatcher>,
        call: GenerateCall,
        request: FrontendRequest<'_>,
    ) -> Result<Served, RouterError> {
        let continuable = self.continuation_attempts > 0;
        let route = Route {
            endpoint: request.endpoint,
            model: request.model,
            key: request.key,
            prompt: request.prompt.clone(),
            prompt_ids: Some(&call.prompt_ids),
            salt: request.salt,
            stream: call.plan.stream,
            started: request.started,
            phase: None,
            continuable,
            avoid: None,
        };
        let outbound = Outbound::new(
            Method::POST,
            PathAndQuery::from_static(GENERATE_PATH),
            request.headers,
            Bytes::from(call.body(Stage::default())),
        );
        let served = dispatcher.dispatch(&route, &outbound).await?;
        let Outbound { headers, .. } = outbound;
        let later = continuable.then(|| Later {
            dispatcher: dispatcher.clone(),
            headers,
            endpoint: request.endpoint,
            key: request.key.cloned(),
            started: request.started,
        });
        self.answer(served, call, later).await
    }

    /// The OpenAI answer to a generate call, from the engine's response to it; with
    /// `later`, a stream that breaks is continued elsewhere.
    pub async fn answer(
        &self,
        served: Served,
        call: GenerateCall,
        later: Option<Later>,
    ) -> Result<Served, RouterError> {
        if served.response.status() != StatusCode::OK {
            return Ok(served);
        }
        let stream = call.plan.stream;
        let answer = Answer::new(self.tokenizer.clone(), call.plan.clone(), &call.prompt_ids);
        // The call is kept only to continue the answer (its prompt ids are most of it).
        let answer = answer.resumable(later.map(|later| Resume {
            dispatcher: later.dispatcher,
            metrics: self.metrics.clone(),
            call,
            headers: later.headers,
            endpoint: later.endpoint,
            key: later.key,
            started: later.started,
            attempts: self.continuation_attempts,
            replica: served.replica.clone(),
        }));
        let (mut parts, upstream) = served.response.into_parts();
        parts.headers.remove(header::CONTENT_LENGTH);
        let ended_by_router = parts.extensions.remove::<EndedByRouter>();
        let body = if stream {
            parts
                .headers
                .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream; charset=utf-8"));
            Body::new(openai_stream(upstream, answer, ended_by_router))
        } else {
            match collect(upstream, answer, ended_by_router).await {
                Ok(body) => {
                    parts.headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
                    Body::from(body)
                }
                Err(CollectError::Engine(error)) => {
                    let code = serde_json::from_slice::<serde_json::Value>(&error)
                        .ok()
                        .and_then(|e| e["error"]["code"].as_u64())
                        .and_then(|c| StatusCode::from_u16(c as u16).ok())
                        .filter(|c| c.is_client_error() || c.is_server_error())
                        .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                    parts.status = code;
                    parts.headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
                    Body::from(error)
                }
                Err(CollectError::Broken(reason)) => {
                    return Err(RouterError::Upstream { replica: served.replica, reason });
                }
            }
        };
        Ok(Served { response: Response::from_parts(parts, body), ..served })
    }
}
