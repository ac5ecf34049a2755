//! HTTP/2 streams held to what an HTTP/1.1 connection is held to, and a connection that
//! resets its own streams en masse cut off.
//!
//! **A stream the client does not read.** Over HTTP/1.1 a client that stops reading
//! blocks the socket, and [`super::client_io`] sees the blocked write. Over HTTP/2 the
//! client closes its flow-control window instead (the stream's or the connection's) and
//! keeps answering pings: the socket stays writable, hyper simply stops asking the
//! response body for more, and nothing on the request path runs again: the stream would
//! hold its concurrency slot, its upstream request and the engine's work for as long as
//! the connection lives. So each stream's task is watched from outside ([`StreamExecutor`],
//! the executor hyper spawns streams on): the response body ([`watched_body`]) notes when
//! it handed hyper a frame and when hyper came back for the next; a stream whose body has
//! waited for hyper's next poll longer than `--client-idle-timeout` is dropped, which
//! resets it (RST_STREAM CANCEL) and frees everything it held. A body waiting for its
//! replica is not waiting for the client: the stream idle timeout covers that.
//!
//! **Rapid reset.** A client can open a stream and reset it at once, thousands of times
//! a second, each costing a parse and a routing decision (CVE-2023-44487). A stream reset
//! before its response ended, within [`PREMATURE`] of its start, is premature; once a
//! connection has had [`MAX_PREMATURE_RESETS`] of them and they are more than half of
//! its streams, the connection gets GOAWAY and is closed (Envoy's premature-reset limit,
//! HAProxy's glitch counter). A stream reset before it is dispatched is never dispatched:
//! the ingress yields once before it sends a request upstream, which lets hyper see the
//! reset and drop the request first.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use http_body::{Frame, SizeHint};
use prometheus::IntCounter;
use tokio::sync::Notify;
use tokio::time::{Instant, Sleep};

/// A stream reset sooner than this after it opened, before its response ended, is
/// premature.
pub const PREMATURE: Duration = Duration::from_secs(1);
/// Premature resets a connection may have before it is judged (and then only if they
/// are more than half of its streams).
pub const MAX_PREMATURE_RESETS: u32 = 100;

tokio::task_local! {
    /// The connection a task serves (set around each client connection's task).
    static CONNECTION: Arc<ConnectionStreams>;
    /// The stream a task serves (set around each HTTP/2 stream's task).
    static STREAM: Arc<StreamWatch>;
}

/// One client connection's streams: how many, how many were reset prematurely, and the
/// signal that the connection must go.
#[derive(Default)]
pub struct ConnectionStreams {
    streams: AtomicU32,
    premature: AtomicU32,
    abusive: AtomicBool,
    notify: Notify,
}

impl ConnectionStreams {
    pub fn new() -> Arc<Self> {
        Arc::new(ConnectionStreams::default())
    }

    /// Run `serve` (the connection's task) as this connection.
    pub fn scope<F: Future>(self: Arc<Self>, serve: F) -> impl Future<Output = F::Output> {
        CONNECTION.scope(self, serve)
    }

    /// Resolves once the connection has reset too many streams prematurely.
    pub async fn abusive(&self) {
        loop {
            let notified = self.notify.notified();
            if self.abusive.load(Ordering::Acquire) {
                return;
            }
            notified.await;
        }
    }

    fn premature_reset(&self) {
        let premature = self.premature.fetch_add(1, Ordering::AcqRel) + 1;
        let streams = self.streams.load(Ordering::Acquire);
        if premature >= MAX_PREMATURE_RESETS
            && premature * 2 > streams
            && !self.abusive.swap(true, Ordering::AcqRel)
        {
            self.notify.notify_waiters();
        }
    }
}

/// What the stream watch counts.
#[derive(Clone)]
pub struct StreamCounters {
    /// `router_client_stalls_total{protocol="h2"}`.
    pub stalls: IntCounter,
    /// `router_client_premature_resets_total`.
    pub premature_resets: IntCounter,
}

/// One stream: when it started, whether its body waits for hyper, whether it ended.
struct StreamWatch {
    started: Instant,
    /// Milliseconds after `started` since which the body has waited for hyper to poll it
    /// again; [`NOT_WAITING`] while hyper is not expected to (the body waits for its
    /// replica, or there is no body yet).
    waiting_since_ms: AtomicU64,
    /// The response body reached its end.
    complete: AtomicBool,
}

const NOT_WAITING: u64 = u64::MAX;

impl StreamWatch {
    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }
}

/// The executor hyper spawns HTTP/2 streams on: each stream's task is watched for a
/// client that takes none of its data, and counted when it is reset prematurely.
#[derive(Clone)]
pub struct StreamExecutor {
    /// `--client-idle-timeout`.
    pub limit: Duration,
    pub counters: StreamCounters,
}

impl<F> hyper::rt::Executor<F> for StreamExecutor
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, stream: F) {
        let connection = CONNECTION.try_with(Arc::clone).ok();
        if let Some(connection) = &connection {
            connection.streams.fetch_add(1, Ordering::AcqRel);
        }
        let watch = Arc::new(StreamWatch {
            started: Instant::now(),
            waiting_since_ms: AtomicU64::new(NOT_WAITING),
            complete: AtomicBool::new(false),
        });
        tokio::spawn(Watched {
            inner: Box::pin(STREAM.scope(watch.clone(), stream)),
            watch,
            connection,
            limit: self.limit,
            counters: self.counters.clone(),
            timer: None,
            cut: false,
        });
    }
}

/// A stream's task, cut when its body waits for the client too long.
struct Watched<F> {
    inner: Pin<Box<F>>,
    watch: Arc<StreamWatch>,
    connection: Option<Arc<ConnectionStreams>>,
    limit: Duration,
    counters: StreamCounters,
    timer: Option<Pin<Box<Sleep>>>,
    /// Dropped for a stall (not a reset by the client).
    cut: bool,
}

impl<F: Future> Future for Watched<F> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        if this.inner.as_mut().poll(cx).is_ready() {
            return Poll::Ready(());
        }
        loop {
            let since = this.watch.waiting_since_ms.load(Ordering::Acquire);
            if since == NOT_WAITING {
                return Poll::Pending;
            }
            let deadline = this.watch.started + Duration::from_millis(since) + this.limit;
            if Instant::now() >= deadline {
                tracing::debug!(limit = ?this.limit, "HTTP/2 stream reset: the client accepted none of its data");
                this.counters.stalls.inc();
                this.cut = true;
                return Poll::Ready(());
            }
            let timer = this.timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
            if timer.deadline() != deadline {
                timer.as_mut().reset(deadline);
            }
            if timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
        }
    }
}

impl<F> Drop for Watched<F> {
    fn drop(&mut self) {
        let complete = self.watch.complete.load(Ordering::Acquire);
        // Ended before its response did, soon after it began, and not by the router.
        if !complete && !self.cut && self.watch.started.elapsed() < PREMATURE {
            self.counters.premature_resets.inc();
            if let Some(connection) = &self.connection {
                connection.premature_reset();
            }
        }
    }
}

/// Whether the current task serves an HTTP/2 stream.
pub fn in_stream() -> bool {
    STREAM.try_with(|_| ()).is_ok()
}

/// `body` as the response of the HTTP/2 stream this task serves (as it is, outside one),
/// keeping `guard` until it ends: its waits for the client are noted for the stall limit.
pub fn watched_body<G: Send + Unpin + 'static>(body: Body, guard: G) -> Body {
    match STREAM.try_with(Arc::clone) {
        Ok(watch) => {
            // hyper polls a new response body at once, unless the client has no window.
            watch.waiting_since_ms.store(watch.now_ms(), Ordering::Release);
            Body::new(StreamBody { inner: body, rest: Bytes::new(), watch, _guard: guard })
        }
        Err(_) => crate::response::end::holding(body, guard),
    }
}

/// Largest frame handed to hyper at once: the client has `--client-idle-timeout` to
/// take each, so a long body read slowly but steadily is never cut.
const MAX_SLICE: usize = 16 * 1024;

struct StreamBody<G> {
    inner: Body,
    /// What is left of a frame larger than [`MAX_SLICE`].
    rest: Bytes,
    watch: Arc<StreamWatch>,
    _guard: G,
}

impl<G> StreamBody<G> {
    /// The next slice of `data` (the rest kept for the next poll).
    fn slice(&mut self, mut data: Bytes) -> Bytes {
        if data.len() > MAX_SLICE {
            self.rest = data.split_off(MAX_SLICE);
        }
        data
    }
}

impl<G: Unpin> http_body::Body for StreamBody<G> {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let polled = if self.rest.is_empty() {
            match Pin::new(&mut self.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => Poll::Ready(Some(Ok(Frame::data(self.slice(data))))),
                    Err(frame) => Poll::Ready(Some(Ok(frame))),
                },
                other => other,
            }
        } else {
            let rest = std::mem::take(&mut self.rest);
            Poll::Ready(Some(Ok(Frame::data(self.slice(rest)))))
        };
        let watch = &self.watch;
        match &polled {
            // A frame for hyper: it comes back for the next once the client takes it.
            Poll::Ready(Some(Ok(_))) => watch.waiting_since_ms.store(watch.now_ms(), Ordering::Release),
            Poll::Ready(None) => {
                watch.complete.store(true, Ordering::Release);
                watch.waiting_since_ms.store(NOT_WAITING, Ordering::Release);
            }
            // Waiting for the replica (or failed): not the client's doing.
            _ => watch.waiting_since_ms.store(NOT_WAITING, Ordering::Release),
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        let end = self.rest.is_empty() && self.inner.is_end_stream();
        if end {
            self.watch.complete.store(true, Ordering::Release);
        }
        end
    }

    fn size_hint(&self) -> SizeHint {
        let mut hint = self.inner.size_hint();
        let rest = self.rest.len() as u64;
        if let Some(upper) = hint.upper() {
            hint.set_upper(upper + rest);
        }
        hint.set_lower(hint.lower() + rest);
        hint
    }
}
