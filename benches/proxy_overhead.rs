//! What the router adds to a request, measured against going direct: an in-process
//! upstream on loopback answers instantly (a JSON completion, or an SSE stream of 32
//! events written one by one), and the same request is timed direct and through the
//! router. The difference is the router's cost per request; the engine's time, which
//! dominates in production, is deliberately zero here.
//!
//! Two more routers in the same process show what the optional observability costs:
//! `router_access_log` (`--access-log`, JSON lines formatted and written to a sink, as
//! the process's log subscriber is installed here at `info`) and `router_tracing`
//! (`--otlp-endpoint`, spans exported to an in-process collector that drops them; each
//! request carries a sampled `traceparent`).
//!
//! Run: `cargo bench --bench proxy_overhead`. Figures are reported in README.

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::response::Response;
use axum::routing::{get, post};
use criterion::{Criterion, criterion_group, criterion_main};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use llm_router::config::RouterConfig;
use llm_router::replicas::ReplicaUrl;

const EVENTS: usize = 32;

async fn upstream() -> SocketAddr {
    async fn complete(body: Bytes) -> Response {
        let stream = body.windows(14).any(|w| w == b"\"stream\":true");
        if !stream {
            return Response::builder()
                .header("content-type", "application/json")
                .body(Body::from(r#"{"id":"cmpl-1","object":"text_completion","choices":[{"index":0,"text":"hello","finish_reason":"length"}]}"#))
                .unwrap();
        }
        let events = (0..EVENTS).map(|i| {
            Ok::<_, std::io::Error>(Bytes::from(format!(
                "data: {{\"id\":\"cmpl-1\",\"object\":\"text_completion\",\"choices\":[{{\"index\":0,\"text\":\" tok{i}\"}}]}}\n\n"
            )))
        });
        let done = std::iter::once(Ok(Bytes::from_static(b"data: [DONE]\n\n")));
        Response::builder()
            .header("content-type", "text/event-stream")
            .body(Body::from_stream(tokio_stream::iter(events.chain(done))))
            .unwrap()
    }
    let models = || async { r#"{"object":"list","data":[{"id":"m","object":"model"}]}"# };
    let app = Router::new()
        .route("/health", get(|| async { "" }))
        .route("/v1/models", get(models))
        .route("/v1/completions", post(complete));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

/// An OTLP/HTTP collector that accepts spans and drops them.
async fn collector() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = Router::new().route("/v1/traces", post(|| async { "" }));
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

fn overhead(c: &mut Criterion) {
    tracing_subscriber::fmt().json().with_max_level(tracing::Level::INFO).with_writer(std::io::sink).init();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let targets = rt.block_on(async {
        let up = upstream().await;
        let spans = collector().await;
        let mut targets = vec![(up, "direct")];
        for who in ["router", "router_access_log", "router_tracing"] {
            let mut config = RouterConfig::new(vec![ReplicaUrl::parse(&format!("http://{up}")).unwrap()]);
            config.access_log = who == "router_access_log";
            if who == "router_tracing" {
                config.trace = Some(llm_router::trace::TraceConfig {
                    endpoint: format!("http://{spans}"),
                    service_name: "bench".into(),
                    sample_ratio: 1.0,
                });
            }
            let router = llm_router::server::start(config).await.unwrap();
            targets.push((router.addr, who));
            std::mem::forget(router); // serve for the whole bench
        }
        targets
    });
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build(connector);

    let mut group = c.benchmark_group("proxy_overhead");
    group.measurement_time(Duration::from_secs(5));
    for (stream, label) in [(false, "non_stream"), (true, "stream_32_events")] {
        let body = format!(r#"{{"model":"m","prompt":"hi","max_tokens":32,"stream":{stream}}}"#);
        for &(target, who) in &targets {
            let uri: http::Uri = format!("http://{target}/v1/completions").parse().unwrap();
            group.bench_function(format!("{label}/{who}"), |b| {
                b.to_async(&rt).iter(|| {
                    let request = http::Request::post(uri.clone())
                        .header("content-type", "application/json")
                        .header("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
                        .body(Full::new(Bytes::from(body.clone())))
                        .unwrap();
                    let client = client.clone();
                    async move {
                        let response = client.request(request).await.unwrap();
                        assert!(response.status().is_success());
                        response.into_body().collect().await.unwrap().to_bytes().len()
                    }
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, overhead);
criterion_main!(benches);
