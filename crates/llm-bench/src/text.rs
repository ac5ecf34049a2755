//! Prompt text with an exact o200k token count, drawn from a seeded random generator.
//!
//! Text is a run of single-token English words (see
//! [`llm_common::tokenizer::single_token_words`]), each one token with its leading space,
//! so `n` words are exactly `n` tokens for any o200k tokenizer, and a prompt of a given
//! length costs no tokenizer call to build. Random words also keep unrelated prompts from
//! sharing a prefix, so a random workload gets no prefix-cache hits it did not ask for.
//! A trace's hash ids name blocks: [`hash_block`] gives the same text for the same id.

use xxhash_rust::xxh3::xxh3_64_with_seed;

use llm_common::tokenizer::{WordToken, single_token_words};

/// `tokens` random words: exactly `tokens` o200k tokens.
pub fn random_words(rng: &mut fastrand::Rng, tokens: usize) -> String {
    let words = single_token_words();
    let mut text = String::with_capacity(tokens * 7);
    for _ in 0..tokens {
        text.push_str(&words[rng.usize(..words.len())].text);
    }
    text
}

/// Seed of the text behind trace hash ids; changing it changes every trace's text.
const BLOCK_SEED: u64 = 0x6a09_e667_f3bc_c908;

/// Append the first `tokens` tokens of the block named `hash_id`: the same id always
/// gives the same words, whichever session or turn uses it.
pub fn hash_block(hash_id: u64, tokens: usize, out: &mut String) {
    out.reserve(tokens * 7);
    block_words(hash_id, tokens, |w| out.push_str(&w.text));
}

/// The token ids of [`hash_block`]'s text, without tokenising it.
pub fn hash_block_ids(hash_id: u64, tokens: usize, out: &mut Vec<u32>) {
    out.reserve(tokens);
    block_words(hash_id, tokens, |w| out.push(w.id));
}

fn block_words(hash_id: u64, tokens: usize, mut each: impl FnMut(&WordToken)) {
    let words = single_token_words();
    let mut rng = fastrand::Rng::with_seed(xxh3_64_with_seed(&hash_id.to_le_bytes(), BLOCK_SEED));
    for _ in 0..tokens {
        each(&words[rng.usize(..words.len())]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use llm_common::tokenizer::encode;

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

    #[test]
    fn hash_blocks_are_the_same_text_for_the_same_id() {
        let block = |id, n| {
            let mut s = String::new();
            hash_block(id, n, &mut s);
            s
        };
        assert_eq!(block(7, 64), block(7, 64));
        assert_ne!(block(7, 64), block(8, 64));
        assert!(block(7, 64).starts_with(&block(7, 10)), "a cut block is a prefix of the whole");
        let two = block(7, 64) + &block(8, 30);
        let mut ids = Vec::new();
        hash_block_ids(7, 64, &mut ids);
        hash_block_ids(8, 30, &mut ids);
        assert_eq!(encode(&two), ids, "blocks concatenate without merging tokens, to these ids");
    }
}
