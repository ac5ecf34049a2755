//! vLLM's token-in, token-out endpoint, `POST /inference/v1/generate` (vLLM 0.32 with
//! `--enable-scale-out`; without it vLLM answers 403 `PermissionDeniedError`, and so
//! does the simulator without `--enable-scale-out`).
//!
//! The request carries the prompt as `token_ids` and vLLM's own `sampling_params`
//! (`max_tokens`, default: what is left of the context; `min_tokens`, `ignore_eos`,
//! `seed`, `stop`, `temperature`, `top_p` checked as vLLM checks them), and `stream`,
//! `stream_options`, `return_token_ids`, `kv_transfer_params`. The answer holds token
//! ids only (`output_mode: "tokens"`; `"text"` is refused: the simulator does not
//! render it). The members, their order and their null placeholders are those vLLM
//! 0.32.0 sent, captured from the real engine (`tests/golden/vllm-0.32.0/generate_*`,
//! checked by tests/wire_shapes.rs): each streamed event one token, the last with its
//! finish reason and `weight_versions`, the final usage chunk with `choices: []`.
//!
//! The API server's intake is charged as for a prompt of token ids (nothing to
//! tokenise); its per-token output cost is charged as on the OpenAI endpoints (vLLM
//! still frames one SSE event per token here; only detokenisation is saved, which the
//! profile does not yet price apart).

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_stream::Stream;

use super::SimError;
use super::engine::{Event, Finish};
use super::request::GenRequest;
use llm_common::tokenizer::VOCAB_SIZE;

/// What vLLM says when the scale-out endpoints are off.
pub const DISABLED: &str =
    "Scale-out endpoints are disabled. Restart vllm serve with --enable-scale-out to enable them.";

fn bad(message: impl Into<String>) -> SimError {
    SimError::BadRequest(message.into())
}

/// Validate a generate body for the model this replica serves.
pub fn parse(body: &Value, served_model: &str, max_model_len: usize) -> Result<GenRequest, SimError> {
    let Some(fields) = body.as_object() else { return Err(bad("request body must be a JSON object")) };
    let model = match fields.get("model") {
        Some(Value::String(m)) => m.clone(),
        None | Some(Value::Null) => served_model.to_owned(),
        Some(_) => return Err(bad("`model` must be a string")),
    };
    if model != served_model {
        return Err(SimError::ModelNotFound { model, served: served_model.to_owned() });
    }
    let ids = match fields.get("token_ids") {
        Some(Value::Array(ids)) if !ids.is_empty() => ids,
        Some(Value::Array(_)) => return Err(bad("`token_ids` should have at least 1 item")),
        _ => return Err(bad("`token_ids` is required: a list of token ids")),
    };
    let prompt_ids = ids
        .iter()
        .map(|v| match v.as_u64() {
            Some(id) if id < VOCAB_SIZE as u64 => Ok(id as u32),
            _ => Err(bad(format!("Token id {v} is out of vocabulary"))),
        })
        .collect::<Result<Vec<u32>, SimError>>()?;
    if prompt_ids.len() >= max_model_len {
        return Err(bad(format!(
            "The prompt is {} tokens long, the maximum context length is {max_model_len}",
            prompt_ids.len()
        )));
    }
    let sampling = match fields.get("sampling_params") {
        Some(Value::Object(s)) => s,
        _ => return Err(bad("`sampling_params` is required: an object")),
    };
    // The checks vLLM's sampling parameters make, on the same names.
    let params = Value::Object(sampling.clone());
    super::request::check_sampling(&params)?;
    let uint = |name: &str| -> Result<Option<usize>, SimError> {
        match sampling.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_u64()
                .map(|n| Some(n as usize))
                .ok_or_else(|| bad(format!("`{name}` must be a non-negative integer"))),
        }
    };
    if uint("n")?.unwrap_or(1) != 1 {
        return Err(bad("the simulator supports only n=1"));
    }
    let left = max_model_len - prompt_ids.len();
    let max_tokens = uint("max_tokens")?.unwrap_or(left).min(left);
    if max_tokens == 0 {
        return Err(bad("max_tokens must be at least 1, got 0."));
    }
    let flag = |value: Option<&Value>| matches!(value, Some(Value::Bool(true)));
    let stop = match sampling.get("stop") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(list)) => list.iter().filter_map(Value::as_str).map(str::to_owned).collect(),
        Some(_) => return Err(bad("`stop` must be a string or a list of strings")),
    };
    if let Some(mode) = fields.get("output_mode").and_then(Value::as_str)
        && mode != "tokens"
    {
        return Err(bad(format!("the simulator serves output_mode `tokens` only, not `{mode}`")));
    }
    let options = fields.get("stream_options");
    Ok(GenRequest {
        chat: false,
        model,
        prompt_ids,
        from_text: false,
        max_tokens,
        min_tokens: uint("min_tokens")?.unwrap_or(0),
        ignore_eos: flag(sampling.get("ignore_eos")),
        stop,
        include_stop_str_in_output: flag(sampling.get("include_stop_str_in_output")),
        seed: sampling.get("seed").and_then(Value::as_u64),
        stream: flag(fields.get("stream")),
        include_usage: flag(options.and_then(|o| o.get("include_usage"))),
        continuous_usage: flag(options.and_then(|o| o.get("continuous_usage_stats"))),
        return_token_ids: flag(fields.get("return_token_ids")),
        kv_transfer_params: fields.get("kv_transfer_params").filter(|v| !v.is_null()).cloned(),
        cache_salt: crate::request::cache_salt(fields.get("cache_salt"))?,
    })
}

fn finish_fields(finish: Finish, stop: &[String]) -> (&'static str, Value) {
    match finish {
        Finish::Length => ("length", Value::Null),
        Finish::Stop => ("stop", Value::Null),
        Finish::StopString(i) => ("stop", json!(stop[i])),
    }
}

fn weight_versions(generated: usize) -> Value {
    json!([{"version": "default", "start": 0, "end": generated}])
}

fn sse(value: &Value) -> Bytes {
    Bytes::from(format!("data: {value}\n\n"))
}

/// A whole answer: every token, then the response vLLM sends.
pub async fn collect(
    id: &str,
    created: u64,
    request: &GenRequest,
    mut events: mpsc::UnboundedReceiver<Event>,
    kv_transfer_params: impl FnOnce(&[u32]) -> Option<Value>,
) -> Result<Value, String> {
    let (mut ids, mut finish, mut blocks) = (Vec::new(), Finish::Length, None);
    while let Some(event) = events.recv().await {
        match event {
            Event::Token { id, finish: f } => {
                ids.push(id);
                if let Some(f) = f {
                    finish = f;
                    break;
                }
            }
            Event::PrefillBlocks(b) => blocks = Some(b),
            Event::Rejected(reason) => return Err(reason),
        }
    }
    let (finish_reason, stop_reason) = finish_fields(finish, &request.stop);
    let prompt = request.prompt_ids.len();
    let kv = blocks.as_deref().and_then(kv_transfer_params).unwrap_or(Value::Null);
    Ok(json!({
        "request_id": id, "model": request.model, "created": created,
        "usage": {"prompt_tokens": prompt, "total_tokens": prompt + ids.len(), "completion_tokens": ids.len(),
                  "prompt_tokens_details": null, "completion_tokens_details": null},
        "prompt_logprobs": null, "prompt_token_id_logprobs": null,
        "prompt_token_ids": if request.return_token_ids { json!(request.prompt_ids) } else { Value::Null },
        "mm_placeholders": null, "metrics": null, "kv_transfer_params": kv, "ec_transfer_params": null,
        "output_mode": "tokens",
        "choices": [{"index": 0, "finish_reason": finish_reason, "stop_reason": stop_reason, "token_ids": ids,
                     "routed_experts": null, "sampling_mask": null, "weight_versions": weight_versions(ids.len()),
                     "logprobs": null}],
    }))
}

/// A streamed answer, one event per token, polled straight off the engine's channel;
/// dropping it (the client left) closes the channel and the engine aborts the request.
pub struct GenerateStream {
    id: String,
    request: GenRequest,
    events: mpsc::UnboundedReceiver<Event>,
    generated: usize,
    prompt_sent: bool,
    phase: Phase,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    Tokens,
    Usage,
    Done,
    End,
}

impl GenerateStream {
    pub fn new(id: String, request: GenRequest, events: mpsc::UnboundedReceiver<Event>) -> Self {
        GenerateStream { id, request, events, generated: 0, prompt_sent: false, phase: Phase::Tokens }
    }

    fn token_event(&mut self, id: u32, finish: Option<Finish>) -> Bytes {
        let (finish_reason, stop_reason) = match finish {
            Some(f) => {
                let (reason, stop) = finish_fields(f, &self.request.stop);
                (json!(reason), stop)
            }
            None => (Value::Null, Value::Null),
        };
        let versions = if finish.is_some() { weight_versions(self.generated) } else { Value::Null };
        let choice = json!({"index": 0, "finish_reason": finish_reason, "stop_reason": stop_reason,
            "token_ids": [id], "routed_experts": null, "sampling_mask": null, "weight_versions": versions,
            "logprobs": null});
        let prompt = self.request.prompt_ids.len();
        let usage = if self.request.continuous_usage {
            json!({"prompt_tokens": prompt, "total_tokens": prompt + self.generated,
                   "completion_tokens": self.generated})
        } else {
            Value::Null
        };
        let mut chunk = serde_json::Map::new();
        chunk.insert("request_id".into(), json!(self.id));
        chunk.insert("usage".into(), usage);
        if self.request.return_token_ids && !self.prompt_sent {
            chunk.insert("prompt_token_ids".into(), json!(self.request.prompt_ids));
        }
        self.prompt_sent = true;
        chunk.insert("output_mode".into(), json!("tokens"));
        chunk.insert("choices".into(), json!([choice]));
        sse(&Value::Object(chunk))
    }
}

impl Stream for GenerateStream {
    type Item = Result<Bytes, std::io::Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            match this.phase {
                Phase::Tokens => {
                    let event = match Pin::new(&mut this.events).poll_recv(cx) {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(None) => {
                            return Poll::Ready(Some(Err(std::io::Error::other("engine ended the request"))));
                        }
                        Poll::Ready(Some(event)) => event,
                    };
                    match event {
                        Event::PrefillBlocks(_) => continue,
                        Event::Rejected(reason) => {
                            this.phase = Phase::Done;
                            let error = json!({"error": {"message": reason, "type": "BadRequestError",
                                "param": null, "code": 400}});
                            return Poll::Ready(Some(Ok(sse(&error))));
                        }
                        Event::Token { id, finish } => {
                            this.generated += 1;
                            if finish.is_some() {
                                this.phase =
                                    if this.request.include_usage { Phase::Usage } else { Phase::Done };
                            }
                            return Poll::Ready(Some(Ok(this.token_event(id, finish))));
                        }
                    }
                }
                Phase::Usage => {
                    this.phase = Phase::Done;
                    let prompt = this.request.prompt_ids.len();
                    let chunk = json!({"request_id": this.id,
                        "usage": {"prompt_tokens": prompt, "total_tokens": prompt + this.generated,
                                  "completion_tokens": this.generated},
                        "output_mode": "tokens", "choices": []});
                    return Poll::Ready(Some(Ok(sse(&chunk))));
                }
                Phase::Done => {
                    this.phase = Phase::End;
                    return Poll::Ready(Some(Ok(Bytes::from_static(b"data: [DONE]\n\n"))));
                }
                Phase::End => return Poll::Ready(None),
            }
        }
    }
}
