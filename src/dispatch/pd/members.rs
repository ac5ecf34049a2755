//! A JSON object's top-level members, each value kept as the raw bytes it arrived as,
//! and the same object written back with a few members replaced, added or dropped.
//!
//! The P/D rewrites change a handful of top-level fields (`stream`, `max_tokens`,
//! `kv_transfer_params`, `prompt`) of bodies that can be tens of megabytes, almost all
//! of it `messages` or `prompt`. Parsing such a body into a `serde_json::Value` tree
//! and cloning it per stage cost 75 times the body in memory (a 32 MB prompt of small
//! numbers took 2.4 GB). Here the body is walked once, each member's value is a slice
//! of it, and a rewrite copies the slices it keeps: a rewritten body costs its own
//! size. The number of members is bounded (no request has hundreds of top-level
//! fields), so the list of slices stays small whatever the body holds.

use std::borrow::Cow;

use serde::Deserialize;
use serde::de::{MapAccess, Visitor};
use serde_json::value::RawValue;

/// More top-level members than any OpenAI request has.
pub const MAX_MEMBERS: usize = 1024;

/// The top-level members of a JSON object, in order (duplicates kept, as sent).
#[derive(Debug)]
pub struct Members<'a> {
    list: Vec<(Cow<'a, str>, &'a RawValue)>,
}

#[derive(Debug, thiserror::Error)]
pub enum MembersError {
    #[error("not a JSON object: {0}")]
    Json(#[from] serde_json::Error),
}

impl<'a> Members<'a> {
    pub fn parse(json: &'a [u8]) -> Result<Self, MembersError> {
        Ok(serde_json::from_slice(json)?)
    }

    /// A member's raw value; the last one when the key repeats (as Python's `json`,
    /// and so vLLM, reads it).
    pub fn get(&self, key: &str) -> Option<&'a RawValue> {
        self.list.iter().rev().find(|(k, _)| k == key).map(|(_, v)| *v)
    }

    /// The keys, in order (a repeated key as often as it appears).
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.list.iter().map(|(k, _)| k.as_ref())
    }

    /// Present with a value other than `null` and `false`.
    pub fn is_set(&self, key: &str) -> bool {
        self.get(key).is_some_and(|v| !matches!(v.get(), "null" | "false"))
    }

    /// The object again: members `keep` refuses are dropped; each `(key, raw JSON)` of
    /// `set` replaces every member of that key (written once, where the first stood)
    /// or, if there is none, is added at the end.
    pub fn rewrite(&self, keep: impl Fn(&str) -> bool, set: &[(&str, &[u8])]) -> Vec<u8> {
        let size: usize = self.list.iter().map(|(k, v)| k.len() + v.get().len() + 4).sum::<usize>()
            + set.iter().map(|(k, v)| k.len() + v.len() + 4).sum::<usize>();
        let mut out = Vec::with_capacity(size + 2);
        let mut written = vec![false; set.len()];
        out.push(b'{');
        let member = |out: &mut Vec<u8>, key: &str, value: &[u8]| {
            if out.len() > 1 {
                out.push(b',');
            }
            serde_json::to_writer(&mut *out, key).expect("writing to a Vec cannot fail");
            out.push(b':');
            out.extend_from_slice(value);
        };
        for (key, value) in &self.list {
            match set.iter().position(|(k, _)| k == key) {
                Some(i) if !written[i] => {
                    member(&mut out, key, set[i].1);
                    written[i] = true;
                }
                Some(_) => {}
                None if keep(key) => member(&mut out, key, value.get().as_bytes()),
                None => {}
            }
        }
        for (i, (key, value)) in set.iter().enumerate() {
            if !written[i] {
                member(&mut out, key, value);
            }
        }
        out.push(b'}');
        out
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Members<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ObjectVisitor;
        impl<'de> Visitor<'de> for ObjectVisitor {
            type Value = Members<'de>;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut list = Vec::new();
                while let Some(Key(key)) = map.next_key()? {
                    if list.len() == MAX_MEMBERS {
                        return Err(serde::de::Error::custom(format!(
                            "more than {MAX_MEMBERS} top-level fields"
                        )));
                    }
                    list.push((key, map.next_value()?));
                }
                Ok(Members { list })
            }
        }
        deserializer.deserialize_map(ObjectVisitor)
    }
}

/// `bytes` if they hold a JSON object (a derived struct would also take an array).
pub(crate) fn object(bytes: &[u8]) -> Option<&[u8]> {
    (bytes.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{')).then_some(bytes)
}

/// A key, borrowed from the body unless it had escapes to undo.
struct Key<'a>(Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for Key<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string")
            }

            fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Self::Value, E> {
                Ok(Key(Cow::Borrowed(s)))
            }

            fn visit_str<E>(self, s: &str) -> Result<Self::Value, E> {
                Ok(Key(Cow::Owned(s.to_owned())))
            }
        }
        deserializer.deserialize_str(KeyVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    #[test]
    fn rewrites_keep_everything_else_byte_for_byte() {
        let body =
            br#"{"model":"m", "messages":[{"role":"user","content":"caf\u00e9 \"x\""}],"stream":true,"n":1}"#;
        let m = Members::parse(body).unwrap();
        assert_eq!(m.get("stream").unwrap().get(), "true");
        let out = m.rewrite(|k| k != "n", &[("stream", b"false"), ("max_tokens", b"1")]);
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains(r#""messages":[{"role":"user","content":"caf\u00e9 \"x\""}]"#), "{text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            v,
            json!({"model": "m", "messages": [{"role": "user", "content": "café \"x\""}],
            "stream": false, "max_tokens": 1})
        );
    }

    #[test]
    fn duplicates_escapes_and_bounds() {
        let m = Members::parse(br#"{"a":1,"a":2,"b\u0061":3}"#).unwrap();
        assert_eq!(m.get("a").unwrap().get(), "2", "the last one wins");
        assert_eq!(m.get("ba").unwrap().get(), "3", "escaped keys are read");
        assert!(m.is_set("a") && !Members::parse(br#"{"x":false}"#).unwrap().is_set("x"));
        let once = m.rewrite(|_| true, &[("a", b"9")]);
        assert_eq!(serde_json::from_slice::<Value>(&once).unwrap(), json!({"a": 9, "ba": 3}));
        assert_eq!(&once[..7], br#"{"a":9,"#, "written once, where the first stood");
        assert!(Members::parse(b"[1]").is_err());
        assert!(Members::parse(b"{\"a\":").is_err());
        let many: String = (0..=MAX_MEMBERS).map(|i| format!("\"k{i}\":0")).collect::<Vec<_>>().join(",");
        assert!(Members::parse(format!("{{{many}}}").as_bytes()).is_err());
        assert_eq!(Members::parse(b"{}").unwrap().rewrite(|_| true, &[]), b"{}");
    }
}
