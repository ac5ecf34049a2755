//! The access log (`--access-log`): one line per request, written when its response
//! ends (the last byte sent, or the client gone), at `info` under the target `access`.
//!
//! A line names the request (id, method, path), who answered it (the replica, or
//! `none` when the router answered itself) and why the policy chose it, its status, how long until the response
//! headers and until the end, the body bytes sent, and how it ended: `complete`, or
//! `client_closed` when the client left before the end. Off by default: without the
//! flag the layer is not installed and requests pay nothing for it.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use axum::body::Body;
use axum::extract::Request;
use axum::middleware::Next;
use axum::response::Response;
use bytes::Bytes;
use http_body::{Frame, SizeHint};

use crate::admission::REQUEST_ID;
use crate::dispatch::ServedBy;

/// What one line of the access log says.
#[derive(Debug, Clone)]
pub struct AccessRecord {
    pub id: String,
    pub method: http::Method,
    pub path: String,
    pub status: u16,
    pub replica: String,
    /// Why the policy chose the replica.
    pub reason: &'static str,
    pub started: Instant,
    pub headers_after: f64,
}

/// The access log layer: time the request, then log it when its body ends.
pub async fn layer(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let id = request.headers().get(&REQUEST_ID).and_then(|v| v.to_str().ok()).unwrap_or("-").to_owned();
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let response = next.run(request).await;
    let served = response.extensions().get::<ServedBy>();
    let replica = served.map_or_else(|| "none".to_owned(), |s| s.replica.clone());
    let reason = served.map_or("none", |s| s.reason);
    let record = AccessRecord {
        id,
        method,
        path,
        status: response.status().as_u16(),
        replica,
        reason,
        started,
        headers_after: started.elapsed().as_secs_f64(),
    };
    let (parts, body) = response.into_parts();
    Response::from_parts(parts, Body::new(Logged { inner: body, record, bytes: 0, ended: false }))
}

/// A response body that writes its access log line when dropped.
struct Logged {
    inner: Body,
    record: AccessRecord,
    bytes: u64,
    ended: bool,
}

impl http_body::Body for Logged {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                self.bytes += frame.data_ref().map_or(0, |d| d.len() as u64);
            }
            Poll::Ready(None) => self.ended = true,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        let r = &self.record;
        let outcome = if self.ended || http_body::Body::is_end_stream(&self.inner) {
            "complete"
        } else {
            "client_closed"
        };
        tracing::info!(
            target: "access",
            request_id = %r.id,
            method = %r.method,
            path = %r.path,
            status = r.status,
            replica = %r.replica,
            reason = r.reason,
            headers_s = r.headers_after,
            duration_s = r.started.elapsed().as_secs_f64(),
            bytes = self.bytes,
            outcome,
            "request"
        );
    }
}
