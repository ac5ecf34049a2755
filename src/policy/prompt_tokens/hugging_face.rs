//! A Hugging Face tokenizer (`--tokenizer DIR`, a model directory as shipped, or
//! `DIR/tokenizer.json`) with its chat template (`--chat-template FILE`, else
//! `chat_template.jinja`, `chat_templates/default.jinja` or `tokenizer_config.json`'s
//! `chat_template`, in transformers' order),
//! rendered with `minijinja` (Python string methods from `minijinja-contrib`'s pycompat)
//! and encoded with the `tokenizers` crate, as vLLM renders and encodes a chat request
//! (`add_generation_prompt` true, no special tokens added on encoding: the template
//! writes them).
//!
//! Incremental: the rendered prompt is cut before every occurrence of a special (added)
//! token. `tokenizers` splits its input at added tokens before normalising and
//! pre-tokenising, so each segment encodes independently to exactly its share of the
//! whole's ids; each segment's ids are cached by the xxh3 of its text. A new turn
//! re-renders the template (the template may treat any message differently once more
//! follow it) but encodes only the segments not seen before: in a chat template every
//! message starts with a special token, so those are the new messages.
//! Added tokens that strip the whitespace around them (`lstrip` / `rstrip`) would make a
//! cut inexact; such tokenizers are refused at load.

use std::path::Path;
use std::sync::Arc;

use aho_corasick::AhoCorasick;
use serde_json::Value;
use xxhash_rust::xxh3::xxh3_64_with_seed;

use super::segments::SegmentCache;

const SEGMENT: u64 = 11;

pub struct HfTokenizer {
    tokenizer: tokenizers::Tokenizer,
    template: minijinja::Environment<'static>,
    bos_token: String,
    eos_token: String,
    specials: Option<AhoCorasick>,
    cache: SegmentCache,
}

impl std::fmt::Debug for HfTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HfTokenizer").finish_non_exhaustive()
    }
}

/// A token's text in `tokenizer_config.json`: a string, or `{"content": ...}`.
fn token_text(value: Option<&Value>) -> String {
    match value {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Object(o)) => o.get("content").and_then(Value::as_str).unwrap_or("").to_owned(),
        _ => String::new(),
    }
}

fn read_template(file: &Path) -> Result<String, String> {
    std::fs::read_to_string(file).map_err(|e| format!("cannot read chat template {}: {e}", file.display()))
}

/// The chat template transformers would load with the tokenizer at `tokenizer_json`:
/// a template file beside it wins over `tokenizer_config.json`. Empty when there is none.
fn template_beside(tokenizer_json: &Path, config: &Value) -> Result<String, String> {
    for file in ["chat_template.jinja", "chat_templates/default.jinja"] {
        let candidate = tokenizer_json.with_file_name(file);
        if candidate.is_file() {
            return read_template(&candidate);
        }
    }
    Ok(match config.get("chat_template") {
        Some(Value::String(t)) => t.clone(),
        // A list of named templates: the default one.
        Some(Value::Array(named)) => named
            .iter()
            .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
            .or_else(|| named.first())
            .and_then(|t| t.get("template").and_then(Value::as_str))
            .unwrap_or("")
            .to_owned(),
        _ => String::new(),
    })
}

impl HfTokenizer {
    /// Load `path`: a model or tokenizer directory (its `tokenizer.json`) or the
    /// `tokenizer.json` itself. The chat template is `chat_template` (a file) if given,
    /// else found beside the tokenizer as transformers finds it: `chat_template.jinja`,
    /// else `chat_templates/default.jinja`, else `tokenizer_config.json`'s
    /// `chat_template` (a string, or a list of named templates: the `default` one).
    pub fn load(path: &Path, chat_template: Option<&Path>, cache_tokens: usize) -> Result<Self, String> {
        let path = if path.is_dir() { path.join("tokenizer.json") } else { path.to_path_buf() };
        let tokenizer = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| format!("cannot load tokenizer {}: {e}", path.display()))?;
        let config_path = path.with_file_name("tokenizer_config.json");
        let config: Value = match std::fs::read(&config_path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| format!("{} is not JSON: {e}", config_path.display()))?,
            Err(_) => Value::Null,
        };
        let template = match chat_template {
            Some(file) => read_template(file)?,
            None => template_beside(&path, &config)?,
        };
        if template.is_empty() {
            return Err(format!(
                "no chat template: none of chat_template.jinja, chat_templates/default.jinja or the \
                 `chat_template` of tokenizer_config.json is in {}, and --chat-template was not given",
                path.parent().map_or_else(|| ".".into(), |d| d.display().to_string())
            ));
        }
        let mut env = minijinja::Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |message: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, message))
        });
        env.add_template_owned("chat", template)
            .map_err(|e| format!("the chat template does not parse: {e}"))?;
        let added = tokenizer.get_added_tokens_decoder();
        if added.values().any(|t| t.lstrip || t.rstrip) {
            return Err(
                "tokenizers whose added tokens strip whitespace (lstrip/rstrip) are not supported".into()
            );
        }
        let specials: Vec<String> = added.values().filter(|t| t.special).map(|t| t.content.clone()).collect();
        let specials = if specials.is_empty() {
            None
        } else {
            Some(
                AhoCorasick::builder()
                    .match_kind(aho_corasick::MatchKind::LeftmostLongest)
                    .build(&specials)
                    .map_err(|e| format!("special tokens: {e}"))?,
            )
        };
        Ok(HfTokenizer {
            tokenizer,
            template: env,
            bos_token: token_text(config.get("bos_token")),
            eos_token: token_text(config.get("eos_token")),
            specials,
            cache: SegmentCache::new(cache_tokens),
        })
    }

    /// The tokenizer itself (for decoding).
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.tokenizer
    }

    /// The chat template applied to `messages` with the generation prompt.
    pub fn render(&self, messages: &Value) -> Result<String, String> {
        let template = self.template.get_template("chat").map_err(|e| e.to_string())?;
        template
            .render(minijinja::context! {
                messages => minijinja::Value::from(minijinja::value::Serde(messages)),
                add_generation_prompt => true,
                bos_token => &self.bos_token,
                eos_token => &self.eos_token,
            })
            .map_err(|e| format!("chat template: {e}"))
    }

    /// The ids of a prompt given as the raw JSON of `messages` or `prompt`.
    pub fn tokens(&self, raw: &[u8]) -> Option<Vec<u32>> {
        let value: Value = serde_json::from_slice(raw).ok()?;
        match &value {
            Value::String(text) => self.encode_whole(text, true),
            Value::Array(items) if items.first().is_some_and(Value::is_object) => {
                Some(self.segmented(&self.render(&value).ok()?))
            }
            Value::Array(items) if items.iter().all(Value::is_u64) => {
                items.iter().map(|v| v.as_u64().and_then(|id| u32::try_from(id).ok())).collect()
            }
            Value::Array(items) if items.len() == 1 => match &items[0] {
                Value::String(text) => self.encode_whole(text, true),
                Value::Array(ids) => {
                    ids.iter().map(|v| v.as_u64().and_then(|id| u32::try_from(id).ok())).collect()
                }
                _ => None,
            },
            _ => None,
        }
    }

    fn encode_whole(&self, text: &str, special: bool) -> Option<Vec<u32>> {
        Some(self.tokenizer.encode_fast(text, special).ok()?.get_ids().to_vec())
    }

    /// `text` encoded segment by segment, each cut before a special token.
    fn segmented(&self, text: &str) -> Vec<u32> {
        let mut cuts: Vec<usize> = match &self.specials {
            Some(specials) => specials.find_iter(text).map(|m| m.start()).filter(|&s| s > 0).collect(),
            None => Vec::new(),
        };
        cuts.push(text.len());
        let mut ids = Vec::with_capacity(text.len() / 3);
        let mut start = 0;
        for cut in cuts {
            let segment = &text[start..cut];
            start = cut;
            let key = xxh3_64_with_seed(segment.as_bytes(), SEGMENT);
            let segment_ids = self.cache.get(key).unwrap_or_else(|| {
                let encoded: Arc<[u32]> = self.encode_whole(segment, false).unwrap_or_default().into();
                self.cache.insert(key, encoded.clone());
                encoded
            });
            ids.extend_from_slice(&segment_ids);
        }
        ids
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokenizers::decoders::DecoderWrapper;
    use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
    use tokenizers::normalizers::NormalizerWrapper;
    use tokenizers::pre_tokenizers::PreTokenizerWrapper;
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    use tokenizers::processors::PostProcessorWrapper;
    use tokenizers::{AddedToken, TokenizerBuilder};

    const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + \
        message['content'].strip() + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}\
        {{ '<|im_start|>assistant\\n' }}{% endif %}";

    /// A byte-level BPE tokenizer trained on a small corpus, with ChatML's special tokens,
    /// written as tokenizer.json + tokenizer_config.json in a fresh directory.
    fn trained(dir_name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("llm-router-{dir_name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let corpus = dir.join("corpus.txt");
        let text: String = (0..300)
            .map(|i| format!("the agent runs the tests {i} times, then fixes the bug in src/main.rs\n"))
            .collect();
        std::fs::write(&corpus, text).unwrap();
        let mut trainer = BpeTrainerBuilder::new()
            .vocab_size(500)
            .min_frequency(2)
            .show_progress(false)
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .build();
        let mut tokenizer = TokenizerBuilder::<
            BPE,
            NormalizerWrapper,
            PreTokenizerWrapper,
            PostProcessorWrapper,
            DecoderWrapper,
        >::new()
        .with_model(BPE::default())
        .with_pre_tokenizer(Some(PreTokenizerWrapper::ByteLevel(ByteLevel::default())))
        .with_decoder(Some(DecoderWrapper::ByteLevel(ByteLevel::default())))
        .build()
        .unwrap();
        tokenizer.train_from_files(&mut trainer, vec![corpus.to_string_lossy().into_owned()]).unwrap();
        tokenizer
            .add_special_tokens([
                AddedToken::from("<|im_start|>", true),
                AddedToken::from("<|im_end|>", true),
            ])
            .unwrap();
        let path = dir.join("tokenizer.json");
        tokenizer.save(&path, false).unwrap();
        let config =
            serde_json::json!({"chat_template": CHATML, "bos_token": null, "eos_token": "<|im_end|>"});
        std::fs::write(dir.join("tokenizer_config.json"), config.to_string()).unwrap();
        path
    }

    #[test]
    fn segments_encode_to_the_ids_of_the_whole_rendered_prompt() {
        let path = trained("hf-segments");
        let t = HfTokenizer::load(&path, None, 1 << 20).unwrap();
        let whole = tokenizers::Tokenizer::from_file(&path).unwrap();
        let mut messages =
            vec![serde_json::json!({"role": "system", "content": "  You are an agent. Run the tests.  "})];
        for turn in 0..6 {
            messages.push(serde_json::json!({"role": "user", "content": format!("turn {turn}: the tests fail\n  in src/main.rs ")}));
            let raw = serde_json::to_vec(&messages).unwrap();
            let rendered = t.render(&serde_json::Value::Array(messages.clone())).unwrap();
            assert!(rendered.starts_with("<|im_start|>system\nYou are an agent."), "{rendered}");
            let expected = whole.encode_fast(rendered.as_str(), false).unwrap().get_ids().to_vec();
            assert_eq!(t.tokens(&raw).unwrap(), expected, "turn {turn}");
            messages.push(serde_json::json!({"role": "assistant", "content": "fixed 2 bugs"}));
        }
        // Every message is its own segment: a new turn encodes little.
        let before = t.cache.tokens();
        messages.push(serde_json::json!({"role": "user", "content": "thanks"}));
        t.tokens(&serde_json::to_vec(&messages).unwrap()).unwrap();
        assert!(t.cache.tokens() - before < 20, "{}", t.cache.tokens() - before);
        // Ids and text prompts.
        assert_eq!(t.tokens(b"[5, 6]").unwrap(), vec![5, 6]);
        let text = whole.encode_fast("the agent", true).unwrap().get_ids().to_vec();
        assert_eq!(t.tokens(br#""the agent""#).unwrap(), text);
    }

    #[test]
    fn streamed_decoding_equals_the_whole_decode() {
        let path = trained("hf-decode");
        let t =
            super::super::PromptTokenizer::HuggingFace(Box::new(HfTokenizer::load(&path, None, 16).unwrap()));
        let whole = tokenizers::Tokenizer::from_file(&path).unwrap();
        let prompt = whole
            .encode_fast("<|im_start|>user\nthe tests<|im_end|>\n<|im_start|>assistant\n", false)
            .unwrap();
        let prompt = prompt.get_ids();
        // Multi-byte characters (byte-level tokens of one character), a special token.
        let text = " the agent runs é 🦀 東京 tests<|im_end|> fixes";
        let ids = whole.encode_fast(text, false).unwrap().get_ids().to_vec();
        assert!(ids.len() > 10, "{ids:?}");
        let mut decoder = t.decoder(prompt, true);
        let mut out = String::new();
        for &id in &ids {
            let piece = t.decode_step(&mut decoder, id);
            assert!(!piece.ends_with('\u{fffd}'), "{piece:?}");
            out.push_str(&piece);
        }
        assert_eq!(out, whole.decode(&ids, true).unwrap());
        assert_eq!(out, " the agent runs é 🦀 東京 tests fixes");
        // Special tokens kept when asked.
        let mut decoder = t.decoder(prompt, false);
        let kept: String = ids.iter().map(|&id| t.decode_step(&mut decoder, id)).collect();
        assert_eq!(kept, text);
    }

    #[test]
    fn ids_that_never_complete_text_are_held_boundedly() {
        let path = trained("hf-window");
        let t =
            super::super::PromptTokenizer::HuggingFace(Box::new(HfTokenizer::load(&path, None, 16).unwrap()));
        let whole = tokenizers::Tokenizer::from_file(&path).unwrap();
        let end = whole.token_to_id("<|im_end|>").unwrap();
        // A lone continuation byte: never a character.
        let stray = whole.encode_fast("é", false).unwrap().get_ids().to_vec();
        let stray = &stray[stray.len() - 1..];
        assert_eq!(whole.decode(stray, false).unwrap(), "\u{fffd}", "{stray:?}");
        let pending = |d: &super::super::TokenDecoder| match d {
            super::super::TokenDecoder::HuggingFace { ids, .. } => ids.len(),
            super::super::TokenDecoder::Builtin(_) => 0,
        };
        for filler in [end, stray[0]] {
            let mut decoder = t.decoder(&[], true);
            for _ in 0..5_000 {
                let piece = t.decode_step(&mut decoder, filler);
                assert!(!piece.contains("the"), "{piece:?}");
                assert!(
                    pending(&decoder) <= super::super::stream_decode::MAX_PENDING_IDS + 2,
                    "{filler}: {}",
                    pending(&decoder)
                );
            }
            // Text after them still comes out.
            let ids = whole.encode_fast(" the tests", false).unwrap().get_ids().to_vec();
            let text: String = ids.iter().map(|&id| t.decode_step(&mut decoder, id)).collect();
            assert!(text.ends_with("the tests"), "{text:?}");
        }
    }

    #[test]
    fn a_directory_finds_its_template_where_transformers_does() {
        let path = trained("hf-layouts");
        let dir = path.parent().unwrap();
        let messages = serde_json::json!([{"role": "user", "content": "hi"}]);
        let rendered = |t: &HfTokenizer| t.render(&messages).unwrap();
        // tokenizer_config.json's template, through the directory.
        assert_eq!(
            rendered(&HfTokenizer::load(dir, None, 16).unwrap()),
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        );
        // Named templates in the config: the default one.
        let named = serde_json::json!({"chat_template": [
            {"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": "NAMED"}]});
        std::fs::write(dir.join("tokenizer_config.json"), named.to_string()).unwrap();
        assert_eq!(rendered(&HfTokenizer::load(&path, None, 16).unwrap()), "NAMED");
        // chat_templates/default.jinja wins over the config.
        std::fs::create_dir_all(dir.join("chat_templates")).unwrap();
        std::fs::write(dir.join("chat_templates/default.jinja"), "DIR").unwrap();
        assert_eq!(rendered(&HfTokenizer::load(dir, None, 16).unwrap()), "DIR");
        // chat_template.jinja (what transformers writes today) wins over both.
        std::fs::write(dir.join("chat_template.jinja"), "FILE {{ messages[0].content }}").unwrap();
        assert_eq!(rendered(&HfTokenizer::load(dir, None, 16).unwrap()), "FILE hi");
        // --chat-template wins over everything.
        let flag = dir.join("flag.jinja");
        std::fs::write(&flag, "FLAG").unwrap();
        assert_eq!(rendered(&HfTokenizer::load(dir, Some(&flag), 16).unwrap()), "FLAG");
    }

    #[test]
    fn a_missing_template_or_file_is_a_clear_error() {
        let path = trained("hf-errors");
        std::fs::write(path.with_file_name("tokenizer_config.json"), "{}").unwrap();
        let err = HfTokenizer::load(&path, None, 16).unwrap_err();
        assert!(err.contains("no chat template"), "{err}");
        let template = path.with_file_name("chat.jinja");
        std::fs::write(&template, CHATML).unwrap();
        assert!(HfTokenizer::load(&path, Some(&template), 16).is_ok());
        let err =
            HfTokenizer::load(std::path::Path::new("/nonexistent/tokenizer.json"), None, 16).unwrap_err();
        assert!(err.contains("cannot load tokenizer"), "{err}");
    }
}
