//! The generate-mode corpus: the same requests sent to an engine's own OpenAI endpoints
//! and through a router running `--engine-api generate` in front of it must read the
//! same (text, finish reason, stop reason, usage), streamed and not, at temperature 0.
//!
//! The cases are built from what the engine says: a first answer's text gives the stop
//! strings (cut from its middle, so they do occur; multi-byte ones when the text has
//! any), its token ids give a stop token id. [`Coverage`] counts what the corpus
//! exercised, for the caller to require.

use serde_json::{Value, json};

use super::real_vllm::{reading, send};

const MAX_TOKENS: u32 = 40;

#[derive(Debug, Default)]
pub struct Coverage {
    pub compared: usize,
    pub by_length: usize,
    /// Ended by the model's own end (EOS), finish `stop` with no stop reason.
    pub by_eos: usize,
    pub by_stop_string: usize,
    pub by_stop_token: usize,
    /// Prompts or answers with characters beyond ASCII.
    pub multi_byte: usize,
}

/// Greedy answers of the test's tiny model to the first two (as chats) end with its EOS
/// token within 40 tokens (found by a search over short prompts).
pub const PROMPTS: [&str; 7] = [
    "ba",
    "é東 ba",
    "Write a short line about the sea.",
    "naïve café — crème brûlée, 東京 and Zürich",
    "emoji: 🦀🚀🎉 and a family 👨‍👩‍👧 in one line",
    "tabs\tand\nnew lines\n\n  spaced out",
    "Σ ≈ ∞; ½ + ¼ = ¾ — «quotes» “curly” ‘single’",
];

/// A prefix of `text` of about `chars` characters starting near its middle.
fn middle(text: &str, chars: usize) -> Option<String> {
    let all: Vec<char> = text.chars().collect();
    if all.len() < chars + 4 {
        return None;
    }
    let start = all.len() / 2;
    let piece: String = all[start..start + chars].iter().collect();
    (!piece.trim().is_empty()).then_some(piece)
}

/// Compare one request both ways, streamed and not (and streamed with usage).
async fn compare(
    c: &reqwest::Client,
    direct: &str,
    routed: &str,
    path: &str,
    body: &Value,
    cov: &mut Coverage,
) -> Value {
    let mut first = Value::Null;
    for (stream, usage) in [(false, false), (true, false), (true, true)] {
        let mut body = body.clone();
        body["stream"] = json!(stream);
        if usage {
            body["stream_options"] = json!({"include_usage": true});
        }
        let what = format!("{path} stream={stream} usage={usage} {body}");
        let (status, d) = send(c, &format!("{direct}{path}"), &body, &[]).await;
        assert_eq!(status, 200, "direct {what}: {d}");
        let (status, r) = send(c, &format!("{routed}{path}"), &body, &[]).await;
        assert_eq!(status, 200, "routed {what}: {r}");
        let (d, r) = (reading(&d, stream), reading(&r, stream));
        assert_eq!(r, d, "{what}");
        cov.compared += 1;
        if first.is_null() {
            first = d;
        }
    }
    match (first["finish_reason"].as_str(), &first["stop_reason"]) {
        (Some("length"), _) => cov.by_length += 1,
        (Some("stop"), Value::String(_)) => cov.by_stop_string += 1,
        (Some("stop"), Value::Number(_)) => cov.by_stop_token += 1,
        (Some("stop"), Value::Null) => cov.by_eos += 1,
        _ => {}
    }
    if !first["text"].as_str().unwrap_or("").is_ascii() {
        cov.multi_byte += 1;
    }
    first
}

/// Run the corpus for `model`. `natural_end`: also ask without `max_tokens` (an engine
/// whose model ends its answers soon).
pub async fn run(
    c: &reqwest::Client,
    direct: &str,
    routed: &str,
    model: &str,
    natural_end: bool,
) -> Coverage {
    let mut cov = Coverage::default();
    for (i, prompt) in PROMPTS.iter().enumerate() {
        if !prompt.is_ascii() {
            cov.multi_byte += 1;
        }
        for chat in [true, false] {
            let (path, mut base) = if chat {
                (
                    "/v1/chat/completions",
                    json!({"model": model, "messages": [{"role": "user", "content": prompt}]}),
                )
            } else {
                ("/v1/completions", json!({"model": model, "prompt": prompt}))
            };
            base["temperature"] = json!(0);
            base["seed"] = json!(i);
            // Plain, to a length.
            let mut body = base.clone();
            body["max_tokens"] = json!(MAX_TOKENS);
            let first = compare(c, direct, routed, path, &body, &mut cov).await;
            let text = first["text"].as_str().unwrap_or("").to_owned();
            // Stop strings cut from the answer: one that occurs (and one that does not),
            // then the same kept in the output, then held off by min_tokens.
            if let Some(stop) = middle(&text, 3) {
                let mut body = base.clone();
                body["max_tokens"] = json!(MAX_TOKENS);
                body["stop"] = json!(["never-said-zzz", stop]);
                compare(c, direct, routed, path, &body, &mut cov).await;
                body["include_stop_str_in_output"] = json!(true);
                compare(c, direct, routed, path, &body, &mut cov).await;
                let mut body = base.clone();
                body["max_tokens"] = json!(MAX_TOKENS);
                body["stop"] = json!(stop);
                body["min_tokens"] = json!(20);
                compare(c, direct, routed, path, &body, &mut cov).await;
            }
            // A single-character stop string (a character split across tokens when the
            // answer has multi-byte ones).
            if let Some(ch) = text
                .chars()
                .rev()
                .find(|ch| !ch.is_ascii() && *ch != '\u{fffd}')
                .or_else(|| text.chars().nth(text.chars().count() / 2))
            {
                let mut body = base.clone();
                body["max_tokens"] = json!(MAX_TOKENS);
                body["stop"] = json!(ch.to_string());
                compare(c, direct, routed, path, &body, &mut cov).await;
            }
            // A stop token id: the answer's sixth token.
            let mut ids_body = base.clone();
            ids_body["max_tokens"] = json!(MAX_TOKENS);
            ids_body["return_token_ids"] = json!(true);
            let (status, answer) = send(c, &format!("{direct}{path}"), &ids_body, &[]).await;
            assert_eq!(status, 200, "{answer}");
            let answer: Value = serde_json::from_str(&answer).unwrap();
            if let Some(id) = answer["choices"][0]["token_ids"].get(5) {
                let mut body = base.clone();
                body["max_tokens"] = json!(MAX_TOKENS);
                body["stop_token_ids"] = json!([id]);
                compare(c, direct, routed, path, &body, &mut cov).await;
            }
            // No max_tokens: a chat to its natural end, a completion to its default 16.
            if natural_end || !chat {
                compare(c, direct, routed, path, &base, &mut cov).await;
            }
        }
    }
    cov
}
