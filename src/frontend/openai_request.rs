//! An OpenAI chat or completions request turned into a call of vLLM's token-in,
//! token-out endpoint (`POST /inference/v1/generate`), or the reason it cannot be.
//!
//! Pure: the body in, the generate body and what writing the answer needs out. The
//! prompt is tokenised here (the chat template rendered as vLLM renders it, see
//! [`crate::policy::prompt_tokens`]); the sampling parameters go to the engine under
//! vLLM's own names; what vLLM's API server does with text (stop strings, special
//! tokens in the output, holding back text that may become a stop string) is left for
//! [`super::output_text`], so the engine is asked for `detokenize: false`.
//!
//! A request the router cannot answer exactly as vLLM's own endpoint would (tools,
//! structured output, logprobs, `n > 1`, `echo`, content parts, template options, a
//! batch of prompts, any field it does not know) is a [`Fallback`]: it goes to the
//! engine's OpenAI endpoint unchanged. A value of `null` counts as absent, as in vLLM.

use std::io::Write;

use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::dispatch::pd::members::Members;
use crate::policy::prompt_tokens::{MAX_PROMPT_BYTES, PromptTokenizer};

/// Why a request goes through the pass-through path (a metric label: a fixed set).
pub type Fallback = &'static str;

/// Sampling parameters copied to the engine as they came (vLLM checks them).
const SAMPLING: [&str; 11] = [
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "min_tokens",
    "ignore_eos",
    "stop_token_ids",
];

/// Fields the router reads itself, or that only route the request.
const ROUTER_FIELDS: [&str; 16] = [
    "model",
    "messages",
    "prompt",
    "stream",
    "stream_options",
    "max_tokens",
    "max_completion_tokens",
    "stop",
    "include_stop_str_in_output",
    "skip_special_tokens",
    "spaces_between_special_tokens",
    "session_id",
    "session_params",
    "user",
    "user_id",
    "add_generation_prompt",
];

/// Fields passed to the generate request's top level as they came.
const TOP_LEVEL: [&str; 2] = ["priority", "cache_salt"];

/// Fields whose presence (other than `null`, `false`, `1`, `[]` where that means "off")
/// sends the request through the pass-through path, and under which reason.
const FALLBACKS: [(&str, Fallback); 22] = [
    ("tools", "tools"),
    ("tool_choice", "tools"),
    ("functions", "tools"),
    ("function_call", "tools"),
    ("parallel_tool_calls", "tools"),
    ("response_format", "structured_output"),
    ("structured_outputs", "structured_output"),
    ("guided_json", "structured_output"),
    ("guided_regex", "structured_output"),
    ("guided_choice", "structured_output"),
    ("guided_grammar", "structured_output"),
    ("logprobs", "logprobs"),
    ("top_logprobs", "logprobs"),
    ("prompt_logprobs", "logprobs"),
    ("n", "n"),
    ("best_of", "n"),
    ("echo", "echo"),
    ("suffix", "echo"),
    ("continue_final_message", "chat_template"),
    ("chat_template", "chat_template"),
    ("chat_template_kwargs", "chat_template"),
    ("documents", "chat_template"),
];

/// What writing the client's answer needs.
#[derive(Debug, Clone, PartialEq)]
pub struct OutputPlan {
    pub chat: bool,
    pub stream: bool,
    pub include_usage: bool,
    /// The `model` to name in the answer (the request's).
    pub model: String,
    pub stop: Vec<String>,
    pub include_stop_str_in_output: bool,
    pub min_tokens: usize,
    pub skip_special_tokens: bool,
    /// The most tokens the engine may generate (the request's, or its model's default);
    /// `None`: what the context leaves. The router ends generation there itself.
    pub max_tokens: Option<usize>,
}

/// A request ready for the generate endpoint.
#[derive(Debug)]
pub struct GenerateCall {
    pub prompt_ids: Vec<u32>,
    pub plan: OutputPlan,
    model: Option<String>,
    /// vLLM's sampling parameters, as sent.
    sampling: Map<String, Value>,
    /// Top-level members passed on as they came ([`TOP_LEVEL`]).
    passed: Vec<(&'static str, Box<RawValue>)>,
}

/// How one generate request differs from the call's plain one.
#[derive(Debug, Clone, Copy, Default)]
pub struct Stage<'a> {
    /// `kv_transfer_params` (raw JSON), for a P/D stage.
    pub kv_transfer_params: Option<&'a str>,
    /// A P/D prefill: one token, not streamed.
    pub prefill: bool,
}

impl GenerateCall {
    /// The model the request names.
    pub fn model(&self) -> Option<&str> {
        self.model.as_deref()
    }

    /// A request that names no `max_tokens` generates what a context of `context`
    /// tokens leaves after its prompt (the engine's default): the router's bound too.
    pub fn bound_by_context(&mut self, context: u64) {
        if self.plan.max_tokens.is_none() {
            self.plan.max_tokens = Some(context.saturating_sub(self.prompt_ids.len() as u64) as usize);
        }
    }

    /// Whether the prompt and the tokens asked for fit a context of `context` tokens.
    pub fn fits(&self, context: u64) -> bool {
        let prompt = self.prompt_ids.len() as u64;
        let asked = self.sampling.get("max_tokens").and_then(Value::as_u64).unwrap_or(0);
        prompt < context && prompt.saturating_add(asked) <= context
    }

    /// The generate request's body: always streamed (the router cuts a stop string's
    /// request short), but a prefill stage's.
    pub fn body(&self, stage: Stage<'_>) -> Vec<u8> {
        if stage.prefill {
            let mut sampling = self.sampling.clone();
            sampling.insert("max_tokens".into(), Value::from(1));
            sampling.insert("min_tokens".into(), Value::from(0));
            self.write(&[], &sampling, stage)
        } else {
            self.write(&[], &self.sampling, stage)
        }
    }

    /// The body that asks for the rest of an answer of which `generated` came already:
    /// those ids after the prompt's, `max_tokens` and `min_tokens` less them. `None`
    /// when no tokens are left to ask for.
    pub fn continuing(&self, generated: &[u32]) -> Option<Vec<u8>> {
        let mut sampling = self.sampling.clone();
        let sent = generated.len() as u64;
        if let Some(max) = sampling.get("max_tokens").and_then(Value::as_u64) {
            if max <= sent {
                return None;
            }
            sampling.insert("max_tokens".into(), Value::from(max - sent));
        }
        if let Some(min) = sampling.get("min_tokens").and_then(Value::as_u64) {
            sampling.insert("min_tokens".into(), Value::from(min.saturating_sub(sent)));
        }
        Some(self.write(generated, &sampling, Stage::default()))
    }

    fn write(&self, generated: &[u32], sampling: &Map<String, Value>, stage: Stage<'_>) -> Vec<u8> {
        // Written directly: a long prompt's ids are most of the body.
        let ids = self.prompt_ids.len() + generated.len();
        let mut body = Vec::with_capacity(ids * 7 + 256);
        body.push(b'{');
        if let Some(model) = &self.model {
            body.extend_from_slice(b"\"model\":");
            serde_json::to_writer(&mut body, model).expect("writing to a Vec cannot fail");
            body.push(b',');
        }
        body.extend_from_slice(b"\"token_ids\":[");
        for (i, id) in self.prompt_ids.iter().chain(generated).enumerate() {
            if i > 0 {
                body.push(b',');
            }
            write!(body, "{id}").expect("writing to a Vec cannot fail");
        }
        body.extend_from_slice(b"],\"sampling_params\":");
        serde_json::to_writer(&mut body, sampling).expect("writing to a Vec cannot fail");
        body.extend_from_slice(if stage.prefill { b",\"stream\":false" } else { b",\"stream\":true" });
        for (key, raw) in &self.passed {
            body.extend_from_slice(format!(",\"{key}\":").as_bytes());
            body.extend_from_slice(raw.get().as_bytes());
        }
        if let Some(kv) = stage.kv_transfer_params {
            body.extend_from_slice(b",\"kv_transfer_params\":");
            body.extend_from_slice(kv.as_bytes());
        }
        body.push(b'}');
        body
    }
}

/// Defaults vLLM's OpenAI endpoints take from the model's `generation_config.json`
/// (its generate endpoint does not: the router applies them, as the endpoint the client
/// asked for would).
#[derive(Debug, Clone, Default)]
pub struct SamplingDefaults(pub Map<String, Value>);

impl SamplingDefaults {
    /// The defaults in a `generation_config.json` (the keys vLLM reads); none when the
    /// file is missing.
    pub fn load(dir: &std::path::Path) -> Result<Self, String> {
        let path = dir.join("generation_config.json");
        let Ok(bytes) = std::fs::read(&path) else { return Ok(Self::default()) };
        let config: Map<String, Value> = serde_json::from_slice(&bytes)
            .map_err(|e| format!("{} is not a JSON object: {e}", path.display()))?;
        let mut defaults = Map::new();
        for key in [
            "repetition_penalty",
            "presence_penalty",
            "frequency_penalty",
            "temperature",
            "top_k",
            "top_p",
            "min_p",
            "max_new_tokens",
        ] {
            if let Some(value) = config.get(key).filter(|v| !v.is_null()) {
                let name = if key == "max_new_tokens" { "max_tokens" } else { key };
                defaults.insert(name.to_owned(), value.clone());
            }
        }
        Ok(SamplingDefaults(defaults))
    }
}

fn present<'a>(members: &Members<'a>, key: &str) -> Option<&'a RawValue> {
    members.get(key).filter(|v| v.get() != "null")
}

fn as_value(raw: &RawValue) -> Option<Value> {
    serde_json::from_str(raw.get()).ok()
}

/// Whether a field that turns a feature on is set to something other than its off value.
fn feature_on(key: &str, raw: &RawValue) -> bool {
    !matches!(
        (key, raw.get()),
        (_, "false" | "null")
            | ("n" | "best_of", "1")
            | ("tools" | "functions" | "documents", "[]")
            | ("tool_choice", "\"none\"")
            | ("top_logprobs", "0")
            | ("chat_template_kwargs", "{}")
    )
}

/// The stop strings of a `stop` field: a string or a list of strings.
fn stop_strings(raw: Option<&RawValue>) -> Result<Vec<String>, Fallback> {
    match raw.map(|r| serde_json::from_str::<Value>(r.get())) {
        None => Ok(Vec::new()),
        Some(Ok(Value::String(s))) => Ok(vec![s]),
        Some(Ok(Value::Array(list))) => list
            .into_iter()
            .map(|v| match v {
                Value::String(s) => Ok(s),
                _ => Err("invalid_value"),
            })
            .collect(),
        _ => Err("invalid_value"),
    }
}

/// Messages the router renders as vLLM does: each has a string `role` and a string
/// `content` and nothing else (content parts, names, tool calls and tool results go
/// through vLLM's own message handling).
fn plain_messages(raw: &RawValue) -> Result<(), Fallback> {
    let messages: Vec<Map<String, Value>> = serde_json::from_str(raw.get()).map_err(|_| "invalid_value")?;
    if messages.is_empty() {
        return Err("invalid_value");
    }
    for message in &messages {
        if message.len() != 2 || !message.get("role").is_some_and(Value::is_string) {
            return Err("message_fields");
        }
        match message.get("content") {
            Some(Value::String(_)) => {}
            Some(Value::Array(_)) => return Err("content_parts"),
            _ => return Err("message_fields"),
        }
    }
    Ok(())
}

/// Turn an OpenAI request body into a generate call.
pub fn generate_call(
    tokenizer: &PromptTokenizer,
    defaults: &SamplingDefaults,
    chat: bool,
    body: &[u8],
) -> Result<GenerateCall, Fallback> {
    let members = Members::parse(body).map_err(|_| "invalid_value")?;
    if members.get("kv_transfer_params").is_some() {
        return Err("kv_transfer_params");
    }
    for key in members.keys() {
        let known = SAMPLING.contains(&key) || ROUTER_FIELDS.contains(&key) || TOP_LEVEL.contains(&key);
        match FALLBACKS.iter().find(|(name, _)| *name == key) {
            Some((_, reason)) if members.get(key).is_some_and(|raw| feature_on(key, raw)) => {
                return Err(reason);
            }
            Some(_) => {}
            None if !known => return Err("unknown_field"),
            None => {}
        }
    }
    let flag = |key: &str| -> Result<Option<bool>, Fallback> {
        match present(&members, key).map(RawValue::get) {
            None => Ok(None),
            Some("true") => Ok(Some(true)),
            Some("false") => Ok(Some(false)),
            Some(_) => Err("invalid_value"),
        }
    };
    if flag("add_generation_prompt")? == Some(false) {
        return Err("chat_template");
    }
    let skip_special_tokens = flag("skip_special_tokens")?.unwrap_or(true);
    if flag("spaces_between_special_tokens")? == Some(false) && !skip_special_tokens {
        return Err("special_tokens");
    }
    let stream = flag("stream")?.unwrap_or(false);
    let mut include_usage = false;
    if let Some(options) = present(&members, "stream_options") {
        let options: Map<String, Value> = serde_json::from_str(options.get()).map_err(|_| "invalid_value")?;
        for (key, value) in &options {
            match (key.as_str(), value) {
                ("include_usage", Value::Bool(on)) => include_usage = *on,
                (_, Value::Null | Value::Bool(false)) => {}
                ("continuous_usage_stats", _) => return Err("continuous_usage"),
                _ => return Err("unknown_field"),
            }
        }
    }
    let model = match present(&members, "model").map(as_value) {
        None => None,
        Some(Some(Value::String(m))) => Some(m),
        Some(_) => return Err("invalid_value"),
    };

    // The prompt.
    let prompt = if chat {
        let messages = present(&members, "messages").ok_or("invalid_value")?;
        plain_messages(messages)?;
        messages
    } else {
        let prompt = present(&members, "prompt").ok_or("invalid_value")?;
        match as_value(prompt) {
            Some(Value::String(_)) => {}
            Some(Value::Array(items)) if items.is_empty() => return Err("invalid_value"),
            Some(Value::Array(items)) if items.iter().all(Value::is_u64) && !items.is_empty() => {}
            Some(Value::Array(items)) if items.len() == 1 => match &items[0] {
                Value::String(text) if !text.is_empty() => {}
                Value::Array(ids) if !ids.is_empty() && ids.iter().all(Value::is_u64) => {}
                Value::String(_) | Value::Array(_) => return Err("empty_prompt"),
                _ => return Err("invalid_value"),
            },
            Some(Value::Array(_)) => return Err("batch_prompt"),
            _ => return Err("invalid_value"),
        }
        prompt
    };
    if prompt.get().len() > MAX_PROMPT_BYTES {
        return Err("prompt_too_long");
    }
    let prompt_ids = tokenizer.tokens(prompt.get().as_bytes()).ok_or("tokenizer")?;
    if prompt_ids.is_empty() {
        return Err("empty_prompt");
    }

    // Sampling parameters, under vLLM's names.
    let mut sampling = Map::new();
    for key in SAMPLING {
        if let Some(raw) = present(&members, key) {
            sampling.insert(key.to_owned(), as_value(raw).ok_or("invalid_value")?);
        }
    }
    let max_tokens = if chat {
        present(&members, "max_completion_tokens").or_else(|| present(&members, "max_tokens"))
    } else {
        present(&members, "max_tokens")
    };
    match max_tokens.map(as_value) {
        Some(Some(value)) => {
            sampling.insert("max_tokens".into(), value);
        }
        Some(None) => return Err("invalid_value"),
        // A completion's default is 16 tokens (vLLM's, as OpenAI's); a chat's what is
        // left of the context (the engine's default too), or the model's own default.
        None if !chat => {
            sampling.insert("max_tokens".into(), Value::from(16));
        }
        None => {}
    }
    for (key, value) in &defaults.0 {
        if !sampling.contains_key(key) {
            sampling.insert(key.clone(), value.clone());
        }
    }
    let min_tokens = match sampling.get("min_tokens") {
        None => 0,
        Some(v) => v.as_u64().ok_or("invalid_value")? as usize,
    };
    sampling.insert("detokenize".into(), Value::Bool(false));
    let stop = stop_strings(present(&members, "stop"))?;
    if stop.iter().any(String::is_empty) {
        return Err("invalid_value"); // vLLM refuses an empty stop string: let it say so
    }
    let max_tokens = match sampling.get("max_tokens") {
        None => None,
        Some(v) => Some(v.as_u64().ok_or("invalid_value")? as usize),
    };

    let mut passed = Vec::new();
    for key in TOP_LEVEL {
        if let Some(raw) = present(&members, key) {
            passed.push((key, raw.to_owned()));
        }
    }
    Ok(GenerateCall {
        prompt_ids,
        model: model.clone(),
        sampling,
        passed,
        plan: OutputPlan {
            chat,
            stream,
            include_usage: stream && include_usage,
            model: model.unwrap_or_default(),
            stop,
            include_stop_str_in_output: flag("include_stop_str_in_output")?.unwrap_or(false),
            min_tokens,
            skip_special_tokens,
            max_tokens,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn call(chat: bool, body: Value) -> Result<GenerateCall, Fallback> {
        let tokenizer =
            PromptTokenizer::Builtin(crate::policy::prompt_tokens::BuiltinTokenizer::new(1 << 16));
        generate_call(&tokenizer, &SamplingDefaults::default(), chat, &serde_json::to_vec(&body).unwrap())
    }

    fn sent(call: &GenerateCall) -> Value {
        serde_json::from_slice(&call.body(Stage::default())).unwrap()
    }

    #[test]
    fn chat_requests_become_token_ids_and_vllm_sampling_params() {
        let c = call(
            true,
            json!({"model": "m", "messages": [{"role": "user", "content": "hi there"}], "stream": true,
                "stream_options": {"include_usage": true}, "max_completion_tokens": 9, "max_tokens": 50,
                "temperature": 0.5, "top_p": 0.9, "top_k": 5, "min_p": 0.1, "seed": 7, "stop": "\n\n",
                "stop_token_ids": [3], "presence_penalty": 0.1, "frequency_penalty": 0.2,
                "repetition_penalty": 1.1, "ignore_eos": true, "min_tokens": 2, "user": "u1", "priority": 0}),
        )
        .unwrap();
        let expected_ids = llm_common::tokenizer::encode(
            "<|start|>user<|message|>hi there<|end|><|start|>assistant<|message|>",
        );
        assert_eq!(c.prompt_ids, expected_ids);
        let body = sent(&c);
        assert_eq!(body["token_ids"], json!(expected_ids));
        assert_eq!(body["model"], "m");
        assert_eq!(body["stream"], true, "always streamed from the engine");
        assert_eq!(body["priority"], 0);
        assert_eq!(
            body["sampling_params"],
            json!({"temperature": 0.5, "top_p": 0.9, "top_k": 5, "min_p": 0.1, "seed": 7,
                "presence_penalty": 0.1, "frequency_penalty": 0.2, "repetition_penalty": 1.1,
                "min_tokens": 2, "ignore_eos": true, "stop_token_ids": [3], "max_tokens": 9,
                "detokenize": false})
        );
        assert_eq!(
            c.plan,
            OutputPlan {
                chat: true,
                stream: true,
                include_usage: true,
                model: "m".into(),
                stop: vec!["\n\n".into()],
                include_stop_str_in_output: false,
                min_tokens: 2,
                skip_special_tokens: true,
                max_tokens: Some(9),
            }
        );
    }

    #[test]
    fn a_continuation_asks_for_the_rest_after_the_ids_already_generated() {
        let c = call(false, json!({"model": "m", "prompt": [5, 6, 7], "max_tokens": 10, "min_tokens": 4}))
            .unwrap();
        let rest: Value = serde_json::from_slice(&c.continuing(&[8, 9, 10]).unwrap()).unwrap();
        assert_eq!(rest["token_ids"], json!([5, 6, 7, 8, 9, 10]));
        assert_eq!(rest["sampling_params"]["max_tokens"], 7);
        assert_eq!(rest["sampling_params"]["min_tokens"], 1);
        assert_eq!(rest["stream"], true);
        assert!(c.continuing(&[1; 10]).is_none(), "nothing left to ask for");
        let chat = call(true, json!({"messages": [{"role": "user", "content": "x"}]})).unwrap();
        let rest: Value = serde_json::from_slice(&chat.continuing(&[1, 2]).unwrap()).unwrap();
        assert!(rest["sampling_params"].get("max_tokens").is_none(), "what the context leaves");
    }

    #[test]
    fn completions_default_to_sixteen_tokens_and_take_ids() {
        let c = call(false, json!({"model": "m", "prompt": [5, 6, 7], "stream": false})).unwrap();
        assert_eq!(c.prompt_ids, vec![5, 6, 7]);
        assert_eq!(sent(&c)["sampling_params"]["max_tokens"], 16);
        assert!(!c.plan.stream && !c.plan.include_usage && !c.plan.chat);
        let c = call(false, json!({"prompt": ["a text"], "max_tokens": null})).unwrap();
        assert_eq!(c.prompt_ids, llm_common::tokenizer::encode("a text"));
        let c = call(true, json!({"messages": [{"role": "user", "content": "x"}]})).unwrap();
        assert!(sent(&c)["sampling_params"].get("max_tokens").is_none(), "chat: what the context leaves");
        assert!(sent(&c).get("model").is_none());
    }

    #[test]
    fn generation_config_defaults_fill_what_the_client_left_out() {
        let tokenizer =
            PromptTokenizer::Builtin(crate::policy::prompt_tokens::BuiltinTokenizer::new(1 << 16));
        let dir = std::env::temp_dir().join(format!("llm-router-genconf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("generation_config.json"),
            r#"{"temperature": 0.6, "top_p": 0.95, "max_new_tokens": 100, "eos_token_id": 2}"#,
        )
        .unwrap();
        let defaults = SamplingDefaults::load(&dir).unwrap();
        let body =
            serde_json::to_vec(&json!({"messages": [{"role": "user", "content": "x"}], "temperature": 0}))
                .unwrap();
        let c = generate_call(&tokenizer, &defaults, true, &body).unwrap();
        assert_eq!(
            sent(&c)["sampling_params"],
            json!({"temperature": 0, "top_p": 0.95, "max_tokens": 100, "detokenize": false})
        );
        assert!(SamplingDefaults::load(&dir.join("missing")).unwrap().0.is_empty());
    }

    #[test]
    fn what_the_router_cannot_answer_identically_falls_back_with_a_reason() {
        let m = || json!([{"role": "user", "content": "x"}]);
        let cases = [
            (json!({"messages": m(), "tools": [{"type": "function"}]}), "tools"),
            (json!({"messages": m(), "tool_choice": "auto"}), "tools"),
            (json!({"messages": m(), "response_format": {"type": "json_object"}}), "structured_output"),
            (json!({"messages": m(), "logprobs": true}), "logprobs"),
            (json!({"messages": m(), "n": 2}), "n"),
            (json!({"messages": m(), "chat_template_kwargs": {"enable_thinking": false}}), "chat_template"),
            (json!({"messages": m(), "add_generation_prompt": false}), "chat_template"),
            (json!({"messages": m(), "logit_bias": {"5": 1}}), "unknown_field"),
            (
                json!({"messages": m(), "stream": true, "stream_options": {"continuous_usage_stats": true}}),
                "continuous_usage",
            ),
            (
                json!({"messages": [{"role": "user", "content": [{"type": "text", "text": "x"}]}]}),
                "content_parts",
            ),
            (json!({"messages": [{"role": "user", "content": "x", "name": "bob"}]}), "message_fields"),
            (json!({"messages": [{"role": "assistant", "content": null}]}), "message_fields"),
            (json!({"messages": []}), "invalid_value"),
            (json!({"messages": m(), "stop": 5}), "invalid_value"),
            (json!({"messages": m(), "stop": ["a", ""]}), "invalid_value"),
            (json!({"messages": m(), "stream": "yes"}), "invalid_value"),
            (json!({"messages": m(), "kv_transfer_params": {}}), "kv_transfer_params"),
            (
                json!({"messages": m(), "skip_special_tokens": false, "spaces_between_special_tokens": false}),
                "special_tokens",
            ),
        ];
        for (body, reason) in cases {
            assert_eq!(call(true, body.clone()).unwrap_err(), reason, "{body}");
        }
        assert_eq!(call(false, json!({"prompt": ["a", "b"]})).unwrap_err(), "batch_prompt");
        assert_eq!(call(false, json!({"prompt": "a", "echo": true})).unwrap_err(), "echo");
        assert_eq!(call(false, json!({"prompt": "a", "suffix": "z"})).unwrap_err(), "echo");
        assert_eq!(call(false, json!({"prompt": []})).unwrap_err(), "invalid_value");
        assert_eq!(call(false, json!({"prompt": [[]]})).unwrap_err(), "empty_prompt");
        // Off values of feature fields are fine.
        let off = json!({"messages": m(), "tools": [], "tool_choice": "none", "logprobs": false, "n": 1,
            "echo": null, "response_format": null, "stream_options": {"include_usage": false}});
        assert!(call(true, off).is_ok());
        assert!(call(true, json!("not an object")).is_err());
    }
}
