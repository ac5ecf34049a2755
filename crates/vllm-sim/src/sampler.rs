//! Deterministic "generation": which token comes next, and when the model would stop.
//!
//! The same request (prompt token ids and `seed`) always yields the same tokens, so a
//! P/D run can be compared token for token with a collocated one and tests can pin
//! exact output. Tokens are drawn from single-token English words, so the text decodes
//! to readable, valid UTF-8 and re-tokenises to the same ids (which keeps multi-turn
//! prefix caching honest). The natural length, where an EOS would come, is drawn from
//! the same stream unless `ignore_eos` is set.

use std::sync::OnceLock;

use xxhash_rust::xxh3::xxh3_64_with_seed;

use llm_common::tokenizer;

fn vocabulary() -> &'static [u32] {
    static VOCAB: OnceLock<Vec<u32>> = OnceLock::new();
    VOCAB.get_or_init(|| tokenizer::single_token_words().iter().map(|w| w.id).collect())
}

pub struct Sampler {
    rng: fastrand::Rng,
    natural_len: usize,
}

impl Sampler {
    pub fn new(prompt: &[u32], seed: Option<u64>) -> Self {
        let bytes: Vec<u8> = prompt.iter().flat_map(|id| id.to_le_bytes()).collect();
        let mut rng = fastrand::Rng::with_seed(xxh3_64_with_seed(&bytes, seed.unwrap_or(0)));
        let natural_len = 16 + rng.usize(..240);
        Sampler { rng, natural_len }
    }

    /// Tokens after which the model would emit EOS.
    pub fn natural_len(&self) -> usize {
        self.natural_len
    }

    pub fn next_token(&mut self) -> u32 {
        let vocab = vocabulary();
        vocab[self.rng.usize(..vocab.len())]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_per_prompt_and_seed() {
        let take = |prompt: &[u32], seed| {
            let mut s = Sampler::new(prompt, seed);
            (0..20).map(|_| s.next_token()).collect::<Vec<_>>()
        };
        assert_eq!(take(&[1, 2, 3], None), take(&[1, 2, 3], None));
        assert_ne!(take(&[1, 2, 3], None), take(&[1, 2, 4], None));
        assert_ne!(take(&[1, 2, 3], Some(7)), take(&[1, 2, 3], None));
    }

    #[test]
    fn output_is_words_that_retokenise_identically() {
        let mut s = Sampler::new(&[42], None);
        let ids: Vec<u32> = (0..200).map(|_| s.next_token()).collect();
        let text = tokenizer::decode(&ids).unwrap();
        assert!(text.is_ascii());
        assert_eq!(tokenizer::encode(&text), ids);
        assert!(vocabulary().len() > 150, "{}", vocabulary().len());
    }
}
