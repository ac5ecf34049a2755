//! A native Rust LLM router and ingress proxy for vLLM replicas.
//!
//! The request path, one module per phase:
//! [`admission`] (API keys, request ids, concurrency limit) ->
//! [`ingress`] (HTTP surface, body read once, routing facts) ->
//! [`policy`] (pure choice of a replica; the cache-aware ones consult the
//! [`cache_index`]) ->
//! [`dispatch`] (choose, forward, retry once before the first byte; in P/D mode
//! [`pd`] runs it twice, prefill then decode) ->
//! [`proxy`] (pooled connection to the replica) ->
//! [`response_body`] (the stream back to the client, metered, never re-encoded).
//! Around it: [`replicas`] (registry and health checks), [`admin`] (the runtime admin
//! API), [`discovery`] (replica sets from a file, DNS or Kubernetes), [`metrics`],
//! [`logging`] (log format, access log), [`config`], [`server`] (start-up and graceful
//! shutdown).
//!
//! [`sim`] is the vLLM engine simulator (`vllm-sim`) that tests, benchmarks and
//! `router --sim N` run against; [`loadgen`] is the benchmark's load generator
//! (`llm-bench`).

pub mod admin;
pub mod admission;
pub mod config;
pub mod discovery;
pub mod dispatch;
pub mod error;
pub mod fuzzing;
pub mod ingress;
pub mod logging;
pub mod metrics;
pub mod policy;
pub mod replicas;
pub mod response;
pub mod server;
pub mod trace;
pub mod upstream;
