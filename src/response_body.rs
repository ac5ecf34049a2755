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
//! When the upstream fails mid-stream (the connection breaks, or no byte arrives for
//! the idle timeout), an SSE client gets what was already produced, then an error event
//! in vLLM's shape and `data: [DONE]`, so it neither hangs nor mistakes a cut stream for
//! a finished one. The replica is taken out of rotation until its health checks pass
//! again. A non-SSE body can only be cut, which the client sees as an error.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::Sleep;

use crate::dispatch::PhaseTimers;
use crate::metrics::Metrics;
use crate::relay::RelayBody;
use crate::replicas::InFlight;

pub struct MeteredBody {
    /// None once the upstream has been given up on (dropping it closes the connection).
    inner: Option<RelayBody>,
    in_flight: InFlight,
    metrics: Arc<Metrics>,
    endpoint: &'static str,
    started: Instant,
    /// Observe time to first event (streaming requests only).
    stream: bool,
    /// The response is an SSE stream: failures end it with an error event.
    sse: bool,
    idle_timeout: Option<Duration>,
    idle: Option<Pin<Box<Sleep>>>,
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

/// How the metered body should behave.
pub struct BodyOptions {
    pub endpoint: &'static str,
    pub started: Instant,
    pub stream: bool,
    pub sse: bool,
    pub idle_timeout: Option<Duration>,
    pub phase: Option<PhaseTimers>,
}

impl MeteredBody {
    pub fn new(inner: RelayBody, in_flight: InFlight, metrics: Arc<Metrics>, options: BodyOptions) -> Self {
        MeteredBody {
            inner: Some(inner),
            in_flight,
            metrics,
            endpoint: options.endpoint,
            started: options.started,
            stream: options.stream,
            sse: options.sse,
            idle: options.idle_timeout.map(|t| Box::pin(tokio::time::sleep(t))),
            idle_timeout: options.idle_timeout,
            last_frame: Instant::now(),
            tail: VecDeque::new(),
            seen_data: false,
            ended: false,
            failed: false,
            phase: options.phase,
        }
    }

    /// Give up on the upstream: count it, take the replica out of rotation, close the
    /// connection, and queue the error event for an SSE client.
    fn fail(&mut self, kind: &'static str, message: String) {
        self.failed = true;
        self.inner = None;
        let replica = self.in_flight.replica();
        self.metrics.upstream_errors.with_label_values(&[replica.name(), kind]).inc();
        if replica.take_out_of_rotation() {
            tracing::warn!(replica = replica.name(), kind, "replica failed mid-stream: out of rotation");
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
                if !this.sse {
                    this.failed = true;
                    let replica = this.in_flight.replica();
                    this.metrics.upstream_errors.with_label_values(&[replica.name(), "mid_body"]).inc();
                    replica.take_out_of_rotation();
                    return Poll::Ready(Some(Err(error.into())));
                }
                this.fail("mid_body", format!("the replica failed mid-stream: {error}"));
                Poll::Ready(this.tail.pop_front().map(|b| Ok(Frame::data(b))))
            }
            Poll::Ready(None) => {
                this.ended = true;
                Poll::Ready(None)
            }
            Poll::Pending => {
                let (Some(idle), Some(timeout)) = (this.idle.as_mut(), this.idle_timeout) else {
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
                this.fail("idle_timeout", format!("the replica sent nothing for {timeout:?}"));
                match this.tail.pop_front() {
                    Some(bytes) => Poll::Ready(Some(Ok(Frame::data(bytes)))),
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
        let finished = self.ended || self.inner.as_ref().is_some_and(Body::is_end_stream);
        if !finished && !self.failed {
            self.metrics.client_disconnects.with_label_values(&[self.endpoint, "streaming"]).inc();
        }
    }
}
