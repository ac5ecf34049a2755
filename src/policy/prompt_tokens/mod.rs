//! The request's prompt as token ids, computed in the router for `--policy kv-aware`
//! (the engines' KV events name cached blocks by their token ids).
//!
//! A prompt given as token ids is used as it is. Text and chat prompts are tokenised
//! the way the engine will: the chat messages rendered with the model's chat template,
//! then encoded. `--tokenizer builtin` (the default with `--sim`) is the simulator's
//! o200k_base and template ([`BuiltinTokenizer`]); `--tokenizer PATH` loads a Hugging
//! Face model directory's (or a `tokenizer.json`'s) tokenizer and the chat template
//! shipped beside it ([`HfTokenizer`]).
//!
//! Tokenising a 37k-token agentic prompt from scratch costs milliseconds, and every turn
//! of a session resends the whole conversation. So the rendered prompt is cut into
//! segments at points where the encoder always splits (so the segments encode
//! independently to exactly the ids of the whole), and each segment's ids are cached by
//! the hash of its source ([`segments::SegmentCache`]). A turn then costs the encoding
//! of what is new; the history, and the system prompts sessions share, come from the
//! cache.

mod hugging_face;
mod o200k;
pub mod pool;
mod segments;
pub mod stream_decode;

pub use hugging_face::HfTokenizer;
pub use o200k::BuiltinTokenizer;
pub use pool::{Busy, TokenizePool};
pub use segments::{SegmentCache, split_json_array};
pub use stream_decode::TokenDecoder;

use std::path::PathBuf;

/// What `--tokenizer` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenizerSpec {
    /// The simulator's o200k_base with its chat template.
    Builtin,
    /// A Hugging Face model directory or `tokenizer.json`.
    File(PathBuf),
}

impl TokenizerSpec {
    pub fn parse(text: &str) -> Result<Self, String> {
        match text {
            "builtin" | "builtin:o200k" => Ok(TokenizerSpec::Builtin),
            path => Ok(TokenizerSpec::File(PathBuf::from(path))),
        }
    }

    /// Load it, with at most `cache_tokens` token ids in its segment cache.
    pub fn load(
        &self,
        chat_template: Option<&std::path::Path>,
        cache_tokens: usize,
    ) -> Result<PromptTokenizer, String> {
        Ok(match self {
            TokenizerSpec::Builtin => PromptTokenizer::Builtin(BuiltinTokenizer::new(cache_tokens)),
            TokenizerSpec::File(path) => {
                PromptTokenizer::HuggingFace(Box::new(HfTokenizer::load(path, chat_template, cache_tokens)?))
            }
        })
    }
}

/// Longest prompt (raw JSON bytes) tokenised for routing. Tokenising holds a few times
/// the prompt's size (a chat template's rendering, the tokenizer's encoding), and no
/// engine accepts a prompt this long (about a million tokens): a longer one is routed
/// by load and left for the engine to refuse.
pub const MAX_PROMPT_BYTES: usize = 4 << 20;

/// A loaded tokenizer.
#[derive(Debug)]
pub enum PromptTokenizer {
    Builtin(BuiltinTokenizer),
    HuggingFace(Box<HfTokenizer>),
}

impl PromptTokenizer {
    /// The token ids of a prompt given as the raw JSON of a request's `messages` or
    /// `prompt`; `None` when it is none of the shapes those take.
    pub fn tokens(&self, raw: &[u8]) -> Option<Vec<u32>> {
        if raw.len() > MAX_PROMPT_BYTES {
            return None;
        }
        match self {
            PromptTokenizer::Builtin(t) => t.tokens(raw),
            PromptTokenizer::HuggingFace(t) => t.tokens(raw),
        }
    }
}
