//! A generate-mode answer that survives its engine: when the engine's token stream
//! breaks before generation ended (the connection lost, the engine killed, an error
//! event, vLLM's `abort`), the rest is asked of another replica as token ids: the
//! prompt's ids followed by every id generated so far, `max_tokens` and `min_tokens`
//! less those. The client's answer goes on from the same detokenizer state, so it reads
//! as one answer: same `id`, every token once, the usage of the client's own prompt.
//!
//! This is what [`crate::response::continued`] does for the OpenAI endpoints, without
//! its costs: the router already holds the ids (no text re-tokenised by the engine, no
//! events rewritten). Bounded like it: `--continuation-attempts` per request, each
//! spending the retry budget.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::uri::PathAndQuery;
use http::{HeaderMap, Method, StatusCode};

use super::GENERATE_PATH;
use super::openai_request::GenerateCall;
use crate::dispatch::{Dispatcher, Route};
use crate::ingress::routing_key::RoutingKey;
use crate::metrics::Metrics;
use crate::response::body::EndedByRouter;
use crate::response::sse_map::{Resumed, Resuming};
use crate::upstream::proxy::Outbound;

/// What asking for the rest of an answer needs, kept by the answer's stream.
pub struct Resume {
    pub dispatcher: Arc<Dispatcher>,
    pub metrics: Arc<Metrics>,
    pub call: GenerateCall,
    /// The client's end-to-end headers, as the first request went.
    pub headers: HeaderMap,
    pub endpoint: &'static str,
    pub key: Option<RoutingKey>,
    pub started: Instant,
    /// Continuations left.
    pub attempts: u32,
    /// The replica streaming now (a continuation avoids it).
    pub replica: String,
}

impl Resume {
    fn count(&self, outcome: &str) {
        self.metrics.continuations.with_label_values(&[self.endpoint, outcome]).inc();
    }

    /// Ask another replica for the rest, after `generated`; `None` when no attempt is
    /// left, the retry budget says no, or no tokens are left to ask for.
    pub fn resume(&mut self, generated: &[u32]) -> Option<Resuming> {
        let body = self.call.continuing(generated);
        if self.attempts == 0 || body.is_none() {
            self.count("refused");
            return None;
        }
        if !self.dispatcher.retries.try_spend() {
            self.metrics.retries_denied.with_label_values(&[self.endpoint]).inc();
            self.count("refused");
            return None;
        }
        self.attempts -= 1;
        tracing::debug!(replica = %self.replica, sent = generated.len(), "continuing a broken generate stream elsewhere");
        let outbound = Outbound::new(
            Method::POST,
            PathAndQuery::from_static(GENERATE_PATH),
            self.headers.clone(),
            Bytes::from(body.expect("checked")),
        );
        let (dispatcher, metrics, endpoint) = (self.dispatcher.clone(), self.metrics.clone(), self.endpoint);
        let (model, key, started, avoid) =
            (self.call.model().map(str::to_owned), self.key.clone(), self.started, self.replica.clone());
        Some(Box::pin(async move {
            let route = Route {
                endpoint,
                model: model.as_deref(),
                key: key.as_ref(),
                prompt: None,
                prompt_ids: None,
                salt: None,
                stream: true,
                started,
                phase: None,
                continuable: true,
                avoid: Some(&avoid),
            };
            let served = dispatcher.dispatch(&route, &outbound).await;
            let outcome = match served {
                Ok(served) if served.response.status() == StatusCode::OK => {
                    let (mut parts, body) = served.response.into_parts();
                    let ended_by_router = parts.extensions.remove::<EndedByRouter>();
                    Some(Resumed { body, replica: served.replica, ended_by_router })
                }
                Ok(served) => {
                    tracing::debug!(status = %served.response.status(), "a generate continuation was refused");
                    None
                }
                Err(error) => {
                    tracing::debug!(%error, "a generate continuation failed");
                    None
                }
            };
            let label = if outcome.is_some() { "continued" } else { "failed" };
            metrics.continuations.with_label_values(&[endpoint, label]).inc();
            outcome
        }))
    }

    /// The stream now comes from `replica`.
    pub fn resumed(&mut self, replica: String) {
        self.replica = replica;
    }
}

/// The error event that ends a stream that could not be continued.
pub fn error_event(message: &str) -> Bytes {
    let error = serde_json::json!({"error": {"message": message, "type": "BadGatewayError", "param": null, "code": 502}});
    Bytes::from(format!("data: {error}\n\n"))
}
