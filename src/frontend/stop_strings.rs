//! A request's stop strings: how many and how long a client may send, and the search for
//! the one that completes first in a generated text, in time that does not grow with
//! their number.
//!
//! vLLM looks for each stop string in the text every update added, one `str.find` per
//! string per token: 2,000 stop strings of 4,000 characters cost its API server (or the
//! router, in generate mode) seconds per answer. So the router bounds them for every
//! chat and completions request ([`check`]: at most [`MAX_STOP_STRINGS`] strings of at
//! most [`MAX_STOP_BYTES`] bytes in all; more is a 400), and searches them all at once
//! with an Aho-Corasick automaton built once per request ([`StopStrings`]).
//!
//! The match rule is vLLM's: a stop string counts only if it ends in the text the update
//! added (earlier text was searched before); the one that ends first wins, ties going to
//! the first listed.

use aho_corasick::{AhoCorasick, MatchKind};

/// Most stop strings a request may carry (OpenAI allows 4).
pub const MAX_STOP_STRINGS: usize = 256;
/// Most bytes of stop strings a request may carry, all of them together.
pub const MAX_STOP_BYTES: usize = 64 * 1024;

/// Why a request's `stop` is refused.
pub fn check(stop: &[String]) -> Result<(), String> {
    if stop.len() > MAX_STOP_STRINGS {
        return Err(format!("`stop` may hold at most {MAX_STOP_STRINGS} strings; it holds {}", stop.len()));
    }
    let bytes: usize = stop.iter().map(String::len).sum();
    if bytes > MAX_STOP_BYTES {
        return Err(format!("`stop` may hold at most {MAX_STOP_BYTES} bytes of strings; it holds {bytes}"));
    }
    Ok(())
}

/// The stop strings of one request, ready to search.
pub struct StopStrings {
    strings: Vec<String>,
    automaton: Option<AhoCorasick>,
    /// The longest, in bytes.
    longest: usize,
}

impl StopStrings {
    /// The automaton for `strings` (checked by [`check`] at ingress, so its size is
    /// bounded).
    pub fn new(strings: Vec<String>) -> Self {
        let automaton = if strings.is_empty() {
            None
        } else {
            AhoCorasick::builder().match_kind(MatchKind::Standard).build(&strings).ok()
        };
        let longest = strings.iter().map(String::len).max().unwrap_or(0);
        StopStrings { strings, automaton, longest }
    }

    pub fn is_empty(&self) -> bool {
        self.strings.is_empty()
    }

    /// The longest stop string in bytes: how much of the old text a search needs.
    pub fn longest(&self) -> usize {
        self.longest
    }

    /// The longest in characters (what a stream holds back, as vLLM counts).
    pub fn longest_chars(&self) -> usize {
        self.strings.iter().map(|s| s.chars().count()).max().unwrap_or(0)
    }

    /// The stop string completing earliest among those that end in the last `new_bytes`
    /// bytes of `text` (ties: the first listed), and where it starts.
    pub fn find(&self, text: &str, new_bytes: usize) -> Option<(&str, usize)> {
        let automaton = self.automaton.as_ref()?;
        if new_bytes == 0 {
            return None;
        }
        let old = text.len() - new_bytes.min(text.len());
        let from = floor_boundary(text, old.saturating_sub(self.longest.saturating_sub(1)));
        let mut best: Option<(usize, usize, usize)> = None; // (end, pattern, start)
        for found in automaton.find_overlapping_iter(&text[from..]) {
            let (start, end) = (from + found.start(), from + found.end());
            if end <= old {
                continue; // ends in text searched before
            }
            match best {
                // Matches come in order of their end: past the first end, none is better.
                Some((best_end, _, _)) if end > best_end => break,
                Some((_, pattern, _)) if found.pattern().as_usize() >= pattern => {}
                _ => best = Some((end, found.pattern().as_usize(), start)),
            }
        }
        best.map(|(_, pattern, start)| (self.strings[pattern].as_str(), start))
    }
}

/// The largest char boundary at or below `i`.
pub fn floor_boundary(text: &str, mut i: usize) -> usize {
    i = i.min(text.len());
    while !text.is_char_boundary(i) {
        i -= 1;
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn stops(list: &[&str]) -> StopStrings {
        StopStrings::new(list.iter().map(|s| s.to_string()).collect())
    }

    #[test]
    fn the_earliest_end_wins_and_ties_go_to_the_first_listed() {
        let s = stops(&["gamma", "beta", "ta"]);
        // "beta" and "ta" end together, before "gamma": "beta" is listed first.
        assert_eq!(s.find("alpha beta gamma", 16), Some(("beta", 6)));
        let s = stops(&["ta", "beta"]);
        assert_eq!(s.find("alpha beta gamma", 16), Some(("ta", 8)));
        // Only matches that end in the new text count.
        let s = stops(&["alpha", "gam"]);
        assert_eq!(s.find("alpha beta gamma", 6), Some(("gam", 11)));
        assert_eq!(s.find("alpha beta gamma", 0), None);
        // A stop string straddling the old and new text is found.
        let s = stops(&["a g"]);
        assert_eq!(s.find("alpha beta gamma", 5), Some(("a g", 9)));
        assert!(stops(&[]).find("anything", 8).is_none());
    }

    #[test]
    fn bounds_refuse_what_would_cost_seconds() {
        assert!(check(&vec!["x".to_owned(); MAX_STOP_STRINGS]).is_ok());
        assert!(check(&vec!["x".to_owned(); MAX_STOP_STRINGS + 1]).unwrap_err().contains("at most 256"));
        assert!(check(&["y".repeat(MAX_STOP_BYTES)]).is_ok());
        assert!(check(&["y".repeat(MAX_STOP_BYTES), "z".into()]).unwrap_err().contains("bytes"));
    }

    proptest! {
        /// The automaton finds what searching each string (vLLM's way) finds.
        #[test]
        fn the_same_as_searching_each_string(
            text in "[abé🦀 ]{0,40}",
            cut in 0usize..200,
            list in prop::collection::vec("[abé🦀 ]{1,4}", 1..6),
        ) {
            let old = floor_boundary(&text, cut);
            let new_bytes = text.len() - old;
            let s = StopStrings::new(list.clone());
            // The reference: each string's first occurrence that ends in the new text;
            // the earliest end, ties to the first listed.
            let mut expected: Option<(usize, usize, usize)> = None;
            for (i, stop) in list.iter().enumerate() {
                let first = text.match_indices(stop.as_str()).map(|(at, _)| at).find(|at| at + stop.len() > old);
                // Overlapping occurrences too: match_indices skips them.
                let first = (0..text.len())
                    .filter(|&at| text.is_char_boundary(at) && text[at..].starts_with(stop.as_str()))
                    .find(|at| at + stop.len() > old)
                    .or(first);
                if let Some(start) = first {
                    let end = start + stop.len();
                    if expected.is_none_or(|(e, _, _)| end < e) {
                        expected = Some((end, i, start));
                    }
                }
            }
            let expected = expected.map(|(_, i, start)| (list[i].as_str(), start));
            prop_assert_eq!(s.find(&text, new_bytes), expected);
        }
    }
}
