//! A completion (from a decode of token ids) written as the chat completion a chat
//! client asked for: completion chunks as `chat.completion.chunk` events, a completion
//! body as a `chat.completion`.
//!
//! The decode replica's JSON is read through borrowed views (each field a slice of the
//! input) and the chat JSON written straight out, choice by choice: memory is the input
//! and the output, whatever the response holds. A role chunk (`delta.role:
//! "assistant"`) goes first, as vLLM's chat endpoint sends it; `text` becomes
//! `delta.content` or `message.content`; finish and stop reasons and usage are carried
//! over. Anything that is not a completion (an error, `[DONE]`, a comment) is the
//! caller's to pass through unchanged.

use std::borrow::Cow;

use serde::de::{DeserializeSeed, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;

/// The parts of a completion (or a chunk of one) the conversion reads.
#[derive(Deserialize)]
struct Completion<'a> {
    #[serde(borrow, default)]
    id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    created: Option<&'a RawValue>,
    #[serde(borrow, default)]
    model: Option<&'a RawValue>,
    #[serde(borrow, default)]
    choices: Option<&'a RawValue>,
    #[serde(borrow, default)]
    usage: Option<&'a RawValue>,
    #[serde(borrow, default)]
    error: Option<&'a RawValue>,
}

/// One completion choice; a field present as `null` is `Some("null")`.
#[derive(Deserialize)]
struct Choice<'a> {
    #[serde(borrow, default)]
    index: Option<&'a RawValue>,
    #[serde(borrow, default)]
    text: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    finish_reason: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    stop_reason: Option<&'a RawValue>,
}

fn present<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(deserializer).map(Some)
}

fn raw(value: Option<&RawValue>) -> &[u8] {
    value.map_or(b"null", |v| v.get().as_bytes())
}

fn is_null(value: Option<&RawValue>) -> bool {
    value.is_none_or(|v| v.get() == "null")
}

/// `cmpl-X` becomes `chatcmpl-X`, as vLLM names chat completions.
fn chat_id(out: &mut Vec<u8>, id: Option<&RawValue>) {
    match id.and_then(|id| serde_json::from_str::<Cow<str>>(id.get()).ok()) {
        Some(id) => {
            let id = format!("chatcmpl-{}", id.strip_prefix("cmpl-").unwrap_or(&id));
            serde_json::to_writer(&mut *out, &id).expect("writing to a Vec cannot fail");
        }
        None => out.extend_from_slice(raw(id)),
    }
}

/// `{"id":..,"object":OBJECT,"created":..,"model":..,"choices":` (the caller writes the
/// choices and closes the object).
fn head(out: &mut Vec<u8>, c: &Completion, object: &str) {
    out.extend_from_slice(b"{\"id\":");
    chat_id(out, c.id);
    out.extend_from_slice(format!(",\"object\":\"{object}\",\"created\":").as_bytes());
    out.extend_from_slice(raw(c.created));
    out.extend_from_slice(b",\"model\":");
    out.extend_from_slice(raw(c.model));
    out.extend_from_slice(b",\"choices\":");
}

/// Each choice of a `choices` array written by `write`, as a JSON array, without
/// holding the choices.
fn write_choices(out: &mut Vec<u8>, choices: &RawValue, write: fn(&mut Vec<u8>, &Choice)) -> Option<()> {
    struct Each<'o> {
        out: &'o mut Vec<u8>,
        write: fn(&mut Vec<u8>, &Choice),
    }
    impl<'de> DeserializeSeed<'de> for Each<'_> {
        type Value = ();

        fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
            deserializer.deserialize_seq(self)
        }
    }
    impl<'de> Visitor<'de> for Each<'_> {
        type Value = ();

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a list of choices")
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
            self.out.push(b'[');
            let mut first = true;
            while let Some(choice) = seq.next_element::<Choice>()? {
                if !first {
                    self.out.push(b',');
                }
                first = false;
                (self.write)(self.out, &choice);
            }
            self.out.push(b']');
            Ok(())
        }
    }
    let mut deserializer = serde_json::Deserializer::from_str(choices.get());
    Each { out, write }.deserialize(&mut deserializer).ok()
}

fn delta_choice(out: &mut Vec<u8>, c: &Choice) {
    out.extend_from_slice(b"{\"index\":");
    out.extend_from_slice(raw(c.index));
    out.extend_from_slice(b",\"delta\":{\"content\":");
    out.extend_from_slice(raw(c.text));
    out.extend_from_slice(b"},\"logprobs\":null,\"finish_reason\":");
    out.extend_from_slice(raw(c.finish_reason));
    if c.stop_reason.is_some() && !(is_null(c.stop_reason) && is_null(c.finish_reason)) {
        out.extend_from_slice(b",\"stop_reason\":");
        out.extend_from_slice(raw(c.stop_reason));
    }
    out.push(b'}');
}

fn message_choice(out: &mut Vec<u8>, c: &Choice) {
    out.extend_from_slice(b"{\"index\":");
    out.extend_from_slice(raw(c.index));
    out.extend_from_slice(b",\"message\":{\"role\":\"assistant\",\"content\":");
    out.extend_from_slice(raw(c.text));
    out.extend_from_slice(
        b",\"refusal\":null,\"annotations\":null,\"audio\":null,\"function_call\":null,\"tool_calls\":[],\"reasoning_content\":null},\"logprobs\":null,\"finish_reason\":",
    );
    out.extend_from_slice(raw(c.finish_reason));
    out.extend_from_slice(b",\"stop_reason\":");
    out.extend_from_slice(raw(c.stop_reason));
    out.push(b'}');
}

/// One completion chunk (an SSE event's data) as chat chunk events (`data: ...\n\n`),
/// with the role chunk first when `first` and the chunk has choices. `false` when it is
/// not a completion chunk (an error, or something else): pass it on unchanged.
pub fn convert_chunk(chunk: &[u8], first: bool, out: &mut Vec<u8>) -> bool {
    let Some(Ok(c)) = super::members::object(chunk).map(serde_json::from_slice::<Completion>) else {
        return false;
    };
    let Some(choices) = c.choices.filter(|_| c.error.is_none()) else { return false };
    let start = out.len();
    let has_choices =
        choices.get().trim_start_matches('[').trim_start().chars().next().is_some_and(|ch| ch != ']');
    if first && has_choices {
        out.extend_from_slice(b"data: ");
        head(out, &c, "chat.completion.chunk");
        out.extend_from_slice(
            br#"[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]}"#,
        );
        out.extend_from_slice(b"\n\n");
    }
    out.extend_from_slice(b"data: ");
    head(out, &c, "chat.completion.chunk");
    if write_choices(out, choices, delta_choice).is_none() {
        out.truncate(start);
        return false;
    }
    if let Some(usage) = c.usage {
        out.extend_from_slice(b",\"usage\":");
        out.extend_from_slice(usage.get().as_bytes());
    }
    out.extend_from_slice(b"}\n\n");
    true
}

/// A finished completion as a chat completion; an error body as it is. `None` when it
/// is neither.
pub fn convert_body(completion: &[u8]) -> Option<Vec<u8>> {
    let c = serde_json::from_slice::<Completion>(super::members::object(completion)?).ok()?;
    if c.error.is_some() {
        return Some(completion.to_vec());
    }
    let mut out = Vec::with_capacity(completion.len() + 512);
    head(&mut out, &c, "chat.completion");
    match c.choices {
        Some(choices) => write_choices(&mut out, choices, message_choice)?,
        None => out.extend_from_slice(b"[]"),
    }
    out.extend_from_slice(b",\"service_tier\":null,\"system_fingerprint\":null,\"usage\":");
    out.extend_from_slice(raw(c.usage));
    out.extend_from_slice(b",\"prompt_logprobs\":null,\"kv_transfer_params\":null}");
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn events(out: &[u8]) -> Vec<Value> {
        let text = std::str::from_utf8(out).unwrap();
        text.split("\n\n")
            .filter(|e| !e.is_empty())
            .map(|e| serde_json::from_str(e.strip_prefix("data: ").unwrap()).unwrap())
            .collect()
    }

    #[test]
    fn chunks_become_chat_chunks_with_the_role_first() {
        let chunk = br#"{"id":"cmpl-1","object":"text_completion","created":5,"model":"m","choices":[{"index":0,"text":" a","logprobs":null,"finish_reason":null,"stop_reason":null}]}"#;
        let mut out = Vec::new();
        assert!(convert_chunk(chunk, true, &mut out));
        let e = events(&out);
        assert_eq!(e.len(), 2);
        assert_eq!(e[0]["object"], "chat.completion.chunk");
        assert_eq!(e[0]["id"], "chatcmpl-1");
        assert_eq!(e[0]["choices"][0]["delta"]["role"], "assistant");
        assert_eq!(e[1]["choices"][0]["delta"]["content"], " a");
        assert!(e[1]["choices"][0].get("stop_reason").is_none(), "null with a null finish: left out");
        let last = br#"{"id":"cmpl-1","created":5,"model":"m","choices":[{"index":0,"text":"","finish_reason":"stop","stop_reason":null}]}"#;
        let mut out = Vec::new();
        assert!(convert_chunk(last, false, &mut out));
        let e = events(&out);
        assert_eq!(e.len(), 1, "no role chunk after the first");
        assert_eq!(e[0]["choices"][0]["finish_reason"], "stop");
        assert_eq!(e[0]["choices"][0]["stop_reason"], Value::Null);
        let usage = br#"{"id":"cmpl-1","created":5,"model":"m","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}"#;
        let mut out = Vec::new();
        assert!(convert_chunk(usage, true, &mut out));
        let e = events(&out);
        assert_eq!(e.len(), 1, "no role chunk without choices");
        assert_eq!(
            (e[0]["choices"].clone(), e[0]["usage"]["completion_tokens"].clone()),
            (json!([]), json!(2))
        );
        for other in [&br#"{"error":{"message":"x"}}"#[..], b"[DONE]", b"not json", br#"{"choices":[1]}"#] {
            let mut out = Vec::new();
            assert!(!convert_chunk(other, true, &mut out), "{}", String::from_utf8_lossy(other));
            assert!(out.is_empty());
        }
    }

    #[test]
    fn bodies_become_chat_completions() {
        let c = br#"{"id": "cmpl-9", "object": "text_completion", "created": 1, "model": "m",
            "choices": [{"index": 0, "text": "hello \"you\"", "finish_reason": "stop", "stop_reason": null}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}"#;
        let chat: Value = serde_json::from_slice(&convert_body(c).unwrap()).unwrap();
        assert_eq!(chat["object"], "chat.completion");
        assert_eq!(chat["id"], "chatcmpl-9");
        assert_eq!(chat["choices"][0]["message"]["content"], "hello \"you\"");
        assert_eq!(chat["choices"][0]["message"]["role"], "assistant");
        assert_eq!(chat["choices"][0]["finish_reason"], "stop");
        assert_eq!(chat["usage"]["total_tokens"], 2);
        let error = br#"{"error":{"message":"bad","code":400}}"#;
        assert_eq!(convert_body(error).unwrap(), error.to_vec());
        assert!(convert_body(b"[1,2]").is_none());
    }
}
