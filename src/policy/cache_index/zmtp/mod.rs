//! ZMTP 3 (ZeroMQ's wire protocol, RFC 23) from the connecting side, for the two sockets
//! the KV event feed opens: a SUB socket for the engine's events and a DEALER socket for
//! its replay endpoint.
//!
//! Written here because the feed must survive whatever a publisher sends, and neither
//! option at hand does: the `zeromq` crate's codec reserves a frame's announced length
//! (up to 2^63 bytes) before any byte of the frame has arrived, and never bounds how
//! many frames make a message; libzmq enforces `ZMQ_MAXMSGSIZE` but needs a C build and
//! blocking sockets. What the feed needs is small: the greeting, the NULL security
//! handshake, frames, a subscription, one request on the DEALER. Every length a peer
//! announces is checked against [`Limits`] before a byte is reserved for it, and a
//! message's frames are counted and summed as they come; a peer that breaks a bound
//! gets its connection closed, and the caller counts it and reconnects.
//!
//! [`Connection::recv`] is cancel-safe (its state lives in the connection and a message
//! is taken from the read buffer only once it is whole), so it can be raced with a
//! timer. We speak ZMTP 3.0 and send subscriptions as 3.0's `0x01 + topic` messages,
//! which libzmq (3.0 and 3.1 peers) and the `zeromq` crate both accept.

mod frames;

use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use frames::*;
pub(crate) use frames::{Parsed, take_message};

/// Bounds on what a peer may send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest message (all its frames' bytes together).
    pub max_message_bytes: usize,
    /// Most frames in one message.
    pub max_frames: usize,
}

impl Default for Limits {
    /// vLLM publishes one batch per engine step: a few kB to a few hundred kB. 4 MiB is
    /// ten times the largest batch seen, and 8 frames twice the most vLLM sends.
    fn default() -> Self {
        Limits { max_message_bytes: 4 << 20, max_frames: 8 }
    }
}

/// Which socket we are to the peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SocketType {
    Sub,
    Dealer,
}

impl SocketType {
    fn name(self) -> &'static [u8] {
        match self {
            SocketType::Sub => b"SUB",
            SocketType::Dealer => b"DEALER",
        }
    }

    /// The peer socket types this one may talk to.
    fn accepts(self, peer: &[u8]) -> bool {
        match self {
            SocketType::Sub => peer == b"PUB" || peer == b"XPUB",
            SocketType::Dealer => peer == b"ROUTER" || peer == b"DEALER",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ZmtpError {
    #[error("bad endpoint `{0}`: expected tcp://HOST:PORT")]
    Endpoint(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("no connection within {0:?}")]
    ConnectTimeout(Duration),
    #[error("handshake: {0}")]
    Handshake(&'static str),
    #[error("the peer refused the handshake: {0}")]
    Refused(String),
    #[error("framing: {0}")]
    Framing(&'static str),
    #[error("a message of more than {limit} bytes (a frame announced {announced})")]
    TooLarge { announced: u64, limit: usize },
    #[error("a message of more than {0} frames")]
    TooManyFrames(usize),
    #[error("the peer closed the connection")]
    Closed,
}

impl ZmtpError {
    /// A short label for metrics: what kind of failure ended a connection.
    pub fn kind(&self) -> &'static str {
        match self {
            ZmtpError::TooLarge { .. } | ZmtpError::TooManyFrames(_) => "oversize",
            ZmtpError::Framing(_) | ZmtpError::Handshake(_) | ZmtpError::Refused(_) => "protocol",
            ZmtpError::Endpoint(_) | ZmtpError::ConnectTimeout(_) => "connect",
            ZmtpError::Io(_) | ZmtpError::Closed => "closed",
        }
    }
}

/// Bytes reserved at a time while a long frame arrives, so that a peer announcing a
/// large frame and sending nothing costs this much, not the announced length.
const READ_STEP: usize = 64 * 1024;

/// One connection to a ZMQ peer, after its handshake.
pub struct Connection {
    stream: TcpStream,
    read: BytesMut,
    limits: Limits,
}

impl Connection {
    /// Connect to `tcp://HOST:PORT` and complete the handshake as `socket`, all within
    /// `timeout`.
    pub async fn connect(
        endpoint: &str,
        socket: SocketType,
        limits: Limits,
        timeout: Duration,
    ) -> Result<Self, ZmtpError> {
        let address = endpoint
            .strip_prefix("tcp://")
            .filter(|a| a.rsplit_once(':').is_some_and(|(_, p)| p.parse::<u16>().is_ok()))
            .ok_or_else(|| ZmtpError::Endpoint(endpoint.to_owned()))?;
        let address = address.to_owned();
        tokio::time::timeout(timeout, async move {
            let stream = TcpStream::connect(address.as_str()).await?;
            let _ = stream.set_nodelay(true);
            let mut connection = Connection { stream, read: BytesMut::with_capacity(8 * 1024), limits };
            connection.handshake(socket).await?;
            Ok(connection)
        })
        .await
        .map_err(|_| ZmtpError::ConnectTimeout(timeout))?
    }

    async fn handshake(&mut self, socket: SocketType) -> Result<(), ZmtpError> {
        self.stream.write_all(&greeting()).await?;
        self.fill(GREETING).await?;
        let peer = self.read.split_to(GREETING);
        if peer[0] != 0xff || peer[9] & 0x01 == 0 {
            return Err(ZmtpError::Handshake("not a ZMTP peer"));
        }
        if peer[10] < 3 {
            return Err(ZmtpError::Handshake("the peer speaks ZMTP before 3.0"));
        }
        if &peer[12..16] != b"NULL" || peer[16..32].iter().any(|&b| b != 0) {
            return Err(ZmtpError::Handshake("the peer asks for a security mechanism other than NULL"));
        }
        self.stream.write_all(&ready(socket)).await?;
        let command = loop {
            if let Some(frame) = self.next_frame(MAX_COMMAND).await? {
                if frame.command {
                    break frame.body;
                }
                return Err(ZmtpError::Handshake("a message before READY"));
            }
        };
        let (name, mut properties) = command_name(&command)?;
        match name {
            b"READY" => {}
            b"ERROR" => {
                let reason = properties.first().map_or(0, |&n| n as usize);
                let text = properties.get(1..1 + reason).unwrap_or_default();
                return Err(ZmtpError::Refused(String::from_utf8_lossy(text).into_owned()));
            }
            _ => return Err(ZmtpError::Handshake("expected READY")),
        }
        while !properties.is_empty() {
            let (key, value, rest) = property(properties)?;
            if key.eq_ignore_ascii_case(b"Socket-Type") && !socket.accepts(value) {
                return Err(ZmtpError::Handshake("the peer's socket type does not match ours"));
            }
            properties = rest;
        }
        Ok(())
    }

    /// SUB: receive messages whose first frame starts with `topic` (empty: all).
    pub async fn subscribe(&mut self, topic: &[u8]) -> Result<(), ZmtpError> {
        let mut body = Vec::with_capacity(1 + topic.len());
        body.push(0x01);
        body.extend_from_slice(topic);
        self.send(&[&body]).await
    }

    /// Send one message of `frames`.
    pub async fn send(&mut self, frames: &[&[u8]]) -> Result<(), ZmtpError> {
        let mut out = BytesMut::new();
        for (i, frame) in frames.iter().enumerate() {
            let more = if i + 1 < frames.len() { FLAG_MORE } else { 0 };
            put_frame(&mut out, more, frame);
        }
        self.stream.write_all(&out).await?;
        Ok(())
    }

    /// The next message. Commands between messages are read and dropped (a PING needs
    /// no answer from a peer that never asked for heartbeats, and vLLM does not).
    /// Cancel-safe.
    pub async fn recv(&mut self) -> Result<Vec<Bytes>, ZmtpError> {
        loop {
            match take_message(&mut self.read, &self.limits)? {
                Parsed::Message(frames) => return Ok(frames),
                Parsed::Command => continue,
                Parsed::Need(more) => {
                    self.read.reserve(more.min(READ_STEP));
                    if self.stream.read_buf(&mut self.read).await? == 0 {
                        return Err(ZmtpError::Closed);
                    }
                }
            }
        }
    }

    /// One frame during the handshake, with a bound of its own.
    async fn next_frame(&mut self, max: usize) -> Result<Option<Frame>, ZmtpError> {
        loop {
            if let Some(header) = frame_header(&self.read)? {
                if header.size > max as u64 {
                    return Err(ZmtpError::TooLarge { announced: header.size, limit: max });
                }
                let end = header.length + header.size as usize;
                if self.read.len() >= end {
                    self.read.advance(header.length);
                    let body = self.read.split_to(header.size as usize).freeze();
                    return Ok(Some(Frame { command: header.command, body }));
                }
            }
            self.read.reserve(READ_STEP);
            if self.stream.read_buf(&mut self.read).await? == 0 {
                return Err(ZmtpError::Closed);
            }
        }
    }

    /// Read until the buffer holds at least `n` bytes.
    async fn fill(&mut self, n: usize) -> Result<(), ZmtpError> {
        while self.read.len() < n {
            self.read.reserve(n - self.read.len());
            if self.stream.read_buf(&mut self.read).await? == 0 {
                return Err(ZmtpError::Closed);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use bytes::BufMut;

    use super::*;
    use tokio::net::TcpListener;

    /// A peer that completes the handshake as `socket_type` and then writes `then`.
    async fn peer(socket_type: &'static [u8], then: Vec<u8>) -> (String, tokio::task::JoinHandle<Vec<u8>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("tcp://{}", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut g = greeting();
            g[32] = 1; // as server
            stream.write_all(&g).await.unwrap();
            let mut theirs = [0u8; GREETING];
            stream.read_exact(&mut theirs).await.unwrap();
            let mut body = BytesMut::new();
            body.put_u8(5);
            body.put_slice(b"READY");
            body.put_u8(11);
            body.put_slice(b"Socket-Type");
            body.put_u32(socket_type.len() as u32);
            body.put_slice(socket_type);
            let mut out = BytesMut::new();
            put_frame(&mut out, FLAG_COMMAND, &body);
            stream.write_all(&out).await.unwrap();
            stream.write_all(&then).await.unwrap();
            let mut received = Vec::new();
            let _ = tokio::time::timeout(Duration::from_millis(300), stream.read_to_end(&mut received)).await;
            received
        });
        (endpoint, task)
    }

    fn message(frames: &[&[u8]]) -> Vec<u8> {
        let mut out = BytesMut::new();
        for (i, f) in frames.iter().enumerate() {
            put_frame(&mut out, if i + 1 < frames.len() { FLAG_MORE } else { 0 }, f);
        }
        out.to_vec()
    }

    const LIMITS: Limits = Limits { max_message_bytes: 1024, max_frames: 4 };
    const T: Duration = Duration::from_secs(5);

    #[tokio::test]
    async fn messages_arrive_whole_with_commands_between_dropped() {
        let long = vec![7u8; 600];
        let mut bytes = message(&[b"topic", &1u64.to_be_bytes(), &long]);
        let mut ping = BytesMut::new();
        put_frame(&mut ping, FLAG_COMMAND, b"\x04PING\x00\x00");
        bytes.extend_from_slice(&ping);
        bytes.extend(message(&[b"x"]));
        let (endpoint, peer) = peer(b"PUB", bytes).await;
        let mut c = Connection::connect(&endpoint, SocketType::Sub, LIMITS, T).await.unwrap();
        c.subscribe(b"").await.unwrap();
        let first = c.recv().await.unwrap();
        assert_eq!(first.len(), 3);
        assert_eq!(&first[0][..], b"topic");
        assert_eq!(&first[2][..], &long[..]);
        assert_eq!(c.recv().await.unwrap(), vec![Bytes::from_static(b"x")]);
        assert!(matches!(c.recv().await, Err(ZmtpError::Closed)));
        let received = peer.await.unwrap();
        assert!(received.ends_with(&[0x00, 0x01, 0x01]), "the subscription: {received:?}");
    }

    #[tokio::test]
    async fn an_announced_frame_over_the_bound_closes_before_any_allocation() {
        // A long frame announcing 2^62 bytes, none of which follow.
        let mut bytes = vec![FLAG_LONG];
        bytes.extend_from_slice(&(1u64 << 62).to_be_bytes());
        let (endpoint, _peer) = peer(b"PUB", bytes).await;
        let mut c = Connection::connect(&endpoint, SocketType::Sub, LIMITS, T).await.unwrap();
        let error = c.recv().await.unwrap_err();
        assert!(matches!(error, ZmtpError::TooLarge { announced, .. } if announced == 1 << 62), "{error}");
        assert_eq!(error.kind(), "oversize");
        assert!(c.read.capacity() <= 64 * 1024 + GREETING, "{}", c.read.capacity());
    }

    #[tokio::test]
    async fn frames_summing_over_the_bound_or_too_many_are_refused() {
        let chunk = vec![1u8; 400];
        let (endpoint, _p) = peer(b"PUB", message(&[&chunk, &chunk, &chunk])).await;
        let mut c = Connection::connect(&endpoint, SocketType::Sub, LIMITS, T).await.unwrap();
        assert!(matches!(c.recv().await, Err(ZmtpError::TooLarge { .. })));
        let (endpoint, _p) = peer(b"PUB", message(&[b"a", b"b", b"c", b"d", b"e"])).await;
        let mut c = Connection::connect(&endpoint, SocketType::Sub, LIMITS, T).await.unwrap();
        assert!(matches!(c.recv().await, Err(ZmtpError::TooManyFrames(4))));
    }

    #[tokio::test]
    async fn bad_framing_and_wrong_peers_are_errors() {
        let (endpoint, _p) = peer(b"PUB", vec![0x80, 0]).await;
        let mut c = Connection::connect(&endpoint, SocketType::Sub, LIMITS, T).await.unwrap();
        assert!(matches!(c.recv().await, Err(ZmtpError::Framing(_))));
        let (endpoint, _p) = peer(b"REP", Vec::new()).await;
        assert!(matches!(
            Connection::connect(&endpoint, SocketType::Sub, LIMITS, T).await,
            Err(ZmtpError::Handshake(_))
        ));
        assert!(matches!(
            Connection::connect("udp://x", SocketType::Sub, LIMITS, T).await,
            Err(ZmtpError::Endpoint(_))
        ));
    }

    #[tokio::test]
    async fn recv_survives_being_cancelled_mid_message() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("tcp://{}", listener.local_addr().unwrap());
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            s.write_all(&greeting()).await.unwrap();
            let mut theirs = [0u8; GREETING];
            s.read_exact(&mut theirs).await.unwrap();
            let mut out = BytesMut::new();
            put_frame(&mut out, FLAG_COMMAND, b"\x05READY\x0bSocket-Type\x00\x00\x00\x03PUB");
            s.write_all(&out).await.unwrap();
            let m = message(&[b"abc", b"def"]);
            s.write_all(&m[..4]).await.unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
            s.write_all(&m[4..]).await.unwrap();
            tokio::time::sleep(Duration::from_millis(200)).await;
        });
        let mut c = Connection::connect(&endpoint, SocketType::Sub, LIMITS, T).await.unwrap();
        assert!(tokio::time::timeout(Duration::from_millis(30), c.recv()).await.is_err());
        let m = c.recv().await.unwrap();
        assert_eq!(m, vec![Bytes::from_static(b"abc"), Bytes::from_static(b"def")]);
        server.await.unwrap();
    }
}
