//! Admission: what a request must pass before it is routed. Client API keys, request
//! ids, and the concurrency limit with its bounded queue.
//!
//! - API keys ([`api_keys`]: `--api-key`, `ROUTER_API_KEYS`, `--api-keys-file`):
//!   `Authorization: Bearer KEY`, compared in constant time; anything else gets 401 in
//!   the OpenAI error shape. `/health` stays open for probes; `/metrics` needs a key
//!   too, unless it is served on the admin listener (`--metrics-on admin`).
//! - Request ids: every request gets an id the router makes, and that is the
//!   `x-request-id` the replicas see (engines key requests by it, and P/D matches a KV
//!   transfer by it: a client must not be able to choose it, or collide with another).
//!   A client's own `x-request-id` (up to 128 visible characters) is kept for the logs
//!   and trace and returned on the response; without one, the router's is returned.
//!   Every response carries one, the router's own errors included.
//! - Concurrency (`--max-concurrent-requests`): at most that many requests are proxied
//!   at once; up to `--max-queued-requests` more wait, each for at most
//!   `--queue-timeout`. A full queue answers 429 at once, a wait that times out 503 with
//!   `Retry-After`. The slot is taken once the request body has been read (a slow
//!   upload holds its connection, not a slot) and held until the response body ends or
//!   the client is cut off ([`crate::ingress::client_io`]), so a long stream counts for as long
//!   as it runs. Memory stays bounded: excess requests are refused, not buffered.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{HeaderName, HeaderValue, header};
use http_body::{Frame, SizeHint};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::RouterError;

mod api_keys;
pub use api_keys::{ApiKey, ApiKeys, KeyName, load_file as load_api_keys_file};

pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The `x-request-id` a client sent, in the request's extensions (for the access log
/// and the trace); replicas get the router's id instead.
#[derive(Debug, Clone)]
pub struct ClientRequestId(pub HeaderValue);

/// Longest client request id kept; a longer one is ignored.
const MAX_CLIENT_ID: usize = 128;

/// The admission layer of every request: give it an id (the client's, or a new one),
/// refuse it without a valid API key when keys are configured, and put the id on the
/// response, whoever answered.
pub async fn admit(State(keys): State<ApiKeys>, mut request: Request, next: Next) -> Response {
    let client_id = request
        .headers_mut()
        .remove(&REQUEST_ID)
        .filter(|id| !id.is_empty() && id.len() <= MAX_CLIENT_ID && id.to_str().is_ok());
    let id = format!("req-{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..));
    let id = HeaderValue::from_str(&id).expect("hex is a valid header value");
    request.headers_mut().insert(REQUEST_ID, id.clone());
    if let Some(client_id) = &client_id {
        request.extensions_mut().insert(ClientRequestId(client_id.clone()));
    }
    // Probes and the admin API (which has its own token) need no API key.
    let path = request.uri().path();
    let open = path == "/health" || path.starts_with("/admin/");
    let let_in = !keys.is_enabled() || open || {
        match keys.check(request.headers().get(header::AUTHORIZATION)).cloned() {
            Some(name) => {
                request.extensions_mut().insert(KeyName(name));
                true
            }
            None => false,
        }
    };
    let mut response =
        if let_in { next.run(request).await } else { RouterError::Unauthorized.into_response() };
    response.headers_mut().insert(REQUEST_ID, client_id.unwrap_or(id));
    response
}

/// The concurrency limit and its queue.
pub struct Limiter {
    permits: Arc<Semaphore>,
    queued: AtomicUsize,
    max_queued: usize,
    queue_timeout: Duration,
}

impl Limiter {
    pub fn new(max_concurrent: usize, max_queued: usize, queue_timeout: Duration) -> Self {
        Limiter {
            permits: Arc::new(Semaphore::new(max_concurrent)),
            queued: AtomicUsize::new(0),
            max_queued,
            queue_timeout,
        }
    }

    /// A slot for one request, waiting in the queue if need be.
    pub async fn admit(&self) -> Result<OwnedSemaphorePermit, RouterError> {
        if let Ok(permit) = self.permits.clone().try_acquire_owned() {
            return Ok(permit);
        }
        if self.queued.fetch_add(1, Ordering::AcqRel) >= self.max_queued {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            return Err(RouterError::QueueFull);
        }
        let waited = tokio::time::timeout(self.queue_timeout, self.permits.clone().acquire_owned()).await;
        self.queued.fetch_sub(1, Ordering::AcqRel);
        match waited {
            Ok(Ok(permit)) => Ok(permit),
            _ => Err(RouterError::QueueTimeout { after: self.queue_timeout }),
        }
    }
}

/// A response body that holds its request's concurrency slot until it ends or drops.
pub struct Slotted {
    inner: Body,
    _permit: OwnedSemaphorePermit,
}

impl Slotted {
    pub fn wrap(response: Response, permit: OwnedSemaphorePermit) -> Response {
        let (parts, inner) = response.into_parts();
        Response::from_parts(parts, Body::new(Slotted { inner, _permit: permit }))
    }
}

impl http_body::Body for Slotted {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn queue_is_bounded_and_times_out() {
        let limiter = Limiter::new(1, 1, Duration::from_millis(50));
        let held = limiter.admit().await.unwrap();
        let (queued, full) = tokio::join!(limiter.admit(), async {
            tokio::time::sleep(Duration::from_millis(10)).await;
            limiter.admit().await
        });
        assert!(matches!(full, Err(RouterError::QueueFull)));
        assert!(matches!(queued, Err(RouterError::QueueTimeout { .. })));
        drop(held);
        assert!(limiter.admit().await.is_ok());
    }
}
