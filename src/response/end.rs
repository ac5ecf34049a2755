//! The end of a response body, for the layers that report on a whole request (the
//! access log, the request's trace span): a wrapper that passes frames through and
//! calls back once, when the body is dropped, with how many body bytes went out and
//! whether the body reached its end or the client left first. And [`holding`]: a body
//! that keeps something alive (a concurrency slot, a connection's in-flight mark) until
//! it ends or is dropped.

use std::pin::Pin;
use std::task::{Context, Poll};

use axum::body::Body;
use bytes::Bytes;
use http_body::{Frame, SizeHint};

/// How a response body ended.
#[derive(Debug, Clone, Copy)]
pub struct Ending {
    /// The body reached its end (false: dropped before, the client gone).
    pub complete: bool,
    /// Body bytes passed on.
    pub bytes: u64,
}

/// `body`, calling `on_end` once when it is dropped.
pub fn watch<F>(body: Body, on_end: F) -> Body
where
    F: FnOnce(Ending) + Send + Unpin + 'static,
{
    Body::new(Watched { inner: body, bytes: 0, ended: false, on_end: Some(on_end) })
}

struct Watched<F: FnOnce(Ending)> {
    inner: Body,
    bytes: u64,
    ended: bool,
    on_end: Option<F>,
}

impl<F: FnOnce(Ending) + Unpin> http_body::Body for Watched<F> {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => self.bytes += frame.data_ref().map_or(0, |d| d.len() as u64),
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

impl<F: FnOnce(Ending)> Drop for Watched<F> {
    fn drop(&mut self) {
        if let Some(on_end) = self.on_end.take() {
            let complete = self.ended || http_body::Body::is_end_stream(&self.inner);
            on_end(Ending { complete, bytes: self.bytes });
        }
    }
}

/// `body`, keeping `guard` alive until the body ends or is dropped.
pub fn holding<G: Send + Unpin + 'static>(body: Body, guard: G) -> Body {
    Body::new(Holding { inner: body, _guard: guard })
}

struct Holding<G> {
    inner: Body,
    _guard: G,
}

impl<G: Unpin> http_body::Body for Holding<G> {
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
    use http_body_util::BodyExt;
    use std::sync::{Arc, Mutex};

    #[tokio::test]
    async fn reports_complete_bodies_and_abandoned_ones() {
        let seen: Arc<Mutex<Vec<(bool, u64)>>> = Arc::default();
        let record = |seen: &Arc<Mutex<Vec<(bool, u64)>>>| {
            let seen = seen.clone();
            move |e: Ending| seen.lock().unwrap().push((e.complete, e.bytes))
        };
        let body = watch(Body::from("hello"), record(&seen));
        assert_eq!(body.collect().await.unwrap().to_bytes(), "hello");
        let chunks = futures_lite_stream(vec!["ab", "cd"]);
        let mut body = watch(Body::from_stream(chunks), record(&seen));
        let first = body.frame().await.unwrap().unwrap();
        assert_eq!(first.data_ref().unwrap().as_ref(), b"ab");
        drop(body);
        assert_eq!(*seen.lock().unwrap(), [(true, 5), (false, 2)]);
    }

    fn futures_lite_stream(
        chunks: Vec<&'static str>,
    ) -> impl tokio_stream::Stream<Item = Result<Bytes, std::io::Error>> {
        tokio_stream::iter(chunks.into_iter().map(|c| Ok(Bytes::from_static(c.as_bytes()))))
    }
}
