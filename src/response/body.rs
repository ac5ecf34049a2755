//! The response body as it streams from a replica to the client, with the bookkeeping
//! that must last exactly as long as the stream.
//!
//! Frames pass through as they arrive: no buffering, no re-encoding of SSE events. The
//! wrapper holds the request's [`InFlight`] guard (so load-aware policies see the request
//! until its last byte), observes time to first event and total duration, and tells a
//! finished stream from one the client abandoned. Dropping it mid-stream drops the
//! upstream body, which closes the upstream connection: that is how a client disconnect
//! reaches the replica and vLLM aborts the request.
//!
//! When the upstream fails mid-stream (the connection breaks, its framing breaks, or no
//! byte arrives for the idle timeout), an SSE client gets what was already produced,
//! then an error event in vLLM's shape and `data: [DONE]`, so it neither hangs nor
//! mistakes a cut stream for a finished one. The replica is ejected until its health
//! checks pass again, within the ejection ceiling ([`Registry::eject`]). A body whose
//! first byte does not come within the first-byte limit ends the same way, without an
//! ejection: an engine that queues a request is busy, not broken. A non-SSE body can
//! only be cut, which the client sees as an error.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::Sleep;

use crate::metrics::Metrics;
use crate::replicas::{InFlight, Registry};
use crate::upstream::relay::RelayBody;

/// P/D phase histograms observed by the response body: time to its first byte from
/// `since`, and the request's total time at its end.
#[derive(Clone)]
pub struct PhaseTimers {
    pub first_token: prometheus::Histogram,
    pub total: prometheus::Histogram,
    pub since: Instant,
}

pub struct MeteredBody {
    /// None once the upstream has been given up on (dropping it closes the connection).
    inner: Option<RelayBody>,
    in_flight: InFlight,
    /// The replica's registry, to eject it if its stream fails.
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    endpoint: &'static str,
    started: Instant,
    /// Observe time to first event (streaming requests only).
    stream: bool,
    /// The response is an SSE stream: failures end it with an error event.
    sse: bool,
    /// Failures end the body with an error naming them, for the caller to continue.
    continuable: bool,
    idle_timeout: Option<Duration>,
    first_byte_timeout: Option<Duration>,
    idle: Option<Pin<Box<Sleep>>>,
    ended_by_router: Option<EndedByRouter>,
    /// When the last frame arrived. The idle timer is not touched per frame: when it
    /// fires early it is re-armed from here, so a busy stream costs a clock read per
    /// frame, not a timer update.
    last_frame: Instant,
    /// Frames to send after a failure: the error event and `[DONE]`.
    tail: VecDeque<Bytes>,
    seen_data: bool,
    ended: bool,
    failed: bool,
    phase: Option<PhaseTimers>,
}

/// Why a body was given up on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    /// The connection broke, or the framing did.
    MidBody,
    /// Silence after the first byte: the replica's fault.
    IdleTimeout,
    /// No first byte: the replica is busy (vLLM queues after sending headers), not
    /// broken, so it is not ejected.
    FirstByteTimeout,
}

impl Failure {
    /// The `kind` label of `router_upstream_errors_total`.
    fn kind(self) -> &'static str {
        match self {
            Failure::MidBody => "mid_body",
            Failure::IdleTimeout => "idle_timeout",
            Failure::FirstByteTimeout => "first_byte_timeout",
        }
    }
}

/// How the metered body should behave.
pub struct BodyOptions {
    pub endpoint: &'static str,
    pub started: Instant,
    pub stream: bool,
    pub sse: bool,
    pub idle_timeout: Option<Duration>,
    pub first_byte_timeout: Option<Duration>,
    pub phase: Option<PhaseTimers>,
    /// A failure after the headers ends the body with an error (for the caller to
    /// continue the stream elsewhere) instead of an SSE error event.
    pub continuable: bool,
    /// Set by whoever reads the body when it stops reading on purpose (generate mode: a
    /// stop string ended generation), so that dropping the body early is not counted as
    /// a client that went away. Also in the response's extensions.
    pub ended_by_router: Option<EndedByRouter>,
}

/// See [`BodyOptions::ended_by_router`].
#[derive(Debug, Clone, Default)]
pub struct EndedByRouter(pub Arc<std::sync::atomic::AtomicBool>);

impl EndedByRouter {
    pub fn set(&self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn is_set(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl MeteredBody {
    pub fn new(
        inner: RelayBody,
        in_flight: InFlight,
        registry: Arc<Registry>,
        metrics: Arc<Metrics>,
        options: BodyOptions,
    ) -> Self {
        let first_limit = options.first_byte_timeout.or(options.idle_timeout);
        MeteredBody {
            inner: Some(inner),
            in_flight,
            registry,
            metrics,
            endpoint: options.endpoint,
            started: options.started,
            stream: options.stream,
            sse: options.sse && !options.continuable,
            continuable: options.continuable,
            idle: first_limit.map(|t| Box::pin(tokio::time::sleep(t))),
            idle_timeout: options.idle_timeout,
            first_byte_timeout: options.first_byte_timeout,
            last_frame: Instant::now(),
            tail: VecDeque::new(),
            seen_data: false,
            ended: false,
            failed: false,
            phase: options.phase,
            ended_by_router: options.ended_by_router,
        }
    }

    /// Give up on the upstream: count it, eject the replica (if the failure is its
    /// fault), close the connection, and queue the error event for an SSE client.
    fn fail(&mut self, failure: Failure, message: String) {
        self.failed = true;
        self.inner = None;
        let replica = self.in_flight.replica();
        let kind = failure.kind();
        self.metrics.upstream_errors.with_label_values(&[replica.name(), kind]).inc();
        if failure != Failure::FirstByteTimeout {
            self.registry.eject(replica, kind);
        }
        if self.sse {
            let error = serde_json::json!({"error": {"message": message, "type": "BadGatewayError",
                "param": null, "code": 502}});
            self.tail.push_back(Bytes::from(format!("data: {error}\n\n")));
            self.tail.push_back(Bytes::from_static(b"data: [DONE]\n\n"));
        }
    }

    fn observe_first_data(&mut self) {
        self.seen_data = true;
        // From here on silence is judged by the idle limit, not the first-byte one.
        if let (Some(timer), Some(limit)) = (self.idle.as_mut(), self.idle_timeout) {
            timer.as_mut().reset((Instant::now() + limit).into());
        }
        if self.stream {
            let elapsed = self.started.elapsed().as_secs_f64();
            self.metrics.first_event.with_label_values(&[self.endpoint]).observe(elapsed);
        }
        if let Some(phase) = &self.phase {
            phase.first_token.observe(phase.since.elapsed().as_secs_f64());
        }
    }
}

impl Body for MeteredBody {
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        if let Some(bytes) = this.tail.pop_front() {
            return Poll::Ready(Some(Ok(Frame::data(bytes))));
        }
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        match Pin::new(inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if this.idle.is_some() {
                    this.last_frame = Instant::now();
                }
                if !this.seen_data && frame.data_ref().is_some_and(|d| !d.is_empty()) {
                    this.observe_first_data();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(error))) => {
                tracing::debug!(replica = this.in_flight.replica().name(), %error, "upstream body failed mid-stream");
                let message = "the replica failed mid-stream".to_owned();
                this.fail(Failure::MidBody, message.clone());
                match this.tail.pop_front() {
                    Some(bytes) => Poll::Ready(Some(Ok(Frame::data(bytes)))),
                    // The caller continues the stream elsewhere, or ends it with this.
                    None if this.continuable => Poll::Ready(Some(Err(message.into()))),
                    // Not SSE: cut the body with an error, never end it cleanly short.
                    None => Poll::Ready(Some(Err(error.into()))),
                }
            }
            Poll::Ready(None) => {
                this.ended = true;
                Poll::Ready(None)
            }
            Poll::Pending => {
                let limit = if this.seen_data { this.idle_timeout } else { this.first_byte_timeout };
                let (Some(idle), Some(timeout)) = (this.idle.as_mut(), limit.or(this.idle_timeout)) else {
                    return Poll::Pending;
                };
                loop {
                    if idle.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                    let deadline = this.last_frame + timeout;
                    if Instant::now() >= deadline {
                        break;
                    }
                    // Frames came since the timer was armed: wait out the rest from the last one.
                    idle.as_mut().reset(deadline.into());
                }
                let failure = if this.seen_data { Failure::IdleTimeout } else { Failure::FirstByteTimeout };
                let message = format!("the replica sent nothing for {timeout:?}");
                this.fail(failure, message.clone());
                match this.tail.pop_front() {
                    Some(bytes) => Poll::Ready(Some(Ok(Frame::data(bytes)))),
                    None if this.continuable => Poll::Ready(Some(Err(message.into()))),
                    // Not SSE: cut the body with an error, never end it cleanly short.
                    None => Poll::Ready(Some(Err(format!("upstream idle for {timeout:?}").into()))),
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.tail.is_empty() && self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Some(inner) if self.tail.is_empty() => inner.size_hint(),
            _ => SizeHint::default(),
        }
    }
}

impl Drop for MeteredBody {
    fn drop(&mut self) {
        if let Some(phase) = &self.phase {
            phase.total.observe(self.started.elapsed().as_secs_f64());
        }
        self.metrics
            .duration
            .with_label_values(&[self.endpoint])
            .observe(self.started.elapsed().as_secs_f64());
        let finished = self.ended
            || self.inner.as_ref().is_some_and(Body::is_end_stream)
            || self.ended_by_router.as_ref().is_some_and(EndedByRouter::is_set);
        if !finished && !self.failed {
            self.metrics.client_disconnects.with_label_values(&[self.endpoint, "streaming"]).inc();
        }
    }
}
