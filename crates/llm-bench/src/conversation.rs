//! One trace session as it is replayed: the chat history so far and the request body of
//! its next turn, built as AIPerf builds them for a mooncake trace (its default
//! `deltas_without_responses` context mode).
//!
//! Each turn's new text becomes a user message; the engine's response to it, as it was
//! streamed, becomes the assistant message that follows, so every request carries the
//! whole conversation so far and the engine sees the previous prompt as a prefix of the
//! next. Like AIPerf's chat endpoint: no system message, `max_completion_tokens` set to
//! the turn's `output_length`, `ignore_eos` (the study's `--extra-inputs`), streamed. We
//! also ask for `stream_options.include_usage`, so output tokens are counted by the engine.
//!
//! Each message is JSON-escaped once, when it joins the history, and a turn's body is the
//! escaped history spliced into a small template: a 40k-token history costs a copy per
//! turn, not a re-serialisation.

use bytes::Bytes;
use xxhash_rust::xxh3::xxh3_64_with_seed;

use super::client::Prepared;
use super::text::{hash_block, random_words};
use super::trace::{TraceTurn, TurnPrompt};

pub struct Conversation {
    /// The model name, as a JSON string.
    model: String,
    session_id: String,
    block_size: usize,
    /// The escaped messages so far, comma-separated.
    messages: String,
    /// Prompt tokens so far, as the trace counts them (message contents only).
    tokens: usize,
    turns: usize,
}

impl Conversation {
    pub fn new(model: &str, session_id: &str, block_size: usize) -> Self {
        Conversation {
            model: serde_json::to_string(model).expect("a string serialises"),
            session_id: session_id.to_owned(),
            block_size,
            messages: String::new(),
            tokens: 0,
            turns: 0,
        }
    }

    fn push(&mut self, role: &str, content: &str) {
        if !self.messages.is_empty() {
            self.messages.push(',');
        }
        self.messages.push_str(r#"{"role":""#);
        self.messages.push_str(role);
        self.messages.push_str(r#"","content":"#);
        self.messages.push_str(&serde_json::to_string(content).expect("a string serialises"));
        self.messages.push('}');
    }

    /// The request of `turn`: its new text joins the history as a user message.
    pub fn ask(&mut self, turn: &TraceTurn) -> Prepared {
        let text = self.turn_text(turn);
        self.push("user", &text);
        self.tokens += turn.input_length;
        self.turns += 1;
        let body = format!(
            r#"{{"messages":[{}],"model":{},"stream":true,"max_completion_tokens":{},"ignore_eos":true,"stream_options":{{"include_usage":true}}}}"#,
            self.messages, self.model, turn.output_length
        );
        Prepared {
            path: "/v1/chat/completions",
            body: Bytes::from(body),
            prompt_tokens: self.tokens,
            session: Some(self.session_id.clone()),
            keep_text: true,
        }
    }

    /// The response to the last turn joins the history, as the engine generated it.
    pub fn answer(&mut self, text: &str, tokens: usize) {
        self.push("assistant", text);
        self.tokens += tokens;
    }

    /// The turn's new text: its blocks, its literal text, or random words.
    fn turn_text(&self, turn: &TraceTurn) -> String {
        match &turn.prompt {
            TurnPrompt::Text(text) => text.clone(),
            TurnPrompt::Blocks(ids) => {
                let mut text = String::new();
                let last = ids.len() - 1;
                for (i, &id) in ids.iter().enumerate() {
                    let tokens =
                        if i == last { turn.input_length - last * self.block_size } else { self.block_size };
                    hash_block(id, tokens, &mut text);
                }
                text
            }
            TurnPrompt::Random => {
                let key = format!("{}#{}", self.session_id, self.turns);
                let mut rng = fastrand::Rng::with_seed(xxh3_64_with_seed(key.as_bytes(), 0x5eed));
                random_words(&mut rng, turn.input_length)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use llm_common::tokenizer::encode;
    use serde_json::Value;

    fn turn(prompt: TurnPrompt, input_length: usize, output_length: usize) -> TraceTurn {
        TraceTurn { delay: Duration::ZERO, input_length, output_length, prompt }
    }

    #[test]
    fn history_grows_turn_by_turn_as_aiperf_sends_it() {
        let mut c = Conversation::new("m\"x", "s1", 64);
        let first = c.ask(&turn(TurnPrompt::Blocks(vec![0, 1, 2]), 150, 3));
        let body: Value = serde_json::from_slice(&first.body).unwrap();
        let content = body["messages"][0]["content"].as_str().unwrap();
        assert_eq!(encode(content).len(), 150, "two whole blocks and 22 tokens of the third");
        c.answer(" a b \"c\"", 3);
        let second = c.ask(&turn(TurnPrompt::Random, 20, 2));
        let body: Value = serde_json::from_slice(&second.body).unwrap();
        assert_eq!(body["model"], "m\"x");
        assert_eq!(body["max_completion_tokens"], 2);
        assert_eq!(body["ignore_eos"], true);
        assert_eq!(body["stream"], true);
        let roles: Vec<&str> =
            body["messages"].as_array().unwrap().iter().map(|m| m["role"].as_str().unwrap()).collect();
        assert_eq!(roles, ["user", "assistant", "user"]);
        assert_eq!(body["messages"][0]["content"].as_str().unwrap(), content, "history resent unchanged");
        assert_eq!(body["messages"][1]["content"], " a b \"c\"");
        assert_eq!(encode(body["messages"][2]["content"].as_str().unwrap()).len(), 20);
        assert_eq!((first.prompt_tokens, second.prompt_tokens), (150, 173));
        assert_eq!(second.session.as_deref(), Some("s1"));
    }

    #[test]
    fn the_same_block_is_the_same_text_in_every_session() {
        let text = |session: &str, ids: Vec<u64>, len| {
            let mut c = Conversation::new("m", session, 64);
            let body: Value =
                serde_json::from_slice(&c.ask(&turn(TurnPrompt::Blocks(ids), len, 1)).body).unwrap();
            body["messages"][0]["content"].as_str().unwrap().to_owned()
        };
        let a = text("a", vec![5, 6, 7], 192);
        let b = text("b", vec![5, 6, 9], 192);
        let shared = text("c", vec![5, 6], 128);
        assert!(a.starts_with(&shared) && b.starts_with(&shared));
        assert_ne!(a, b);
    }
}
