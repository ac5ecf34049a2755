//! The relay: HTTP/1.1 to the replicas over pooled keep-alive connections, with the
//! response body read from the replica's socket by the task that writes it to the
//! client.
//!
//! A streaming hop should cost what a byte relay costs: one read from the replica and
//! one write to the client for whatever arrived together. A general-purpose client
//! (hyper's) runs each upstream connection on its own task and hands the body over a
//! channel one chunk at a time, so every SSE event costs a task wake-up and a write of
//! its own. Here the request is written, and the response head and body are read, from
//! the request's own task; [`RelayBody`] decodes the chunked coding of everything one
//! read brought and hands it out as one frame.
//!
//! An idle pooled connection the replica has closed is skipped when taken; if a reused
//! connection still fails before any byte of a response arrives (the replica closed it
//! as the request went out), the request is sent once more on a new connection, which
//! is safe because the replica never began it.

mod body;
pub(crate) mod chunked;
pub(crate) mod message;
mod pool;

use std::collections::HashSet;
use std::io::IoSlice;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use http::Response;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

pub use body::RelayBody;
use message::HeadError;
use pool::Pool;

use crate::replicas::Replica;
use crate::upstream::proxy::{Outbound, UpstreamError, strip_hop_by_hop};

/// Idle connections kept per replica: enough for the concurrency one replica serves.
const MAX_IDLE_PER_REPLICA: usize = 1024;
/// An idle connection older than this is not reused.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// TCP keep-alive probes on replica connections start after this much silence.
const TCP_KEEPALIVE: Duration = Duration::from_secs(60);
/// How often idle connections are reaped: the longest a connection the replica closed,
/// or one to a replica that left, stays open on our side.
pub const REAP_INTERVAL: Duration = Duration::from_secs(5);

/// The proxy's connections to the replicas.
#[derive(Clone)]
pub struct Relay {
    pool: Arc<Pool>,
    connect_timeout: Duration,
}

/// Why one exchange on one connection produced no response head.
enum Failure {
    /// Nothing came back: on a reused connection, the replica may have closed it idle.
    NoResponse(String),
    /// Anything else (a malformed head, bytes then a close).
    Other(String),
}

impl Relay {
    pub fn new(connect_timeout: Duration) -> Self {
        Relay { pool: Arc::new(Pool::new(MAX_IDLE_PER_REPLICA, IDLE_TIMEOUT)), connect_timeout }
    }

    /// Reap idle connections every [`REAP_INTERVAL`] until the task is dropped, keeping
    /// only those to replicas some registry still holds; the count kept goes to `idle`.
    pub fn reaper(
        &self,
        registries: Vec<Arc<crate::replicas::Registry>>,
        idle: prometheus::IntGauge,
    ) -> JoinHandle<()> {
        let pool = self.pool.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(REAP_INTERVAL).await;
                let members: HashSet<String> =
                    registries.iter().flat_map(|r| r.replicas()).map(|r| r.name().to_owned()).collect();
                idle.set(pool.reap(|replica| members.contains(replica)) as i64);
            }
        })
    }

    /// Send `outbound` to `replica`; the response body streams from the replica as read.
    pub async fn send(
        &self,
        replica: &Replica,
        outbound: &Outbound,
    ) -> Result<Response<RelayBody>, UpstreamError> {
        let name = replica.name();
        let head = message::request_head(outbound, replica.url.authority());
        if let Some(stream) = self.pool.take(name) {
            match self.exchange(name, stream, &head, outbound).await {
                Ok(response) => return Ok(response),
                Err(Failure::NoResponse(detail)) => {
                    tracing::debug!(
                        replica = name,
                        detail,
                        "pooled connection was closed; sending on a new one"
                    );
                }
                Err(Failure::Other(detail)) => return Err(UpstreamError::BeforeHeaders(detail)),
            }
        }
        let stream = self.connect(replica).await?;
        self.exchange(name, stream, &head, outbound).await.map_err(|failure| match failure {
            Failure::NoResponse(detail) | Failure::Other(detail) => UpstreamError::BeforeHeaders(detail),
        })
    }

    async fn connect(&self, replica: &Replica) -> Result<TcpStream, UpstreamError> {
        let (host, port) = (replica.url.host(), replica.url.port());
        let stream = tokio::time::timeout(self.connect_timeout, TcpStream::connect((host, port)))
            .await
            .map_err(|_| UpstreamError::Connect(format!("no connection within {:?}", self.connect_timeout)))?
            .map_err(|e| UpstreamError::Connect(e.to_string()))?;
        let _ = stream.set_nodelay(true);
        let keepalive = socket2::TcpKeepalive::new().with_time(TCP_KEEPALIVE);
        let _ = socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive);
        Ok(stream)
    }

    /// Write the request, read the response head; the rest of the body stays on the socket.
    async fn exchange(
        &self,
        replica: &str,
        mut stream: TcpStream,
        head: &[u8],
        outbound: &Outbound,
    ) -> Result<Response<RelayBody>, Failure> {
        write_request(&mut stream, head, &outbound.body)
            .await
            .map_err(|e| Failure::NoResponse(e.to_string()))?;
        let mut read = BytesMut::with_capacity(8 * 1024);
        let (head, used) = loop {
            match message::parse_head(&read) {
                Ok(Some(parsed)) => break parsed,
                Ok(None) => {}
                Err(e) => return Err(Failure::Other(e.to_string())),
            }
            read.reserve(8 * 1024);
            match stream.read_buf(&mut read).await {
                Ok(0) if read.is_empty() => return Err(Failure::NoResponse("connection closed".into())),
                Ok(0) => return Err(Failure::Other("connection closed within the response head".into())),
                Ok(_) => {}
                Err(e) if read.is_empty() => return Err(Failure::NoResponse(e.to_string())),
                Err(e) => return Err(Failure::Other(e.to_string())),
            }
        };
        read.advance(used);
        let framing = message::framing(&outbound.method, &head)
            .map_err(|e: HeadError| Failure::Other(e.to_string()))?;
        let reuse = message::reusable(&head, framing).then(|| (self.pool.clone(), replica.to_owned()));
        let mut response = Response::new(RelayBody::new(stream, read, framing, reuse));
        *response.status_mut() = head.status;
        *response.version_mut() = head.version;
        *response.headers_mut() = head.headers;
        strip_hop_by_hop(response.headers_mut());
        message::normalise_length(response.headers_mut(), &outbound.method, framing);
        Ok(response)
    }
}

/// The head and the body in as few writes as the socket allows (one, normally).
async fn write_request(stream: &mut TcpStream, head: &[u8], body: &[u8]) -> std::io::Result<()> {
    let (mut head, mut body) = (head, body);
    while !head.is_empty() {
        let n = stream.write_vectored(&[IoSlice::new(head), IoSlice::new(body)]).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        let from_head = n.min(head.len());
        head = &head[from_head..];
        body = &body[n - from_head..];
    }
    stream.write_all(body).await
}
