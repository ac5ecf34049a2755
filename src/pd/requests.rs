//! The request rewrites of prefill/decode disaggregation, as pure functions over the
//! client's JSON body (vLLM's NixlConnector protocol, as in vLLM's reference proxy).
//!
//! Prefill: the client's request with `stream: false`, `max_tokens: 1` (and
//! `max_completion_tokens: 1` when present), no `stream_options`, `kv_transfer_params`
//! asking for a remote decode, and `return_token_ids` so the response carries the
//! prompt's token ids.
//!
//! Decode: the client's request with the prefill's `kv_transfer_params`. With
//! tokenize-once the prompt goes as token ids to `/v1/completions` (vLLM's chat endpoint
//! takes no token ids), so decode never tokenises the text again; a chat client's
//! stream is converted back to chat chunks (see `chat_stream`). A chat request that
//! needs what only the chat endpoint does (tools, response formats, reasoning output,
//! chat-format logprobs) goes to decode's chat endpoint with its messages instead: the
//! chat endpoint parses tool calls and reasoning from the generated text, which a
//! completion of token ids would return as raw text.

use serde_json::{Map, Value, json};

/// Chat fields whose handling lives in vLLM's chat endpoint (output parsing or chat
/// logprob formatting): their presence sends decode to `/v1/chat/completions`.
pub const CHAT_ONLY_FIELDS: [&str; 9] = [
    "tools",
    "tool_choice",
    "functions",
    "function_call",
    "response_format",
    "reasoning_effort",
    "include_reasoning",
    "logprobs",
    "top_logprobs",
];

/// Fields of a chat request that have no meaning for a completion of token ids (the
/// prompt they shaped is already in the ids).
const PROMPT_SHAPING_FIELDS: [&str; 8] = [
    "messages",
    "add_generation_prompt",
    "continue_final_message",
    "chat_template",
    "chat_template_kwargs",
    "documents",
    "echo",
    "max_completion_tokens",
];

pub fn prefill_request(body: &Value) -> Value {
    let mut p = body.clone();
    let obj = p.as_object_mut().expect("inference bodies are objects");
    obj.insert("stream".into(), json!(false));
    obj.remove("stream_options");
    obj.insert("max_tokens".into(), json!(1));
    if obj.contains_key("max_completion_tokens") {
        obj.insert("max_completion_tokens".into(), json!(1));
    }
    obj.insert("min_tokens".into(), json!(0));
    obj.insert("return_token_ids".into(), json!(true));
    obj.insert(
        "kv_transfer_params".into(),
        json!({"do_remote_decode": true, "do_remote_prefill": false, "remote_engine_id": null,
               "remote_block_ids": null, "remote_host": null, "remote_port": null}),
    );
    p
}

/// What the prefill stage returned that decode needs.
#[derive(Debug, Clone, PartialEq)]
pub struct PrefillResult {
    pub kv_transfer_params: Option<Value>,
    pub prompt_token_ids: Option<Vec<u64>>,
}

pub fn read_prefill_response(response: &Value) -> PrefillResult {
    let kv = response.get("kv_transfer_params").filter(|v| v.is_object()).cloned();
    // Completions carry the ids on the choice, chat completions at the top level.
    let ids = response
        .get("prompt_token_ids")
        .or_else(|| response.pointer("/choices/0/prompt_token_ids"))
        .and_then(Value::as_array)
        .and_then(|ids| ids.iter().map(Value::as_u64).collect::<Option<Vec<_>>>());
    PrefillResult { kv_transfer_params: kv, prompt_token_ids: ids }
}

pub fn needs_chat_endpoint(body: &Value) -> bool {
    CHAT_ONLY_FIELDS.iter().any(|f| body.get(f).is_some_and(|v| !v.is_null() && v != &json!(false)))
}

/// Where decode goes and with what body.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodeRequest {
    pub path: &'static str,
    pub body: Value,
    /// The prompt travels as token ids (tokenize-once).
    pub token_ids: bool,
    /// A chat client answered from `/v1/completions`: its response must be converted.
    pub convert_to_chat: bool,
}

/// The decode request for `body` (the client's), given the prefill's parameters and
/// prompt ids. `max_model_len` sets the default `max_tokens` of a converted chat request
/// (chat defaults to the rest of the context, completions to 16).
pub fn decode_request(
    body: &Value,
    chat: bool,
    kv: &Value,
    prompt_ids: Option<&[u64]>,
    tokenize_once: bool,
    max_model_len: Option<u64>,
) -> DecodeRequest {
    let mut d = body.clone();
    let obj = d.as_object_mut().expect("inference bodies are objects");
    obj.insert("kv_transfer_params".into(), kv.clone());
    let ids = prompt_ids.filter(|_| tokenize_once && !(chat && needs_chat_endpoint(body)));
    let Some(ids) = ids else {
        let path = if chat { "/v1/chat/completions" } else { "/v1/completions" };
        return DecodeRequest { path, body: d, token_ids: false, convert_to_chat: false };
    };
    if chat {
        let max = body
            .get("max_completion_tokens")
            .or_else(|| body.get("max_tokens"))
            .filter(|v| !v.is_null())
            .cloned()
            .or_else(|| max_model_len.map(|len| json!(len.saturating_sub(ids.len() as u64).max(1))));
        let mut completion: Map<String, Value> = obj
            .iter()
            .filter(|(k, _)| !PROMPT_SHAPING_FIELDS.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        match max {
            Some(max) => completion.insert("max_tokens".into(), max),
            None => completion.remove("max_tokens"),
        };
        completion.insert("prompt".into(), json!(ids));
        return DecodeRequest {
            path: "/v1/completions",
            body: Value::Object(completion),
            token_ids: true,
            convert_to_chat: true,
        };
    }
    obj.insert("prompt".into(), json!(ids));
    DecodeRequest { path: "/v1/completions", body: d, token_ids: true, convert_to_chat: false }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefill_follows_the_protocol() {
        let body = json!({"model": "m", "messages": [], "stream": true, "stream_options": {"include_usage": true},
                          "max_completion_tokens": 300, "min_tokens": 10});
        let p = prefill_request(&body);
        assert_eq!(p["stream"], false);
        assert_eq!(p["max_tokens"], 1);
        assert_eq!(p["max_completion_tokens"], 1);
        assert_eq!(p["min_tokens"], 0);
        assert!(p.get("stream_options").is_none());
        assert_eq!(p["return_token_ids"], true);
        assert_eq!(p["kv_transfer_params"]["do_remote_decode"], true);
        assert!(p["kv_transfer_params"]["remote_block_ids"].is_null());
        let plain = prefill_request(&json!({"model": "m", "prompt": "x"}));
        assert!(plain.get("max_completion_tokens").is_none());
    }

    #[test]
    fn reads_ids_from_either_shape() {
        let chat = json!({"prompt_token_ids": [1, 2], "kv_transfer_params": {"do_remote_prefill": true}});
        assert_eq!(read_prefill_response(&chat).prompt_token_ids, Some(vec![1, 2]));
        let completion = json!({"choices": [{"prompt_token_ids": [3]}], "kv_transfer_params": null});
        let r = read_prefill_response(&completion);
        assert_eq!(r.prompt_token_ids, Some(vec![3]));
        assert_eq!(r.kv_transfer_params, None);
    }

    #[test]
    fn chat_decode_becomes_a_completion_of_ids() {
        let kv = json!({"do_remote_prefill": true});
        let body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": true,
                          "stream_options": {"include_usage": true}, "temperature": 0.5, "add_generation_prompt": true});
        let d = decode_request(&body, true, &kv, Some(&[5, 6, 7]), true, Some(100));
        assert_eq!(d.path, "/v1/completions");
        assert!(d.token_ids && d.convert_to_chat);
        assert_eq!(d.body["prompt"], json!([5, 6, 7]));
        assert_eq!(d.body["max_tokens"], 97, "chat's default: the rest of the context");
        assert!(d.body.get("messages").is_none() && d.body.get("add_generation_prompt").is_none());
        assert_eq!(d.body["stream_options"]["include_usage"], true);
        assert_eq!(d.body["temperature"], 0.5);
        assert_eq!(d.body["kv_transfer_params"], kv);
        let with_max = json!({"model": "m", "messages": [], "max_completion_tokens": 7});
        assert_eq!(decode_request(&with_max, true, &kv, Some(&[1]), true, Some(100)).body["max_tokens"], 7);
    }

    #[test]
    fn tools_off_switch_and_missing_ids_keep_text() {
        let kv = json!({});
        let tools = json!({"model": "m", "messages": [], "tools": [{"type": "function"}]});
        let d = decode_request(&tools, true, &kv, Some(&[1]), true, None);
        assert_eq!((d.path, d.token_ids, d.convert_to_chat), ("/v1/chat/completions", false, false));
        let chat = json!({"model": "m", "messages": []});
        assert!(!decode_request(&chat, true, &kv, Some(&[1]), false, None).token_ids);
        assert!(!decode_request(&chat, true, &kv, None, true, None).token_ids);
        let completion = json!({"model": "m", "prompt": "text", "max_tokens": 5});
        let d = decode_request(&completion, false, &kv, Some(&[9]), true, None);
        assert_eq!(
            (d.path, d.body["prompt"].clone(), d.body["max_tokens"].clone()),
            ("/v1/completions", json!([9]), json!(5))
        );
        assert!(!needs_chat_endpoint(&json!({"logprobs": false, "tools": null})));
    }
}
