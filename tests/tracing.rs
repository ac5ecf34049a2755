//! Trace context and span export against a mock replica and a stand-in OpenTelemetry
//! collector on 127.0.0.1 (OTLP/HTTP protobuf, decoded with the OTLP definitions).
//! Off: the client's `traceparent` and `tracestate` reach the replica untouched. On:
//! the router's span is a child of the client's, carries the routing decision, and the
//! replica is told to continue under the router's span.

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::routing::post;
use llm_router::trace::{TraceConfig, TraceParent};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use serde_json::json;
use support::{MockReplica, base, client, post as send};

const CLIENT_PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
const TRACESTATE: &str = "vendor=abc,other=1";

/// Every span received, with its resource's `service.name`.
type Received = Arc<Mutex<Vec<(String, Span)>>>;

/// An OTLP/HTTP collector that keeps every span it is sent (and the service names).
struct Collector {
    url: String,
    received: Received,
    server: tokio::task::JoinHandle<()>,
}

impl Collector {
    async fn start() -> Collector {
        let received: Received = Arc::default();
        let app = axum::Router::new().route("/v1/traces", post(export)).with_state(received.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let server = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Collector { url, received, server }
    }

    fn spans(&self) -> Vec<(String, Span)> {
        self.received.lock().unwrap().clone()
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn export(State(received): State<Received>, body: Bytes) -> Vec<u8> {
    let request = ExportTraceServiceRequest::decode(body).expect("an OTLP protobuf export");
    for resource in request.resource_spans {
        let service = resource
            .resource
            .iter()
            .flat_map(|r| &r.attributes)
            .find(|a| a.key == "service.name")
            .and_then(|a| string(a.value.as_ref()?.value.as_ref()?))
            .unwrap_or_default();
        for scope in resource.scope_spans {
            for span in scope.spans {
                received.lock().unwrap().push((service.clone(), span));
            }
        }
    }
    Vec::new()
}

fn string(value: &AnyValue) -> Option<String> {
    match value {
        AnyValue::StringValue(s) => Some(s.clone()),
        AnyValue::IntValue(i) => Some(i.to_string()),
        _ => None,
    }
}

fn attribute(span: &Span, key: &str) -> Option<String> {
    span.attributes.iter().find(|a| a.key == key).and_then(|a| string(a.value.as_ref()?.value.as_ref()?))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn chat() -> serde_json::Value {
    json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": true})
}

/// The traceparent and tracestate the replica received with its last request.
fn upstream_context(mock: &MockReplica) -> (Option<String>, Option<String>) {
    let last = mock.requests().pop().unwrap();
    let get = |name: &str| last.headers.get(name).map(|v| v.to_str().unwrap().to_owned());
    (get("traceparent"), get("tracestate"))
}

#[tokio::test]
async fn without_export_the_clients_trace_context_reaches_the_replica_untouched() {
    let mocks = support::mocks(1).await;
    let router = support::router(support::config(&mocks)).await;
    let url = format!("{}/v1/chat/completions", base(&router));
    let headers = [("traceparent", CLIENT_PARENT), ("tracestate", TRACESTATE)];
    let (status, _, _) = send(&client(), &url, &chat(), &headers).await;
    assert_eq!(status, 200);
    assert_eq!(upstream_context(&mocks[0]), (Some(CLIENT_PARENT.into()), Some(TRACESTATE.into())));
    router.shutdown().await;
}

#[tokio::test]
async fn with_export_the_routers_span_joins_the_clients_trace_and_the_replica_continues_it() {
    let collector = Collector::start().await;
    let mocks = support::mocks(2).await;
    let mut config = support::config(&mocks);
    config.trace = Some(TraceConfig {
        endpoint: collector.url.clone(),
        service_name: "edge-router".into(),
        sample_ratio: 1.0,
    });
    let router = support::router(config).await;
    let url = format!("{}/v1/chat/completions", base(&router));
    let http = client();

    // 1. A sampled client trace.
    let headers =
        [("traceparent", CLIENT_PARENT), ("tracestate", TRACESTATE), ("x-request-id", "req-traced")];
    let (status, served_by, _) = send(&http, &url, &chat(), &headers).await;
    assert_eq!(status, 200);
    let mock = mocks.iter().find(|m| Some(&m.state.name) == served_by.as_ref()).unwrap();
    let (upstream, state) = upstream_context(mock);
    let upstream = TraceParent::parse(&upstream.unwrap()).expect("a valid traceparent to the replica");
    let client_parent = TraceParent::parse(CLIENT_PARENT).unwrap();
    assert_eq!(upstream.trace_id, client_parent.trace_id, "same trace");
    assert_ne!(upstream.parent_id, client_parent.parent_id, "the replica's parent is the router's span");
    assert!(upstream.sampled);
    assert_eq!(state.as_deref(), Some(TRACESTATE));

    // 2. No trace from the client: a new one, continued at the replica.
    let (status, served_by, _) = send(&http, &url, &chat(), &[]).await;
    assert_eq!(status, 200);
    let mock = mocks.iter().find(|m| Some(&m.state.name) == served_by.as_ref()).unwrap();
    let fresh = TraceParent::parse(&upstream_context(mock).0.unwrap()).unwrap();
    assert_ne!(fresh.trace_id, client_parent.trace_id);

    // 3. A client trace that is not sampled: followed, not recorded.
    let unsampled = "00-11111111111111111111111111111111-2222222222222222-00";
    let (status, served_by, _) = send(&http, &url, &chat(), &[("traceparent", unsampled)]).await;
    assert_eq!(status, 200);
    let mock = mocks.iter().find(|m| Some(&m.state.name) == served_by.as_ref()).unwrap();
    let followed = TraceParent::parse(&upstream_context(mock).0.unwrap()).unwrap();
    assert_eq!((followed.trace_id, followed.sampled), ([0x11; 16], false));

    // 4. A refused request gets a span too.
    let (status, _, _) = send(&http, &format!("{}/nothing/here", base(&router)), &chat(), &[]).await;
    assert!(status >= 400);

    router.shutdown().await; // flushes the exporter
    let mut spans = collector.spans();
    for _ in 0..100 {
        if spans.len() >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        spans = collector.spans();
    }
    assert_eq!(spans.len(), 3, "sampled requests only: {spans:?}");
    assert!(spans.iter().all(|(service, _)| service == "edge-router"));

    let (_, traced) = spans.iter().find(|(_, s)| hex(&s.trace_id) == hex(&client_parent.trace_id)).unwrap();
    assert_eq!(hex(&traced.parent_span_id), hex(&client_parent.parent_id));
    assert_eq!(hex(&traced.span_id), hex(&upstream.parent_id));
    assert_eq!(traced.name, "POST /v1/chat/completions");
    assert_eq!(traced.kind, 2, "a server span");
    let replica = attribute(traced, "llm_router.replica").unwrap();
    assert!(mocks.iter().any(|m| m.url() == replica), "{replica}");
    assert!(attribute(traced, "llm_router.reason").is_some_and(|r| !r.is_empty()));
    assert_eq!(attribute(traced, "http.response.status_code").as_deref(), Some("200"));
    assert_eq!(attribute(traced, "llm_router.client_request_id").as_deref(), Some("req-traced"));
    assert!(
        attribute(traced, "llm_router.request_id")
            .is_some_and(|id| id.starts_with("req-") && id != "req-traced")
    );
    assert_eq!(attribute(traced, "llm_router.outcome").as_deref(), Some("complete"));
    assert!(traced.end_time_unix_nano > traced.start_time_unix_nano);

    assert!(
        spans.iter().any(|(_, s)| hex(&s.trace_id) == hex(&fresh.trace_id) && s.parent_span_id.is_empty())
    );
    let refused = spans.iter().find(|(_, s)| s.name.contains("/nothing/here")).unwrap();
    assert_eq!(attribute(&refused.1, "llm_router.replica").as_deref(), Some("none"));
}
