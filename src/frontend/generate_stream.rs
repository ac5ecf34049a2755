//! The engine's generate stream (token ids, one SSE event per engine step) turned into
//! the OpenAI answer the client asked for: a chat or completions stream, written as it
//! arrives ([`openai_stream`]), or one body once generation ends ([`collect`]).
//!
//! Each token event's ids go through [`OutputText`] (detokenized, stop strings found);
//! the text it releases goes out as a chunk. When a stop string ends generation, the
//! final chunks are written and the engine's stream is dropped at once, which closes its
//! connection: vLLM aborts the request, as its own endpoint would stop it. Events that
//! are not token events (an error event, vLLM's or the router's for a broken upstream)
//! pass through as they came, and `data: [DONE]` ends the stream. Events are cut by
//! [`SseMap`], each at most [`MAX_EVENT_BYTES`].

use std::collections::VecDeque;
use std::sync::Arc;

use axum::body::Body;
use bytes::Bytes;
use http_body_util::BodyExt;
use serde::Deserialize;
use serde_json::Value;

use super::generate_resume::{Resume, error_event};
use super::openai_request::OutputPlan;
use super::openai_shapes::{DONE, Shapes};
use super::output_text::{Finish, Limits, OutputText};
use crate::policy::prompt_tokens::PromptTokenizer;
use crate::response::body::EndedByRouter;
use crate::response::sse_map::{EventMap, Resumed, Resuming, SseMap};
use llm_common::sse::{SseEvents, data_payload};

/// Largest generate event read (one engine step's ids; vLLM sends a few per event).
pub const MAX_EVENT_BYTES: usize = 1 << 20;

/// Tokens generated at most when neither the request nor the fleet says how many (a
/// model's context is less).
pub const MAX_GENERATED_TOKENS: usize = 1 << 20;

#[derive(Deserialize)]
struct GenerateEvent {
    #[serde(default)]
    choices: Vec<GenerateChoice>,
    #[serde(default)]
    error: Option<serde::de::IgnoredAny>,
}

#[derive(Deserialize)]
struct GenerateChoice {
    #[serde(default)]
    index: u32,
    #[serde(default)]
    finish_reason: Option<String>,
    #[serde(default)]
    stop_reason: Value,
    #[serde(default)]
    token_ids: Vec<u32>,
}

/// A token event's ids and finish; `None` for any other event.
fn token_event(payload: &[u8]) -> Option<(Vec<u32>, Option<Finish>)> {
    let event: GenerateEvent = serde_json::from_slice(payload).ok()?;
    if event.error.is_some() {
        return None;
    }
    let choice = event.choices.into_iter().find(|c| c.index == 0)?;
    let finish = choice.finish_reason.map(|reason| Finish { reason, stop_reason: choice.stop_reason });
    Some((choice.token_ids, finish))
}

/// The state one answer is written from.
pub struct Answer {
    pub tokenizer: Arc<PromptTokenizer>,
    pub output: OutputText,
    pub shapes: Shapes,
    pub plan: OutputPlan,
    pub prompt_tokens: usize,
    /// How a broken stream is continued elsewhere (none: it ends with an error).
    pub resume: Option<Resume>,
    /// The ids generated so far (kept only when the stream may be continued).
    generated: Vec<u32>,
}

impl Answer {
    pub fn new(tokenizer: Arc<PromptTokenizer>, plan: OutputPlan, prompt_ids: &[u32]) -> Self {
        let decoder = tokenizer.decoder(prompt_ids, plan.skip_special_tokens);
        let limits =
            Limits { max_tokens: plan.max_tokens.unwrap_or(MAX_GENERATED_TOKENS), keep_all: !plan.stream };
        let output = OutputText::new(
            decoder,
            plan.stop.clone(),
            plan.include_stop_str_in_output,
            plan.min_tokens,
            limits,
        );
        Answer {
            shapes: Shapes::new(plan.chat, &plan.model),
            tokenizer,
            output,
            plan,
            prompt_tokens: prompt_ids.len(),
            resume: None,
            generated: Vec::new(),
        }
    }

    /// The same, continued on another replica if its engine's stream breaks.
    pub fn resumable(self, resume: Option<Resume>) -> Self {
        Answer { resume, ..self }
    }

    fn update(&mut self, ids: &[u32], finish: Option<Finish>) -> bool {
        // An engine shutting down ends its requests with `abort`: a broken stream, to be
        // continued elsewhere when it can be.
        let finish = finish.filter(|f| f.reason != "abort" || self.resume.is_none());
        if self.resume.is_some() {
            self.generated.extend_from_slice(ids);
        }
        self.output.update(&self.tokenizer, ids, finish).is_some()
    }

    /// The engine's stream broke before generation ended: ask for the rest elsewhere.
    fn resume(&mut self) -> Option<Resuming> {
        self.resume.as_mut()?.resume(&self.generated)
    }
}

/// The engine's token events to the OpenAI stream ([`SseMap`] cuts the events).
pub struct TokenEvents {
    answer: Answer,
    role_sent: bool,
    /// Generation is over: later token events are ignored.
    finished: bool,
    /// Told when the engine's stream is dropped on purpose.
    ended_by_router: Option<EndedByRouter>,
    /// The engine's error event, held back while the stream may be continued.
    held_error: Option<Bytes>,
}

pub type OpenAiStream = SseMap<TokenEvents>;

/// The OpenAI stream answering `answer` from the engine's stream `inner`.
pub fn openai_stream(inner: Body, answer: Answer, ended_by_router: Option<EndedByRouter>) -> OpenAiStream {
    SseMap::new(
        inner,
        TokenEvents { answer, role_sent: false, finished: false, ended_by_router, held_error: None },
    )
}

impl EventMap for TokenEvents {
    const MAX_EVENT_BYTES: usize = MAX_EVENT_BYTES;

    fn event(&mut self, event: Bytes, ready: &mut VecDeque<Bytes>) -> bool {
        let Some(payload) = data_payload(&event) else { return true }; // comments, keep-alives
        if payload == b"[DONE]" {
            // Before generation ended: the stream broke (continued once it ends).
            if !self.finished && self.answer.resume.is_none() {
                ready.push_back(event);
            }
            return true;
        }
        let Some((ids, finish)) = token_event(payload) else {
            if self.answer.resume.is_some() && !self.finished {
                self.held_error = Some(event); // the stream broke: continued once it ends
            } else {
                ready.push_back(event); // an error: the client reads it as the engine wrote it
            }
            return true;
        };
        if self.finished {
            return true;
        }
        let done = self.answer.update(&ids, finish);
        let mut out = Vec::new();
        if self.answer.plan.chat && !self.role_sent {
            self.answer.shapes.role(&mut out);
            self.role_sent = true;
        }
        let text = self.answer.output.take_new().to_owned();
        let mut reading = true;
        if done {
            let finish = self.answer.output.finish().expect("done").clone();
            self.answer.shapes.last(&mut out, &text, &finish, !self.answer.plan.include_usage);
            if self.answer.plan.include_usage {
                self.answer.shapes.usage(&mut out, self.answer.prompt_tokens, self.answer.output.tokens());
            }
            out.extend_from_slice(DONE);
            self.finished = true;
            if self.answer.output.ended_by_router() {
                // The router's stop: abort the engine's request (not a client leaving).
                if let Some(flag) = &self.ended_by_router {
                    flag.set();
                }
                reading = false;
            }
        } else if !text.is_empty() {
            self.answer.shapes.delta(&mut out, &text);
        }
        if !out.is_empty() {
            ready.push_back(Bytes::from(out));
        }
        reading
    }

    fn broken(&mut self, why: Option<&str>, out: &mut VecDeque<Bytes>) -> Option<Resuming> {
        if self.finished {
            return None;
        }
        let resuming = self.answer.resume();
        if resuming.is_none() && self.answer.resume.is_some() {
            // Continuation was possible but is not to be: end as the stream would have.
            let why = why.unwrap_or("the engine's stream ended before generation did");
            out.push_back(self.held_error.take().unwrap_or_else(|| error_event(why)));
            out.push_back(Bytes::from_static(DONE));
        }
        resuming
    }

    fn resumed(&mut self, resumed: Option<&mut Resumed>, out: &mut VecDeque<Bytes>) {
        match resumed {
            Some(resumed) => {
                self.held_error = None;
                self.ended_by_router = resumed.ended_by_router.take();
                if let Some(resume) = &mut self.answer.resume {
                    resume.resumed(resumed.replica.clone());
                }
            }
            None => {
                let why = "the engine failed mid-stream and its continuation failed";
                out.push_back(self.held_error.take().unwrap_or_else(|| error_event(why)));
                out.push_back(Bytes::from_static(DONE));
            }
        }
    }
}

/// Why a non-streamed answer could not be written.
#[derive(Debug, PartialEq, Eq)]
pub enum CollectError {
    /// The engine sent an error event: its JSON.
    Engine(Bytes),
    /// The stream broke or ended before generation did.
    Broken(String),
}

/// Read the engine's stream to the end of generation and write the whole answer; a
/// stream that breaks first is continued elsewhere when the answer allows.
pub async fn collect(
    mut inner: Body,
    mut answer: Answer,
    mut ended_by_router: Option<EndedByRouter>,
) -> Result<Vec<u8>, CollectError> {
    let mut events = SseEvents::new();
    let mut held_error: Option<Bytes> = None;
    loop {
        let broke = 'read: loop {
            let frame = match inner.frame().await {
                None => break 'read "the engine's stream ended before generation did".to_owned(),
                Some(Err(e)) => break 'read e.to_string(),
                Some(Ok(frame)) => frame,
            };
            let Ok(data) = frame.into_data() else { continue };
            events.push(&data);
            while let Some(event) = events.next_event() {
                let Some(payload) = data_payload(&event) else { continue };
                if payload == b"[DONE]" {
                    continue;
                }
                let Some((ids, finish)) = token_event(payload) else {
                    let error = Bytes::copy_from_slice(payload);
                    if answer.resume.is_none() {
                        return Err(CollectError::Engine(error));
                    }
                    held_error = Some(error);
                    continue;
                };
                if answer.update(&ids, finish) {
                    let finish = answer.output.finish().expect("done").clone();
                    let body = answer.shapes.body(
                        answer.output.text(),
                        &finish,
                        answer.prompt_tokens,
                        answer.output.tokens(),
                    );
                    if answer.output.ended_by_router() {
                        if let Some(flag) = &ended_by_router {
                            flag.set();
                        }
                    } else {
                        // The engine ended it: read its `[DONE]` so the connection is reused.
                        while let Some(Ok(_)) = inner.frame().await {}
                    }
                    return Ok(body);
                }
            }
            if events.buffered() > MAX_EVENT_BYTES {
                break 'read format!("an event from the replica exceeded {MAX_EVENT_BYTES} bytes");
            }
        };
        if let Some(resuming) = answer.resume()
            && let Some(resumed) = resuming.await
        {
            inner = resumed.body;
            ended_by_router = resumed.ended_by_router;
            events = SseEvents::new();
            held_error = None;
            if let Some(resume) = &mut answer.resume {
                resume.resumed(resumed.replica);
            }
            continue;
        }
        return Err(match held_error {
            Some(error) => CollectError::Engine(error),
            None => CollectError::Broken(broke),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::prompt_tokens::BuiltinTokenizer;
    use llm_common::tokenizer::encode;
    use serde_json::json;

    fn tokenizer() -> Arc<PromptTokenizer> {
        Arc::new(PromptTokenizer::Builtin(BuiltinTokenizer::new(1 << 10)))
    }

    fn plan(chat: bool, stream: bool, usage: bool, stop: &[&str]) -> OutputPlan {
        OutputPlan {
            chat,
            stream,
            include_usage: usage,
            model: "m".into(),
            stop: stop.iter().map(|s| s.to_string()).collect(),
            include_stop_str_in_output: false,
            min_tokens: 0,
            skip_special_tokens: true,
            max_tokens: None,
        }
    }

    /// The engine's events for `ids`, one id per event, the last with `finish`.
    fn engine(ids: &[u32], finish: &str, stop_reason: Value) -> String {
        let mut out = String::new();
        for (i, id) in ids.iter().enumerate() {
            let last = i + 1 == ids.len();
            let event = json!({"request_id": "r", "usage": null, "output_mode": "tokens", "choices": [{
                "index": 0, "finish_reason": if last { json!(finish) } else { Value::Null },
                "stop_reason": if last { stop_reason.clone() } else { Value::Null },
                "token_ids": [id], "routed_experts": null}]});
            out.push_str(&format!("data: {event}\n\n"));
        }
        out.push_str("data: [DONE]\n\n");
        out
    }

    fn body_of(text: String, frame: usize) -> Body {
        let chunks: Vec<Result<Bytes, std::io::Error>> =
            text.as_bytes().chunks(frame).map(|c| Ok(Bytes::copy_from_slice(c))).collect();
        Body::from_stream(tokio_stream::iter(chunks))
    }

    fn events(out: &[u8]) -> Vec<Value> {
        std::str::from_utf8(out)
            .unwrap()
            .split("\n\n")
            .filter(|e| !e.is_empty() && *e != "data: [DONE]")
            .map(|e| serde_json::from_str(e.strip_prefix("data: ").unwrap()).unwrap())
            .collect()
    }

    #[tokio::test]
    async fn a_chat_stream_reads_as_vllm_writes_it() {
        let mut ids = encode("Hello, crab 🦀!");
        ids.push(199_999);
        for frame in [7, 64, 4096] {
            let answer = Answer::new(tokenizer(), plan(true, true, true, &[]), &[1, 2, 3]);
            let out = openai_stream(body_of(engine(&ids, "stop", Value::Null), frame), answer, None)
                .collect()
                .await
                .unwrap()
                .to_bytes();
            assert!(out.ends_with(b"data: [DONE]\n\n"));
            let e = events(&out);
            assert_eq!(e[0]["choices"][0]["delta"]["role"], "assistant");
            let text: String =
                e.iter().filter_map(|e| e["choices"][0]["delta"]["content"].as_str()).collect();
            assert_eq!(text, "Hello, crab 🦀!");
            let last = &e[e.len() - 2];
            assert_eq!(
                (last["choices"][0]["finish_reason"].clone(), last["choices"][0]["stop_reason"].clone()),
                (json!("stop"), Value::Null)
            );
            let usage = &e[e.len() - 1]["usage"];
            assert_eq!(usage["prompt_tokens"], 3);
            assert_eq!(usage["completion_tokens"], ids.len());
        }
    }

    #[tokio::test]
    async fn a_stop_string_ends_the_stream_and_drops_the_engine() {
        let ids = encode("one two three four five");
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(64);
        // The engine's stream stays open after "three": only the stop can end it.
        for event in engine(&ids, "length", Value::Null).split_inclusive("\n\n").take(3) {
            tx.send(Ok(Bytes::from(event.to_owned()))).await.unwrap();
        }
        let inner = Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
        let answer = Answer::new(tokenizer(), plan(false, true, false, &[" thr"]), &[1]);
        let flag = EndedByRouter::default();
        let out = openai_stream(inner, answer, Some(flag.clone())).collect().await.unwrap().to_bytes();
        assert!(flag.is_set(), "the early end is the router's");
        let e = events(&out);
        let text: String = e.iter().filter_map(|e| e["choices"][0]["text"].as_str()).collect();
        assert_eq!(text, "one two");
        assert_eq!(e.last().unwrap()["choices"][0]["stop_reason"], " thr");
        assert!(tx.is_closed(), "the engine's stream was dropped");
    }

    #[tokio::test]
    async fn errors_pass_through_and_non_streams_are_collected() {
        let error = "data: {\"error\":{\"message\":\"boom\",\"code\":500}}\n\ndata: [DONE]\n\n";
        let answer = Answer::new(tokenizer(), plan(true, true, false, &[]), &[1]);
        let out =
            openai_stream(body_of(error.to_owned(), 5), answer, None).collect().await.unwrap().to_bytes();
        assert_eq!(&out[..], error.as_bytes());
        let ids = encode("a whole answer");
        let answer = Answer::new(tokenizer(), plan(true, false, false, &[]), &[1, 2]);
        let body = collect(body_of(engine(&ids, "length", Value::Null), 9), answer, None).await.unwrap();
        let body: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["choices"][0]["message"]["content"], "a whole answer");
        assert_eq!(body["usage"]["completion_tokens"], ids.len());
        let answer = Answer::new(tokenizer(), plan(true, false, false, &[]), &[1]);
        assert!(matches!(
            collect(body_of(error.to_owned(), 4), answer, None).await,
            Err(CollectError::Engine(_))
        ));
        let answer = Answer::new(tokenizer(), plan(true, false, false, &[]), &[1]);
        let cut = engine(&ids, "length", Value::Null)[..50].to_owned();
        assert!(matches!(collect(body_of(cut, 7), answer, None).await, Err(CollectError::Broken(_))));
    }
}
