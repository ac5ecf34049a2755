//! The built-in tokenizer: the simulator's o200k_base encoding and chat template
//! (`<|start|>{role}<|message|>{content}<|end|>` per message, then
//! `<|start|>assistant<|message|>`), so the router computes exactly the ids a
//! simulated replica computes.
//!
//! Where the segments are cut, and why they encode independently: o200k's
//! pre-tokenizer splits text into pieces by a regular expression and BPE never merges
//! across pieces, so text cut where a piece always ends encodes to the concatenation
//! of its parts' ids. Two such places are used:
//! - between a letter and a `|` (a run of letters ends at any non-letter, and a
//!   punctuation run cannot hold a letter): every message's `<|end|>` is cut after
//!   `<|end`, so each message is one segment that depends on that message alone;
//! - after a newline followed by an ASCII character that is neither whitespace nor `/`
//!   (a newline run ends there, no piece starts with a newline, and only `/` may
//!   follow a newline inside a punctuation piece): long text prompts are cut into
//!   chunks of about [`TEXT_CHUNK`] bytes there.
//!
//! `add_generation_prompt` is taken as true (vLLM's and the simulator's default).

use std::borrow::Cow;
use std::sync::Arc;

use serde_json::Value;
use xxhash_rust::xxh3::xxh3_64_with_seed;

use super::segments::{SegmentCache, split_json_array};
use llm_common::tokenizer;

/// Text prompts are cut at the first safe newline after this many bytes.
pub const TEXT_CHUNK: usize = 1024;

const FIRST_MESSAGE: u64 = 1;
const LATER_MESSAGE: u64 = 2;
const TEXT: u64 = 3;

pub struct BuiltinTokenizer {
    cache: SegmentCache,
}

impl std::fmt::Debug for BuiltinTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BuiltinTokenizer").finish_non_exhaustive()
    }
}

impl BuiltinTokenizer {
    /// With a cache of at most `cache_tokens` token ids.
    pub fn new(cache_tokens: usize) -> Self {
        tokenizer::warm_up();
        BuiltinTokenizer { cache: SegmentCache::new(cache_tokens) }
    }

    /// The token ids of a prompt given as the raw JSON of a request's `messages` or
    /// `prompt`; `None` when it is none of the shapes those take.
    pub fn tokens(&self, raw: &[u8]) -> Option<Vec<u32>> {
        let first = *raw.iter().find(|b| !b.is_ascii_whitespace())?;
        match first {
            b'"' => Some(self.text(&serde_json::from_slice::<Cow<str>>(raw).ok()?)),
            b'[' => {
                let elements = split_json_array(raw)?;
                let Some(head) = elements.first() else { return Some(self.chat(raw, &elements)) };
                match raw[head.start] {
                    b'{' => Some(self.chat(raw, &elements)),
                    b'0'..=b'9' => serde_json::from_slice::<Vec<u32>>(raw).ok(),
                    // A list of one prompt: text or ids.
                    b'"' | b'[' if elements.len() == 1 => self.tokens(&raw[head.clone()]),
                    _ => None,
                }
            }
            _ => None,
        }
    }

    fn chat(&self, raw: &[u8], elements: &[std::ops::Range<usize>]) -> Vec<u32> {
        let mut ids = Vec::with_capacity(raw.len() / 3);
        for (i, element) in elements.iter().enumerate() {
            let source = &raw[element.clone()];
            let seed = if i == 0 { FIRST_MESSAGE } else { LATER_MESSAGE };
            let key = xxh3_64_with_seed(source, seed);
            let segment = self.cache.get(key).unwrap_or_else(|| {
                let text = message_segment(source, i == 0);
                let segment: Arc<[u32]> = tokenizer::encode(&text).into();
                self.cache.insert(key, segment.clone());
                segment
            });
            ids.extend_from_slice(&segment);
        }
        let prompt = if elements.is_empty() {
            "<|start|>assistant<|message|>"
        } else {
            "|><|start|>assistant<|message|>"
        };
        ids.extend_from_slice(&self.cached(prompt, TEXT));
        ids
    }

    fn text(&self, text: &str) -> Vec<u32> {
        let mut ids = Vec::with_capacity(text.len() / 3);
        for chunk in text_chunks(text) {
            ids.extend_from_slice(&self.cached(chunk, TEXT));
        }
        ids
    }

    fn cached(&self, text: &str, seed: u64) -> Arc<[u32]> {
        let key = xxh3_64_with_seed(text.as_bytes(), seed);
        self.cache.get(key).unwrap_or_else(|| {
            let segment: Arc<[u32]> = tokenizer::encode(text).into();
            self.cache.insert(key, segment.clone());
            segment
        })
    }
}

/// One message's segment of the rendered prompt: `<|start|>{role}<|message|>{content}<|end`,
/// after the `|>` that closes the previous message's `<|end|>` for all but the first.
/// Content is text, or the concatenated text of its text parts (the simulator's rule).
fn message_segment(source: &[u8], first: bool) -> String {
    let message: Value = serde_json::from_slice(source).unwrap_or(Value::Null);
    let role = message.get("role").and_then(Value::as_str).unwrap_or("");
    let mut out = String::with_capacity(source.len() + 32);
    if !first {
        out.push_str("|>");
    }
    out.push_str("<|start|>");
    out.push_str(role);
    out.push_str("<|message|>");
    match message.get("content") {
        Some(Value::String(s)) => out.push_str(s),
        Some(Value::Array(parts)) => {
            for part in parts {
                if let Some(text) = part.get("text").and_then(Value::as_str) {
                    out.push_str(text);
                }
            }
        }
        _ => {}
    }
    out.push_str("<|end");
    out
}

/// `text` cut after a newline that is followed by a non-whitespace character, at the
/// first such place after every [`TEXT_CHUNK`] bytes.
fn text_chunks(text: &str) -> impl Iterator<Item = &str> {
    let bytes = text.as_bytes();
    let mut start = 0;
    std::iter::from_fn(move || {
        if start >= bytes.len() {
            return None;
        }
        let mut cut = bytes.len();
        let mut i = start + TEXT_CHUNK;
        while i + 1 < bytes.len() {
            let next = bytes[i + 1];
            if bytes[i] == b'\n' && next.is_ascii() && !next.is_ascii_whitespace() && next != b'/' {
                cut = i + 1;
                break;
            }
            i += 1;
        }
        let chunk = &text[start..cut];
        start = cut;
        Some(chunk)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use llm_common::tokenizer::{ChatMessage, render_chat};

    fn reference(messages: &[(&str, &str)]) -> Vec<u32> {
        let m: Vec<ChatMessage> =
            messages.iter().map(|(role, content)| ChatMessage { role, content }).collect();
        tokenizer::encode(&render_chat(&m, true))
    }

    fn raw(messages: &[(&str, &str)]) -> String {
        let list: Vec<Value> =
            messages.iter().map(|(r, c)| serde_json::json!({"role": r, "content": c})).collect();
        serde_json::to_string(&list).unwrap()
    }

    /// Contents chosen to end and start with every kind of character next to the cuts.
    const TRICKY: &[&str] = &[
        "plain words",
        "ends with a space ",
        "ends with newline\n",
        "  leading spaces and trailing\n\n  ",
        "digits 12345",
        "<|end|> inside content <|start|>",
        "punctuation!?|",
        "|starts with a bar",
        "unicode 東京 🚀 ends é",
        "",
        "x's and it'll",
        "tabs\tand\r\nCRLF\r\n",
        "code: fn main() { println!(\"hi\"); }\n    return 0;\n}",
        "a path.\n/usr/bin\nnext",
    ];

    #[test]
    fn segments_encode_to_exactly_the_ids_of_the_whole_prompt() {
        let t = BuiltinTokenizer::new(1 << 20);
        let roles = ["system", "user", "assistant", "tool"];
        for (i, a) in TRICKY.iter().enumerate() {
            for (j, b) in TRICKY.iter().enumerate() {
                let messages = [(roles[i % 4], *a), (roles[j % 4], *b), ("user", *a)];
                assert_eq!(
                    t.tokens(raw(&messages).as_bytes()).unwrap(),
                    reference(&messages),
                    "{a:?} / {b:?}"
                );
            }
        }
        // Content given as parts.
        let parts = r#"[{"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]}]"#;
        assert_eq!(t.tokens(parts.as_bytes()).unwrap(), reference(&[("user", "ab")]));
    }

    #[test]
    fn a_growing_conversation_hits_the_cache() {
        let t = BuiltinTokenizer::new(1 << 20);
        let replies: Vec<String> = (0..6).map(|i| format!("done {i}: 1 2 3")).collect();
        let mut messages = vec![("system", "You are an agent.\nBe brief.")];
        for (turn, reply) in replies.iter().take(5).enumerate() {
            messages.push(("user", if turn % 2 == 0 { "run the tests\nnow" } else { "ok" }));
            assert_eq!(t.tokens(raw(&messages).as_bytes()).unwrap(), reference(&messages));
            messages.push(("assistant", reply));
        }
        let before = t.cache.tokens();
        t.tokens(raw(&messages).as_bytes()).unwrap();
        // Only the new message's segment was added.
        let segment = tokenizer::encode("|><|start|>assistant<|message|>done 4: 1 2 3<|end");
        assert_eq!(t.cache.tokens() - before, segment.len());
    }

    #[test]
    fn text_and_id_prompts() {
        let t = BuiltinTokenizer::new(1 << 20);
        let mut text = String::new();
        for i in 0..400 {
            text.push_str(&format!("line {i} of a long prompt,  with  spaces.\n"));
            if i % 5 == 0 {
                text.push_str("/path/to/file.rs\n");
            }
            if i % 7 == 0 {
                text.push_str("\n  indented\n\n");
            }
        }
        assert!(text_chunks(&text).count() > 5);
        let json = serde_json::to_string(&text).unwrap();
        assert_eq!(t.tokens(json.as_bytes()).unwrap(), tokenizer::encode(&text));
        assert_eq!(t.tokens(format!("[{json}]").as_bytes()).unwrap(), tokenizer::encode(&text));
        assert_eq!(t.tokens(b"[1, 2, 3]").unwrap(), vec![1, 2, 3]);
        assert_eq!(t.tokens(b"[[4, 5]]").unwrap(), vec![4, 5]);
        assert_eq!(t.tokens(b"{}"), None);
        assert_eq!(t.tokens(b"[true]"), None);
    }
}
