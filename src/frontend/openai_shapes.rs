//! The OpenAI answers the router writes in `generate` mode, member for member as vLLM
//! 0.32's chat and completions endpoints write them (captured from the real engine:
//! `crates/vllm-sim/tests/golden/vllm-0.32.0/shapes.json`): the chat role chunk first,
//! a chunk per piece of text, the last with its finish and stop reasons, the usage
//! chunk with `choices: []` when asked, `data: [DONE]`; or one `chat.completion` /
//! `text_completion` body. `system_fingerprint` names the router's build.

use serde_json::Value;

use super::output_text::Finish;

pub const FINGERPRINT: &str = concat!("llm-router-", env!("CARGO_PKG_VERSION"));

pub const DONE: &[u8] = b"data: [DONE]\n\n";

pub struct Shapes {
    chat: bool,
    id: String,
    created: u64,
    /// The model's name as JSON.
    model: String,
}

fn json_string(out: &mut Vec<u8>, text: &str) {
    serde_json::to_writer(&mut *out, text).expect("writing to a Vec cannot fail");
}

impl Shapes {
    pub fn new(chat: bool, model: &str) -> Self {
        let created =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let id = format!("{}-{:016x}", if chat { "chatcmpl" } else { "cmpl" }, fastrand::u64(..));
        Shapes { chat, id, created, model: Value::from(model).to_string() }
    }

    fn head(&self, out: &mut Vec<u8>, object: &str) {
        out.extend_from_slice(b"{\"id\":\"");
        out.extend_from_slice(self.id.as_bytes());
        out.extend_from_slice(b"\",\"object\":\"");
        out.extend_from_slice(object.as_bytes());
        out.extend_from_slice(b"\",\"created\":");
        out.extend_from_slice(self.created.to_string().as_bytes());
        out.extend_from_slice(b",\"model\":");
        out.extend_from_slice(self.model.as_bytes());
        out.extend_from_slice(b",\"choices\":[");
    }

    fn chunk_head(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"data: ");
        self.head(out, if self.chat { "chat.completion.chunk" } else { "text_completion" });
    }

    /// The chat stream's first chunk: the assistant's role.
    pub fn role(&self, out: &mut Vec<u8>) {
        self.chunk_head(out);
        out.extend_from_slice(
            br#"{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}],"prompt_token_ids":null,"prompt_text":null}"#,
        );
        out.extend_from_slice(b"\n\n");
    }

    fn text_member(&self, out: &mut Vec<u8>, text: &str) {
        out.extend_from_slice(if self.chat {
            b"{\"index\":0,\"delta\":{\"content\":"
        } else {
            b"{\"index\":0,\"text\":"
        });
        json_string(out, text);
        if self.chat {
            out.push(b'}');
        }
    }

    /// A chunk of text, generation going on.
    pub fn delta(&self, out: &mut Vec<u8>, text: &str) {
        self.chunk_head(out);
        self.text_member(out, text);
        out.extend_from_slice(if self.chat {
            br#","logprobs":null,"finish_reason":null,"token_ids":null}]}"#.as_slice()
        } else {
            br#","logprobs":null,"finish_reason":null,"stop_reason":null,"prompt_token_ids":null,"token_ids":null}]}"#
                .as_slice()
        });
        out.extend_from_slice(b"\n\n");
    }

    fn finish_members(out: &mut Vec<u8>, finish: &Finish) {
        out.extend_from_slice(b",\"logprobs\":null,\"finish_reason\":");
        json_string(out, &finish.reason);
        out.extend_from_slice(b",\"stop_reason\":");
        serde_json::to_writer(&mut *out, &finish.stop_reason).expect("writing to a Vec cannot fail");
    }

    /// The last chunk of text, with the finish (and the fingerprint, when no usage chunk
    /// follows).
    pub fn last(&self, out: &mut Vec<u8>, text: &str, finish: &Finish, fingerprint: bool) {
        self.chunk_head(out);
        self.text_member(out, text);
        Self::finish_members(out, finish);
        if !self.chat {
            out.extend_from_slice(b",\"prompt_token_ids\":null");
        }
        out.extend_from_slice(b",\"token_ids\":null}]");
        if fingerprint {
            out.extend_from_slice(b",\"system_fingerprint\":\"");
            out.extend_from_slice(FINGERPRINT.as_bytes());
            out.push(b'"');
        }
        out.extend_from_slice(b"}\n\n");
    }

    /// The usage chunk of a stream that asked for it.
    pub fn usage(&self, out: &mut Vec<u8>, prompt: usize, completion: usize) {
        self.chunk_head(out);
        out.extend_from_slice(b"],\"system_fingerprint\":\"");
        out.extend_from_slice(FINGERPRINT.as_bytes());
        out.extend_from_slice(
            format!(
                "\",\"usage\":{{\"prompt_tokens\":{prompt},\"total_tokens\":{},\"completion_tokens\":{completion}}}}}\n\n",
                prompt + completion
            )
            .as_bytes(),
        );
    }

    /// A whole answer.
    pub fn body(&self, text: &str, finish: &Finish, prompt: usize, completion: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(text.len() + 640);
        self.head(&mut out, if self.chat { "chat.completion" } else { "text_completion" });
        if self.chat {
            out.extend_from_slice(b"{\"index\":0,\"message\":{\"role\":\"assistant\",\"content\":");
            json_string(&mut out, text);
            out.extend_from_slice(
                br#","refusal":null,"annotations":null,"audio":null,"function_call":null,"reasoning":null}"#,
            );
            Self::finish_members(&mut out, finish);
            out.extend_from_slice(br#","token_ids":null,"routed_experts":null}]"#);
        } else {
            out.extend_from_slice(b"{\"index\":0,\"text\":");
            json_string(&mut out, text);
            Self::finish_members(&mut out, finish);
            out.extend_from_slice(br#","token_ids":null,"prompt_logprobs":null,"prompt_token_ids":null,"routed_experts":null}]"#);
        }
        out.extend_from_slice(b",\"service_tier\":null,\"system_fingerprint\":\"");
        out.extend_from_slice(FINGERPRINT.as_bytes());
        out.extend_from_slice(
            format!(
                "\",\"usage\":{{\"prompt_tokens\":{prompt},\"total_tokens\":{},\"completion_tokens\":{completion},\"prompt_tokens_details\":null,\"completion_tokens_details\":null}}",
                prompt + completion
            )
            .as_bytes(),
        );
        if self.chat {
            out.extend_from_slice(br#","prompt_logprobs":null,"prompt_token_ids":null,"prompt_text":null"#);
        }
        out.extend_from_slice(br#","kv_transfer_params":null,"ec_transfer_params":null,"metrics":null}"#);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The shape of a JSON value as shapes.json records it: each leaf its type name.
    fn shape(v: &Value) -> Value {
        match v {
            Value::Null => json!("null"),
            Value::Bool(_) => json!("bool"),
            Value::Number(n) if n.is_u64() || n.is_i64() => json!("int"),
            Value::Number(_) => json!("float"),
            Value::String(_) => json!("str"),
            Value::Array(items) => Value::Array(items.iter().take(1).map(shape).collect()),
            Value::Object(o) => Value::Object(o.iter().map(|(k, v)| (k.clone(), shape(v))).collect()),
        }
    }

    fn golden(name: &str) -> Value {
        let path =
            concat!(env!("CARGO_MANIFEST_DIR"), "/crates/vllm-sim/tests/golden/vllm-0.32.0/shapes.json");
        let all: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        all[name]["shape"].clone()
    }

    fn event(bytes: &[u8]) -> Value {
        let text = std::str::from_utf8(bytes).unwrap();
        serde_json::from_str(text.strip_prefix("data: ").unwrap().trim_end()).unwrap()
    }

    #[test]
    fn answers_have_the_members_vllm_writes() {
        let stop = Finish { reason: "stop".into(), stop_reason: Value::Null };
        for chat in [true, false] {
            let s = Shapes::new(chat, "tiny");
            let (name, stream) =
                if chat { ("chat", "chat_stream_usage") } else { ("completion", "completion_stream_usage") };
            let body: Value = serde_json::from_slice(&s.body("hi", &stop, 3, 2)).unwrap();
            assert_eq!(shape(&body), golden(name), "{name}");
            let want = golden(stream);
            let mut out = Vec::new();
            s.delta(&mut out, "a");
            assert_eq!(shape(&event(&out)), want["middle"], "{stream} middle");
            out.clear();
            s.last(&mut out, "b", &stop, false);
            assert_eq!(shape(&event(&out)), want["finish"], "{stream} finish");
            out.clear();
            s.usage(&mut out, 3, 2);
            assert_eq!(shape(&event(&out)), want["usage"], "{stream} usage");
            if chat {
                out.clear();
                s.role(&mut out);
                assert_eq!(shape(&event(&out)), want["first"], "{stream} first");
            }
            // Without a usage chunk, the last chunk carries the fingerprint.
            out.clear();
            s.last(&mut out, "b", &stop, true);
            let plain = if chat { "chat_stream" } else { "completion_stream" };
            assert_eq!(shape(&event(&out)), golden(plain)["finish"], "{plain} finish");
        }
        let s = Shapes::new(true, "m\"x");
        let body: Value = serde_json::from_slice(&s.body("q\"\n🦀", &stop, 1, 1)).unwrap();
        assert_eq!(body["choices"][0]["message"]["content"], "q\"\n🦀");
        assert_eq!(body["model"], "m\"x");
        assert!(body["id"].as_str().unwrap().starts_with("chatcmpl-"));
    }
}
