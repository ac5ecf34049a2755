//! The random workloads: independent requests of exactly `isl` prompt tokens, each
//! generating exactly `osl` tokens (`ignore_eos`), as `vllm bench serve --dataset-name
//! random` sends them. The study's two: prefill-heavy (ISL 8000, OSL 50) and
//! decode-heavy (ISL 50, OSL 500).
//!
//! Request `i` of seed `s` is built when it is sent, from its own seeded generator, so a
//! run of any length needs no dataset in memory and every contender gets the same
//! prompts. Prompts share no prefix (random words), so the engines' prefix caches do
//! not help: the workload measures serving, not caching.

use bytes::Bytes;
use serde_json::json;
use xxhash_rust::xxh3::xxh3_64_with_seed;

use super::client::Prepared;
use super::text::random_words;

#[derive(Debug, Clone)]
pub struct RandomWorkload {
    pub model: String,
    pub isl: usize,
    pub osl: usize,
    pub seed: u64,
    /// Send chat completions (one user message) instead of completions.
    pub chat: bool,
}

impl RandomWorkload {
    pub fn request(&self, index: usize) -> Prepared {
        let mut rng = fastrand::Rng::with_seed(xxh3_64_with_seed(&(index as u64).to_le_bytes(), self.seed));
        let prompt = random_words(&mut rng, self.isl);
        let common = |mut body: serde_json::Value| {
            body["max_tokens"] = json!(self.osl);
            body["ignore_eos"] = json!(true);
            body["temperature"] = json!(0.0);
            body["stream"] = json!(true);
            body["stream_options"] = json!({"include_usage": true});
            Bytes::from(body.to_string())
        };
        let (path, body) = if self.chat {
            let body = json!({"model": self.model, "messages": [{"role": "user", "content": prompt}]});
            ("/v1/chat/completions", common(body))
        } else {
            ("/v1/completions", common(json!({"model": self.model, "prompt": prompt})))
        };
        Prepared { path, body, prompt_tokens: self.isl, session: None, keep_text: false }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use llm_common::tokenizer::encode;

    #[test]
    fn prompts_have_exactly_isl_tokens_and_differ() {
        let w = RandomWorkload { model: "m".into(), isl: 300, osl: 5, seed: 42, chat: false };
        let body = |i| serde_json::from_slice::<serde_json::Value>(&w.request(i).body).unwrap();
        let (a, b) = (body(0), body(1));
        assert_eq!(encode(a["prompt"].as_str().unwrap()).len(), 300);
        assert_ne!(a["prompt"], b["prompt"]);
        assert_eq!(a, body(0));
        assert_eq!(a["max_tokens"], 5);
        assert_eq!(a["ignore_eos"], true);
        assert_eq!(a["stream_options"]["include_usage"], true);
        let chat = RandomWorkload { chat: true, ..w.clone() }.request(0);
        assert_eq!(chat.path, "/v1/chat/completions");
    }
}
