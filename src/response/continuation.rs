//! Mid-stream continuation, the pure part: what a client has been sent of a streamed
//! answer ([`Ledger`]), whether a request can be continued faithfully, the request that
//! continues it on another replica, and the continuation's events rewritten so the
//! client sees one stream.
//!
//! A continuation asks for the rest of the answer: a completion's prompt with the text
//! already sent appended; a chat's messages with the partial assistant message last and
//! vLLM's `continue_final_message: true`, `add_generation_prompt: false`. `max_tokens`
//! (or `max_completion_tokens`) and `min_tokens` shrink by the tokens already sent,
//! counted as vLLM streams them: one event per generated token. The continuation's
//! events keep the first stream's `id` and `created`; its chat role event is dropped;
//! its usage counts the client's prompt once (the continuation's prompt less the tokens
//! already sent) and every token the client received.
//!
//! Refused (the stream ends with an error event, as without continuation): `n` > 1,
//! `logprobs`, tools or structured output, `echo`, prompts that are not one string, and
//! a stream whose events this module cannot read.

use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::dispatch::pd::members::Members;

/// Most text a ledger keeps: an answer longer than this (a replica that streams without
/// end) is no longer continued, and its text not kept.
pub const MAX_LEDGER_TEXT: usize = 4 << 20;

/// What the client has been sent of one streamed answer.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Ledger {
    /// The first event's `id` and `created`, kept by the continuation's events.
    pub id: Option<String>,
    pub created: Option<u64>,
    /// Text of choice 0 sent so far.
    pub text: String,
    /// Generated tokens sent: events that carried a choice (the chat role event aside).
    pub tokens: u64,
    /// A finish reason was sent: the answer is whole.
    pub finished: bool,
    /// `[DONE]` was sent.
    pub done: bool,
    /// Something was sent that a continuation cannot carry on (a tool call, a second
    /// choice, an event that does not parse).
    pub unfaithful: bool,
    /// The last event was the engine's error event (vLLM's way of ending a stream that
    /// failed after its headers), with its message.
    pub error: Option<String>,
}

#[derive(Deserialize)]
struct Chunk<'a> {
    error: Option<Value>,
    #[serde(borrow)]
    id: Option<std::borrow::Cow<'a, str>>,
    created: Option<u64>,
    #[serde(default)]
    choices: Vec<ChunkChoice<'a>>,
}

#[derive(Deserialize)]
struct ChunkChoice<'a> {
    #[serde(default)]
    index: u32,
    #[serde(borrow)]
    text: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow)]
    delta: Option<Delta<'a>>,
    #[serde(borrow)]
    finish_reason: Option<std::borrow::Cow<'a, str>>,
}

#[derive(Deserialize)]
struct Delta<'a> {
    #[serde(borrow)]
    content: Option<std::borrow::Cow<'a, str>>,
    role: Option<serde::de::IgnoredAny>,
    tool_calls: Option<serde::de::IgnoredAny>,
}

impl Ledger {
    /// Take in one SSE event (its bytes without the blank line that ends it).
    pub fn observe(&mut self, event: &[u8]) {
        let Some(data) = data(event) else { return };
        if data == b"[DONE]" {
            self.done = true;
            return;
        }
        let Ok(chunk) = serde_json::from_slice::<Chunk>(data) else {
            self.unfaithful = true;
            return;
        };
        if let Some(error) = chunk.error {
            let message = error.get("message").and_then(Value::as_str).unwrap_or("an error event");
            self.error = Some(format!("the replica failed mid-stream: {message}"));
            return;
        }
        if self.id.is_none() {
            self.id = chunk.id.map(|id| id.into_owned());
            self.created = chunk.created;
        }
        // vLLM ends the streams of an engine shutting down with `finish_reason: "abort"`:
        // a broken stream, not an answer (the event is held back, like an error event).
        if chunk.choices.iter().any(|c| c.finish_reason.as_deref() == Some("abort")) {
            self.error = Some("the replica aborted the request mid-stream".to_owned());
            return;
        }
        for choice in &chunk.choices {
            if choice.index != 0 {
                self.unfaithful = true;
                continue;
            }
            if choice.finish_reason.is_some() {
                self.finished = true;
            }
            match (&choice.text, &choice.delta) {
                (Some(text), _) => {
                    self.keep(text);
                    self.tokens += 1;
                }
                (None, Some(delta)) => {
                    if delta.tool_calls.is_some() {
                        self.unfaithful = true;
                    }
                    let content = delta.content.as_deref().unwrap_or("");
                    // vLLM's first chat event names the role and carries no token.
                    if delta.role.is_some() && content.is_empty() && choice.finish_reason.is_none() {
                        continue;
                    }
                    self.keep(content);
                    self.tokens += 1;
                }
                (None, None) => {}
            }
        }
    }
}

impl Ledger {
    /// Keep text the client was sent, up to [`MAX_LEDGER_TEXT`].
    fn keep(&mut self, text: &str) {
        if self.unfaithful {
            return;
        }
        if self.text.len() + text.len() > MAX_LEDGER_TEXT {
            self.unfaithful = true;
            self.text = String::new();
            return;
        }
        self.text.push_str(text);
    }
}

/// The `data:` payload of an SSE event, if it has one.
fn data(event: &[u8]) -> Option<&[u8]> {
    event.split(|&b| b == b'\n').find_map(|line| {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let rest = line.strip_prefix(b"data:")?;
        Some(rest.strip_prefix(b" ").unwrap_or(rest))
    })
}

/// Why a stream cannot be continued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotContinuable(pub &'static str);

/// Whether a streamed request can be continued faithfully, judged from its top-level
/// members (`member` gives one's raw value, the last when a key repeats) before it is
/// sent; the prompt itself is never parsed, only its first character looked at.
pub fn continuable<'a>(
    member: impl Fn(&str) -> Option<&'a RawValue>,
    chat: bool,
) -> Result<(), NotContinuable> {
    let value = |key: &str| member(key).and_then(|raw| serde_json::from_str::<Value>(raw.get()).ok());
    let count = |key: &str| value(key).and_then(|v| v.as_u64());
    let is_set = |key: &str| member(key).is_some_and(|v| !matches!(v.get(), "null" | "false"));
    if count("n").is_some_and(|n| n > 1) {
        return Err(NotContinuable("n > 1"));
    }
    if is_set("logprobs") || is_set("top_logprobs") || is_set("prompt_logprobs") {
        return Err(NotContinuable("logprobs"));
    }
    if is_set("echo") || count("best_of").is_some_and(|n| n > 1) {
        return Err(NotContinuable("echo or best_of"));
    }
    let tools = member("tools").is_some_and(|t| {
        let text = t.get().trim_start();
        text.starts_with('[') && !text[1..].trim_start().starts_with(']')
    }) && value("tool_choice").as_ref().and_then(Value::as_str) != Some("none");
    let structured = ["structured_outputs", "guided_json", "guided_regex", "guided_choice", "guided_grammar"]
        .iter()
        .any(|k| is_set(k))
        || value("response_format")
            .is_some_and(|f| !f.is_null() && f.get("type").and_then(Value::as_str) != Some("text"));
    if tools || structured {
        return Err(NotContinuable("tools or structured output"));
    }
    let starts = |key: &str, c: char| member(key).is_some_and(|raw| raw.get().trim_start().starts_with(c));
    match chat {
        true if !starts("messages", '[') => Err(NotContinuable("no messages")),
        false if !starts("prompt", '"') => Err(NotContinuable("not a text prompt")),
        _ => Ok(()),
    }
}

/// The request that asks another replica for the rest of the answer, written from the
/// original's raw members (the prompt copied once, never parsed).
pub fn continuation_request(original: &[u8], chat: bool, sent: &Ledger) -> Result<Bytes, NotContinuable> {
    let request = Members::parse(original).map_err(|_| NotContinuable("the request is not a JSON object"))?;
    continuable(|key| request.get(key), chat)?;
    if sent.unfaithful {
        return Err(NotContinuable("the stream so far cannot be carried on"));
    }
    let text = serde_json::to_string(&sent.text).expect("a string serialises");
    let mut set: Vec<(&str, Vec<u8>)> = Vec::new();
    if chat {
        // The messages with the partial answer last: `[...]` becomes `[..., {assistant}]`.
        let messages = request.get("messages").expect("continuable: messages").get().trim_end();
        let head = messages[..messages.len() - 1].trim_end();
        let mut written = Vec::with_capacity(messages.len() + text.len() + 40);
        written.extend_from_slice(head.as_bytes());
        if head != "[" {
            written.push(b',');
        }
        written.extend_from_slice(b"{\"role\":\"assistant\",\"content\":");
        written.extend_from_slice(text.as_bytes());
        written.extend_from_slice(b"}]");
        set.push(("messages", written));
        set.push(("continue_final_message", b"true".to_vec()));
        set.push(("add_generation_prompt", b"false".to_vec()));
    } else {
        // `"prompt"` + `"sent"`: one string literal, the escapes of both kept.
        let prompt = request.get("prompt").expect("continuable: a text prompt").get().trim_end();
        let mut written = Vec::with_capacity(prompt.len() + text.len());
        written.extend_from_slice(&prompt.as_bytes()[..prompt.len() - 1]);
        written.extend_from_slice(&text.as_bytes()[1..]);
        set.push(("prompt", written));
    }
    for key in ["max_tokens", "max_completion_tokens"] {
        if let Some(max) = request.get(key).and_then(|raw| raw.get().parse::<u64>().ok()) {
            let left = max.saturating_sub(sent.tokens);
            if left == 0 {
                return Err(NotContinuable("no tokens left"));
            }
            set.push((key, left.to_string().into_bytes()));
        }
    }
    if let Some(min) = request.get("min_tokens").and_then(|raw| raw.get().parse::<u64>().ok()) {
        set.push(("min_tokens", min.saturating_sub(sent.tokens).to_string().into_bytes()));
    }
    let set: Vec<(&str, &[u8])> = set.iter().map(|(k, v)| (*k, v.as_slice())).collect();
    Ok(Bytes::from(request.rewrite(|_| true, &set)))
}

/// What a continuation's events are rewritten with: the first stream's `id` and
/// `created`, and the tokens the client had when the continuation started.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Splice {
    pub id: Option<String>,
    pub created: Option<u64>,
    pub tokens: u64,
    /// The client's prompt in tokens, as the continuing replica's `/tokenize` counts it;
    /// without it, the continuation's prompt less the tokens sent (which differs by how
    /// the engine re-tokenises the sent text).
    pub prompt_tokens: Option<u64>,
}

impl Splice {
    /// A continuation starting after what `sent` says the client has.
    pub fn after(sent: &Ledger, prompt_tokens: Option<u64>) -> Splice {
        Splice { id: sent.id.clone(), created: sent.created, tokens: sent.tokens, prompt_tokens }
    }
}

/// The `/tokenize` request that counts the client's own prompt (the members of the
/// request that shape it, copied as they came).
pub fn tokenize_request(original: &[u8]) -> Bytes {
    const SHAPING: [&str; 9] = [
        "model",
        "messages",
        "prompt",
        "add_generation_prompt",
        "continue_final_message",
        "chat_template",
        "chat_template_kwargs",
        "add_special_tokens",
        "tools",
    ];
    match Members::parse(original) {
        Ok(request) => Bytes::from(request.rewrite(|key| SHAPING.contains(&key), &[])),
        Err(_) => Bytes::from_static(b"{}"),
    }
}

/// One event of the continuation's stream as the client must see it, or None to drop it.
pub fn rewrite_event(event: &[u8], sent: &Splice) -> Option<Bytes> {
    let Some(data) = data(event) else { return Some(Bytes::copy_from_slice(event)) };
    if data == b"[DONE]" {
        return Some(Bytes::from_static(b"data: [DONE]"));
    }
    let Ok(Value::Object(mut chunk)) = serde_json::from_slice::<Value>(data) else {
        return Some(Bytes::copy_from_slice(event));
    };
    if let Some(id) = &sent.id {
        chunk.insert("id".into(), Value::String(id.clone()));
    }
    if let Some(created) = sent.created {
        chunk.insert("created".into(), created.into());
    }
    let role_only = chunk.get("choices").and_then(Value::as_array).is_some_and(|choices| {
        choices.iter().all(|c| {
            c["delta"].get("role").is_some()
                && c["delta"]["content"].as_str().unwrap_or("").is_empty()
                && c["finish_reason"].is_null()
        }) && !choices.is_empty()
    });
    if role_only && chunk.get("usage").is_none_or(Value::is_null) {
        return None;
    }
    if let Some(Value::Object(usage)) = chunk.get_mut("usage") {
        let number =
            |usage: &Map<String, Value>, key: &str| usage.get(key).and_then(Value::as_u64).unwrap_or(0);
        let prompt = sent.prompt_tokens.unwrap_or(number(usage, "prompt_tokens").saturating_sub(sent.tokens));
        let completion = number(usage, "completion_tokens") + sent.tokens;
        usage.insert("prompt_tokens".into(), prompt.into());
        usage.insert("completion_tokens".into(), completion.into());
        usage.insert("total_tokens".into(), (prompt + completion).into());
    }
    let mut out = b"data: ".to_vec();
    serde_json::to_writer(&mut out, &chunk).expect("a JSON map serialises");
    Some(Bytes::from(out))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn bytes(v: Value) -> Vec<u8> {
        serde_json::to_vec(&v).unwrap()
    }

    fn judged(v: Value, chat: bool) -> Result<(), NotContinuable> {
        let body = bytes(v);
        let members = Members::parse(&body).unwrap();
        continuable(|key| members.get(key), chat)
    }

    #[test]
    fn the_ledger_counts_what_was_sent() {
        let mut ledger = Ledger::default();
        for event in [
            r#"data: {"id":"chatcmpl-1","created":7,"choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}"#,
            r#"data: {"id":"chatcmpl-1","created":7,"choices":[{"index":0,"delta":{"content":" the"},"finish_reason":null}]}"#,
            r#"data: {"id":"chatcmpl-1","created":7,"choices":[{"index":0,"delta":{"content":" of"},"finish_reason":null}]}"#,
        ] {
            ledger.observe(event.as_bytes());
        }
        assert_eq!((ledger.id.as_deref(), ledger.created), (Some("chatcmpl-1"), Some(7)));
        assert_eq!((ledger.text.as_str(), ledger.tokens, ledger.finished), (" the of", 2, false));
        ledger.observe(
            br#"data: {"id":"c","choices":[{"index":0,"delta":{"content":"!"},"finish_reason":"length"}]}"#,
        );
        ledger.observe(b"data: [DONE]");
        assert!(ledger.finished && ledger.done && ledger.tokens == 3);
        let mut completion = Ledger::default();
        completion
            .observe(br#"data: {"id":"cmpl-2","choices":[{"index":0,"text":" and","finish_reason":null}]}"#);
        assert_eq!((completion.text.as_str(), completion.tokens), (" and", 1));
        completion.observe(br#"data: {"choices":[{"index":0,"text":"","finish_reason":"abort"}]}"#);
        assert_eq!(completion.error.take().as_deref(), Some("the replica aborted the request mid-stream"));
        assert!(!completion.finished);
        completion.observe(br#"data: {"error":{"message":"engine dead","code":500}}"#);
        assert_eq!(completion.error.as_deref(), Some("the replica failed mid-stream: engine dead"));
        assert_eq!(completion.tokens, 1);
        completion.observe(br#"data: {"choices":[{"index":1,"text":"x"}]}"#);
        completion.observe(b"data: {not json");
        assert!(completion.unfaithful);
    }

    #[test]
    fn the_ledger_keeps_a_bounded_text() {
        let mut ledger = Ledger::default();
        let event = format!(r#"data: {{"choices":[{{"index":0,"text":"{}"}}]}}"#, "a".repeat(1 << 20));
        for _ in 0..4 {
            ledger.observe(event.as_bytes());
        }
        assert!(!ledger.unfaithful && ledger.text.len() == MAX_LEDGER_TEXT);
        ledger.observe(event.as_bytes());
        assert!(ledger.unfaithful && ledger.text.is_empty(), "over the bound: not continued, nothing kept");
        assert_eq!(ledger.tokens, 5);
    }

    #[test]
    fn only_faithful_requests_continue() {
        let chat = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": true});
        assert_eq!(judged(chat.clone(), true), Ok(()));
        for (key, value) in [
            ("n", json!(2)),
            ("logprobs", json!(true)),
            ("tools", json!([{"type": "function", "function": {"name": "f"}}])),
            ("response_format", json!({"type": "json_object"})),
            ("structured_outputs", json!({"regex": "a+"})),
        ] {
            let mut request = chat.clone();
            request[key] = value;
            assert!(judged(request, true).is_err(), "{key}");
        }
        let mut none = chat.clone();
        none["tools"] = json!([{"type": "function", "function": {"name": "f"}}]);
        none["tool_choice"] = json!("none");
        assert_eq!(judged(none, true), Ok(()));
        let mut off = chat.clone();
        off["tools"] = json!([]);
        off["response_format"] = json!({"type": "text"});
        off["n"] = json!(1);
        off["logprobs"] = json!(false);
        assert_eq!(judged(off, true), Ok(()));
        assert!(judged(json!({"prompt": [1, 2, 3]}), false).is_err(), "token ids");
        assert!(judged(json!({"prompt": "a", "echo": true}), false).is_err());
        assert!(judged(json!({"messages": "hi"}), true).is_err());
    }

    #[test]
    fn the_continuation_asks_for_the_rest() {
        let sent = Ledger { text: " the of".into(), tokens: 2, ..Ledger::default() };
        let chat = bytes(
            json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10, "min_tokens": 1}),
        );
        let body: Value = serde_json::from_slice(&continuation_request(&chat, true, &sent).unwrap()).unwrap();
        assert_eq!(body["messages"][1], json!({"role": "assistant", "content": " the of"}));
        assert_eq!(
            (body["continue_final_message"].clone(), body["add_generation_prompt"].clone()),
            (json!(true), json!(false))
        );
        assert_eq!((body["max_tokens"].clone(), body["min_tokens"].clone()), (json!(8), json!(0)));
        let completion = bytes(json!({"prompt": "Once \"upon\"\n", "max_completion_tokens": 3}));
        let body: Value =
            serde_json::from_slice(&continuation_request(&completion, false, &sent).unwrap()).unwrap();
        assert_eq!(
            (body["prompt"].clone(), body["max_completion_tokens"].clone()),
            (json!("Once \"upon\"\n the of"), json!(1))
        );
        let spent = Ledger { tokens: 3, ..sent.clone() };
        assert!(continuation_request(&completion, false, &spent).is_err(), "nothing left to ask for");
        let odd = Ledger { unfaithful: true, ..sent };
        assert!(continuation_request(&completion, false, &odd).is_err());
    }

    #[test]
    fn continuation_events_join_the_first_stream() {
        let mut sent =
            Splice { id: Some("chatcmpl-1".into()), created: Some(7), tokens: 2, prompt_tokens: None };
        let role = br#"data: {"id":"chatcmpl-9","created":9,"choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}"#;
        assert_eq!(rewrite_event(role, &sent), None);
        let token = br#"data: {"id":"chatcmpl-9","created":9,"choices":[{"index":0,"delta":{"content":" and"},"finish_reason":null}]}"#;
        let out: Value = serde_json::from_slice(&rewrite_event(token, &sent).unwrap()[6..]).unwrap();
        assert_eq!((out["id"].clone(), out["created"].clone()), (json!("chatcmpl-1"), json!(7)));
        assert_eq!(out["choices"][0]["delta"]["content"], " and");
        let usage = br#"data: {"id":"x","choices":[],"usage":{"prompt_tokens":12,"completion_tokens":3,"total_tokens":15}}"#;
        let out: Value = serde_json::from_slice(&rewrite_event(usage, &sent).unwrap()[6..]).unwrap();
        assert_eq!(out["usage"], json!({"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}));
        sent.prompt_tokens = Some(9);
        let out: Value = serde_json::from_slice(&rewrite_event(usage, &sent).unwrap()[6..]).unwrap();
        assert_eq!(out["usage"], json!({"prompt_tokens": 9, "completion_tokens": 5, "total_tokens": 14}));
        let counted: Value = serde_json::from_slice(&tokenize_request(&bytes(
            json!({"model": "m", "messages": [], "max_tokens": 3, "stream": true, "tools": []}),
        )))
        .unwrap();
        assert_eq!(counted, json!({"model": "m", "messages": [], "tools": []}));
        assert_eq!(rewrite_event(b"data: [DONE]", &sent).unwrap(), Bytes::from_static(b"data: [DONE]"));
    }
}
