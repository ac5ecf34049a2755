//! The streamed body of a `/v1/completions` decode (tokenize-once), re-framed as chat
//! chunks for a chat client ([`super::chat_convert`]).
//!
//! This is the one place the router re-encodes a stream, and only on this path: events
//! are found by scanning for the blank line that ends each SSE event, and only then
//! read. `[DONE]`, comments, errors and anything else that is not a completion chunk
//! pass through as they came. An event may not grow past [`MAX_EVENT_BYTES`] before its
//! end arrives: a replica that never ends one cannot make the router hold its stream.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};

use axum::body::Body;
use bytes::Bytes;
use http_body::{Body as HttpBody, Frame};

use super::chat_convert::convert_chunk;
use llm_common::sse::{SseEvents, data_payload};

/// Largest SSE event converted: a completion chunk carrying the prompt's token ids
/// (`return_token_ids`) for a 128k-token context is about 1 MB.
pub const MAX_EVENT_BYTES: usize = 8 << 20;

pub struct ChatStream {
    inner: Body,
    events: SseEvents,
    ready: VecDeque<Bytes>,
    first: bool,
    ended: bool,
}

impl ChatStream {
    pub fn new(inner: Body) -> Self {
        ChatStream { inner, events: SseEvents::new(), ready: VecDeque::new(), first: true, ended: false }
    }

    fn take_events(&mut self) {
        while let Some(event) = self.events.next_event() {
            self.convert_event(event);
        }
    }

    fn convert_event(&mut self, event: Bytes) {
        let mut out = Vec::new();
        match data_payload(&event) {
            Some(payload) if payload != b"[DONE]" && convert_chunk(payload, self.first, &mut out) => {
                self.ready.push_back(Bytes::from(out));
                self.first = false;
            }
            _ => self.ready.push_back(event),
        }
    }
}

impl HttpBody for ChatStream {
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
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        this.events.push(&data);
                        this.take_events();
                        if this.events.buffered() > MAX_EVENT_BYTES {
                            this.ended = true;
                            let message =
                                format!("an event from the replica exceeded {MAX_EVENT_BYTES} bytes");
                            return Poll::Ready(Some(Err(axum::Error::new(message))));
                        }
                    }
                }
                Poll::Ready(None) => {
                    this.ended = true;
                    if let Some(rest) = this.events.take_rest() {
                        this.ready.push_back(rest);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use serde_json::{Value, json};

    fn body_of(chunks: Vec<Vec<u8>>) -> Body {
        let chunks: Vec<Result<Bytes, std::io::Error>> =
            chunks.into_iter().map(|c| Ok(Bytes::from(c))).collect();
        Body::from_stream(tokio_stream::iter(chunks))
    }

    #[tokio::test]
    async fn completion_stream_becomes_chat_stream() {
        let events = concat!(
            "data: {\"id\":\"cmpl-1\",\"object\":\"text_completion\",\"created\":5,\"model\":\"m\",\"choices\":[{\"index\":0,\"text\":\" a\",\"logprobs\":null,\"finish_reason\":null,\"stop_reason\":null}]}\n\n",
            "data: {\"id\":\"cmpl-1\",\"object\":\"text_completion\",\"created\":5,\"model\":\"m\",\"choices\":[{\"index\":0,\"text\":\" b\",\"logprobs\":null,\"finish_reason\":\"length\",\"stop_reason\":null}]}\n\n",
            "data: {\"id\":\"cmpl-1\",\"object\":\"text_completion\",\"created\":5,\"model\":\"m\",\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"total_tokens\":5,\"completion_tokens\":2}}\n\n",
            "data: [DONE]\n\n"
        );
        // Split awkwardly: events straddle frames.
        let body = body_of(events.as_bytes().chunks(37).map(<[u8]>::to_vec).collect());
        let out = ChatStream::new(body).collect().await.unwrap().to_bytes();
        let text = String::from_utf8(out.to_vec()).unwrap();
        let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
        assert_eq!(events.len(), 5);
        let parse = |e: &str| serde_json::from_str::<Value>(e.strip_prefix("data: ").unwrap()).unwrap();
        let role = parse(events[0]);
        assert_eq!(role["object"], "chat.completion.chunk");
        assert_eq!(role["id"], "chatcmpl-1");
        assert_eq!(role["choices"][0]["delta"]["role"], "assistant");
        assert_eq!(parse(events[1])["choices"][0]["delta"]["content"], " a");
        assert_eq!(parse(events[2])["choices"][0]["finish_reason"], "length");
        assert_eq!(parse(events[3])["usage"]["completion_tokens"], 2);
        assert_eq!(parse(events[3])["choices"], json!([]));
        assert_eq!(events[4], "data: [DONE]");
    }

    #[tokio::test]
    async fn an_event_that_never_ends_is_cut_at_the_bound() {
        let endless = (0..(MAX_EVENT_BYTES / (1 << 20) + 2)).map(|_| vec![b'x'; 1 << 20]).collect();
        let result = ChatStream::new(body_of(endless)).collect().await;
        assert!(result.is_err(), "the stream fails instead of buffering without end");
    }
}
