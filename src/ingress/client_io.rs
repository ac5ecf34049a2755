//! A client connection's socket with a limit on how long the client may refuse bytes:
//! HAProxy's `timeout client` for the direction that matters to a streaming proxy.
//!
//! A client that stops reading fills its socket buffer, then the router's; from then on
//! every write would block. hyper then stops polling the response body (it has nowhere
//! to put more), so nothing on the request path runs: not the stream idle timer, not
//! the end of the upstream body. The request would keep its concurrency slot, its
//! upstream connection and the engine's work for as long as the client stays connected.
//!
//! So the deadline lives here, where the blocked write is seen: when a write cannot
//! proceed, a timer starts; any byte the client accepts stops it; if it fires first, the
//! write fails with `TimedOut`, hyper closes the connection, and dropping the request's
//! future and body cancels the upstream request and frees the slot. A client that reads
//! slowly but steadily is never cut. Writes that proceed cost a flag check; the timer is
//! allocated once per connection, on its first stall.

use std::io::IoSlice;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

pub struct StallLimited<S> {
    inner: S,
    limit: Duration,
    /// Armed while a write is blocked; reset from the first blocked write.
    timer: Option<Pin<Box<Sleep>>>,
    armed: bool,
    /// Counts the connection cut off (once).
    stalls: Option<prometheus::IntCounter>,
}

impl<S> StallLimited<S> {
    pub fn new(inner: S, limit: Duration) -> Self {
        StallLimited { inner, limit, timer: None, armed: false, stalls: None }
    }

    /// The same, counting a cut-off connection in `stalls`.
    pub fn counted(inner: S, limit: Duration, stalls: prometheus::IntCounter) -> Self {
        StallLimited { stalls: Some(stalls), ..Self::new(inner, limit) }
    }

    /// A write returned `Pending`: start the clock (if it is not running) and fail once
    /// it has run out.
    fn blocked(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Error> {
        let deadline = Instant::now() + self.limit;
        let timer = self.timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if !self.armed {
            timer.as_mut().reset(deadline);
            self.armed = true;
        }
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready({
                if let Some(stalls) = self.stalls.take() {
                    stalls.inc();
                }
                std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("the client accepted no bytes for {:?}", self.limit),
                )
            }),
            Poll::Pending => Poll::Pending,
        }
    }

    fn wrote<T>(
        &mut self,
        result: Poll<std::io::Result<T>>,
        cx: &mut Context<'_>,
    ) -> Poll<std::io::Result<T>> {
        match result {
            Poll::Ready(result) => {
                self.armed = false;
                Poll::Ready(result)
            }
            Poll::Pending => self.blocked(cx).map(Err),
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for StallLimited<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for StallLimited<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        let result = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.wrote(result, cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        let result = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.wrote(result, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        let result = Pin::new(&mut this.inner).poll_flush(cx);
        this.wrote(result, cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    // Paused time: the timers advance only when every task waits, so the 60 ms reader
    // and the 100 ms limit are compared exactly, however loaded the machine is.
    #[tokio::test(start_paused = true)]
    async fn a_reader_that_stops_fails_the_writer_and_a_slow_one_does_not() {
        // A small pipe: the writer blocks once 64 bytes are unread.
        let (writer, _reader) = tokio::io::duplex(64);
        let mut limited = StallLimited::new(writer, Duration::from_millis(100));
        let started = Instant::now();
        let error = loop {
            if let Err(e) = limited.write_all(&[7u8; 32]).await {
                break e;
            }
        };
        assert_eq!(error.kind(), std::io::ErrorKind::TimedOut);
        assert!(started.elapsed() >= Duration::from_millis(100));

        // A reader taking 32 bytes every 60 ms: each stall is shorter than the limit.
        let (writer, mut slow) = tokio::io::duplex(64);
        let mut limited = StallLimited::new(writer, Duration::from_millis(100));
        let reading = tokio::spawn(async move {
            let mut buf = [0u8; 32];
            for _ in 0..20 {
                tokio::time::sleep(Duration::from_millis(60)).await;
                slow.read_exact(&mut buf).await.unwrap();
            }
        });
        for _ in 0..20 {
            limited.write_all(&[1u8; 32]).await.expect("a slow reader is not cut");
        }
        reading.await.unwrap();
    }
}
