//! Prompt text with an exact o200k token count, drawn from a seeded random generator.
//!
//! Text is a run of single-token English words (see
//! [`crate::sim::tokenizer::single_token_words`]), each one token with its leading space,
//! so `n` words are exactly `n` tokens for any o200k tokenizer, and a prompt of a given
//! length costs no tokenizer call to build. Random words also keep unrelated prompts from
//! sharing a prefix, so a random workload gets no prefix-cache hits it did not ask for.

use crate::sim::tokenizer::single_token_words;

/// `tokens` random words: exactly `tokens` o200k tokens.
pub fn random_words(rng: &mut fastrand::Rng, tokens: usize) -> String {
    let words = single_token_words();
    let mut text = String::with_capacity(tokens * 7);
    for _ in 0..tokens {
        text.push_str(&words[rng.usize(..words.len())].text);
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::tokenizer::encode;

    #[test]
    fn word_count_is_token_count() {
        let mut rng = fastrand::Rng::with_seed(42);
        for n in [1, 2, 50, 8000] {
            assert_eq!(encode(&random_words(&mut rng, n)).len(), n);
        }
        let a = random_words(&mut fastrand::Rng::with_seed(7), 64);
        assert_eq!(a, random_words(&mut fastrand::Rng::with_seed(7), 64), "seeded");
        assert_ne!(a, random_words(&mut fastrand::Rng::with_seed(8), 64));
    }
}
