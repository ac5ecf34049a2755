//! Generated token ids back to text, one token at a time, as vLLM's API server does it
//! (its `FastIncrementalDetokenizer`): for a Hugging Face tokenizer the `tokenizers`
//! crate's decode-stream step (the same Rust code vLLM calls through Python), primed with
//! the end of the prompt, so a token's text depends on the ones before it as in a whole
//! decode (a leading space kept, a character split across tokens held until it is
//! whole, special tokens skipped when asked); for the built-in tokenizer, the
//! simulator's own incremental detokenizer.
//!
//! A step returns the text the token completes: empty while a character is still
//! incomplete. vLLM primes with the whole prompt; the result is the same with its last
//! few ids (decoding is local: only the bytes of a split character and a decoder's
//! start-of-text rule reach back), and that costs nothing per request.
//!
//! Each step decodes every id since the last text was released, so ids that never
//! complete a character (a hostile engine's stray bytes, or skipped special tokens
//! without end) would make each step longer than the last. At most
//! [`MAX_PENDING_IDS`] ids are held: past that the decoder starts afresh at the next
//! token (what they would have shown, replacement characters or nothing, is dropped).

use llm_common::tokenizer::Detokenizer;

use super::PromptTokenizer;

/// Prompt ids the decoder is primed with.
const PRIME_IDS: usize = 8;

/// Ids a decoder holds at most: the few of context it decodes from and those not yet
/// released as text (a character is at most four byte tokens).
pub const MAX_PENDING_IDS: usize = 32;

/// The state of one response's detokenization.
pub enum TokenDecoder {
    HuggingFace { ids: Vec<u32>, prefix: String, prefix_index: usize, skip_special_tokens: bool },
    Builtin(Detokenizer),
}

impl std::fmt::Debug for TokenDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenDecoder").finish_non_exhaustive()
    }
}

impl PromptTokenizer {
    /// A decoder for the tokens generated after `prompt`.
    pub fn decoder(&self, prompt: &[u32], skip_special_tokens: bool) -> TokenDecoder {
        match self {
            PromptTokenizer::Builtin(_) => TokenDecoder::Builtin(Detokenizer::default()),
            PromptTokenizer::HuggingFace(_) => TokenDecoder::HuggingFace {
                ids: prompt[prompt.len().saturating_sub(PRIME_IDS)..].to_vec(),
                prefix: String::new(),
                prefix_index: 0,
                skip_special_tokens,
            },
        }
    }

    /// The text `id` completes (empty when it completes none yet).
    pub fn decode_step(&self, decoder: &mut TokenDecoder, id: u32) -> String {
        match (self, decoder) {
            (
                PromptTokenizer::HuggingFace(t),
                TokenDecoder::HuggingFace { ids, prefix, prefix_index, skip_special_tokens },
            ) => {
                let tokenizer = t.inner();
                if ids.len() > MAX_PENDING_IDS {
                    ids.clear();
                    prefix.clear();
                    *prefix_index = 0;
                }
                let step = |ids: &mut Vec<u32>, prefix: &mut String, index: &mut usize| {
                    tokenizers::tokenizer::step_decode_stream(
                        tokenizer,
                        vec![id],
                        *skip_special_tokens,
                        ids,
                        prefix,
                        index,
                    )
                };
                match step(ids, prefix, prefix_index) {
                    Ok(text) => text.unwrap_or_default(),
                    // vLLM's recovery from a decoder whose output is not prefix-stable: start
                    // a fresh stream at this token.
                    Err(_) => {
                        ids.clear();
                        prefix.clear();
                        *prefix_index = 0;
                        step(ids, prefix, prefix_index).ok().flatten().unwrap_or_default()
                    }
                }
            }
            (PromptTokenizer::Builtin(_), TokenDecoder::Builtin(d)) => d.push(id),
            _ => String::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_steps_hold_a_split_character_until_it_is_whole() {
        let t = PromptTokenizer::Builtin(super::super::BuiltinTokenizer::new(1024));
        let text = "naïve 🦀 crab — 東京";
        let ids = llm_common::tokenizer::encode(text);
        let mut d = t.decoder(&[1, 2, 3], true);
        let mut out = String::new();
        for &id in &ids {
            let piece = t.decode_step(&mut d, id);
            assert!(!piece.contains('\u{fffd}'), "{piece:?}");
            out.push_str(&piece);
        }
        assert_eq!(out, text);
    }
}
