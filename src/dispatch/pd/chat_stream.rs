//! The streamed body of a `/v1/completions` decode (tokenize-once), re-framed as chat
//! chunks for a chat client ([`super::chat_convert`]).
//!
//! Events are cut by [`SseMap`] (bounded by [`MAX_EVENT_BYTES`]) and only then read.
//! `[DONE]`, comments, errors and anything else that is not a completion chunk pass
//! through as they came.

use std::collections::VecDeque;

use axum::body::Body;
use bytes::Bytes;

use super::chat_convert::convert_chunk;
use crate::response::sse_map::{EventMap, SseMap};
use llm_common::sse::data_payload;

/// Largest SSE event converted: a completion chunk carrying the prompt's token ids
/// (`return_token_ids`) for a 128k-token context is about 1 MB.
pub const MAX_EVENT_BYTES: usize = 8 << 20;

/// Completion chunks to chat chunks, the role chunk before the first.
pub struct ChatChunks {
    first: bool,
}

impl EventMap for ChatChunks {
    const MAX_EVENT_BYTES: usize = MAX_EVENT_BYTES;

    fn event(&mut self, event: Bytes, out: &mut VecDeque<Bytes>) -> bool {
        let mut converted = Vec::new();
        match data_payload(&event) {
            Some(payload) if payload != b"[DONE]" && convert_chunk(payload, self.first, &mut converted) => {
                out.push_back(Bytes::from(converted));
                self.first = false;
            }
            _ => out.push_back(event),
        }
        true
    }
}

pub type ChatStream = SseMap<ChatChunks>;

/// A completion stream as a chat stream.
pub fn chat_stream(inner: Body) -> ChatStream {
    SseMap::new(inner, ChatChunks { first: true })
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
        let out = chat_stream(body).collect().await.unwrap().to_bytes();
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
        let result = chat_stream(body_of(endless)).collect().await;
        assert!(result.is_err(), "the stream fails instead of buffering without end");
    }
}
