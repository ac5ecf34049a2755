//! A native Rust LLM router and ingress proxy for vLLM replicas.
//!
//! The request path, one module per phase, declared in the order a request meets them:
//! [`server`] (accept, write-stall limit) ->
//! [`admission`] (API keys, request ids, concurrency limit) ->
//! [`ingress`] (HTTP surface, body read once, routing facts and key) ->
//! [`policy`] (pure choice of a replica; the cache-aware ones consult its cache index
//! and prompt tokens) ->
//! [`dispatch`] (choose, forward, retry once before the first byte; in P/D mode it runs
//! twice, prefill then decode) ->
//! `upstream` (what is forwarded; the relay's pooled connection to the replica) ->
//! `response` (the stream back to the client, metered, never re-encoded).
//!
//! Around it: [`replicas`] (registry, fleet snapshots, health, breakers, outliers),
//! [`discovery`] (replica sets from a file, DNS or Kubernetes), `admin` (the runtime
//! admin API), [`metrics`], [`logging`] (log format, access log), [`trace`] (W3C
//! traceparent, OTLP), [`config`] (one flag group per subsystem) and [`error`] (the one
//! client-facing error type). [`fuzzing`] holds the fuzz targets' entry points.
//!
//! The simulator (`vllm-sim`) and the load generator (`llm-bench`) are crates of their
//! own; see `docs/architecture.md`.

// The request path, in order.
pub mod server;

pub mod admission;

/// The engines' frontend: tokens in and out of vLLM (`--engine-api generate`).
pub mod frontend;
pub mod ingress;

pub mod policy;

pub mod dispatch;

mod upstream;

mod response;

// Around it.
mod admin;
pub mod config;
pub mod discovery;
pub mod error;
pub mod fuzzing;
pub mod logging;
pub mod metrics;
pub mod reload;
pub mod replicas;
pub mod state_store;
pub mod trace;
