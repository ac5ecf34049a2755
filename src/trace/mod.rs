//! Distributed tracing: a span per request, in the trace the client started, exported
//! over OTLP (`--otlp-endpoint`), with the trace continued at the replica.
//!
//! With tracing off (the default) nothing here runs: the layer is not installed, and a
//! client's `traceparent` / `tracestate` reach the replica untouched like any other
//! end-to-end header, so vLLM started with `--otlp-traces-endpoint` still joins the
//! client's trace. With it on, [`layer`] opens a server span per request (a child of
//! the client's `traceparent`, or a new trace), puts the routing decision on it
//! (replica, reason, P/D prefill replica, status), ends it when the response body
//! ends, and sends the replica a `traceparent` naming that span as the parent, so the
//! engine's spans hang under the router's. `tracestate` passes through unchanged.
//!
//! Spans are batched and exported over OTLP/HTTP protobuf (`/v1/traces` under the
//! endpoint) from a task on the router's runtime; sampling follows the parent's
//! decision, and for new traces `--trace-sample-ratio`.

mod context;
mod layer;

pub use context::TraceParent;
pub use layer::layer;

use std::sync::Arc;
use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::runtime::Tokio;
use opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor;
use opentelemetry_sdk::trace::{BatchConfigBuilder, Sampler, SdkTracer, SdkTracerProvider};

/// Where and how spans are exported.
#[derive(Debug, Clone)]
pub struct TraceConfig {
    /// The OTLP/HTTP endpoint, e.g. `http://otel-collector:4318`.
    pub endpoint: String,
    pub service_name: String,
    /// Share of new traces (no sampled parent) recorded, 0 to 1.
    pub sample_ratio: f64,
}

/// The tracer every request's span comes from.
pub struct Tracing {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
}

impl Tracing {
    /// Build the exporter and tracer. Within the runtime (the batch task runs on it).
    pub fn start(config: &TraceConfig) -> Result<Arc<Tracing>, String> {
        let endpoint = format!("{}/v1/traces", config.endpoint.trim_end_matches('/'));
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_endpoint(endpoint)
            .with_timeout(Duration::from_secs(5))
            .with_headers(Default::default())
            .build()
            .map_err(|e| format!("--otlp-endpoint {}: {e}", config.endpoint))?;
        let batch = BatchConfigBuilder::default().with_scheduled_delay(Duration::from_secs(1)).build();
        let processor = BatchSpanProcessor::builder(exporter, Tokio).with_batch_config(batch).build();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(config.sample_ratio))))
            .with_resource(Resource::builder().with_service_name(config.service_name.clone()).build())
            .build();
        let tracer = provider.tracer("llm-router");
        Ok(Arc::new(Tracing { provider, tracer }))
    }

    /// Export what is buffered and stop (at shutdown). Blocks: call off the runtime's
    /// worker threads.
    pub fn shutdown(&self) {
        if let Err(error) = self.provider.shutdown() {
            tracing::warn!(%error, "trace export did not finish");
        }
    }
}
