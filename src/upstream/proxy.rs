//! The proxy's request and its failures: what is forwarded to a replica (the client's
//! method, path, end-to-end headers and body bytes as read), what is stripped (the
//! hop-by-hop headers, both ways), and why an attempt can produce no response.
//!
//! It never decides where a request goes (that is the policy's job, carried out by
//! [`crate::dispatch`]) and never touches a socket: [`crate::upstream::relay`] carries the request
//! to the replica and streams the response back. The pooled hyper client here serves
//! the health checks.

use std::time::Duration;

use bytes::Bytes;
use http::Method;
use http::header::{self, HeaderMap, HeaderName};
use http::uri::PathAndQuery;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// The pooled client of the health checker.
pub fn http_client(connect_timeout: Duration) -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(connect_timeout));
    connector.set_keepalive(Some(Duration::from_secs(60)));
    // Idle long enough to be reused by the next round of checks (default 5 s), short
    // enough not to keep a departed replica's connection for long.
    Client::builder(TokioExecutor::new()).pool_idle_timeout(Duration::from_secs(15)).build(connector)
}

/// A request ready to be sent, and sent again to another replica if the first fails.
#[derive(Debug, Clone)]
pub struct Outbound {
    pub method: Method,
    pub path: PathAndQuery,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Outbound {
    /// Keep the client's end-to-end headers; drop hop-by-hop ones, `Host` (the client
    /// sets it to the replica) and `Content-Length` (recomputed from the body).
    pub fn new(method: Method, path: PathAndQuery, mut headers: HeaderMap, body: Bytes) -> Self {
        strip_hop_by_hop(&mut headers);
        headers.remove(header::HOST);
        headers.remove(header::CONTENT_LENGTH);
        Outbound { method, path, headers, body }
    }
}

/// Why an attempt produced no response.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connection failed: {0}")]
    Connect(String),
    #[error("failed before response headers: {0}")]
    BeforeHeaders(String),
    #[error("no response headers within {0:?}")]
    HeaderTimeout(std::time::Duration),
}

impl UpstreamError {
    pub fn kind(&self) -> &'static str {
        match self {
            UpstreamError::Connect(_) => "connect",
            UpstreamError::BeforeHeaders(_) => "before_headers",
            UpstreamError::HeaderTimeout(_) => "header_timeout",
        }
    }
}

const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Remove the headers that describe one connection (RFC 9110 §7.6.1), including any
/// the `Connection` header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> =
        connection_options(headers).filter_map(|name| HeaderName::from_bytes(name.as_bytes()).ok()).collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
}

/// The options of the `Connection` header (`close`, `keep-alive`, header names), trimmed.
pub fn connection_options(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_hop_by_hop_and_connection_named_headers() {
        let mut h = HeaderMap::new();
        h.insert("connection", "keep-alive, x-private".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("x-private", "1".parse().unwrap());
        h.insert("transfer-encoding", "chunked".parse().unwrap());
        h.insert("x-session-id", "s".parse().unwrap());
        h.insert("authorization", "Bearer k".parse().unwrap());
        strip_hop_by_hop(&mut h);
        let names: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["x-session-id", "authorization"]);
    }

    #[test]
    fn outbound_drops_host_and_length() {
        let mut h = HeaderMap::new();
        h.insert("host", "router:8000".parse().unwrap());
        h.insert("content-length", "2".parse().unwrap());
        h.insert("content-type", "application/json".parse().unwrap());
        let o = Outbound::new(
            Method::POST,
            PathAndQuery::from_static("/v1/completions"),
            h,
            Bytes::from_static(b"{}"),
        );
        assert!(o.headers.get("host").is_none());
        assert!(o.headers.get("content-length").is_none());
        assert_eq!(o.headers["content-type"], "application/json");
    }
}
