//! The response body as it streams from a replica to the client, with the bookkeeping
//! that must last exactly as long as the stream.
//!
//! Frames pass through as they arrive: no buffering, no re-encoding of SSE events. The
//! wrapper holds the request's [`InFlight`] guard (so load-aware policies see the request
//! until its last byte), observes time to first event and total duration, and tells a
//! finished stream from one the client abandoned. Dropping it mid-stream drops the
//! upstream body, which closes the upstream connection: that is how a client disconnect
//! reaches the replica and vLLM aborts the request.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use crate::dispatch::PhaseTimers;
use crate::metrics::Metrics;
use crate::replicas::InFlight;

pub struct MeteredBody {
    inner: Incoming,
    in_flight: InFlight,
    metrics: Arc<Metrics>,
    endpoint: &'static str,
    started: Instant,
    /// Observe time to first event (streaming requests only).
    stream: bool,
    seen_data: bool,
    ended: bool,
    failed: bool,
    phase: Option<PhaseTimers>,
}

impl MeteredBody {
    pub fn new(
        inner: Incoming,
        in_flight: InFlight,
        metrics: Arc<Metrics>,
        endpoint: &'static str,
        started: Instant,
        stream: bool,
        phase: Option<PhaseTimers>,
    ) -> Self {
        MeteredBody {
            inner,
            in_flight,
            metrics,
            endpoint,
            started,
            stream,
            seen_data: false,
            ended: false,
            failed: false,
            phase,
        }
    }
}

impl Body for MeteredBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if !this.seen_data && frame.data_ref().is_some_and(|d| !d.is_empty()) {
                    this.seen_data = true;
                    if let Some(phase) = &this.phase {
                        phase.first_token.observe(phase.since.elapsed().as_secs_f64());
                    }
                    if this.stream {
                        this.metrics
                            .first_event
                            .with_label_values(&[this.endpoint])
                            .observe(this.started.elapsed().as_secs_f64());
                    }
                }
            }
            Poll::Ready(Some(Err(error))) => {
                this.failed = true;
                let replica = this.in_flight.replica().name();
                tracing::debug!(replica, %error, "upstream body failed mid-stream");
                this.metrics.upstream_errors.with_label_values(&[replica, "mid_body"]).inc();
            }
            Poll::Ready(None) => this.ended = true,
            Poll::Pending => {}
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

impl Drop for MeteredBody {
    fn drop(&mut self) {
        if let Some(phase) = &self.phase {
            phase.total.observe(self.started.elapsed().as_secs_f64());
        }
        self.metrics
            .duration
            .with_label_values(&[self.endpoint])
            .observe(self.started.elapsed().as_secs_f64());
        let finished = self.ended || self.inner.is_end_stream();
        if !finished && !self.failed {
            self.metrics.client_disconnects.with_label_values(&[self.endpoint, "streaming"]).inc();
        }
    }
}
