//! What the access log and tracing cost per request when they are on, against the same
//! router with both off (the default): one request at a time on loopback to an instant
//! upstream, as in `proxy_overhead`. The access log is written as JSON lines to a sink
//! (the formatting is the cost, not the disk); spans are exported to an in-process OTLP
//! collector that accepts and drops them.
//!
//! Run: `cargo bench --bench observability_cost`.

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

async fn serve(app: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

/// An instant upstream: a JSON completion, or 32 SSE events.
async fn upstream() -> SocketAddr {
    async fn complete(body: Bytes) -> Response {
        if !body.windows(14).any(|w| w == b"\"stream\":true") {
            return Response::builder()
                .header("content-type", "application/json")
                .body(Body::from(r#"{"id":"cmpl-1","object":"text_completion","choices":[{"index":0,"text":"hello","finish_reason":"length"}]}"#))
                .unwrap();
        }
        let events = (0..EVENTS).map(|i| {
            Ok::<_, std::io::Error>(Bytes::from(format!(
                "data: {{\"id\":\"cmpl-1\",\"choices\":[{{\"index\":0,\"text\":\" tok{i}\"}}]}}\n\n"
            )))
        });
        let done = std::iter::once(Ok(Bytes::from_static(b"data: [DONE]\n\n")));
        Response::builder()
            .header("content-type", "text/event-stream")
            .body(Body::from_stream(tokio_stream::iter(events.chain(done))))
            .unwrap()
    }
    let models = || async { r#"{"object":"list","data":[{"id":"m","object":"model"}]}"# };
    serve(
        Router::new()
            .route("/health", get(|| async { "" }))
            .route("/v1/models", get(models))
            .route("/v1/completions", post(complete)),
    )
    .await
}

fn cost(c: &mut Criterion) {
    tracing_subscriber::fmt().json().with_writer(std::io::sink).init();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let routers = rt.block_on(async {
        let up = upstream().await;
        let collector = serve(Router::new().route("/v1/traces", post(|| async { "" }))).await;
        let mut routers = Vec::new();
        for variant in ["off", "access_log", "tracing"] {
            let mut config = RouterConfig::new(vec![ReplicaUrl::parse(&format!("http://{up}")).unwrap()]);
            config.access_log = variant == "access_log";
            if variant == "tracing" {
                config.trace = Some(llm_router::trace::TraceConfig {
                    endpoint: format!("http://{collector}"),
                    service_name: "bench".into(),
                    sample_ratio: 1.0,
                });
            }
            let router = llm_router::server::start(config).await.unwrap();
            routers.push((variant, router.addr));
            std::mem::forget(router); // serve for the whole bench
        }
        routers
    });
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build(connector);
    let mut group = c.benchmark_group("observability_cost");
    group.measurement_time(Duration::from_secs(5));
    for (stream, label) in [(false, "non_stream"), (true, "stream_32_events")] {
        let body = format!(r#"{{"model":"m","prompt":"hi","max_tokens":32,"stream":{stream}}}"#);
        for (variant, addr) in &routers {
            let uri: http::Uri = format!("http://{addr}/v1/completions").parse().unwrap();
            group.bench_function(format!("{label}/{variant}"), |b| {
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

criterion_group!(benches, cost);
criterion_main!(benches);
