//! The pieces incremental tokenisation works with: the elements of a JSON array found
//! without parsing them, and a bounded cache of segments' token ids.

use std::collections::HashMap;
use std::hash::BuildHasherDefault;
use std::sync::{Arc, Mutex};

use crate::policy::cache_index::Prehashed;

/// The byte ranges of the elements of the JSON array `raw` (already validated JSON, as
/// the ingress parsed the body), or `None` if `raw` is not an array. One pass over the
/// bytes: string contents are skipped quote to quote, nesting is counted.
pub fn split_json_array(raw: &[u8]) -> Option<Vec<std::ops::Range<usize>>> {
    let start = raw.iter().position(|b| !b.is_ascii_whitespace())?;
    if raw[start] != b'[' {
        return None;
    }
    let mut elements = Vec::new();
    let mut depth = 0usize;
    let mut element_start: Option<usize> = None;
    let mut i = start;
    while i < raw.len() {
        match raw[i] {
            b'"' => {
                element_start.get_or_insert(i);
                i += 1;
                while i < raw.len() {
                    match raw[i] {
                        b'\\' => i += 2,
                        b'"' => break,
                        _ => i += 1,
                    }
                }
            }
            b'[' | b'{' => {
                depth += 1;
                if depth > 1 {
                    element_start.get_or_insert(i);
                }
            }
            b']' | b'}' => {
                depth = depth.checked_sub(1)?;
                if depth == 0 {
                    if let Some(s) = element_start.take() {
                        elements.push(s..trim_end(raw, i));
                    }
                    return Some(elements);
                }
            }
            b',' if depth == 1 => {
                if let Some(s) = element_start.take() {
                    elements.push(s..trim_end(raw, i));
                }
            }
            b if b.is_ascii_whitespace() => {}
            _ => {
                element_start.get_or_insert(i);
            }
        }
        i += 1;
    }
    None
}

fn trim_end(raw: &[u8], mut end: usize) -> usize {
    while end > 0 && raw[end - 1].is_ascii_whitespace() {
        end -= 1;
    }
    end
}

struct Entry {
    ids: Arc<[u32]>,
    used: u64,
}

struct Inner {
    map: HashMap<u64, Entry, BuildHasherDefault<Prehashed>>,
    tokens: usize,
    clock: u64,
}

/// Token ids of segments by the hash of their source, bounded by the total tokens held
/// (the least recently used half goes when full).
pub struct SegmentCache {
    max_tokens: usize,
    inner: Mutex<Inner>,
}

impl SegmentCache {
    pub fn new(max_tokens: usize) -> Self {
        SegmentCache {
            max_tokens: max_tokens.max(1),
            inner: Mutex::new(Inner { map: HashMap::default(), tokens: 0, clock: 0 }),
        }
    }

    pub fn get(&self, key: u64) -> Option<Arc<[u32]>> {
        let mut inner = self.inner.lock().expect("segment cache lock");
        inner.clock += 1;
        let now = inner.clock;
        inner.map.get_mut(&key).map(|e| {
            e.used = now;
            e.ids.clone()
        })
    }

    pub fn insert(&self, key: u64, ids: Arc<[u32]>) {
        let mut inner = self.inner.lock().expect("segment cache lock");
        inner.clock += 1;
        let used = inner.clock;
        inner.tokens += ids.len();
        if let Some(old) = inner.map.insert(key, Entry { ids, used }) {
            inner.tokens -= old.ids.len();
        }
        if inner.tokens > self.max_tokens {
            let mut ages: Vec<u64> = inner.map.values().map(|e| e.used).collect();
            let half = ages.len() / 2;
            let (_, cut, _) = ages.select_nth_unstable(half);
            let cut = *cut;
            inner.map.retain(|_, e| e.used > cut);
            inner.tokens = inner.map.values().map(|e| e.ids.len()).sum();
        }
    }

    /// Tokens held.
    pub fn tokens(&self) -> usize {
        self.inner.lock().expect("segment cache lock").tokens
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(raw: &str) -> Option<Vec<&str>> {
        split_json_array(raw.as_bytes()).map(|r| r.into_iter().map(|r| &raw[r]).collect())
    }

    #[test]
    fn splits_elements_without_parsing() {
        assert_eq!(
            parts(r#" [ {"a": "x,]}\"y"}, [1, [2]] ,"s" , 3 ] "#).unwrap(),
            vec![r#"{"a": "x,]}\"y"}"#, "[1, [2]]", r#""s""#, "3"]
        );
        assert_eq!(parts("[]").unwrap(), Vec::<&str>::new());
        assert_eq!(parts(r#""text""#), None);
        assert_eq!(parts("[1, 2"), None);
    }

    #[test]
    fn the_cache_is_bounded_by_tokens() {
        let cache = SegmentCache::new(100);
        for key in 0..20u64 {
            cache.insert(key, vec![0u32; 10].into());
            cache.get(0); // keep 0 hot
        }
        assert!(cache.tokens() <= 100, "{}", cache.tokens());
        assert!(cache.get(0).is_some(), "the recently used entry stays");
        assert!(cache.get(1).is_none(), "old ones go");
    }
}
