//! Parsing and validating `/v1/completions` and `/v1/chat/completions` bodies the way
//! vLLM's OpenAI server does, into one generation request for the engine.
//!
//! Supported: prompts as text or token ids, chat messages (text content, or lists of
//! text parts) through the simulator's chat template, `max_tokens` /
//! `max_completion_tokens`, `min_tokens`, `ignore_eos`, `n` = 1, `stop`, `seed`,
//! `stream`, `stream_options` (`include_usage`, `continuous_usage_stats`),
//! `return_token_ids`, and `kv_transfer_params`. Sampling parameters such as
//! `temperature` are accepted and have no effect on the deterministic output.

use serde_json::Value;

use super::SimError;
use llm_common::tokenizer::{self, ChatMessage, VOCAB_SIZE};

#[derive(Debug, Clone)]
pub struct GenRequest {
    pub chat: bool,
    pub model: String,
    pub prompt_ids: Vec<u32>,
    /// True if the prompt came as text (tokenised here), false if as token ids.
    pub from_text: bool,
    pub max_tokens: usize,
    pub min_tokens: usize,
    pub ignore_eos: bool,
    pub stop: Vec<String>,
    /// Keep the stop string that ended generation in the text (vLLM's
    /// `include_stop_str_in_output`).
    pub include_stop_str_in_output: bool,
    pub seed: Option<u64>,
    pub stream: bool,
    pub include_usage: bool,
    pub continuous_usage: bool,
    pub return_token_ids: bool,
    pub kv_transfer_params: Option<Value>,
    /// vLLM's `cache_salt`: the prompt's blocks are cached apart from unsalted ones.
    pub cache_salt: Option<String>,
}

/// A request's `cache_salt` (its value in the body), as vLLM checks it: a non-empty
/// string.
pub(crate) fn cache_salt(value: Option<&Value>) -> Result<Option<String>, SimError> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if !s.is_empty() => Ok(Some(s.clone())),
        Some(_) => Err(bad("Parameter 'cache_salt' must be a non-empty string if provided.")),
    }
}

fn bad(message: impl Into<String>) -> SimError {
    SimError::BadRequest(message.into())
}

/// vLLM's message for a parameter's bad value: `MESSAGE (parameter=NAME, value=VALUE)`.
fn bad_value(message: String, param: &'static str, value: impl std::fmt::Display) -> SimError {
    SimError::Parameter { message: format!("{message} (parameter={param}, value={value})"), param }
}

/// A float as Python prints it (`-1.0`, `0.5`).
fn py_float(x: f64) -> String {
    if x.fract() == 0.0 && x.abs() < 1e16 { format!("{x:.1}") } else { format!("{x}") }
}

/// `temperature` and `top_p`, checked as vLLM's sampling parameters check them.
pub(crate) fn check_sampling(body: &Value) -> Result<(), SimError> {
    let number = |field: &str| -> Result<Option<f64>, SimError> {
        match body.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| bad(format!("`{field}` must be a number"))),
        }
    };
    if let Some(t) = number("temperature")? {
        if t < 0.0 {
            return Err(bad_value(
                format!("temperature must be non-negative, got {}.", py_float(t)),
                "temperature",
                py_float(t),
            ));
        }
        if t > 2.0 {
            return Err(bad_value(
                format!("temperature must be in [0, 2], got {}.", py_float(t)),
                "temperature",
                py_float(t),
            ));
        }
    }
    if let Some(p) = number("top_p")?
        && !(p > 0.0 && p <= 1.0)
    {
        return Err(bad_value(
            format!("top_p must be in (0, 1], got {}.", py_float(p)),
            "top_p",
            py_float(p),
        ));
    }
    Ok(())
}

fn opt_uint(body: &Value, field: &str) -> Result<Option<usize>, SimError> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .map(|n| Some(n as usize))
            .ok_or_else(|| bad(format!("`{field}` must be a non-negative integer"))),
    }
}

fn opt_bool(body: &Value, field: &str) -> Result<bool, SimError> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(bad(format!("`{field}` must be a boolean"))),
    }
}

fn token_ids(list: &[Value]) -> Result<Vec<u32>, SimError> {
    list.iter()
        .map(|v| match v.as_u64() {
            Some(id) if id < VOCAB_SIZE as u64 => Ok(id as u32),
            _ => Err(bad(format!("token id {v} is out of vocabulary (size {VOCAB_SIZE})"))),
        })
        .collect()
}

/// Parse a JSON request body.
pub fn json_body(body: &[u8]) -> Result<Value, SimError> {
    serde_json::from_slice(body).map_err(|e| bad(format!("invalid JSON body: {e}")))
}

/// Validate a request body for the model this replica serves.
pub fn parse(
    body: &Value,
    chat: bool,
    served_model: &str,
    max_model_len: usize,
) -> Result<GenRequest, SimError> {
    if !body.is_object() {
        return Err(bad("request body must be a JSON object"));
    }
    let model = match body.get("model") {
        Some(Value::String(m)) => m.clone(),
        None | Some(Value::Null) => served_model.to_owned(),
        Some(_) => return Err(bad("`model` must be a string")),
    };
    if model != served_model {
        return Err(SimError::ModelNotFound { model, served: served_model.to_owned() });
    }
    if opt_uint(body, "n")?.unwrap_or(1) != 1 {
        return Err(bad("the simulator supports only n=1"));
    }
    let (prompt_ids, from_text) = if chat { chat_prompt(body)? } else { completion_prompt(body)? };
    if prompt_ids.is_empty() {
        return Err(bad("the prompt is empty"));
    }
    let max_tokens = if chat {
        opt_uint(body, "max_completion_tokens")?.or(opt_uint(body, "max_tokens")?)
    } else {
        Some(opt_uint(body, "max_tokens")?.unwrap_or(16))
    };
    check_sampling(body)?;
    // vLLM 0.32: a prompt longer than the context is refused (it stops counting one token
    // past the limit); a max_tokens beyond the context is refused; otherwise max_tokens
    // is cut to what the context leaves, and must then be at least 1.
    let prompt_len = prompt_ids.len();
    if prompt_len > max_model_len {
        let counted = max_model_len + 1;
        return Err(bad_value(
            format!(
                "This model's maximum context length is {max_model_len} tokens. However, your prompt \
                 contains at least {counted} input tokens, which exceeds this limit even without any output \
                 tokens. Please reduce the length of the input prompt."
            ),
            "input_tokens",
            counted,
        ));
    }
    if let Some(asked) = max_tokens
        && asked > max_model_len
    {
        return Err(bad_value(
            format!(
                "max_tokens={asked} cannot be greater than max_model_len={max_model_len}. Please request \
                 fewer output tokens."
            ),
            "max_tokens",
            asked,
        ));
    }
    let max_tokens = max_tokens.unwrap_or(usize::MAX).min(max_model_len - prompt_len);
    if max_tokens == 0 {
        return Err(bad_value("max_tokens must be at least 1, got 0.".into(), "max_tokens", 0));
    }
    let min_tokens = opt_uint(body, "min_tokens")?.unwrap_or(0);
    if min_tokens > max_tokens {
        return Err(bad(format!(
            "min_tokens must be less than or equal to max_tokens={max_tokens}, got {min_tokens}."
        )));
    }
    let stop = match body.get("stop") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(list)) => list
            .iter()
            .map(|s| {
                s.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| bad("`stop` must be a string or a list of strings"))
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(bad("`stop` must be a string or a list of strings")),
    };
    let seed = match body.get("seed") {
        None | Some(Value::Null) => None,
        Some(v) => Some(v.as_i64().ok_or_else(|| bad("`seed` must be an integer"))? as u64),
    };
    let stream = opt_bool(body, "stream")?;
    let options = body.get("stream_options").filter(|v| !v.is_null());
    if options.is_some() && !stream {
        return Err(bad("Stream options can only be defined when `stream=True`."));
    }
    let option = |name: &str| options.and_then(|o| o.get(name)).and_then(Value::as_bool).unwrap_or(false);
    let kv_transfer_params = body.get("kv_transfer_params").filter(|v| !v.is_null()).cloned();
    Ok(GenRequest {
        chat,
        model,
        prompt_ids,
        from_text,
        max_tokens,
        min_tokens,
        ignore_eos: opt_bool(body, "ignore_eos")?,
        stop,
        include_stop_str_in_output: opt_bool(body, "include_stop_str_in_output")?,
        seed,
        stream,
        include_usage: option("include_usage"),
        continuous_usage: option("continuous_usage_stats"),
        return_token_ids: opt_bool(body, "return_token_ids")?,
        kv_transfer_params,
        cache_salt: cache_salt(body.get("cache_salt"))?,
    })
}

pub fn completion_prompt(body: &Value) -> Result<(Vec<u32>, bool), SimError> {
    match body.get("prompt") {
        Some(Value::String(text)) => Ok((tokenizer::encode(text), true)),
        Some(Value::Array(items)) if items.iter().all(Value::is_number) => Ok((token_ids(items)?, false)),
        Some(Value::Array(items)) if items.len() == 1 => match &items[0] {
            Value::String(text) => Ok((tokenizer::encode(text), true)),
            Value::Array(ids) => Ok((token_ids(ids)?, false)),
            _ => Err(bad("`prompt` must be a string, a list of token ids, or a list of one of those")),
        },
        Some(Value::Array(_)) => {
            Err(bad("the simulator serves one prompt per request (batched prompts are not supported)"))
        }
        None => Err(bad("`prompt` is required")),
        Some(_) => Err(bad("`prompt` must be a string or a list of token ids")),
    }
}

pub fn chat_prompt(body: &Value) -> Result<(Vec<u32>, bool), SimError> {
    let Some(Value::Array(messages)) = body.get("messages") else {
        return Err(bad("`messages` is required and must be a list"));
    };
    let mut parts: Vec<(String, String)> = Vec::with_capacity(messages.len());
    for m in messages {
        let role =
            m.get("role").and_then(Value::as_str).ok_or_else(|| bad("each message needs a string `role`"))?;
        let content = match m.get("content") {
            Some(Value::String(s)) => s.clone(),
            None | Some(Value::Null) => String::new(),
            Some(Value::Array(items)) => items
                .iter()
                .map(|p| {
                    match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str)) {
                        (Some("text"), Some(t)) => Ok(t),
                        _ => Err(bad("the simulator accepts only text content parts")),
                    }
                })
                .collect::<Result<String, _>>()?,
            Some(_) => return Err(bad("message `content` must be a string or a list of parts")),
        };
        parts.push((role.to_owned(), content));
    }
    let messages: Vec<ChatMessage> = parts.iter().map(|(r, c)| ChatMessage { role: r, content: c }).collect();
    let add_generation_prompt = body.get("add_generation_prompt").and_then(Value::as_bool).unwrap_or(true);
    let continue_final = body.get("continue_final_message").and_then(Value::as_bool).unwrap_or(false);
    let rendered = match (continue_final, add_generation_prompt) {
        (true, true) => {
            return Err(bad("Cannot set both `continue_final_message` and `add_generation_prompt` to True."));
        }
        (true, false) => tokenizer::render_chat_continuing(&messages),
        (false, _) => tokenizer::render_chat(&messages, add_generation_prompt),
    };
    Ok((tokenizer::encode(&rendered), true))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(body: Value, chat: bool) -> Result<GenRequest, SimError> {
        parse(&body, chat, "m", 100)
    }

    #[test]
    fn prompts_as_text_and_ids() {
        let r = req(serde_json::json!({"model": "m", "prompt": "hello world"}), false).unwrap();
        assert!(r.from_text);
        assert_eq!(r.prompt_ids, tokenizer::encode("hello world"));
        assert_eq!(r.max_tokens, 16, "completions default max_tokens is 16");
        let r = req(serde_json::json!({"model": "m", "prompt": [1, 2, 3]}), false).unwrap();
        assert!(!r.from_text);
        assert_eq!(r.prompt_ids, [1, 2, 3]);
        let r = req(serde_json::json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]}), true)
            .unwrap();
        assert_eq!(r.max_tokens, 100 - r.prompt_ids.len(), "chat defaults to the rest of the context");
    }

    #[test]
    fn rejects_what_vllm_rejects() {
        let cases = [
            (serde_json::json!({"model": "other", "prompt": "x"}), 404),
            (serde_json::json!({"model": "m", "prompt": "x", "n": 2}), 400),
            (serde_json::json!({"model": "m", "prompt": "x", "max_tokens": 0}), 400),
            (serde_json::json!({"model": "m", "prompt": "x", "max_tokens": 200}), 400),
            (serde_json::json!({"model": "m", "prompt": [1, 999_999_999]}), 400),
            (
                serde_json::json!({"model": "m", "prompt": "x", "stream_options": {"include_usage": true}}),
                400,
            ),
            (serde_json::json!({"model": "m", "prompt": "x", "min_tokens": 20, "max_tokens": 5}), 400),
            (serde_json::json!({"model": "m", "prompt": " hello".repeat(200)}), 400),
            (serde_json::json!({"model": "m", "prompt": "x", "temperature": -1}), 400),
            (serde_json::json!({"model": "m", "prompt": "x", "temperature": 2.5}), 400),
            (serde_json::json!({"model": "m", "prompt": "x", "top_p": 0}), 400),
            (serde_json::json!({"model": "m", "prompt": vec![5; 100]}), 400),
        ];
        for (body, status) in cases {
            let err = req(body.clone(), false).unwrap_err();
            assert_eq!(err.status().as_u16(), status, "{body}");
        }
    }

    #[test]
    fn messages_and_context_limits_are_vllm_0_32s() {
        let message = |body: Value| {
            let err = req(body, false).unwrap_err();
            let param = match &err {
                SimError::Parameter { param, .. } => Some(*param),
                _ => None,
            };
            (err.to_string(), param)
        };
        assert_eq!(
            message(serde_json::json!({"model": "m", "prompt": "x", "temperature": -1})),
            (
                "temperature must be non-negative, got -1.0. (parameter=temperature, value=-1.0)".into(),
                Some("temperature")
            )
        );
        assert_eq!(
            message(serde_json::json!({"model": "m", "prompt": "x", "max_tokens": 200})),
            ("max_tokens=200 cannot be greater than max_model_len=100. Please request fewer output tokens. \
              (parameter=max_tokens, value=200)".into(), Some("max_tokens"))
        );
        let (text, param) = message(serde_json::json!({"model": "m", "prompt": vec![5; 101]}));
        assert!(
            text.contains("at least 101 input tokens")
                && text.ends_with("(parameter=input_tokens, value=101)"),
            "{text}"
        );
        assert_eq!(param, Some("input_tokens"));
        // A prompt that fills the context leaves no token to generate.
        assert_eq!(message(serde_json::json!({"model": "m", "prompt": vec![5; 100]})).1, Some("max_tokens"));
        // max_tokens beyond what the context leaves is cut, not refused.
        let r =
            req(serde_json::json!({"model": "m", "prompt": vec![5; 60], "max_tokens": 80}), false).unwrap();
        assert_eq!(r.max_tokens, 40);
    }
}
