//! The tracing layer: one server span per request, from its arrival to the end of its
//! response body, carrying the routing decision the ingress put on the response.

use std::borrow::Cow;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use http::HeaderValue;
use opentelemetry::trace::{
    Span as _, SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags, TraceId, TraceState,
    Tracer as _,
};
use opentelemetry::{Context, KeyValue};

use super::{TraceParent, Tracing};
use crate::admission::{ClientRequestId, REQUEST_ID};
use crate::dispatch::ServedBy;
use crate::response::end as response_end;

const TRACEPARENT: &str = "traceparent";
const TRACESTATE: &str = "tracestate";

/// The client's trace, when its `traceparent` is valid.
fn parent(request: &Request) -> Context {
    let headers = request.headers();
    let Some(parent) = headers.get(TRACEPARENT).and_then(|v| v.to_str().ok()).and_then(TraceParent::parse)
    else {
        return Context::new();
    };
    let state = headers
        .get(TRACESTATE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<TraceState>().ok())
        .unwrap_or_default();
    let flags = if parent.sampled { TraceFlags::SAMPLED } else { TraceFlags::default() };
    let context = SpanContext::new(
        TraceId::from_bytes(parent.trace_id),
        SpanId::from_bytes(parent.parent_id),
        flags,
        true,
        state,
    );
    Context::new().with_remote_span_context(context)
}

pub async fn layer(State(tracing): State<Arc<Tracing>>, mut request: Request, next: Next) -> Response {
    let parent = parent(&request);
    let path = request.uri().path().to_owned();
    let mut attributes = vec![
        KeyValue::new("http.request.method", request.method().as_str().to_owned()),
        KeyValue::new("url.path", path.clone()),
    ];
    if let Some(id) = request.headers().get(&REQUEST_ID).and_then(|v| v.to_str().ok()) {
        attributes.push(KeyValue::new("llm_router.request_id", id.to_owned()));
    }
    if let Some(id) = request.extensions().get::<ClientRequestId>().and_then(|c| c.0.to_str().ok()) {
        attributes.push(KeyValue::new("llm_router.client_request_id", id.to_owned()));
    }
    let mut span = tracing
        .tracer
        .span_builder(Cow::Owned(format!("{} {path}", request.method())))
        .with_kind(SpanKind::Server)
        .with_attributes(attributes)
        .start_with_context(&tracing.tracer, &parent);
    // The replica continues the trace under this span.
    let own = span.span_context();
    let traceparent = TraceParent {
        trace_id: own.trace_id().to_bytes(),
        parent_id: own.span_id().to_bytes(),
        sampled: own.is_sampled(),
    };
    if let Ok(value) = HeaderValue::from_str(&traceparent.format()) {
        request.headers_mut().insert(TRACEPARENT, value);
    }
    let response = next.run(request).await;
    let status = response.status();
    span.set_attribute(KeyValue::new("http.response.status_code", i64::from(status.as_u16())));
    match response.extensions().get::<ServedBy>() {
        Some(served) => {
            span.set_attribute(KeyValue::new("llm_router.replica", served.replica.clone()));
            span.set_attribute(KeyValue::new("llm_router.reason", served.reason));
            if let Some(prefill) = &served.prefill {
                span.set_attribute(KeyValue::new("llm_router.prefill_replica", prefill.clone()));
            }
        }
        None => span.set_attribute(KeyValue::new("llm_router.replica", "none")),
    }
    if status.is_server_error() {
        span.set_status(Status::error(status.to_string()));
    }
    let (parts, body) = response.into_parts();
    let body = response_end::watch(body, move |end| {
        let outcome = if end.complete { "complete" } else { "client_closed" };
        span.set_attribute(KeyValue::new("llm_router.outcome", outcome));
        span.end();
    });
    Response::from_parts(parts, body)
}
