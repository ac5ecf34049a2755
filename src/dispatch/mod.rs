//! Dispatch: the phases of one proxied request. Snapshot the replicas, ask the policy,
//! forward through the proxy, and retry once on another replica while nothing has
//! reached the client yet.
//!
//! A first attempt that cannot connect, fails before response headers, or answers 5xx
//! is retried once on another eligible replica (for a session key, the next one on the
//! ring: the policy is asked again with the failed replica ineligible). The client gets
//! the second attempt's outcome: its response, even a 5xx, or a 502 in the OpenAI error
//! shape when there is no response at all. A 4xx is the client's problem and passes
//! through unchanged, never retried. Once response headers are passed on, the request
//! is never replayed.

pub(crate) mod pd;
pub mod retry_budget;

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::response::Response;
use bytes::Bytes;

use crate::error::RouterError;
use crate::ingress::routing_key::RoutingKey;
use crate::metrics::Metrics;
use crate::policy::prompt_tokens::{PromptTokenizer, TokenizePool};
use crate::policy::{CacheScope, CachedView, Candidate, Decision, Reason, Routed};
use crate::replicas::{Fleet, InFlight, Registry, Replica};
use crate::response::body::{BodyOptions, EndedByRouter, MeteredBody, PhaseTimers};
use crate::upstream::proxy::{Outbound, UpstreamError};
use crate::upstream::relay::{Relay, RelayBody};

pub struct Dispatcher {
    /// The replicas and the policy that chooses among them.
    pub registry: Arc<Registry>,
    pub relay: Relay,
    pub metrics: Arc<Metrics>,
    pub timeouts: Timeouts,
    pub retries: crate::dispatch::retry_budget::RetryBudget,
    /// `--explain-routing`: response headers naming the replica, the policy, its reason
    /// and (cache-aware) the cached tokens expected there and the most any replica held.
    pub explain: bool,
    /// For a policy that routes by token ids (`kv-aware`): the tokenizer, and the
    /// threads that run it off the async workers.
    pub tokens: Option<PromptTokens>,
}

/// How a request's prompt becomes token ids for routing.
#[derive(Clone)]
pub struct PromptTokens {
    pub tokenizer: Arc<PromptTokenizer>,
    pub pool: Arc<TokenizePool>,
}

impl PromptTokens {
    /// The ids of a prompt (the raw JSON of `messages` or `prompt`); `None` when it is
    /// not one the tokenizer reads, or the pool is too busy to take it.
    pub async fn of(&self, prompt: Bytes) -> Option<Vec<u32>> {
        let tokenizer = self.tokenizer.clone();
        self.pool.run(move || tokenizer.tokens(&prompt)).await.ok().flatten()
    }
}

/// Limits on waiting for a replica.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// From sending the request to the response headers (a non-streaming response's
    /// headers come when generation ends, so this bounds a whole non-streaming request).
    pub response_headers: std::time::Duration,
    /// Longest silence within a response body, once its first byte came.
    pub stream_idle: std::time::Duration,
    /// Longest wait from the response headers to the body's first byte (vLLM sends a
    /// stream's headers before it schedules the request: a queued request is waiting,
    /// not dead, and is never ejected for it).
    pub first_byte: std::time::Duration,
}

/// What routing needs to know about one request.
pub struct Route<'a> {
    pub endpoint: &'static str,
    pub model: Option<&'a str>,
    pub key: Option<&'a RoutingKey>,
    /// The raw JSON of the request's `messages` or `prompt`, for cache-aware policies.
    pub prompt: Option<bytes::Bytes>,
    /// The prompt's token ids, when the router has tokenised it already (generate mode).
    pub prompt_ids: Option<&'a [u32]>,
    /// The request's `cache_salt`: only blocks stored under it can serve it.
    pub salt: Option<&'a str>,
    pub stream: bool,
    pub started: Instant,
    /// Extra timings of a P/D decode stage.
    pub phase: Option<PhaseTimers>,
    /// A broken stream is reported to the caller (who continues it elsewhere) rather
    /// than ended with an error event.
    pub continuable: bool,
    /// A replica not to choose (the one a continued stream broke on).
    pub avoid: Option<&'a str>,
}

/// A response from a replica, on its way to the client.
pub struct Served {
    pub response: Response,
    pub replica: String,
    /// Why the policy chose it (`affinity`, `balanced`, `retry`, ...).
    pub reason: &'static str,
    /// P/D: the replica that ran the prefill.
    pub prefill: Option<String>,
}

/// Who served a response and why, put in its extensions for the access log and the
/// request's trace span (only when one of them is on).
#[derive(Debug, Clone)]
pub struct ServedBy {
    pub replica: String,
    pub reason: &'static str,
    pub prefill: Option<String>,
}

enum Attempt {
    /// A response to pass on.
    Done(Served),
    /// A 5xx: passed on only if no retry is possible or the retry fails the same way.
    /// Kept unwrapped so that discarding it is not mistaken for a client disconnect.
    ServerError { response: http::Response<RelayBody>, in_flight: InFlight, reason: &'static str },
    /// No response at all.
    Failed { replica: String, error: UpstreamError },
}

/// The `--explain-routing` headers of a response.
fn explain(served: &mut Served, policy: &'static str, cached: Option<CachedView>) {
    let headers = served.response.headers_mut();
    let mut set = |name: &'static str, value: String| {
        if let Ok(value) = http::HeaderValue::try_from(value) {
            headers.insert(name, value);
        }
    };
    set("x-router-replica", served.replica.clone());
    set("x-router-policy", policy.to_owned());
    set("x-router-reason", served.reason.to_owned());
    if let Some(view) = cached {
        set("x-router-cached-tokens", view.chosen.to_string());
        set("x-router-best-cached-tokens", view.best.to_string());
    }
}

impl Dispatcher {
    pub async fn dispatch(&self, route: &Route<'_>, outbound: &Outbound) -> Result<Served, RouterError> {
        // A policy that routes by token ids gets them off the async workers (before the
        // snapshot: the wait may be long).
        let tokenized = match (&self.tokens, route.prompt_ids, &route.prompt) {
            (Some(tokens), None, Some(prompt)) => tokens.of(prompt.clone()).await,
            _ => None,
        };
        let ids = route.prompt_ids.or(tokenized.as_deref());
        // One snapshot for every attempt: the policy's indices name its replicas.
        let fleet = self.registry.fleet();
        let avoided: Vec<usize> = route
            .avoid
            .and_then(|name| fleet.replicas.iter().position(|r| r.name() == name))
            .into_iter()
            .collect();
        let candidates = fleet.candidates(route.model, &avoided)?;
        if candidates.panic {
            self.metrics.panic_routing.with_label_values(&[route.endpoint]).inc();
        }
        let scope = CacheScope { model: route.model, salt: route.salt };
        let prompt = match ids {
            Some(ids) => fleet.policy.prompt_blocks_for_ids(scope, ids),
            // Prompts by text (prefix-aware hashes the raw JSON: no tokenising).
            None if self.tokens.is_none() => {
                route.prompt.as_deref().and_then(|p| fleet.policy.prompt_blocks(scope, p))
            }
            None => None,
        };
        let choose = |candidates: &[Candidate]| match &prompt {
            Some(prompt) => fleet.policy.choose_for_prompt(route.key, prompt, candidates),
            None => fleet.policy.choose(route.key, candidates),
        };
        // What the policy assumes of an attempt (its load on the replica, in tokens, and
        // the prompt blocks it will store), forgotten if the attempt does not serve the
        // request; the predicted cache hits of the attempt that does are counted.
        let routed = |decision: Decision| {
            prompt.as_ref().map_or(Routed::default(), |p| fleet.policy.routed(route.key, p, decision))
        };
        let unrouted = |decision: Decision, routed: Routed| {
            if let Some(p) = &prompt {
                fleet.policy.unrouted(p, decision, routed);
            }
        };
        let served = |routed: Routed| {
            if let (Some(p), Some(cached)) = (&prompt, routed.cached_tokens) {
                let policy = [fleet.policy.name()];
                self.metrics.routed_prompt_tokens.with_label_values(&policy).inc_by(p.tokens as u64);
                self.metrics.routed_cached_tokens.with_label_values(&policy).inc_by(cached as u64);
            }
        };
        let first = choose(&candidates).ok_or(RouterError::NoHealthyReplica)?;
        let cached = match (&prompt, self.explain) {
            (Some(prompt), true) => fleet.policy.cached_view(prompt, first, &candidates),
            _ => None,
        };
        if let Some(view) = cached {
            let counter = |kind: &str| {
                self.metrics.routing_cached_tokens.with_label_values(&[fleet.policy.name(), kind])
            };
            counter("chosen").inc_by(view.chosen as u64);
            counter("best").inc_by(view.best as u64);
        }
        let explained = |mut served: Served| {
            if self.explain {
                explain(&mut served, fleet.policy.name(), cached);
            }
            served
        };
        let assumed = routed(first);
        self.retries.deposit();
        self.count_decision(&fleet, first);
        let replica = fleet.get(first.replica);
        let failed = match self.attempt(replica, route, outbound, assumed.load_tokens, first.reason).await {
            Attempt::Done(done) => {
                served(assumed);
                return Ok(explained(done));
            }
            failed => failed,
        };
        unrouted(first, assumed);

        let tried: Vec<usize> = avoided.iter().copied().chain([first.replica]).collect();
        let candidates = fleet.candidates(route.model, &tried)?;
        let Some(second) = choose(&candidates) else {
            return self.finish(failed, route);
        };
        if !self.retries.try_spend() {
            self.metrics.retries_denied.with_label_values(&[route.endpoint]).inc();
            return self.finish(failed, route);
        }
        tokio::time::sleep(self.retries.backoff()).await;
        self.metrics.retries.with_label_values(&[route.endpoint]).inc();
        self.count_decision(&fleet, Decision { replica: second.replica, reason: Reason::Retry });
        let assumed = routed(second);
        drop(failed);
        match self
            .attempt(fleet.get(second.replica), route, outbound, assumed.load_tokens, Reason::Retry)
            .await
        {
            Attempt::Done(done) => {
                served(assumed);
                Ok(explained(done))
            }
            failed => {
                unrouted(second, assumed);
                self.finish(failed, route)
            }
        }
    }

    /// The client's answer when no attempt succeeded: the last 5xx, or a 502.
    fn finish(&self, attempt: Attempt, route: &Route<'_>) -> Result<Served, RouterError> {
        match attempt {
            Attempt::Done(served) => Ok(served),
            Attempt::ServerError { response, in_flight, reason } => {
                let replica = in_flight.replica().name().to_owned();
                Ok(Served {
                    response: self.metered(response, in_flight, route),
                    replica,
                    reason,
                    prefill: None,
                })
            }
            Attempt::Failed { replica, error: UpstreamError::HeaderTimeout(after) } => {
                Err(RouterError::UpstreamTimeout { replica, after })
            }
            Attempt::Failed { replica, error } => {
                Err(RouterError::Upstream { replica, reason: error.to_string() })
            }
        }
    }

    fn breaker_failure(&self, replica: &Arc<Replica>) {
        if self.registry.record_failure(replica) {
            tracing::warn!(replica = replica.name(), "circuit breaker open after repeated failures");
        }
    }

    fn count_decision(&self, fleet: &Fleet, decision: Decision) {
        let replica = fleet.get(decision.replica).name();
        self.metrics
            .decisions
            .with_label_values(&[fleet.policy.name(), replica, decision.reason.as_str()])
            .inc();
    }

    async fn attempt(
        &self,
        replica: &Arc<Replica>,
        route: &Route<'_>,
        outbound: &Outbound,
        tokens: usize,
        reason: Reason,
    ) -> Attempt {
        let replica = replica.clone();
        let in_flight = InFlight::with_tokens(replica.clone(), tokens);
        let name = replica.name().to_owned();
        let sent = tokio::time::timeout(self.timeouts.response_headers, self.relay.send(&replica, outbound))
            .await
            .unwrap_or(Err(UpstreamError::HeaderTimeout(self.timeouts.response_headers)));
        match sent {
            Ok(response) if response.status().is_server_error() => {
                self.metrics.upstream_errors.with_label_values(&[&name, "status_5xx"]).inc();
                self.breaker_failure(&replica);
                Attempt::ServerError { response, in_flight, reason: reason.as_str() }
            }
            Ok(response) => {
                replica.record_success();
                Attempt::Done(Served {
                    response: self.metered(response, in_flight, route),
                    replica: name,
                    reason: reason.as_str(),
                    prefill: None,
                })
            }
            Err(error) => {
                tracing::debug!(replica = %name, %error, "upstream attempt failed");
                self.metrics.upstream_errors.with_label_values(&[&name, error.kind()]).inc();
                self.breaker_failure(&replica);
                if let UpstreamError::Connect(_) = error
                    && self.registry.record(&replica, false) == Some(false)
                {
                    tracing::warn!(replica = %name, "replica unhealthy: connections fail");
                }
                Attempt::Failed { replica: name, error }
            }
        }
    }

    fn metered(
        &self,
        response: http::Response<RelayBody>,
        in_flight: InFlight,
        route: &Route<'_>,
    ) -> Response {
        let (mut parts, body) = response.into_parts();
        let sse = parts
            .headers
            .get(http::header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
        if sse {
            // A failed stream ends with an error event the replica did not count.
            parts.headers.remove(http::header::CONTENT_LENGTH);
        }
        let options = BodyOptions {
            endpoint: route.endpoint,
            started: route.started,
            stream: route.stream,
            sse,
            idle_timeout: Some(self.timeouts.stream_idle),
            first_byte_timeout: Some(self.timeouts.first_byte),
            phase: route.phase.clone(),
            continuable: route.continuable,
            // Generate mode's reader may stop early on purpose.
            ended_by_router: route.prompt_ids.map(|_| EndedByRouter::default()),
        };
        if let Some(flag) = &options.ended_by_router {
            parts.extensions.insert(flag.clone());
        }
        let body = MeteredBody::new(body, in_flight, self.registry.clone(), self.metrics.clone(), options);
        Response::from_parts(parts, Body::new(body))
    }
}
