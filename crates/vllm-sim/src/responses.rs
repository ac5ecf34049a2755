//! vLLM's response bodies: the JSON of a finished completion or chat completion, and
//! the SSE stream of chunks, built from the engine's token events.
//!
//! A stream is a [`Stream`] polled straight off the request's engine channel: no relay
//! task, one wake per token. Each chunk is written from a pre-rendered prefix and
//! suffix with only the text escaped, because the simulator must stay cheap enough
//! never to be the bottleneck of a router benchmark. When the client goes away hyper
//! drops the stream, the channel closes, and the engine aborts the request.
//!
//! Stop strings follow vLLM: the text ends before the stop string, and a stream holds
//! back the last few characters that could still begin one.
//!
//! The members, their order and their null placeholders are vLLM 0.32.0's, as captured
//! from the real engine (`tests/golden/vllm-0.32.0/shapes.json`, checked by tests/sim.rs):
//! `system_fingerprint` names the version, the last chunk before `[DONE]` carries it, and
//! a stream's final usage has only the three counts.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_stream::Stream;

use super::engine::{Event, Finish};
use super::faults::Faults;
use super::request::GenRequest;
use llm_common::tokenizer::Detokenizer;

/// Identity of one response: what every chunk repeats.
pub struct Meta {
    pub id: String,
    pub created: u64,
    pub request: GenRequest,
}

impl Meta {
    fn object(&self, chunk: bool) -> &'static str {
        match (self.request.chat, chunk) {
            (true, true) => "chat.completion.chunk",
            (true, false) => "chat.completion",
            (false, _) => "text_completion",
        }
    }

    /// A finished response's usage.
    fn usage(&self, completion_tokens: usize) -> Value {
        let prompt = self.request.prompt_ids.len();
        json!({"prompt_tokens": prompt, "total_tokens": prompt + completion_tokens,
               "completion_tokens": completion_tokens, "prompt_tokens_details": null,
               "completion_tokens_details": null})
    }

    /// The usage a stream's chunks carry with `continuous_usage_stats`.
    fn running_usage(&self, completion_tokens: usize) -> Value {
        let prompt = self.request.prompt_ids.len();
        json!({"prompt_tokens": prompt, "total_tokens": prompt + completion_tokens,
               "completion_tokens": completion_tokens, "completion_tokens_details": null})
    }

    /// The usage of a stream's last chunk (`include_usage`).
    fn final_usage(&self, completion_tokens: usize) -> Value {
        let prompt = self.request.prompt_ids.len();
        json!({"prompt_tokens": prompt, "total_tokens": prompt + completion_tokens,
               "completion_tokens": completion_tokens})
    }
}

/// vLLM's `system_fingerprint`: its version and a hash fixed for the life of the server.
pub fn system_fingerprint() -> &'static str {
    static FINGERPRINT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    FINGERPRINT.get_or_init(|| {
        let seed = format!("{}-{:?}", std::process::id(), std::time::SystemTime::now());
        format!("vllm-0.32.0-{:08x}", xxhash_rust::xxh3::xxh3_64(seed.as_bytes()) as u32)
    })
}

fn finish_strings(finish: Option<Finish>, stop: &[String]) -> (Value, Value) {
    match finish {
        None => (Value::Null, Value::Null),
        Some(Finish::Length) => (json!("length"), Value::Null),
        Some(Finish::Stop) => (json!("stop"), Value::Null),
        Some(Finish::StopString(i)) => (json!("stop"), json!(stop[i])),
    }
}

/// Cut `text` before the occurrence of the stop string that ended generation (the last)
/// (after it, with `include_stop_str_in_output`).
fn truncate_at_stop(text: &mut String, finish: Option<Finish>, r: &GenRequest) {
    if let Some(Finish::StopString(i)) = finish
        && let Some(at) = text.rfind(r.stop[i].as_str())
    {
        text.truncate(if r.include_stop_str_in_output { at + r.stop[i].len() } else { at });
    }
}

/// Drain the engine events of a non-streaming request into vLLM's response JSON.
pub async fn collect(
    meta: &Meta,
    mut events: mpsc::UnboundedReceiver<Event>,
    kv_transfer_params: impl FnOnce(&[u32]) -> Option<Value>,
) -> Result<Value, String> {
    let mut ids = Vec::new();
    let mut finish = None;
    let mut prefill_blocks = None;
    while let Some(event) = events.recv().await {
        match event {
            Event::Token { id, finish: f } => {
                ids.push(id);
                if f.is_some() {
                    finish = f;
                    break;
                }
            }
            Event::PrefillBlocks(blocks) => prefill_blocks = Some(blocks),
            Event::Rejected(reason) => return Err(reason),
        }
    }
    let mut detok = Detokenizer::default();
    // The end-of-text token ends a natural stop: counted, not shown (as vLLM).
    let shown = if finish == Some(Finish::Stop) { &ids[..ids.len().saturating_sub(1)] } else { &ids[..] };
    let mut text: String = shown.iter().map(|&id| detok.push(id)).collect();
    let stop = &meta.request.stop;
    truncate_at_stop(&mut text, finish, &meta.request);
    let (finish_reason, stop_reason) = finish_strings(finish, stop);
    let kv = prefill_blocks.as_deref().and_then(kv_transfer_params).unwrap_or(Value::Null);
    let r = &meta.request;
    let token_ids = r.return_token_ids.then(|| json!(ids));
    let prompt_ids = r.return_token_ids.then(|| json!(r.prompt_ids));
    let usage = meta.usage(ids.len());
    let fingerprint = system_fingerprint();
    Ok(if r.chat {
        json!({
            "id": meta.id, "object": meta.object(false), "created": meta.created, "model": r.model,
            "choices": [{"index": 0,
                "message": {"role": "assistant", "content": text, "refusal": null, "annotations": null,
                            "audio": null, "function_call": null, "reasoning": null},
                "logprobs": null, "finish_reason": finish_reason, "stop_reason": stop_reason,
                "token_ids": token_ids, "routed_experts": null}],
            "service_tier": null, "system_fingerprint": fingerprint, "usage": usage,
            "prompt_logprobs": null, "prompt_token_ids": prompt_ids, "prompt_text": null,
            "kv_transfer_params": kv, "ec_transfer_params": null, "metrics": null,
        })
    } else {
        json!({
            "id": meta.id, "object": meta.object(false), "created": meta.created, "model": r.model,
            "choices": [{"index": 0, "text": text, "logprobs": null, "finish_reason": finish_reason,
                "stop_reason": stop_reason, "token_ids": token_ids, "prompt_logprobs": null,
                "prompt_token_ids": prompt_ids, "routed_experts": null}],
            "service_tier": null, "system_fingerprint": fingerprint, "usage": usage,
            "kv_transfer_params": kv, "ec_transfer_params": null, "metrics": null,
        })
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Chat: the role chunk goes out with the engine's first output, as vLLM sends it
    /// (so a client's time to first chunk is the time to first token).
    Role,
    Tokens,
    Usage,
    Done,
    End,
}

/// The SSE stream of one request.
pub struct SseStream {
    meta: Arc<Meta>,
    events: mpsc::UnboundedReceiver<Event>,
    faults: Arc<Faults>,
    phase: Phase,
    /// An engine event received in the role phase, handled in the token phase.
    first: Option<Event>,
    detok: Detokenizer,
    /// Text not yet sent (held back while it could begin a stop string).
    held: String,
    generated: usize,
    prefix: String,
    suffix: &'static str,
    stalled: bool,
    /// Drop fault: the connection is cut when this fires (after the tokens before it
    /// have had time to leave).
    dropping: Option<Pin<Box<tokio::time::Sleep>>>,
    /// With a drop fault armed, each chunk is preceded by one Pending so hyper writes it
    /// out before the next: chunks yielded in one burst were lost with the cut.
    paced: bool,
}

impl SseStream {
    pub fn new(meta: Meta, events: mpsc::UnboundedReceiver<Event>, faults: Arc<Faults>) -> Self {
        let meta = Arc::new(meta);
        let head = format!(
            r#"data: {{"id":"{}","object":"{}","created":{},"model":{},"choices":[{{"index":0,"#,
            meta.id,
            meta.object(true),
            meta.created,
            Value::from(meta.request.model.as_str())
        );
        let (prefix, suffix) = if meta.request.chat {
            (
                format!(r#"{head}"delta":{{"content":"#),
                r#"},"logprobs":null,"finish_reason":null,"token_ids":null}]"#,
            )
        } else {
            (
                format!(r#"{head}"text":"#),
                r#","logprobs":null,"finish_reason":null,"stop_reason":null,"prompt_token_ids":null,"token_ids":null}]"#,
            )
        };
        let phase = if meta.request.chat { Phase::Role } else { Phase::Tokens };
        SseStream {
            meta,
            events,
            faults,
            phase,
            first: None,
            detok: Detokenizer::default(),
            held: String::new(),
            generated: 0,
            prefix,
            suffix,
            stalled: false,
            dropping: None,
            paced: false,
        }
    }

    fn usage_field(&self) -> String {
        if self.meta.request.continuous_usage {
            format!(r#","usage":{}"#, self.meta.running_usage(self.generated))
        } else {
            String::new()
        }
    }

    fn role_chunk(&self) -> Bytes {
        let r = &self.meta.request;
        let mut chunk = json!({"id": self.meta.id, "object": self.meta.object(true), "created": self.meta.created,
            "model": r.model, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
            "logprobs": null, "finish_reason": null}]});
        if r.continuous_usage {
            chunk["usage"] = self.meta.running_usage(0);
        }
        chunk["prompt_token_ids"] = if r.return_token_ids { json!(r.prompt_ids) } else { Value::Null };
        chunk["prompt_text"] = Value::Null;
        sse(&chunk)
    }

    fn text_chunk(&self, text: &str, id: Option<u32>) -> Bytes {
        let mut out = String::with_capacity(self.prefix.len() + text.len() + 96);
        out.push_str(&self.prefix);
        out.push_str(&Value::from(text).to_string());
        if self.meta.request.return_token_ids {
            let ids = id.map(|i| format!("[{i}]")).unwrap_or_else(|| "[]".into());
            if self.meta.request.chat {
                // token_ids sits on the choice, after the delta.
                out.push_str(&format!(r#"}},"logprobs":null,"finish_reason":null,"token_ids":{ids}}}]"#));
            } else {
                // The first chunk of a completion also carries the prompt's ids.
                let prompt = if self.generated == 1 {
                    format!(r#","prompt_token_ids":{}"#, json!(self.meta.request.prompt_ids))
                } else {
                    r#","prompt_token_ids":null"#.to_owned()
                };
                out.push_str(&format!(
                    r#","logprobs":null,"finish_reason":null,"stop_reason":null{prompt},"token_ids":{ids}}}]"#
                ));
            }
        } else {
            out.push_str(self.suffix);
        }
        out.push_str(&self.usage_field());
        out.push_str("}\n\n");
        Bytes::from(out)
    }

    fn final_chunk(&self, text: &str, id: u32, finish: Finish) -> Bytes {
        let r = &self.meta.request;
        let (finish_reason, stop_reason) = finish_strings(Some(finish), &r.stop);
        let mut choice = if r.chat {
            json!({"index": 0, "delta": {"content": text}, "logprobs": null, "finish_reason": finish_reason,
                   "stop_reason": stop_reason})
        } else {
            json!({"index": 0, "text": text, "logprobs": null, "finish_reason": finish_reason,
                   "stop_reason": stop_reason})
        };
        if !r.chat {
            choice["prompt_token_ids"] =
                if r.return_token_ids && self.generated == 1 { json!(r.prompt_ids) } else { Value::Null };
        }
        choice["token_ids"] = if r.return_token_ids { json!([id]) } else { Value::Null };
        let mut chunk = json!({"id": self.meta.id, "object": self.meta.object(true), "created": self.meta.created,
            "model": r.model, "choices": [choice]});
        if r.continuous_usage {
            chunk["usage"] = self.meta.running_usage(self.generated);
        }
        // The last chunk before [DONE] names the engine's build.
        if !r.include_usage {
            chunk["system_fingerprint"] = json!(system_fingerprint());
        }
        sse(&chunk)
    }

    /// The part of the text that may be sent now: everything but a tail that could still
    /// grow into a stop string.
    fn releasable(&mut self) -> String {
        let keep = self.meta.request.stop.iter().map(|s| s.len().saturating_sub(1)).max().unwrap_or(0);
        if self.held.len() <= keep {
            return String::new();
        }
        let mut cut = self.held.len() - keep;
        while !self.held.is_char_boundary(cut) {
            cut -= 1;
        }
        self.held.drain(..cut).collect()
    }
}

fn sse(value: &Value) -> Bytes {
    Bytes::from(format!("data: {value}\n\n"))
}

impl Stream for SseStream {
    type Item = Result<Bytes, std::io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if let Some(cut) = this.dropping.as_mut() {
            return match cut.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err(std::io::Error::other("fault: connection dropped")))),
                Poll::Pending => Poll::Pending,
            };
        }
        loop {
            match this.phase {
                Phase::Role => {
                    let event = match Pin::new(&mut this.events).poll_recv(cx) {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(Some(Event::PrefillBlocks(_))) => continue,
                        Poll::Ready(event) => event,
                    };
                    this.phase = Phase::Tokens;
                    let role = matches!(event, Some(Event::Token { .. }));
                    this.first = event;
                    if role {
                        return Poll::Ready(Some(Ok(this.role_chunk())));
                    }
                }
                Phase::Tokens => {
                    if this.faults.drop_armed() {
                        this.paced = !this.paced;
                        if this.paced {
                            cx.waker().wake_by_ref();
                            return Poll::Pending;
                        }
                    }
                    if this.stalled {
                        // Stall fault: keep the connection open, send nothing more.
                        return Poll::Pending;
                    }
                    let next = match this.first.take() {
                        Some(event) => Poll::Ready(Some(event)),
                        None => Pin::new(&mut this.events).poll_recv(cx),
                    };
                    let event = match next {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(None) => {
                            // The engine dropped us (rejected or shut down).
                            return Poll::Ready(Some(Err(std::io::Error::other("engine ended the request"))));
                        }
                        Poll::Ready(Some(event)) => event,
                    };
                    let (id, finish) = match event {
                        Event::Token { id, finish } => (id, finish),
                        Event::PrefillBlocks(_) => continue,
                        Event::Rejected(reason) => {
                            this.phase = Phase::End;
                            let err = json!({"error": {"message": reason, "type": "BadRequestError", "param": null, "code": 400}});
                            return Poll::Ready(Some(Ok(sse(&err))));
                        }
                    };
                    this.generated += 1;
                    match this.faults.on_token(this.generated) {
                        super::faults::StreamFault::None => {}
                        super::faults::StreamFault::Stall => {
                            this.stalled = true;
                            return Poll::Pending;
                        }
                        super::faults::StreamFault::Drop => {
                            return Poll::Ready(Some(Err(std::io::Error::other(
                                "fault: connection dropped",
                            ))));
                        }
                        super::faults::StreamFault::Error => {
                            this.phase = Phase::Done;
                            let err = json!({"error": {"message": "fault: the engine failed", "type":
                                "InternalServerError", "param": null, "code": 500}});
                            return Poll::Ready(Some(Ok(sse(&err))));
                        }
                    }
                    // The end-of-text token ends a natural stop: counted, not shown (as vLLM).
                    let delta =
                        if finish == Some(Finish::Stop) { String::new() } else { this.detok.push(id) };
                    this.held.push_str(&delta);
                    match finish {
                        None => {
                            let text = this.releasable();
                            return Poll::Ready(Some(Ok(this.text_chunk(&text, Some(id)))));
                        }
                        Some(f) => {
                            let mut text = std::mem::take(&mut this.held);
                            truncate_at_stop(&mut text, Some(f), &this.meta.request);
                            this.phase =
                                if this.meta.request.include_usage { Phase::Usage } else { Phase::Done };
                            return Poll::Ready(Some(Ok(this.final_chunk(&text, id, f))));
                        }
                    }
                }
                Phase::Usage => {
                    this.phase = Phase::Done;
                    let chunk = json!({"id": this.meta.id, "object": this.meta.object(true), "created": this.meta.created,
                        "model": this.meta.request.model, "choices": [], "usage": this.meta.final_usage(this.generated),
                        "system_fingerprint": system_fingerprint()});
                    return Poll::Ready(Some(Ok(sse(&chunk))));
                }
                Phase::Done => {
                    this.phase = Phase::End;
                    return Poll::Ready(Some(Ok(Bytes::from_static(b"data: [DONE]\n\n"))));
                }
                Phase::End => return Poll::Ready(None),
            }
        }
    }
}
