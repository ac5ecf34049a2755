//! The request rewrites of prefill/decode disaggregation, as pure functions over the
//! client's JSON body (vLLM's NixlConnector protocol, as in vLLM's reference proxy).
//! Bodies stay bytes: only the top-level members a rewrite changes are written anew
//! ([`super::members`]), and the prompt's ids go from the prefill response to the
//! decode request as the slice they arrived as.
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

use serde::Deserialize;
use serde::de::{IgnoredAny, SeqAccess, Visitor};
use serde_json::value::RawValue;

use super::members::Members;

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

/// What prefill is asked to do with the KV cache it computes.
pub const PREFILL_KV_PARAMS: &[u8] = br#"{"do_remote_decode":true,"do_remote_prefill":false,"remote_engine_id":null,"remote_block_ids":null,"remote_host":null,"remote_port":null}"#;

pub fn prefill_request(body: &Members) -> Vec<u8> {
    let mut set: Vec<(&str, &[u8])> = vec![
        ("stream", b"false"),
        ("max_tokens", b"1"),
        ("min_tokens", b"0"),
        ("return_token_ids", b"true"),
        ("kv_transfer_params", PREFILL_KV_PARAMS),
    ];
    if body.get("max_completion_tokens").is_some() {
        set.push(("max_completion_tokens", b"1"));
    }
    body.rewrite(|key| key != "stream_options", &set)
}

/// What the prefill stage returned that decode needs, as slices of its response.
#[derive(Debug, Clone, Copy)]
pub struct PrefillResult<'a> {
    pub kv_transfer_params: Option<&'a RawValue>,
    /// The prompt's token ids (a JSON array of non-negative integers) and how many.
    pub prompt_token_ids: Option<(&'a RawValue, usize)>,
}

/// Read a prefill response without building it: the two fields decode needs are kept
/// as slices, everything else is skipped. `None` when it is not a JSON object.
pub fn read_prefill_response(response: &[u8]) -> Option<PrefillResult<'_>> {
    #[derive(Deserialize)]
    struct Response<'a> {
        #[serde(borrow, default)]
        kv_transfer_params: Option<&'a RawValue>,
        #[serde(borrow, default)]
        prompt_token_ids: Option<&'a RawValue>,
        #[serde(borrow, default)]
        choices: Option<FirstChoice<'a>>,
    }
    let parsed: Response = serde_json::from_slice(super::members::object(response)?).ok()?;
    // Completions carry the ids on the choice, chat completions at the top level.
    let ids = parsed.prompt_token_ids.or(parsed.choices.and_then(|c| c.0));
    Some(PrefillResult {
        kv_transfer_params: parsed.kv_transfer_params.filter(|kv| kv.get().starts_with('{')),
        prompt_token_ids: ids.and_then(|ids| Some((ids, count_token_ids(ids)?))),
    })
}

/// The `prompt_token_ids` of a response's first choice; the other choices are skipped.
struct FirstChoice<'a>(Option<&'a RawValue>);

impl<'de: 'a, 'a> Deserialize<'de> for FirstChoice<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Choice<'a> {
            #[serde(borrow, default)]
            prompt_token_ids: Option<&'a RawValue>,
        }
        struct ChoicesVisitor;
        impl<'de> Visitor<'de> for ChoicesVisitor {
            type Value = FirstChoice<'de>;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a list of choices")
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let first: Option<Choice> = seq.next_element()?;
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(FirstChoice(first.and_then(|c| c.prompt_token_ids)))
            }
        }
        deserializer.deserialize_seq(ChoicesVisitor)
    }
}

/// How many token ids a JSON array holds, if it holds only non-negative integers.
fn count_token_ids(ids: &RawValue) -> Option<usize> {
    struct Count(usize);
    impl<'de> Deserialize<'de> for Count {
        fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            struct CountVisitor;
            impl<'de> Visitor<'de> for CountVisitor {
                type Value = Count;

                fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                    f.write_str("a list of token ids")
                }

                fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Count, A::Error> {
                    let mut n = 0;
                    while seq.next_element::<u64>()?.is_some() {
                        n += 1;
                    }
                    Ok(Count(n))
                }
            }
            deserializer.deserialize_seq(CountVisitor)
        }
    }
    serde_json::from_str::<Count>(ids.get()).ok().map(|c| c.0)
}

pub fn needs_chat_endpoint(body: &Members) -> bool {
    CHAT_ONLY_FIELDS.iter().any(|f| body.is_set(f))
}

/// Where decode goes and with what body.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodeRequest {
    pub path: &'static str,
    pub body: Vec<u8>,
    /// The prompt travels as token ids (tokenize-once).
    pub token_ids: bool,
    /// A chat client answered from `/v1/completions`: its response must be converted.
    pub convert_to_chat: bool,
}

/// The decode request for `body` (the client's), given the prefill's parameters and
/// prompt ids. `max_model_len` sets the default `max_tokens` of a converted chat request
/// (chat defaults to the rest of the context, completions to 16).
pub fn decode_request(
    body: &Members,
    chat: bool,
    kv: &RawValue,
    prompt_ids: Option<(&RawValue, usize)>,
    tokenize_once: bool,
    max_model_len: Option<u64>,
) -> DecodeRequest {
    let kv = kv.get().as_bytes();
    let ids = prompt_ids.filter(|_| tokenize_once && !(chat && needs_chat_endpoint(body)));
    let Some((ids, count)) = ids else {
        let path = if chat { "/v1/chat/completions" } else { "/v1/completions" };
        let body = body.rewrite(|_| true, &[("kv_transfer_params", kv)]);
        return DecodeRequest { path, body, token_ids: false, convert_to_chat: false };
    };
    let prompt = ids.get().as_bytes();
    if !chat {
        let body = body.rewrite(|_| true, &[("kv_transfer_params", kv), ("prompt", prompt)]);
        return DecodeRequest { path: "/v1/completions", body, token_ids: true, convert_to_chat: false };
    }
    let set_to = |key: &str| body.get(key).filter(|v| v.get() != "null").map(|v| v.get().as_bytes().to_vec());
    let max = set_to("max_completion_tokens").or_else(|| set_to("max_tokens")).or_else(|| {
        max_model_len.map(|len| len.saturating_sub(count as u64).max(1).to_string().into_bytes())
    });
    let mut set: Vec<(&str, &[u8])> = vec![("kv_transfer_params", kv), ("prompt", prompt)];
    if let Some(max) = &max {
        set.push(("max_tokens", max));
    }
    let keep = |key: &str| !PROMPT_SHAPING_FIELDS.contains(&key) && key != "max_tokens";
    DecodeRequest {
        path: "/v1/completions",
        body: body.rewrite(keep, &set),
        token_ids: true,
        convert_to_chat: true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn members(v: &Value) -> Vec<u8> {
        v.to_string().into_bytes()
    }

    fn parse(bytes: &[u8]) -> Value {
        serde_json::from_slice(bytes).unwrap()
    }

    fn raw(text: &str) -> Box<RawValue> {
        RawValue::from_string(text.to_owned()).unwrap()
    }

    #[test]
    fn prefill_follows_the_protocol() {
        let body = members(
            &json!({"model": "m", "messages": [], "stream": true, "stream_options": {"include_usage": true},
                          "max_completion_tokens": 300, "min_tokens": 10}),
        );
        let p = parse(&prefill_request(&Members::parse(&body).unwrap()));
        assert_eq!(p["stream"], false);
        assert_eq!(p["max_tokens"], 1);
        assert_eq!(p["max_completion_tokens"], 1);
        assert_eq!(p["min_tokens"], 0);
        assert!(p.get("stream_options").is_none());
        assert_eq!(p["return_token_ids"], true);
        assert_eq!(p["kv_transfer_params"]["do_remote_decode"], true);
        assert!(p["kv_transfer_params"]["remote_block_ids"].is_null());
        let plain = members(&json!({"model": "m", "prompt": "x"}));
        assert!(
            parse(&prefill_request(&Members::parse(&plain).unwrap())).get("max_completion_tokens").is_none()
        );
    }

    #[test]
    fn reads_ids_from_either_shape() {
        let chat = br#"{"prompt_token_ids": [1, 2], "kv_transfer_params": {"do_remote_prefill": true}}"#;
        let r = read_prefill_response(chat).unwrap();
        assert_eq!(r.prompt_token_ids.map(|(ids, n)| (ids.get(), n)), Some(("[1, 2]", 2)));
        assert!(r.kv_transfer_params.is_some());
        let completion =
            br#"{"choices": [{"prompt_token_ids": [3]}, {"x": [[[]]]}], "kv_transfer_params": null}"#;
        let r = read_prefill_response(completion).unwrap();
        assert_eq!(r.prompt_token_ids.map(|(_, n)| n), Some(1));
        assert!(r.kv_transfer_params.is_none());
        // Ids that are not ids are not used; a response that is not an object is none.
        let bad = br#"{"prompt_token_ids": [1, -2, "x"], "kv_transfer_params": "string"}"#;
        let r = read_prefill_response(bad).unwrap();
        assert!(r.prompt_token_ids.is_none() && r.kv_transfer_params.is_none());
        assert!(read_prefill_response(b"[]").is_none());
    }

    #[test]
    fn chat_decode_becomes_a_completion_of_ids() {
        let kv = raw(r#"{"do_remote_prefill":true}"#);
        let ids = raw("[5,6,7]");
        let body = members(
            &json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": true,
                          "stream_options": {"include_usage": true}, "temperature": 0.5, "add_generation_prompt": true}),
        );
        let d = decode_request(&Members::parse(&body).unwrap(), true, &kv, Some((&ids, 3)), true, Some(100));
        assert_eq!(d.path, "/v1/completions");
        assert!(d.token_ids && d.convert_to_chat);
        let b = parse(&d.body);
        assert_eq!(b["prompt"], json!([5, 6, 7]));
        assert_eq!(b["max_tokens"], 97, "chat's default: the rest of the context");
        assert!(b.get("messages").is_none() && b.get("add_generation_prompt").is_none());
        assert_eq!(b["stream_options"]["include_usage"], true);
        assert_eq!(b["temperature"], 0.5);
        assert_eq!(b["kv_transfer_params"], json!({"do_remote_prefill": true}));
        let with_max =
            members(&json!({"model": "m", "messages": [], "max_completion_tokens": 7, "max_tokens": 9}));
        let d =
            decode_request(&Members::parse(&with_max).unwrap(), true, &kv, Some((&ids, 3)), true, Some(100));
        assert_eq!(parse(&d.body)["max_tokens"], 7);
    }

    #[test]
    fn tools_off_switch_and_missing_ids_keep_text() {
        let kv = raw("{}");
        let ids = raw("[1]");
        let tools = members(&json!({"model": "m", "messages": [], "tools": [{"type": "function"}]}));
        let d = decode_request(&Members::parse(&tools).unwrap(), true, &kv, Some((&ids, 1)), true, None);
        assert_eq!((d.path, d.token_ids, d.convert_to_chat), ("/v1/chat/completions", false, false));
        let chat = members(&json!({"model": "m", "messages": []}));
        let chat = Members::parse(&chat).unwrap();
        assert!(!decode_request(&chat, true, &kv, Some((&ids, 1)), false, None).token_ids);
        assert!(!decode_request(&chat, true, &kv, None, true, None).token_ids);
        let completion = members(&json!({"model": "m", "prompt": "text", "max_tokens": 5}));
        let nine = raw("[9]");
        let d =
            decode_request(&Members::parse(&completion).unwrap(), false, &kv, Some((&nine, 1)), true, None);
        let b = parse(&d.body);
        assert_eq!(
            (d.path, b["prompt"].clone(), b["max_tokens"].clone()),
            ("/v1/completions", json!([9]), json!(5))
        );
        let off = members(&json!({"logprobs": false, "tools": null}));
        assert!(!needs_chat_endpoint(&Members::parse(&off).unwrap()));
    }
}
