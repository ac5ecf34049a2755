//! Answer a chat client from a `/v1/completions` decode (tokenize-once): completion
//! chunks become `chat.completion.chunk` events, a completion body becomes a
//! `chat.completion`.
//!
//! This is the one place the router re-encodes a stream, and only on this path: events
//! are found by scanning for the blank line that ends each SSE event, and only then
//! parsed. A role chunk (`delta.role: "assistant"`) goes first, as vLLM's chat endpoint
//! sends it; `text` becomes `delta.content`; finish and stop reasons, usage chunks,
//! errors and `[DONE]` are carried over.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};

use axum::body::Body;
use bytes::Bytes;
use http_body::{Body as HttpBody, Frame};
use serde_json::{Value, json};

use crate::sse::{SseEvents, data_payload};

fn chat_id(id: &Value) -> Value {
    match id.as_str() {
        Some(id) => json!(format!("chatcmpl-{}", id.strip_prefix("cmpl-").unwrap_or(id))),
        None => id.clone(),
    }
}

/// One completion chunk as chat chunks (the role chunk first, when `first`).
fn convert_chunk(chunk: &Value, first: bool) -> Vec<Value> {
    if chunk.get("error").is_some() || chunk.get("choices").is_none() {
        return vec![chunk.clone()];
    }
    let head = |choices: Value| {
        let mut c = json!({"id": chat_id(&chunk["id"]), "object": "chat.completion.chunk",
            "created": chunk["created"], "model": chunk["model"], "choices": choices});
        if let Some(usage) = chunk.get("usage") {
            c["usage"] = usage.clone();
        }
        c
    };
    let mut out = Vec::new();
    let choices = chunk["choices"].as_array().cloned().unwrap_or_default();
    if first && !choices.is_empty() {
        let mut role = head(json!([{"index": 0, "delta": {"role": "assistant", "content": ""},
            "logprobs": null, "finish_reason": null}]));
        role.as_object_mut().expect("object").remove("usage");
        out.push(role);
    }
    let converted: Vec<Value> = choices
        .iter()
        .map(|c| {
            let mut choice = json!({"index": c["index"], "delta": {"content": c["text"]}, "logprobs": null,
                "finish_reason": c["finish_reason"]});
            if let Some(stop) = c.get("stop_reason").filter(|s| !s.is_null() || !c["finish_reason"].is_null())
            {
                choice["stop_reason"] = stop.clone();
            }
            choice
        })
        .collect();
    out.push(head(Value::Array(converted)));
    out
}

/// A finished completion as a chat completion.
pub fn convert_body(completion: &Value) -> Value {
    if completion.get("error").is_some() {
        return completion.clone();
    }
    let choices: Vec<Value> = completion["choices"]
        .as_array()
        .map(|cs| {
            cs.iter()
                .map(|c| json!({"index": c["index"],
                    "message": {"role": "assistant", "content": c["text"], "refusal": null, "annotations": null,
                                "audio": null, "function_call": null, "tool_calls": [], "reasoning_content": null},
                    "logprobs": null, "finish_reason": c["finish_reason"], "stop_reason": c["stop_reason"]}))
                .collect()
        })
        .unwrap_or_default();
    json!({"id": chat_id(&completion["id"]), "object": "chat.completion", "created": completion["created"],
        "model": completion["model"], "choices": choices, "service_tier": null, "system_fingerprint": null,
        "usage": completion["usage"], "prompt_logprobs": null, "kv_transfer_params": null})
}

/// The streamed body of a completion, re-framed as chat chunks.
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
        let parsed = data_payload(&event)
            .filter(|p| *p != b"[DONE]")
            .and_then(|p| serde_json::from_slice::<Value>(p).ok());
        match parsed {
            Some(chunk) => {
                for chat in convert_chunk(&chunk, self.first) {
                    self.ready.push_back(Bytes::from(format!("data: {chat}\n\n")));
                }
                self.first = false;
            }
            // [DONE], comments and anything we do not understand pass through as they are.
            None => self.ready.push_back(event),
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

    #[tokio::test]
    async fn completion_stream_becomes_chat_stream() {
        let events = concat!(
            "data: {\"id\":\"cmpl-1\",\"object\":\"text_completion\",\"created\":5,\"model\":\"m\",\"choices\":[{\"index\":0,\"text\":\" a\",\"logprobs\":null,\"finish_reason\":null,\"stop_reason\":null}]}\n\n",
            "data: {\"id\":\"cmpl-1\",\"object\":\"text_completion\",\"created\":5,\"model\":\"m\",\"choices\":[{\"index\":0,\"text\":\" b\",\"logprobs\":null,\"finish_reason\":\"length\",\"stop_reason\":null}]}\n\n",
            "data: {\"id\":\"cmpl-1\",\"object\":\"text_completion\",\"created\":5,\"model\":\"m\",\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"total_tokens\":5,\"completion_tokens\":2}}\n\n",
            "data: [DONE]\n\n"
        );
        // Split awkwardly: events straddle frames.
        let chunks: Vec<Result<Bytes, std::io::Error>> =
            events.as_bytes().chunks(37).map(|c| Ok(Bytes::copy_from_slice(c))).collect();
        let body = Body::from_stream(tokio_stream::iter(chunks));
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

    #[test]
    fn completion_body_becomes_chat_completion() {
        let c = json!({"id": "cmpl-9", "object": "text_completion", "created": 1, "model": "m",
            "choices": [{"index": 0, "text": "hello", "finish_reason": "stop", "stop_reason": null}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}});
        let chat = convert_body(&c);
        assert_eq!(chat["object"], "chat.completion");
        assert_eq!(chat["choices"][0]["message"]["content"], "hello");
        assert_eq!(chat["choices"][0]["message"]["role"], "assistant");
        assert_eq!(chat["usage"]["total_tokens"], 2);
    }
}
