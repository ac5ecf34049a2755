//! A response body re-framed event by event, for the two places the router rewrites a
//! stream (a P/D decode of token ids answered as chat, and `--engine-api generate`'s
//! token ids answered as OpenAI text): the upstream's frames are cut into whole SSE
//! events (a blank line ends each; an event may arrive in any number of frames) and each
//! is handed to an [`EventMap`], whose output goes to the client. An event may not grow
//! past the map's bound before its end arrives: a replica that never ends one cannot make
//! the router hold its stream. The map may stop reading: the upstream body is dropped
//! then, which closes its connection (the engine aborts the request). When the upstream
//! breaks (fails, or ends before the map is done), the map may go on reading from another
//! one ([`EventMap::broken`]: generate mode continues on another replica).

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};

use axum::body::Body;
use bytes::Bytes;

use super::body::EndedByRouter;

/// Another upstream's stream of the rest, once one answered.
pub struct Resumed {
    pub body: Body,
    pub replica: String,
    /// Set when the reader stops on purpose.
    pub ended_by_router: Option<EndedByRouter>,
}

/// Another upstream being asked for the rest: its stream, or `None` if none could be had.
pub type Resuming = std::pin::Pin<Box<dyn std::future::Future<Output = Option<Resumed>> + Send>>;
use http_body::{Body as HttpBody, Frame};
use llm_common::sse::SseEvents;

/// What to do with each event of a stream.
pub trait EventMap: Send + Unpin + 'static {
    /// Largest event read.
    const MAX_EVENT_BYTES: usize;

    /// One whole event, its terminator included (or, once the upstream has ended, what
    /// was left without one); what the client gets goes on `out`. `false` stops reading:
    /// the upstream is dropped.
    fn event(&mut self, event: Bytes, out: &mut VecDeque<Bytes>) -> bool;

    /// The upstream failed (`Some(why)`) or ended (`None`) while the map was still
    /// reading: another upstream to read the rest from, or `None` to end (what the client
    /// is to get then goes on `out`; a failure with nothing on `out` ends the body with
    /// the error). By default a stream ends as its upstream does.
    fn broken(&mut self, _why: Option<&str>, _out: &mut VecDeque<Bytes>) -> Option<Resuming> {
        None
    }

    /// The rest comes from `resumed` now; `None`: it could not be had (what the client
    /// is to get goes on `out`).
    fn resumed(&mut self, _resumed: Option<&mut Resumed>, _out: &mut VecDeque<Bytes>) {}
}

pub struct SseMap<M> {
    /// `None` once the map stopped reading.
    inner: Option<Body>,
    /// Another upstream being asked for the rest.
    resuming: Option<Resuming>,
    events: SseEvents,
    ready: VecDeque<Bytes>,
    map: M,
    ended: bool,
}

impl<M: EventMap> SseMap<M> {
    pub fn new(inner: Body, map: M) -> Self {
        SseMap {
            inner: Some(inner),
            resuming: None,
            events: SseEvents::new(),
            ready: VecDeque::new(),
            map,
            ended: false,
        }
    }

    fn take(&mut self, event: Bytes) {
        if !self.map.event(event, &mut self.ready) {
            self.inner = None;
        }
    }

    /// The upstream broke: resume elsewhere, or end.
    fn broken(&mut self, why: Option<&str>) {
        self.inner = None;
        match self.map.broken(why, &mut self.ready) {
            Some(resuming) => self.resuming = Some(resuming),
            None => self.ended = true,
        }
    }
}

impl<M: EventMap> HttpBody for SseMap<M> {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        loop {
            if let Some(bytes) = this.ready.pop_front() {
                return Poll::Ready(Some(Ok(Frame::data(bytes))));
            }
            if this.ended {
                return Poll::Ready(None);
            }
            if let Some(resuming) = this.resuming.as_mut() {
                let mut resumed = std::task::ready!(resuming.as_mut().poll(cx));
                this.resuming = None;
                this.map.resumed(resumed.as_mut(), &mut this.ready);
                match resumed {
                    Some(resumed) => {
                        // A half event of the broken stream is not part of the new one.
                        this.events = SseEvents::new();
                        this.inner = Some(resumed.body);
                    }
                    None => this.ended = true,
                }
                continue;
            }
            let Some(inner) = this.inner.as_mut() else {
                this.ended = true;
                continue;
            };
            match Pin::new(inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Err(e))) => {
                    this.broken(Some(&e.to_string()));
                    if this.ended && this.ready.is_empty() {
                        return Poll::Ready(Some(Err(e)));
                    }
                }
                Poll::Ready(Some(Ok(frame))) => {
                    let Ok(data) = frame.into_data() else { continue };
                    this.events.push(&data);
                    while this.inner.is_some()
                        && let Some(event) = this.events.next_event()
                    {
                        this.take(event);
                    }
                    if this.events.buffered() > M::MAX_EVENT_BYTES {
                        this.ended = true;
                        this.inner = None;
                        let message =
                            format!("an event from the replica exceeded {} bytes", M::MAX_EVENT_BYTES);
                        return Poll::Ready(Some(Err(axum::Error::new(message))));
                    }
                }
                Poll::Ready(None) => {
                    if let Some(rest) = this.events.take_rest() {
                        this.take(rest);
                    }
                    if this.inner.is_some() {
                        this.broken(None);
                    } else {
                        this.ended = true;
                    }
                }
            }
        }
    }
}
