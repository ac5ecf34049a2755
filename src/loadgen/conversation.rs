//! One agentic session as it is replayed: the chat history so far and the request body
//! of its next turn.
//!
//! Each message is JSON-escaped once, when it joins the history, and the body of a turn
//! is the escaped history spliced into a small template: a 40k-token history costs a
//! copy per turn, not a re-serialisation.

use bytes::Bytes;

use super::agentic::{Session, Turn};
use super::client::Prepared;

pub struct Conversation {
    /// `"model":"..."`, escaped.
    model: String,
    session_id: String,
    /// The escaped messages so far, comma-separated.
    messages: String,
    /// Prompt tokens so far, as the dataset counts them (content only).
    tokens: usize,
}

impl Conversation {
    pub fn new(model: &str, session: &Session) -> Self {
        let mut conversation = Conversation {
            model: serde_json::to_string(model).expect("a string serialises"),
            session_id: session.session_id.clone(),
            messages: String::with_capacity(session.context.len() * 2),
            tokens: session.context_tokens,
        };
        conversation.push("system", &session.context);
        conversation
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

    /// The request of `turn`: its user message joins the history.
    pub fn ask(&mut self, turn: &Turn) -> Prepared {
        self.push("user", &turn.new_text);
        self.tokens += turn.new_tokens;
        let body = format!(
            r#"{{"model":{},"messages":[{}],"max_tokens":{},"ignore_eos":true,"temperature":0.0,"stream":true,"stream_options":{{"include_usage":true}}}}"#,
            self.model, self.messages, turn.max_tokens
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    #[test]
    fn history_grows_turn_by_turn_and_escapes_text() {
        let session = Session {
            session_id: "s1".into(),
            context: "ctx \"quoted\"\n".into(),
            context_tokens: 4,
            turns: vec![
                Turn { delay_ms: 0, new_text: " one".into(), new_tokens: 1, max_tokens: 3 },
                Turn { delay_ms: 5, new_text: " two".into(), new_tokens: 1, max_tokens: 2 },
            ],
        };
        let mut c = Conversation::new("m\"x", &session);
        let first = c.ask(&session.turns[0]);
        c.answer(" a b c", 3);
        let second = c.ask(&session.turns[1]);
        let body: Value = serde_json::from_slice(&second.body).unwrap();
        assert_eq!(body["model"], "m\"x");
        assert_eq!(body["max_tokens"], 2);
        let roles: Vec<&str> =
            body["messages"].as_array().unwrap().iter().map(|m| m["role"].as_str().unwrap()).collect();
        assert_eq!(roles, ["system", "user", "assistant", "user"]);
        assert_eq!(body["messages"][0]["content"], "ctx \"quoted\"\n");
        assert_eq!(body["messages"][2]["content"], " a b c");
        assert_eq!((first.prompt_tokens, second.prompt_tokens), (5, 9));
        assert_eq!(second.session.as_deref(), Some("s1"));
    }
}
