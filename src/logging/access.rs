//! The access log (`--access-log`): one line per request, written when its response
//! ends (the last byte sent, or the client gone), at `info` under the target `access`.
//!
//! A line names the request (the router's id, the client's own id if it sent one, the
//! name of its API key, method, path), who answered it (the replica, or
//! `none` when the router answered itself) and why the policy chose it, its status, how long until the response
//! headers and until the end, the body bytes sent, and how it ended: `complete`, or
//! `client_closed` when the client left before the end. Off by default: without the
//! flag the layer is not installed and requests pay nothing for it.

use std::time::Instant;

use axum::extract::Request;
use axum::middleware::Next;
use axum::response::Response;

use crate::admission::{Caller, ClientRequestId, REQUEST_ID};
use crate::dispatch::ServedBy;
use crate::response::end::{self as response_end, Ending};

/// What one line of the access log says.
#[derive(Debug, Clone)]
struct AccessRecord {
    id: String,
    client_id: String,
    /// The name of the API key the request came with (`-` without keys).
    key: std::sync::Arc<str>,
    method: http::Method,
    path: String,
    status: u16,
    replica: String,
    /// Why the policy chose the replica.
    reason: &'static str,
    started: Instant,
    headers_after: f64,
}

/// The access log layer: time the request, then log it when its body ends.
pub async fn layer(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let id = request.headers().get(&REQUEST_ID).and_then(|v| v.to_str().ok()).unwrap_or("-").to_owned();
    let client_id = request
        .extensions()
        .get::<ClientRequestId>()
        .and_then(|c| c.0.to_str().ok())
        .unwrap_or("-")
        .to_owned();
    let key = request.extensions().get::<Caller>().map_or_else(|| "-".into(), |k| k.0.name.clone());
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let response = next.run(request).await;
    let served = response.extensions().get::<ServedBy>();
    let replica = served.map_or_else(|| "none".to_owned(), |s| s.replica.clone());
    let reason = served.map_or("none", |s| s.reason);
    let record = AccessRecord {
        id,
        client_id,
        key,
        method,
        path,
        status: response.status().as_u16(),
        replica,
        reason,
        started,
        headers_after: started.elapsed().as_secs_f64(),
    };
    let (parts, body) = response.into_parts();
    Response::from_parts(parts, response_end::watch(body, move |end| record.write(end)))
}

impl AccessRecord {
    /// The line, once the response has ended.
    fn write(&self, end: Ending) {
        let r = self;
        tracing::info!(
            target: "access",
            request_id = %r.id,
            client_request_id = %r.client_id,
            api_key = %r.key,
            method = %r.method,
            path = %r.path,
            status = r.status,
            replica = %r.replica,
            reason = r.reason,
            headers_s = r.headers_after,
            duration_s = r.started.elapsed().as_secs_f64(),
            bytes = end.bytes,
            outcome = if end.complete { "complete" } else { "client_closed" },
            "request"
        );
    }
}
