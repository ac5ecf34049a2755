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
//! - Per-key limits ([`rate_limits`]): requests and tokens per minute, 429 with
//!   `Retry-After` beyond them; a key's model allow-list (404 for other models, as
//!   OpenAI answers a model you may not use).
//! - Concurrency (`--max-concurrent-requests`, [`fair_queue`]): at most that many
//!   requests are proxied at once; up to `--max-queued-requests` more wait, each for at
//!   most `--queue-timeout`, served by priority and then by key in turn. A full queue
//!   answers 429 at once, a wait that times out 503 with `Retry-After`. The slot is taken once the request body has been read (a slow
//!   upload holds its connection, not a slot) and held until the response body ends or
//!   the client is cut off ([`crate::ingress::client_io`]), so a long stream counts for as long
//!   as it runs. Memory stays bounded: excess requests are refused, not buffered.

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http::{HeaderName, HeaderValue, header};

use crate::error::RouterError;

mod api_keys;
pub mod fair_queue;
pub mod key_limits;
pub mod rate_limits;
pub mod shared_limits;
pub use api_keys::{ApiKey, ApiKeys, Caller, load_file as load_api_keys_file};
pub use fair_queue::{Flow, Limiter, Priority, QueueOrder, Slot};

pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// A path with no `.` or `..` segment, no empty segment and no percent-encoded `/`,
/// `\\` or `.`: one that every server resolves to itself.
pub fn clean_path(path: &str) -> bool {
    let bytes = path.as_bytes();
    let encoded_separator = bytes.iter().enumerate().any(|(i, &b)| {
        b == b'\\'
            || (b == b'%'
                && matches!(
                    bytes.get(i + 1..i + 3),
                    Some([b'2', b'f' | b'F' | b'e' | b'E'] | [b'5', b'c' | b'C'])
                ))
    });
    if encoded_separator {
        return false;
    }
    path == "/"
        || path
            .strip_prefix('/')
            .is_some_and(|rest| rest.split('/').all(|s| !s.is_empty() && s != "." && s != ".."))
}

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
    // A path the router would match one way and an engine might resolve another
    // (`/v1/responses/../load_lora_adapter`) is refused before anything matches it.
    if !clean_path(request.uri().path()) {
        let mut response = RouterError::BadPath(request.uri().path().to_owned()).into_response();
        response.headers_mut().insert(REQUEST_ID, client_id.unwrap_or(id));
        return response;
    }
    // Probes and the admin API (which has its own token) need no API key.
    let path = request.uri().path();
    let open = path == "/health" || path.starts_with("/admin/");
    let let_in = !keys.is_enabled() || open || {
        match keys.check(request.headers().get(header::AUTHORIZATION)) {
            Some(key) => {
                request.extensions_mut().insert(Caller(key));
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

#[cfg(test)]
mod tests {
    #[test]
    fn only_paths_every_server_resolves_alike_are_clean() {
        for clean in ["/", "/v1/chat/completions", "/v1/responses/resp_1", "/health", "/v1/a%20b"] {
            assert!(super::clean_path(clean), "{clean}");
        }
        for dirty in [
            "/v1/responses/../x",
            "/v1/./x",
            "/v1//x",
            "/v1/x/",
            "/v1/%2e%2e/x",
            "/v1/%2E/x",
            "/v1/a%2fb",
            "/v1/a%5Cb",
            "/v1/a\\b",
            "v1",
            "",
        ] {
            assert!(!super::clean_path(dirty), "{dirty}");
        }
    }
}
