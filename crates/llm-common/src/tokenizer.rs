//! Real BPE tokenisation (tiktoken's `o200k_base`, the encoding family of gpt-oss,
//! bundled with tiktoken-rs so it works offline), the chat template, and incremental
//! detokenisation for streams.
//!
//! The chat template is deliberately simple and documented so clients can predict token
//! counts: each message renders as `<|start|>{role}<|message|>{content}<|end|>`, and
//! the prompt ends with `<|start|>assistant<|message|>` (the generation prompt). The
//! markers are ordinary text to the encoder: we never emit special tokens.

use std::sync::OnceLock;

use tiktoken_rs::CoreBPE;

fn bpe() -> &'static CoreBPE {
    static BPE: OnceLock<CoreBPE> = OnceLock::new();
    BPE.get_or_init(|| tiktoken_rs::o200k_base().expect("o200k_base is bundled with tiktoken-rs"))
}

/// Load the encoder now (about 0.2 s) rather than on the first request.
pub fn warm_up() {
    bpe();
}

pub fn encode(text: &str) -> Vec<u32> {
    bpe().encode_ordinary(text)
}

/// Decode ids to text; invalid UTF-8 (a split character) is replaced, as vLLM does.
pub fn decode(ids: &[u32]) -> Result<String, String> {
    let bytes = decode_bytes(ids)?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

pub fn decode_bytes(ids: &[u32]) -> Result<Vec<u8>, String> {
    bpe().decode_bytes(ids).map_err(|e| format!("token ids out of the vocabulary: {e}"))
}

const WORDS: &str = "the of and to in is that for it as was with be by on not he this are or his from at \
which but have an they you were her she there all one been their has would when if will we who so no out \
up into do time can more some could them other then than now only its about over also new may any these \
two way our well even because most after first through back where much before right too good how just \
model token cache router request stream session prefix replica decode prefill batch queue engine latency \
value system data code function return error test result number string list file line read write start \
state event order point place world water light sound house small large great long little high low open \
close early late fast slow simple clear true false every each many such same different between under again";

/// A word that is one token when preceded by a space (`" word"`).
#[derive(Debug, Clone)]
pub struct WordToken {
    pub id: u32,
    /// The word with its leading space.
    pub text: String,
}

/// English words that are each a single o200k token with their leading space, sorted
/// by id. Text made of them has a known token count (one per word: o200k's
/// pre-tokenizer splits before each space, so BPE never merges across words), decodes
/// to readable ASCII and re-tokenises to the same ids.
pub fn single_token_words() -> &'static [WordToken] {
    static WORDS_BY_ID: OnceLock<Vec<WordToken>> = OnceLock::new();
    WORDS_BY_ID.get_or_init(|| {
        let mut words: Vec<WordToken> = WORDS
            .split_whitespace()
            .filter_map(|w| {
                let text = format!(" {w}");
                match encode(&text)[..] {
                    [id] => Some(WordToken { id, text }),
                    _ => None,
                }
            })
            .collect();
        words.sort_unstable_by_key(|w| w.id);
        words.dedup_by_key(|w| w.id);
        words
    })
}

/// o200k_base's ids stop below this (the largest ordinary id is 199,997).
pub const VOCAB_SIZE: u32 = 199_998;

/// o200k_base's `<|endoftext|>`: the token a simulated model ends on (finish reason
/// `stop`). As in vLLM, it counts as a completion token but is not part of the text.
pub const EOS_ID: u32 = 199_999;

/// A chat message as the template sees it.
pub struct ChatMessage<'a> {
    pub role: &'a str,
    pub content: &'a str,
}

pub fn render_chat(messages: &[ChatMessage<'_>], add_generation_prompt: bool) -> String {
    let mut out = String::new();
    for m in messages {
        out.push_str("<|start|>");
        out.push_str(m.role);
        out.push_str("<|message|>");
        out.push_str(m.content);
        out.push_str("<|end|>");
    }
    if add_generation_prompt {
        out.push_str("<|start|>assistant<|message|>");
    }
    out
}

/// The chat template with the final message left open for the model to go on with
/// (vLLM's `continue_final_message`): no end marker after it, no generation prompt.
pub fn render_chat_continuing(messages: &[ChatMessage<'_>]) -> String {
    let mut out = render_chat(messages, false);
    if !messages.is_empty() {
        out.truncate(out.len() - "<|end|>".len());
    }
    out
}

/// Turns a stream of token ids into text deltas that are always whole UTF-8: bytes of
/// a character split across tokens are held until the character completes.
#[derive(Default)]
pub struct Detokenizer {
    pending: Vec<u8>,
}

impl Detokenizer {
    pub fn push(&mut self, id: u32) -> String {
        if let Ok(bytes) = decode_bytes(&[id]) {
            self.pending.extend_from_slice(&bytes);
        }
        match std::str::from_utf8(&self.pending) {
            Ok(s) => {
                let s = s.to_owned();
                self.pending.clear();
                s
            }
            Err(e) if e.error_len().is_none() => {
                // Incomplete character at the end: emit what is complete.
                let valid = e.valid_up_to();
                let s = String::from_utf8_lossy(&self.pending[..valid]).into_owned();
                self.pending.drain(..valid);
                s
            }
            Err(_) => {
                let s = String::from_utf8_lossy(&self.pending).into_owned();
                self.pending.clear();
                s
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_text() {
        let text = "Hello, world! naïve café 東京";
        let ids = encode(text);
        assert!(!ids.is_empty());
        assert_eq!(decode(&ids).unwrap(), text);
    }

    #[test]
    fn detokenizer_never_splits_a_character() {
        let ids = encode("東京 🚀 ok");
        let mut d = Detokenizer::default();
        let text: String = ids.iter().map(|&id| d.push(id)).collect();
        assert_eq!(text, "東京 🚀 ok");
    }

    #[test]
    fn single_token_words_count_one_token_each() {
        let words = single_token_words();
        assert!(words.len() > 150, "{}", words.len());
        let text: String = words.iter().map(|w| w.text.as_str()).collect();
        let ids: Vec<u32> = words.iter().map(|w| w.id).collect();
        assert_eq!(encode(&text), ids);
    }

    #[test]
    fn chat_template_is_documented_shape() {
        let t = render_chat(&[ChatMessage { role: "user", content: "hi" }], true);
        let open =
            [ChatMessage { role: "user", content: "hi" }, ChatMessage { role: "assistant", content: "Hel" }];
        assert_eq!(
            render_chat_continuing(&open),
            "<|start|>user<|message|>hi<|end|><|start|>assistant<|message|>Hel"
        );
        assert_eq!(t, "<|start|>user<|message|>hi<|end|><|start|>assistant<|message|>");
    }
}
