//! A streamed answer that survives its replica: when the stream breaks after it has
//! started (the connection lost, the replica killed, the stream idle too long), the rest
//! of the request goes to another replica and its events are spliced into the client's
//! stream ([`super::continuation`] says what is asked and how the events are rewritten).
//!
//! While the first replica streams, its bytes pass through as they came, one frame at a
//! time: only a frame that ends inside an event is held back until the event is whole,
//! so that a replica failing mid-event leaves no half event at the client. Each whole
//! event is copied aside (up to [`MAX_UNREAD`] bytes) and read into the [`Ledger`] of
//! what the client has only when the stream breaks: a stream that ends well is never
//! parsed. Two events are read at once, because they must be held back from the
//! client: the engine's error event and a `finish_reason` of `abort` (a byte search for
//! `"error"` and `"abort"` finds them; an event that merely contains the words is read
//! too, and passes). The continuation's events are rewritten (its `id`, `created` and
//! usage), which costs a parse and a serialisation per event on that path only.
//!
//! When the request cannot be continued faithfully, the attempts are spent, the retry
//! budget says no, or the continuation itself fails, the stream ends as it would
//! without this: an SSE error event and `[DONE]`.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use axum::body::Body;
use bytes::{Bytes, BytesMut};
use http::StatusCode;
use http_body::Frame;
use serde_json::Value;

use super::continuation::{Ledger, Splice, continuation_request, rewrite_event, tokenize_request};
use crate::dispatch::{Dispatcher, Route, Served};
use crate::error::RouterError;
use crate::ingress::routing_key::RoutingKey;
use crate::metrics::Metrics;
use crate::upstream::proxy::Outbound;

/// An SSE event larger than this is not held back: the stream passes through unread
/// from there on, and is no longer continued.
const MAX_HELD_EVENT: usize = 1 << 20;

/// Most bytes of events kept unread; beyond it they are read into the ledger (which
/// keeps only their text) and the buffer starts again.
const MAX_UNREAD: usize = 2 << 20;

static BLANK_LINE: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
    std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b"\n\n"));
static ERROR_KEY: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
    std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b"\"error\""));
static ABORT: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
    std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b"\"abort\""));

/// What a continuation needs of the request, owned by the client's stream.
pub struct Continuation {
    pub dispatcher: Arc<Dispatcher>,
    pub metrics: Arc<Metrics>,
    /// The request as the first replica got it.
    pub outbound: Outbound,
    pub endpoint: &'static str,
    pub chat: bool,
    pub model: Option<String>,
    pub key: Option<RoutingKey>,
    pub started: Instant,
    /// Continuations left for this request.
    pub attempts: u32,
}

/// The continuation's response, and the client's prompt in tokens as its replica counts it.
type Dispatching = Pin<Box<dyn Future<Output = (Result<Served, RouterError>, Option<u64>)> + Send>>;

/// Bounds on the `/tokenize` call that counts the client's prompt for the usage.
const TOKENIZE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
const TOKENIZE_MAX_BYTES: usize = 1 << 20;

pub struct ContinuedBody {
    inner: Body,
    /// The replica streaming now (a continuation avoids it).
    replica: String,
    /// The continuation's events are rewritten with this; the first stream's pass
    /// through.
    splice: Option<Splice>,
    /// The first bytes of an event not yet whole.
    held: BytesMut,
    /// An event outgrew [`MAX_HELD_EVENT`]: pass everything through unread.
    blind: bool,
    /// The engine sent an error event (this message): the rest of its stream is
    /// dropped, and the stream continued once it ends.
    discarding: Option<String>,
    ledger: Ledger,
    /// Events passed on but not yet read into the ledger, each with its blank line.
    unread: BytesMut,
    next: Continuation,
    dispatching: Option<Dispatching>,
    /// Why the stream being continued broke, for the error event if that fails too.
    broke: Option<String>,
    out: VecDeque<Bytes>,
    ended: bool,
}

impl ContinuedBody {
    pub fn new(inner: Body, replica: String, next: Continuation) -> Self {
        ContinuedBody {
            inner,
            replica,
            splice: None,
            held: BytesMut::new(),
            blind: false,
            discarding: None,
            ledger: Ledger::default(),
            unread: BytesMut::new(),
            next,
            dispatching: None,
            broke: None,
            out: VecDeque::new(),
            ended: false,
        }
    }

    fn count(&self, outcome: &str) {
        self.next.metrics.continuations.with_label_values(&[self.next.endpoint, outcome]).inc();
    }

    /// Bytes from the replica: whole events go out (as they came, or rewritten), the
    /// start of an unfinished one is held. An engine's error event is not passed on:
    /// the rest of that stream is discarded and, once it ends, continued elsewhere.
    fn take(&mut self, data: Bytes) {
        if self.blind {
            self.out.push_back(data);
            return;
        }
        if self.discarding.is_some() {
            return;
        }
        let whole = if self.held.is_empty() && data.ends_with(b"\n\n") {
            data
        } else {
            // What is held has no terminator: only the new bytes (and the one before them)
            // are scanned, so an event trickled in one-byte frames costs linear time.
            let from = self.held.len().saturating_sub(1);
            self.held.extend_from_slice(&data);
            match last_terminator(&self.held, from) {
                Some(end) => self.held.split_to(end + 2).freeze(),
                None => {
                    if self.held.len() > MAX_HELD_EVENT {
                        self.blind = true;
                        self.ledger.unfaithful = true;
                        self.out.push_back(self.held.split().freeze());
                    }
                    return;
                }
            }
        };
        let mut passed = 0;
        for event in events(&whole) {
            let rewritten = self.splice.as_ref().map(|splice| rewrite_event(event, splice));
            self.note(event);
            if let Some(error) = self.ledger.error.take() {
                self.discarding = Some(error);
                break;
            }
            passed = event.as_ptr() as usize - whole.as_ptr() as usize + event.len();
            match rewritten {
                None => {}
                Some(None) => {}
                Some(Some(bytes)) => {
                    let mut framed = BytesMut::with_capacity(bytes.len() + 2);
                    framed.extend_from_slice(&bytes);
                    framed.extend_from_slice(b"\n\n");
                    self.out.push_back(framed.freeze());
                }
            }
        }
        if self.splice.is_none() {
            // The first stream's bytes pass as they came, up to an error event.
            let end = if self.discarding.is_some() { (passed + 2).min(whole.len()) } else { whole.len() };
            if passed > 0 || self.discarding.is_none() {
                self.out.push_back(whole.slice(..end));
            }
        }
    }

    /// Keep `event` for the ledger: read it now if it must be acted on now (an error
    /// event, an abort) or a continuation is streaming, else later, if the stream breaks.
    fn note(&mut self, event: &[u8]) {
        if self.splice.is_some() || ERROR_KEY.find(event).is_some() || ABORT.find(event).is_some() {
            self.catch_up();
            self.ledger.observe(event);
            return;
        }
        if self.unread.len() + event.len() + 2 > MAX_UNREAD {
            self.catch_up();
        }
        self.unread.extend_from_slice(event);
        self.unread.extend_from_slice(b"\n\n");
    }

    /// Read every event kept unread into the ledger.
    fn catch_up(&mut self) {
        if self.unread.is_empty() {
            return;
        }
        let unread = self.unread.split();
        for event in events(&unread) {
            self.ledger.observe(event);
        }
    }

    /// The stream broke: continue it elsewhere, or end it with an error event.
    fn broken(&mut self, message: String) {
        self.held.clear();
        self.catch_up();
        if self.ledger.finished {
            // The answer is whole; only its end was lost.
            if !self.ledger.done {
                self.out.push_back(Bytes::from_static(b"data: [DONE]\n\n"));
            }
            self.ended = true;
            return;
        }
        match self.continue_elsewhere() {
            Ok(()) => self.broke = Some(message),
            Err(why) => {
                tracing::debug!(replica = %self.replica, why, "stream not continued");
                self.count("refused");
                self.give_up(message);
            }
        }
    }

    fn continue_elsewhere(&mut self) -> Result<(), &'static str> {
        if self.blind || self.next.attempts == 0 {
            return Err("no continuation attempts left");
        }
        let original = &self.next.outbound.body;
        let body = continuation_request(original, self.next.chat, &self.ledger).map_err(|e| e.0)?;
        if !self.next.dispatcher.retries.try_spend() {
            self.next.metrics.retries_denied.with_label_values(&[self.next.endpoint]).inc();
            return Err("the retry budget is spent");
        }
        self.next.attempts -= 1;
        let dispatcher = self.next.dispatcher.clone();
        let outbound = Outbound {
            method: self.next.outbound.method.clone(),
            path: self.next.outbound.path.clone(),
            headers: self.next.outbound.headers.clone(),
            body,
        };
        let (endpoint, model, key, started) =
            (self.next.endpoint, self.next.model.clone(), self.next.key.clone(), self.next.started);
        let avoid = self.replica.clone();
        let count = Outbound {
            method: http::Method::POST,
            path: http::uri::PathAndQuery::from_static("/tokenize"),
            headers: self.next.outbound.headers.clone(),
            body: tokenize_request(original),
        };
        tracing::debug!(replica = %avoid, sent = self.ledger.tokens, "continuing a broken stream elsewhere");
        self.dispatching = Some(Box::pin(async move {
            let route = Route {
                endpoint,
                model: model.as_deref(),
                key: key.as_ref(),
                prompt: None,
                prompt_ids: None,
                salt: None,
                stream: true,
                started,
                phase: None,
                continuable: true,
                avoid: Some(&avoid),
            };
            let served = dispatcher.dispatch(&route, &outbound).await;
            let streaming = match &served {
                Ok(served) if served.response.status() == StatusCode::OK => Some(served.replica.clone()),
                _ => None,
            };
            let prompt_tokens = match streaming {
                Some(replica) => prompt_count(&dispatcher, &replica, &count).await,
                None => None,
            };
            (served, prompt_tokens)
        }));
        Ok(())
    }

    fn give_up(&mut self, message: String) {
        let error = serde_json::json!({"error": {"message": message, "type": "BadGatewayError",
            "param": null, "code": 502}});
        self.out.push_back(Bytes::from(format!("data: {error}\n\n")));
        self.out.push_back(Bytes::from_static(b"data: [DONE]\n\n"));
        self.ended = true;
    }

    /// The continuation's answer: a stream to splice in, or the end.
    fn answered(&mut self, result: Result<Served, RouterError>, prompt_tokens: Option<u64>) {
        let broke = self.broke.take().unwrap_or_default();
        match result {
            Ok(served) if served.response.status() == StatusCode::OK && is_sse(&served.response) => {
                self.count("continued");
                self.replica = served.replica;
                self.inner = served.response.into_body();
                self.splice = Some(Splice::after(&self.ledger, prompt_tokens));
            }
            Ok(served) => {
                self.count("failed");
                self.give_up(format!(
                    "the replica failed mid-stream; its continuation got {}",
                    served.response.status()
                ));
            }
            Err(error) => {
                self.count("failed");
                self.give_up(format!("{broke}; its continuation failed: {error}"));
            }
        }
    }
}

impl http_body::Body for ContinuedBody {
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        loop {
            if let Some(bytes) = this.out.pop_front() {
                return Poll::Ready(Some(Ok(Frame::data(bytes))));
            }
            if this.ended {
                return Poll::Ready(None);
            }
            if let Some(dispatching) = this.dispatching.as_mut() {
                let (result, prompt_tokens) = std::task::ready!(dispatching.as_mut().poll(cx));
                this.dispatching = None;
                this.answered(result, prompt_tokens);
                continue;
            }
            match std::task::ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        this.take(data);
                    }
                }
                Some(Err(error)) => {
                    tracing::debug!(replica = %this.replica, %error, "stream broke");
                    let message = this.discarding.take().unwrap_or_else(|| error.to_string());
                    this.broken(message);
                }
                None => match this.discarding.take() {
                    Some(message) => {
                        tracing::debug!(replica = %this.replica, %message, "the engine ended a stream with an error");
                        this.broken(message);
                    }
                    None => {
                        if !this.held.is_empty() {
                            this.out.push_back(this.held.split().freeze());
                        }
                        this.ended = true;
                    }
                },
            }
        }
    }
}

/// The client's prompt in tokens, as `replica`'s `/tokenize` counts it; None when it
/// cannot say (then usage is estimated from the continuation's prompt).
async fn prompt_count(dispatcher: &Dispatcher, replica: &str, request: &Outbound) -> Option<u64> {
    use http_body_util::BodyExt;
    let replica = dispatcher.registry.find(replica)?;
    let asked = async {
        let response = dispatcher.relay.send(&replica, request).await.ok()?;
        if response.status() != StatusCode::OK {
            return None;
        }
        let body =
            http_body_util::Limited::new(response.into_body(), TOKENIZE_MAX_BYTES).collect().await.ok()?;
        let counted: Value = serde_json::from_slice(&body.to_bytes()).ok()?;
        counted.get("count")?.as_u64()
    };
    tokio::time::timeout(TOKENIZE_TIMEOUT, asked).await.ok().flatten()
}

/// Where the last `\n\n` in `bytes` starts, looking no earlier than `from`.
fn last_terminator(bytes: &[u8], from: usize) -> Option<usize> {
    memchr::memmem::rfind(&bytes[from..], b"\n\n").map(|at| from + at)
}

/// The SSE events in whole-event bytes (each without its blank line).
fn events(whole: &[u8]) -> EventIter<'_> {
    EventIter { rest: whole }
}

struct EventIter<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for EventIter<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        if self.rest.is_empty() {
            return None;
        }
        match BLANK_LINE.find(self.rest) {
            Some(end) => {
                let event = &self.rest[..end];
                self.rest = &self.rest[end + 2..];
                Some(event)
            }
            None => Some(std::mem::take(&mut self.rest)),
        }
    }
}

fn is_sse(response: &axum::response::Response) -> bool {
    response
        .headers()
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminators_are_found_in_the_new_bytes_and_across_the_join() {
        assert_eq!(last_terminator(b"data: a\n\ndata: b\n\ndata", 0), Some(16));
        assert_eq!(last_terminator(b"data: a\n\ndata", 9), None, "before `from` is not looked at");
        // A terminator split across two frames: the byte before the new ones counts.
        let held = b"data: a\n\n";
        assert_eq!(last_terminator(held, 7), Some(7));
        let events: Vec<&[u8]> = events(b"data: a\n\ndata: [DONE]\n\n").collect();
        assert_eq!(events, [&b"data: a"[..], &b"data: [DONE]"[..]]);
    }
}
