//! A replica's response body, read straight from its socket by whoever polls it.
//!
//! The router's HTTP server polls this body from the client connection's task, so the
//! upstream socket is read on the same task that writes to the client: no channel and
//! no wake-up of another task per chunk. Each poll hands out everything one read
//! brought (a read holding fifteen SSE events gives one frame, written to the client
//! in one system call), and nothing is ever held back waiting for more. A body read to
//! its end returns its connection to the pool; a body dropped before its end closes
//! the connection, which is how a client's disconnect reaches the replica.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use tokio::net::TcpStream;

use super::chunked::Chunked;
use super::message::Framing;
use super::pool::Pool;

/// Bytes asked of the socket per read: more than an engine writes between two reads of
/// a busy proxy.
const READ_BYTES: usize = 16 * 1024;
/// Below this much free space the read buffer is renewed.
const MIN_SPARE: usize = 4 * 1024;

pub struct RelayBody {
    /// None once the body has ended (the connection went back to the pool or was closed).
    stream: Option<TcpStream>,
    /// Bytes read and not yet handed out (the first are those read with the head).
    read: BytesMut,
    decode: Decode,
    /// Where the connection goes when the body ends cleanly, if it may be reused.
    reuse: Option<(Arc<Pool>, String)>,
}

enum Decode {
    Length {
        left: u64,
    },
    Chunked(Chunked),
    UntilClose,
    Done,
    /// Cut short (the connection closed early, or the framing was broken).
    Failed,
}

impl RelayBody {
    pub(super) fn new(
        stream: TcpStream,
        read: BytesMut,
        framing: Framing,
        reuse: Option<(Arc<Pool>, String)>,
    ) -> Self {
        let decode = match framing {
            Framing::Empty => Decode::Done,
            Framing::Length(left) => Decode::Length { left },
            Framing::Chunked => Decode::Chunked(Chunked::default()),
            Framing::UntilClose => Decode::UntilClose,
        };
        let mut body = RelayBody { stream: Some(stream), read, decode, reuse };
        if matches!(body.decode, Decode::Done) {
            body.finish();
        }
        body
    }

    /// The payload in `self.read`, consumed from it; marks the end when it is reached.
    fn take_payload(&mut self) -> std::io::Result<Bytes> {
        let payload = match &mut self.decode {
            Decode::Length { left } => {
                let take = self.read.len().min(usize::try_from(*left).unwrap_or(usize::MAX));
                *left -= take as u64;
                let payload = self.read.split_to(take).freeze();
                if *left == 0 {
                    self.decode = Decode::Done;
                }
                payload
            }
            Decode::Chunked(chunked) => match chunked.decode(&mut self.read) {
                Ok(payload) => {
                    if chunked.is_done() {
                        self.decode = Decode::Done;
                    }
                    payload
                }
                Err(e) => return Err(self.fail(std::io::ErrorKind::InvalidData, e.to_string())),
            },
            Decode::UntilClose => self.read.split().freeze(),
            Decode::Done | Decode::Failed => Bytes::new(),
        };
        if matches!(self.decode, Decode::Done) {
            self.finish();
        }
        Ok(payload)
    }

    /// The body cannot be read to its end: close the connection.
    fn fail(&mut self, kind: std::io::ErrorKind, message: String) -> std::io::Error {
        self.decode = Decode::Failed;
        self.stream = None;
        self.read.clear();
        std::io::Error::new(kind, message)
    }

    /// The body ended: the connection goes back to the pool if it may be reused and
    /// nothing unexpected follows the body (bytes after a body's end belong to no
    /// response: the body is whole, the connection is closed).
    fn finish(&mut self) {
        self.decode = Decode::Done;
        let stream = self.stream.take();
        if !self.read.is_empty() {
            tracing::debug!(bytes = self.read.len(), "bytes after the response body: connection closed");
            self.read.clear();
            return;
        }
        if let (Some(stream), Some((pool, replica))) = (stream, self.reuse.take()) {
            pool.put(&replica, stream);
        }
    }
}

impl Body for RelayBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        loop {
            if matches!(this.decode, Decode::Done | Decode::Failed) {
                return Poll::Ready(None);
            }
            if !this.read.is_empty() {
                let payload = this.take_payload()?;
                if !payload.is_empty() {
                    return Poll::Ready(Some(Ok(Frame::data(payload))));
                }
                continue;
            }
            let Some(stream) = this.stream.as_mut() else {
                return Poll::Ready(None);
            };
            // Frames handed out share the buffer's allocation; a new one is taken only
            // when the space left is short, not per read.
            if this.read.capacity() - this.read.len() < MIN_SPARE {
                this.read.reserve(READ_BYTES);
            }
            // A read that fills less than asked clears the socket's readiness, so the
            // next poll waits for the reactor instead of trying a read that would block.
            let n = match ready!(tokio_util::io::poll_read_buf(Pin::new(stream), cx, &mut this.read)) {
                Ok(n) => n,
                Err(e) => return Poll::Ready(Some(Err(this.fail(e.kind(), e.to_string())))),
            };
            if n == 0 {
                if matches!(this.decode, Decode::UntilClose) {
                    this.decode = Decode::Done;
                    this.stream = None;
                    return Poll::Ready(None);
                }
                let message = "the replica closed the connection before the body ended".to_owned();
                return Poll::Ready(Some(Err(this.fail(std::io::ErrorKind::UnexpectedEof, message))));
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.decode, Decode::Done)
    }

    fn size_hint(&self) -> SizeHint {
        match self.decode {
            Decode::Length { left } => SizeHint::with_exact(left),
            Decode::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}
