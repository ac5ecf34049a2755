//! The few facts routing needs from a request body, parsed as JSON and nothing more.
//!
//! The ingress reads the body once and hands it here. We walk the top-level JSON object
//! with serde, keep borrowed raw slices of the handful of fields we care about (`model`,
//! `stream`, the session fields) and skip everything else without allocating: a 100 kB
//! chat history is validated as JSON but never materialised. Only the fields found are
//! then typed, so a wrong type is reported with the field's name.
//!
//! Session fields, in priority order: `session_id`, `session_params.session_id` (the form
//! vllm-router clients send), `user` (OpenAI's field, also vllm-router's), `user_id`. Only
//! top-level keys count: a message whose text contains `"user"` is content, not a key.
//!
//! The prompt (`messages`, else `prompt`) is kept only as where its raw JSON lies in the
//! body, for the cache-aware policies to hash; it is never parsed here.

use serde::Deserialize;
use serde::de::{IgnoredAny, MapAccess, Visitor};
use serde_json::value::RawValue;

use crate::response::continuation;

/// What the router learned from a request body.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct BodyFacts {
    pub model: Option<String>,
    pub stream: bool,
    /// The body's session key, if any (header keys are found elsewhere and win).
    pub session: Option<String>,
    /// Where the raw JSON of `messages` (or else `prompt`) lies in the body.
    pub prompt: Option<std::ops::Range<usize>>,
    /// The body carries `kv_transfer_params` (which the ingress strips from clients).
    pub kv_transfer_params: bool,
    /// The most tokens one generation may have, as the request names it
    /// (`max_completion_tokens`, `max_tokens`, or the Responses API's
    /// `max_output_tokens`); `None` when it names none.
    pub max_tokens: Option<u64>,
    /// Generations the request asks for: `n` (or `best_of`, if larger) times the
    /// prompts of a batch.
    pub generations: u64,
    /// vLLM's `cache_salt`: the request's blocks are cached apart from unsalted ones.
    pub cache_salt: Option<String>,
    /// Whether a broken stream of this request could be continued faithfully, as a chat
    /// and as a completion ([`crate::response::continuation::continuable`]).
    pub continuable: Continuable,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Continuable {
    pub chat: bool,
    pub completion: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FactsError {
    #[error("request body is empty; expected a JSON object")]
    Empty,
    #[error("request body is not valid JSON: {0}")]
    NotJson(String),
    #[error("request body must be a JSON object")]
    NotObject,
    #[error("`model` is required")]
    MissingModel,
    #[error("`{field}` must be {expected}")]
    WrongType { field: &'static str, expected: &'static str },
    /// Stop strings past the router's bounds ([`crate::frontend::stop_strings`]).
    #[error("{0}")]
    Stop(String),
}

impl FactsError {
    /// The request field the error is about, for the error body's `param`.
    pub fn field(&self) -> Option<&str> {
        match self {
            FactsError::MissingModel => Some("model"),
            FactsError::WrongType { field, .. } => Some(field),
            FactsError::Stop(_) => Some("stop"),
            _ => None,
        }
    }
}

/// Parse the routing facts of a JSON request body.
pub fn parse(body: &[u8]) -> Result<BodyFacts, FactsError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(FactsError::Empty);
    }
    let raw: RawFields = serde_json::from_slice(body).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => FactsError::NotObject,
        _ => FactsError::NotJson(e.to_string()),
    })?;
    let mut facts = raw.typed()?;
    facts.prompt = raw.messages.or(raw.prompt).map(|value| {
        // A borrowed RawValue is a slice of `body` itself.
        let start = value.get().as_ptr() as usize - body.as_ptr() as usize;
        start..start + value.get().len()
    });
    Ok(facts)
}

/// Like [`parse`], and `model` must be present (completions and chat completions).
pub fn parse_inference(body: &[u8]) -> Result<BodyFacts, FactsError> {
    let facts = parse(body)?;
    if facts.model.is_none() {
        return Err(FactsError::MissingModel);
    }
    Ok(facts)
}

/// The untyped first pass: raw JSON slices of the fields we route on.
#[derive(Default)]
struct RawFields<'a> {
    model: Option<&'a RawValue>,
    stream: Option<&'a RawValue>,
    session_id: Option<&'a RawValue>,
    session_params: Option<&'a RawValue>,
    user: Option<&'a RawValue>,
    user_id: Option<&'a RawValue>,
    messages: Option<&'a RawValue>,
    prompt: Option<&'a RawValue>,
    kv_transfer_params: Option<&'a RawValue>,
    stop: Option<&'a RawValue>,
    max_tokens: Option<&'a RawValue>,
    max_completion_tokens: Option<&'a RawValue>,
    max_output_tokens: Option<&'a RawValue>,
    n: Option<&'a RawValue>,
    best_of: Option<&'a RawValue>,
    cache_salt: Option<&'a RawValue>,
    /// The other members continuation judges a request by, last value of each.
    judged: [Option<&'a RawValue>; 12],
}

#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "snake_case")]
enum Field {
    Model,
    Stream,
    SessionId,
    SessionParams,
    User,
    UserId,
    Messages,
    Prompt,
    KvTransferParams,
    Stop,
    MaxTokens,
    MaxCompletionTokens,
    MaxOutputTokens,
    N,
    BestOf,
    CacheSalt,
    Logprobs,
    TopLogprobs,
    PromptLogprobs,
    Echo,
    Tools,
    ToolChoice,
    ResponseFormat,
    StructuredOutputs,
    GuidedJson,
    GuidedRegex,
    GuidedChoice,
    GuidedGrammar,
    #[serde(other)]
    Other,
}

impl<'de: 'a, 'a> Deserialize<'de> for RawFields<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct FieldsVisitor;
        impl<'de> Visitor<'de> for FieldsVisitor {
            type Value = RawFields<'de>;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut raw = RawFields::default();
                while let Some(field) = map.next_key::<Field>()? {
                    // Duplicate keys: the last one wins, as in Python's json (vLLM).
                    let slot = match field {
                        Field::Model => &mut raw.model,
                        Field::Stream => &mut raw.stream,
                        Field::SessionId => &mut raw.session_id,
                        Field::SessionParams => &mut raw.session_params,
                        Field::User => &mut raw.user,
                        Field::UserId => &mut raw.user_id,
                        Field::Messages => &mut raw.messages,
                        Field::Prompt => &mut raw.prompt,
                        Field::KvTransferParams => &mut raw.kv_transfer_params,
                        Field::Stop => &mut raw.stop,
                        Field::MaxTokens => &mut raw.max_tokens,
                        Field::MaxCompletionTokens => &mut raw.max_completion_tokens,
                        Field::MaxOutputTokens => &mut raw.max_output_tokens,
                        Field::N => &mut raw.n,
                        Field::BestOf => &mut raw.best_of,
                        Field::CacheSalt => &mut raw.cache_salt,
                        Field::Logprobs => &mut raw.judged[0],
                        Field::TopLogprobs => &mut raw.judged[1],
                        Field::PromptLogprobs => &mut raw.judged[2],
                        Field::Echo => &mut raw.judged[3],
                        Field::Tools => &mut raw.judged[4],
                        Field::ToolChoice => &mut raw.judged[5],
                        Field::ResponseFormat => &mut raw.judged[6],
                        Field::StructuredOutputs => &mut raw.judged[7],
                        Field::GuidedJson => &mut raw.judged[8],
                        Field::GuidedRegex => &mut raw.judged[9],
                        Field::GuidedChoice => &mut raw.judged[10],
                        Field::GuidedGrammar => &mut raw.judged[11],
                        Field::Other => {
                            map.next_value::<IgnoredAny>()?;
                            continue;
                        }
                    };
                    *slot = Some(map.next_value()?);
                }
                Ok(raw)
            }
        }
        deserializer.deserialize_map(FieldsVisitor)
    }
}

impl RawFields<'_> {
    fn typed(&self) -> Result<BodyFacts, FactsError> {
        let model = match self.model {
            Some(raw) => serde_json::from_str::<Option<String>>(raw.get())
                .map_err(|_| FactsError::WrongType { field: "model", expected: "a string" })?,
            None => None,
        };
        let stream = match self.stream {
            Some(raw) => serde_json::from_str::<Option<bool>>(raw.get())
                .map_err(|_| FactsError::WrongType { field: "stream", expected: "a boolean" })?
                .unwrap_or(false),
            None => false,
        };
        let nested = match self.session_params {
            Some(raw) => serde_json::from_str::<Option<SessionParams>>(raw.get())
                .map_err(|_| FactsError::WrongType { field: "session_params", expected: "an object" })?
                .and_then(|p| p.session_id),
            None => None,
        };
        let mut session = None;
        for (field, raw) in [
            ("session_id", self.session_id),
            ("session_params.session_id", nested),
            ("user", self.user),
            ("user_id", self.user_id),
        ] {
            // Every present session field is type-checked, even when an earlier one wins.
            let value = match raw {
                Some(raw) => session_value(field, raw)?,
                None => None,
            };
            if session.is_none() {
                session = value;
            }
        }
        if let Some(raw) = self.stop {
            use crate::frontend::stop_strings::{MAX_STOP_BYTES, MAX_STOP_STRINGS};
            // Longer than any escaping of what is allowed: refused unread.
            if raw.get().len() > 6 * MAX_STOP_BYTES + 4 * MAX_STOP_STRINGS + 2 {
                return Err(FactsError::Stop(format!(
                    "`stop` may hold at most {MAX_STOP_BYTES} bytes of strings"
                )));
            }
            // A string or a list of strings (anything else is the engine's to refuse).
            let stop = match serde_json::from_str::<serde_json::Value>(raw.get()) {
                Ok(serde_json::Value::String(s)) => vec![s],
                Ok(serde_json::Value::Array(list)) => {
                    list.into_iter().filter_map(|v| v.as_str().map(str::to_owned)).collect()
                }
                _ => Vec::new(),
            };
            crate::frontend::stop_strings::check(&stop).map_err(FactsError::Stop)?;
        }
        // Counts for a key's token allowance; a value that is not a count is the
        // engine's to refuse, and reserves nothing here.
        let count = |raw: Option<&RawValue>| raw.and_then(|r| r.get().parse::<u64>().ok());
        let max_tokens =
            count(self.max_completion_tokens).or(count(self.max_tokens)).or(count(self.max_output_tokens));
        let choices = count(self.n).unwrap_or(1).max(count(self.best_of).unwrap_or(1)).max(1);
        let generations = choices.saturating_mul(prompts(self.prompt));
        Ok(BodyFacts {
            model,
            stream,
            session,
            prompt: None,
            kv_transfer_params: self.kv_transfer_params.is_some(),
            max_tokens,
            generations,
            // Not a string: the engine's to refuse; it salts nothing here.
            cache_salt: self.cache_salt.and_then(|raw| serde_json::from_str::<String>(raw.get()).ok()),
            continuable: Continuable {
                chat: continuation::continuable(|key| self.member(key), true).is_ok(),
                completion: continuation::continuable(|key| self.member(key), false).is_ok(),
            },
        })
    }

    /// A member continuation judges by (the last value of its key).
    fn member(&self, key: &str) -> Option<&RawValue> {
        const JUDGED: [&str; 12] = [
            "logprobs",
            "top_logprobs",
            "prompt_logprobs",
            "echo",
            "tools",
            "tool_choice",
            "response_format",
            "structured_outputs",
            "guided_json",
            "guided_regex",
            "guided_choice",
            "guided_grammar",
        ];
        match key {
            "n" => self.n,
            "best_of" => self.best_of,
            "messages" => self.messages,
            "prompt" => self.prompt,
            _ => JUDGED.iter().position(|k| *k == key).and_then(|i| self.judged[i]),
        }
    }
}

/// The prompts of a completions `prompt`: a batch is a list of strings or of id lists;
/// a string or one list of ids is one prompt.
fn prompts(prompt: Option<&RawValue>) -> u64 {
    let Some(raw) = prompt else { return 1 };
    let text = raw.get().trim_start();
    let first = text.strip_prefix('[').map(|rest| rest.trim_start().as_bytes().first().copied());
    match first {
        Some(Some(b'"' | b'[')) => {
            serde_json::from_str::<Vec<&RawValue>>(text).map_or(1, |list| list.len() as u64)
        }
        _ => 1,
    }
}

#[derive(Deserialize)]
struct SessionParams<'a> {
    #[serde(borrow)]
    session_id: Option<&'a RawValue>,
}

/// A session field is a string or an integer; null or "" means absent.
fn session_value(field: &'static str, raw: &RawValue) -> Result<Option<String>, FactsError> {
    let text = raw.get();
    let wrong = || FactsError::WrongType { field, expected: "a string or an integer" };
    match text.as_bytes().first() {
        Some(b'"') => {
            let s: String = serde_json::from_str(text).map_err(|_| wrong())?;
            Ok((!s.is_empty()).then_some(s))
        }
        Some(b'-' | b'0'..=b'9') => {
            serde_json::from_str::<i128>(text).map_err(|_| wrong())?;
            Ok(Some(text.to_owned()))
        }
        _ if text == "null" => Ok(None),
        _ => Err(wrong()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(body: &str) -> Result<BodyFacts, FactsError> {
        parse(body.as_bytes())
    }

    #[test]
    fn reads_model_stream_and_session() {
        let f = facts(r#"{"model":"m","stream":true,"session_id":"s1","messages":[]}"#).unwrap();
        assert_eq!(f.model.as_deref(), Some("m"));
        assert!(f.stream);
        assert_eq!(f.session.as_deref(), Some("s1"));
    }

    #[test]
    fn session_priority_follows_documented_order() {
        let f = facts(r#"{"model":"m","user":"u","session_params":{"session_id":"p"}}"#).unwrap();
        assert_eq!(f.session.as_deref(), Some("p"));
        let f = facts(r#"{"model":"m","user_id":"x","user":"u"}"#).unwrap();
        assert_eq!(f.session.as_deref(), Some("u"));
        let f = facts(r#"{"model":"m","user_id":7}"#).unwrap();
        assert_eq!(f.session.as_deref(), Some("7"));
        let f = facts(r#"{"model":"m","session_id":"","user":"u"}"#).unwrap();
        assert_eq!(f.session.as_deref(), Some("u"));
    }

    #[test]
    fn message_text_mentioning_user_is_not_a_key() {
        let body = r#"{"model":"m","messages":[{"role":"user","content":"{\"user\": \"mallory\", \"session_id\": \"x\"}"}]}"#;
        let f = facts(body).unwrap();
        assert_eq!(f.session, None);
        let nested = r#"{"model":"m","metadata":{"user":"nested","session_id":"nested"}}"#;
        assert_eq!(facts(nested).unwrap().session, None);
    }

    #[test]
    fn escaped_strings_are_decoded() {
        let f = facts(r#"{"model":"qwen\/0.6b","session_id":"a\u00e9b"}"#).unwrap();
        assert_eq!(f.model.as_deref(), Some("qwen/0.6b"));
        assert_eq!(f.session.as_deref(), Some("aéb"));
    }

    #[test]
    fn bad_input_is_classified() {
        assert_eq!(facts(""), Err(FactsError::Empty));
        assert!(matches!(facts("{\"model\":"), Err(FactsError::NotJson(_))));
        assert!(matches!(facts("not json"), Err(FactsError::NotJson(_))));
        assert!(matches!(facts("{} trailing"), Err(FactsError::NotJson(_))));
        assert_eq!(facts("[1,2]"), Err(FactsError::NotObject));
        assert_eq!(facts("\"model\""), Err(FactsError::NotObject));
        assert_eq!(parse_inference(b"{\"prompt\":\"hi\"}"), Err(FactsError::MissingModel));
        assert_eq!(parse_inference(b"{\"model\":null}"), Err(FactsError::MissingModel));
        assert_eq!(
            facts(r#"{"model":5}"#),
            Err(FactsError::WrongType { field: "model", expected: "a string" })
        );
        assert_eq!(
            facts(r#"{"model":"m","stream":"yes"}"#),
            Err(FactsError::WrongType { field: "stream", expected: "a boolean" })
        );
        assert_eq!(facts(r#"{"model":"m","user":{"id":1}}"#).unwrap_err().field(), Some("user"));
        assert_eq!(
            facts(r#"{"model":"m","session_id":"s","user_id":[1]}"#).unwrap_err().field(),
            Some("user_id")
        );
        assert_eq!(
            facts(r#"{"model":"m","session_params":"s"}"#).unwrap_err().field(),
            Some("session_params")
        );
        assert_eq!(facts(r#"{"model":"m","session_id":1.5}"#).unwrap_err().field(), Some("session_id"));
    }

    #[test]
    fn the_prompt_is_located_not_parsed() {
        let body = r#"{"model":"m","messages":[{"role":"user","content":"hi \"there\""}],"stream":true}"#;
        let f = facts(body).unwrap();
        assert_eq!(&body[f.prompt.unwrap()], r#"[{"role":"user","content":"hi \"there\""}]"#);
        let body = r#"{"prompt": "once upon", "model":"m"}"#;
        assert_eq!(&body[facts(body).unwrap().prompt.unwrap()], r#""once upon""#);
        let body = r#"{"prompt":[1,2,3],"messages":[],"model":"m"}"#;
        assert_eq!(&body[facts(body).unwrap().prompt.unwrap()], "[]");
        assert_eq!(facts(r#"{"model":"m"}"#).unwrap().prompt, None);
    }

    #[test]
    fn stop_strings_past_the_bounds_are_refused() {
        let many: Vec<String> = (0..300).map(|i| format!("s{i}")).collect();
        let body = serde_json::json!({"model": "m", "stop": many}).to_string();
        assert!(matches!(facts(&body), Err(FactsError::Stop(m)) if m.contains("256")));
        let long = serde_json::json!({"model": "m", "stop": "x".repeat(70_000)}).to_string();
        assert_eq!(facts(&long).unwrap_err().field(), Some("stop"));
        let huge = serde_json::json!({"model": "m", "stop": vec!["y".repeat(4000); 2000]}).to_string();
        assert!(matches!(facts(&huge), Err(FactsError::Stop(_))));
        assert!(facts(r#"{"model":"m","stop":["a","b"]}"#).is_ok());
        assert!(facts(r#"{"model":"m","stop":5}"#).is_ok(), "the engine's to refuse");
    }

    #[test]
    fn the_output_a_request_may_cost_is_read() {
        let f = facts(r#"{"model":"m","max_tokens":100,"n":3}"#).unwrap();
        assert_eq!((f.max_tokens, f.generations), (Some(100), 3));
        let f =
            facts(r#"{"model":"m","max_tokens":100,"max_completion_tokens":20,"best_of":5,"n":2}"#).unwrap();
        assert_eq!((f.max_tokens, f.generations), (Some(20), 5));
        let f = facts(r#"{"model":"m","prompt":["a","b","c"],"max_tokens":7}"#).unwrap();
        assert_eq!((f.max_tokens, f.generations), (Some(7), 3));
        let f = facts(r#"{"model":"m","prompt":[[1,2],[3]],"n":2}"#).unwrap();
        assert_eq!((f.max_tokens, f.generations), (None, 4));
        let f = facts(r#"{"model":"m","prompt":[1,2,3]}"#).unwrap();
        assert_eq!(f.generations, 1, "one prompt of ids");
        let f = facts(r#"{"model":"m","max_output_tokens":64,"input":"hi"}"#).unwrap();
        assert_eq!(f.max_tokens, Some(64));
        let f = facts(r#"{"model":"m","max_tokens":"many","n":null}"#).unwrap();
        assert_eq!((f.max_tokens, f.generations), (None, 1));
    }

    #[test]
    fn whether_a_stream_could_be_continued_is_judged_while_reading() {
        let f = facts(r#"{"model":"m","messages":[{"role":"user","content":"x"}],"stream":true}"#).unwrap();
        assert_eq!(f.continuable, Continuable { chat: true, completion: false });
        let f = facts(r#"{"model":"m","prompt":"once","logprobs":null,"n":1}"#).unwrap();
        assert_eq!(f.continuable, Continuable { chat: false, completion: true });
        for body in [
            r#"{"model":"m","prompt":[1,2]}"#,
            r#"{"model":"m","prompt":"x","echo":true}"#,
            r#"{"model":"m","prompt":"x","n":2}"#,
            r#"{"model":"m","prompt":"x","logprobs":1}"#,
            r#"{"model":"m","messages":[],"tools":[{"type":"function"}]}"#,
            r#"{"model":"m","messages":[],"response_format":{"type":"json_object"}}"#,
        ] {
            assert_eq!(facts(body).unwrap().continuable, Continuable::default(), "{body}");
        }
        let f = facts(r#"{"model":"m","messages":[],"tools":[{"type":"function"}],"tool_choice":"none"}"#);
        assert!(f.unwrap().continuable.chat);
    }

    #[test]
    fn duplicate_keys_last_wins() {
        let f = facts(r#"{"model":"a","model":"b"}"#).unwrap();
        assert_eq!(f.model.as_deref(), Some("b"));
    }
}
