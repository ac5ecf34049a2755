//! The text of a generated answer, built from the engine's token ids as vLLM's API
//! server builds it (`vllm/v1/engine/detokenizer.py`), so a client reads the same text
//! through the router as from vLLM's own endpoint:
//! - each token is decoded incrementally ([`PromptTokenizer::decode_step`]);
//! - a token that ended generation as a stop token (EOS or one of `stop_token_ids`) is
//!   counted but not decoded, unless `include_stop_str_in_output`;
//! - stop strings are looked for in the text each update added (once more than
//!   `min_tokens` tokens are out); the one that completes earliest wins
//!   ([`StopStrings`]), the text is cut before it (after it with
//!   `include_stop_str_in_output`), tokens after the one that completed it are dropped,
//!   and generation is over: finish reason `stop`, stop reason the string;
//! - while stop strings may still match, a stream holds back the last
//!   `longest stop string - 1` characters (characters, as vLLM counts them).
//!
//! The router does not trust the engine to stop: it counts the tokens itself and ends
//! generation at the request's `max_tokens` (finish reason `length`), whatever the
//! engine streams. A stream keeps only the text not yet sent and the tail a stop string
//! could still end in; a whole answer (not streamed) keeps its text, at most
//! [`MAX_ANSWER_BYTES`].

use serde_json::Value;

use super::stop_strings::{StopStrings, floor_boundary};
use crate::policy::prompt_tokens::{PromptTokenizer, TokenDecoder};

/// Most text a whole (non-streamed) answer keeps: generation ends there (`length`).
pub const MAX_ANSWER_BYTES: usize = 32 << 20;

/// How generation ended.
#[derive(Debug, Clone, PartialEq)]
pub struct Finish {
    /// `stop`, `length`, `abort`, ...
    pub reason: String,
    /// The stop string or stop token id that ended it (`null` otherwise).
    pub stop_reason: Value,
}

impl Finish {
    /// Ended by a stop token (EOS or a stop token id): finish reason `stop`, stop reason
    /// not a string.
    fn by_stop_token(&self) -> bool {
        self.reason == "stop" && !self.stop_reason.is_string()
    }

    fn length() -> Finish {
        Finish { reason: "length".into(), stop_reason: Value::Null }
    }
}

/// What bounds an answer's text.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Tokens generated at most (the request's `max_tokens`, or what the context leaves).
    pub max_tokens: usize,
    /// The whole text is kept (a non-streamed answer); else only what a stream needs.
    pub keep_all: bool,
}

pub struct OutputText {
    decoder: TokenDecoder,
    /// The text not yet dropped: all of it for a whole answer; for a stream, from what
    /// was sent, the tail a stop string may still end in.
    text: String,
    /// Bytes dropped from the front of `text` (streams).
    dropped: usize,
    /// Output tokens so far (the ones dropped after a stop string excluded).
    tokens: usize,
    stop: StopStrings,
    include_stop: bool,
    min_tokens: usize,
    limits: Limits,
    /// Characters a stream holds back.
    hold: usize,
    /// Bytes of `text` already handed out.
    sent: usize,
    finish: Option<Finish>,
    /// The finish is the router's (a stop string, or the token limit): the engine's
    /// stream is to be dropped, which aborts its request.
    by_router: bool,
}

/// The byte index `chars` characters before the end of `text` (0 if it has fewer).
fn chars_back(text: &str, chars: usize) -> usize {
    if chars == 0 {
        return text.len();
    }
    text.char_indices().rev().nth(chars - 1).map_or(0, |(i, _)| i)
}

impl OutputText {
    pub fn new(
        decoder: TokenDecoder,
        stop: Vec<String>,
        include_stop: bool,
        min_tokens: usize,
        limits: Limits,
    ) -> Self {
        let stop = StopStrings::new(stop);
        let hold = if include_stop { 0 } else { stop.longest_chars().saturating_sub(1) };
        OutputText {
            decoder,
            text: String::new(),
            dropped: 0,
            tokens: 0,
            stop,
            include_stop,
            min_tokens,
            limits,
            hold,
            sent: 0,
            finish: None,
            by_router: false,
        }
    }

    pub fn tokens(&self) -> usize {
        self.tokens
    }

    pub fn finish(&self) -> Option<&Finish> {
        self.finish.as_ref()
    }

    /// Generation was ended by the router, not the engine.
    pub fn ended_by_router(&self) -> bool {
        self.by_router
    }

    /// Add the ids of one engine event, with the engine's finish if it sent one. Returns
    /// the finish when generation is over (the engine's, a stop string's, or the token
    /// limit's); ids after that are ignored.
    pub fn update(
        &mut self,
        tokenizer: &PromptTokenizer,
        ids: &[u32],
        engine: Option<Finish>,
    ) -> Option<&Finish> {
        if self.finish.is_some() {
            return self.finish.as_ref();
        }
        // Never more than the request's tokens, whatever the engine sends.
        let room = self.limits.max_tokens.saturating_sub(self.tokens);
        let (ids, engine) = if ids.len() >= room && engine.is_none() || ids.len() > room {
            self.by_router = true;
            (&ids[..room], Some(Finish::length()))
        } else {
            (ids, engine)
        };
        let skip_last = engine.as_ref().is_some_and(Finish::by_stop_token) && !self.include_stop;
        let decoded = if skip_last { &ids[..ids.len().saturating_sub(1)] } else { ids };
        let previous_tokens = self.tokens;
        let mut offsets = Vec::with_capacity(ids.len() + 1);
        offsets.push(self.text.len());
        for &id in decoded {
            let piece = tokenizer.decode_step(&mut self.decoder, id);
            self.text.push_str(&piece);
            offsets.push(self.text.len());
        }
        if decoded.len() < ids.len() {
            offsets.push(self.text.len());
        }
        self.tokens += ids.len();
        if !self.stop.is_empty() && self.tokens > self.min_tokens {
            let check_from = offsets[self.min_tokens.saturating_sub(previous_tokens).min(offsets.len() - 1)];
            if let Some((stop, at)) = self.stop.find(&self.text, self.text.len() - check_from) {
                let (stop, end) = (stop.to_owned(), at + stop.len());
                // Tokens after the one that completed the stop string are dropped.
                let kept = offsets[1..].iter().position(|&o| o >= end).map_or(ids.len(), |i| i + 1);
                self.tokens = previous_tokens + kept;
                self.text.truncate(if self.include_stop { end } else { at });
                self.finish = Some(Finish { reason: "stop".into(), stop_reason: Value::String(stop) });
                self.by_router = true;
                return self.finish.as_ref();
            }
        }
        if self.limits.keep_all && self.text.len() > MAX_ANSWER_BYTES && engine.is_none() {
            self.text.truncate(floor_boundary(&self.text, MAX_ANSWER_BYTES));
            self.by_router = true;
            self.finish = Some(Finish::length());
            return self.finish.as_ref();
        }
        self.finish = engine;
        self.finish.as_ref()
    }

    /// The text not handed out yet that may be sent now: all of it once generation is
    /// over, else all but the held-back tail. A stream then forgets what it no longer
    /// needs.
    pub fn take_new(&mut self) -> &str {
        let end = if self.finish.is_some() { self.text.len() } else { chars_back(&self.text, self.hold) };
        if end <= self.sent {
            return "";
        }
        let start = self.sent;
        self.sent = end;
        if !self.limits.keep_all {
            // Keep what a stop string could still end in (its length less one byte).
            let keep_from = self.sent.min(self.text.len().saturating_sub(self.stop.longest()));
            let cut = floor_boundary(&self.text, keep_from.min(start));
            if cut > 0 {
                self.text.drain(..cut);
                self.dropped += cut;
                self.sent -= cut;
                return &self.text[start - cut..self.sent];
            }
        }
        &self.text[start..end]
    }

    /// The whole text (for a non-streamed answer).
    pub fn text(&self) -> &str {
        debug_assert!(self.dropped == 0, "a stream's text is not kept whole");
        &self.text
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use llm_common::tokenizer::encode;
    use proptest::prelude::*;

    fn tokenizer() -> PromptTokenizer {
        PromptTokenizer::Builtin(crate::policy::prompt_tokens::BuiltinTokenizer::new(1 << 10))
    }

    fn output(t: &PromptTokenizer, stop: &[&str], include: bool, min_tokens: usize) -> OutputText {
        let limits = Limits { max_tokens: usize::MAX, keep_all: false };
        OutputText::new(
            t.decoder(&[], true),
            stop.iter().map(|s| s.to_string()).collect(),
            include,
            min_tokens,
            limits,
        )
    }

    fn length() -> Finish {
        Finish { reason: "length".into(), stop_reason: Value::Null }
    }

    /// Feed `ids` one per event, the last with `last`; what a stream reads, and the finish.
    fn run(t: &PromptTokenizer, out: &mut OutputText, ids: &[u32], last: Finish) -> (String, Option<Finish>) {
        let mut read = String::new();
        for (i, &id) in ids.iter().enumerate() {
            let engine = (i + 1 == ids.len()).then(|| last.clone());
            let done = out.update(t, &[id], engine).is_some();
            read.push_str(out.take_new());
            if done {
                break;
            }
        }
        (read, out.finish().cloned())
    }

    #[test]
    fn a_stop_string_cuts_the_text_and_ends_generation() {
        let t = tokenizer();
        let ids = encode("The cat sat on the mat. Then it slept.");
        let mut out = output(&t, &["on the", "slept"], false, 0);
        let (read, finish) = run(&t, &mut out, &ids, length());
        assert_eq!(read, "The cat sat ");
        assert_eq!(finish.unwrap().stop_reason, "on the");
        // The token completing " the" is the last counted.
        let upto = encode("The cat sat on the").len();
        assert_eq!(out.tokens(), upto);
        // Included when asked.
        let mut out = output(&t, &["on the"], true, 0);
        assert_eq!(run(&t, &mut out, &ids, length()).0, "The cat sat on the");
    }

    #[test]
    fn the_stop_string_completing_first_wins_and_min_tokens_delays_the_check() {
        let t = tokenizer();
        let ids = encode("alpha beta gamma delta");
        // Both in one update: "beta" completes before "gamma".
        let mut out = output(&t, &["gamma", "beta"], false, 0);
        out.update(&t, &ids, None);
        assert_eq!(out.finish().unwrap().stop_reason, "beta");
        assert_eq!(out.take_new(), "alpha ");
        // min_tokens: "alpha" is within the first 2 tokens, so it does not stop.
        let mut out = output(&t, &["alpha", "delta"], false, 2);
        let (read, finish) = run(&t, &mut out, &ids, length());
        assert_eq!(read, "alpha beta gamma ");
        assert_eq!(finish.unwrap().stop_reason, "delta");
    }

    #[test]
    fn a_stop_token_is_counted_but_not_shown() {
        let t = tokenizer();
        let mut ids = encode("hello world");
        ids.push(199_999);
        let eos = Finish { reason: "stop".into(), stop_reason: Value::Null };
        let mut out = output(&t, &[], false, 0);
        let (read, finish) = run(&t, &mut out, &ids, eos.clone());
        assert_eq!((read.as_str(), finish), ("hello world", Some(eos)));
        assert_eq!(out.tokens(), ids.len());
        // A stop token id: the same; the engine's stop reason carried.
        let by_id = Finish { reason: "stop".into(), stop_reason: Value::from(ids[1]) };
        let mut out = output(&t, &[], false, 0);
        let (read, _) = run(&t, &mut out, &ids[..2], by_id);
        assert_eq!(read, "hello");
    }

    #[test]
    fn streams_hold_back_what_may_become_a_stop_string() {
        let t = tokenizer();
        let ids = encode("one two three four");
        let mut out = output(&t, &["XYZW"], false, 0);
        out.update(&t, &ids[..2], None);
        assert_eq!(out.take_new(), "one ", "3 characters held back");
        out.update(&t, &ids[2..], Some(length()));
        assert_eq!(out.take_new(), "two three four", "all of it at the end");
        assert_eq!(out.take_new(), "");
    }

    #[test]
    fn the_router_ends_generation_at_max_tokens_whatever_the_engine_sends() {
        let t = tokenizer();
        let limits = Limits { max_tokens: 4, keep_all: true };
        let mut out = OutputText::new(t.decoder(&[], true), vec![], false, 0, limits);
        let ids = encode("one two three four five six seven");
        // Three tokens, then an event of many: only one more is taken.
        assert!(out.update(&t, &ids[..3], None).is_none());
        let finish = out.update(&t, &ids[3..], None).cloned().unwrap();
        assert_eq!(finish.reason, "length");
        assert!(out.ended_by_router(), "the engine's stream is to be dropped");
        assert_eq!(out.tokens(), 4);
        assert_eq!(out.text(), llm_common::tokenizer::decode(&ids[..4]).unwrap());
        // The engine saying `length` itself on the last allowed token is the engine's end.
        let mut out = OutputText::new(t.decoder(&[], true), vec![], false, 0, limits);
        out.update(&t, &ids[..3], None);
        assert_eq!(out.update(&t, &ids[3..4], Some(length())).unwrap().reason, "length");
        assert!(!out.ended_by_router());
    }

    #[test]
    fn a_stream_keeps_only_what_a_stop_string_could_still_end_in() {
        let t = tokenizer();
        let limits = Limits { max_tokens: usize::MAX, keep_all: false };
        let mut out = OutputText::new(t.decoder(&[], true), vec!["never there".into()], false, 0, limits);
        let ids = encode(&"a long answer that goes on ".repeat(2_000));
        let mut read = String::new();
        for &id in &ids {
            out.update(&t, &[id], None);
            read.push_str(out.take_new());
            assert!(out.text.len() <= 64, "kept {} bytes", out.text.len());
        }
        out.update(&t, &[], Some(length()));
        read.push_str(out.take_new());
        assert_eq!(read, "a long answer that goes on ".repeat(2_000));
    }

    proptest! {
        /// However the tokens are grouped into events, the text read and the finish are
        /// those of a whole-text search: the text before the first place a stop string
        /// completes.
        #[test]
        fn grouping_never_changes_the_answer(
            words in prop::collection::vec(prop::sample::select(vec!["a", "ab", "b", "é", "🦀", " ", "ba", "\n"]), 1..40),
            cuts in prop::collection::vec(1usize..5, 1..40),
            stop in prop::sample::select(vec!["ab", "🦀 ", "é\n", "bab", "zz"]),
        ) {
            let t = tokenizer();
            let whole: String = words.concat();
            let ids = encode(&whole);
            let mut out = output(&t, &[stop], false, 0);
            let mut read = String::new();
            let mut i = 0;
            let mut cut = cuts.iter().cycle();
            while i < ids.len() {
                let n = (*cut.next().unwrap()).min(ids.len() - i);
                let last = i + n == ids.len();
                let done = out.update(&t, &ids[i..i + n], last.then(length)).is_some();
                read.push_str(out.take_new());
                i += n;
                if done { break; }
            }
            // The reference: decode token by token, stop at the first token after which
            // the text contains the stop string.
            let mut text = String::new();
            let mut d = t.decoder(&[], true);
            let mut expected = None;
            for &id in &ids {
                text.push_str(&t.decode_step(&mut d, id));
                if let Some(at) = text.find(stop) {
                    expected = Some(text[..at].to_owned());
                    break;
                }
            }
            match expected {
                Some(before) => {
                    prop_assert_eq!(&read, &before);
                    prop_assert_eq!(out.finish().unwrap().stop_reason.as_str(), Some(stop));
                }
                None => {
                    prop_assert_eq!(&read, &text);
                    prop_assert_eq!(out.finish().unwrap().reason.as_str(), "length");
                }
            }
        }
    }
}
