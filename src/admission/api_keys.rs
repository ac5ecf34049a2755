//! The API keys clients must present, and where they come from: `--api-key` (also
//! `ROUTER_API_KEYS`, comma-separated, so a key need not show in `ps`), and
//! `--api-keys-file PATH`, a TOML file that names each key and can hold its SHA-256
//! digest instead of the key itself:
//!
//! ```toml
//! [[keys]]
//! name = "team-a"          # what logs say, never the key
//! key = "sk-..."
//!
//! [[keys]]
//! name = "team-b"
//! key_sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
//! ```
//!
//! A presented key is compared with every configured one in constant time, whichever
//! matches. The file is read at start; a bad file stops the router with one line
//! naming the problem. Fields this router does not enforce (rate limits, say) are
//! refused, never silently ignored.

use std::path::Path;
use std::sync::Arc;

use http::HeaderValue;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// One key: its name, and the secret or its digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKey {
    pub name: Arc<str>,
    secret: Secret,
}

/// The name of the key a request was let in with, in its extensions (for the access
/// log).
#[derive(Debug, Clone)]
pub struct KeyName(pub Arc<str>);

#[derive(Clone, PartialEq, Eq)]
enum Secret {
    Plain(Vec<u8>),
    Sha256([u8; 32]),
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<secret>")
    }
}

impl ApiKey {
    /// A key given on the command line or in the environment, named by its position.
    pub fn plain(name: String, key: &str) -> Self {
        ApiKey { name: name.into(), secret: Secret::Plain(key.as_bytes().to_vec()) }
    }
}

/// The keys clients must present, if any.
#[derive(Clone, Default)]
pub struct ApiKeys {
    keys: Arc<Vec<ApiKey>>,
}

impl ApiKeys {
    pub fn new(keys: Vec<ApiKey>) -> Self {
        ApiKeys { keys: Arc::new(keys) }
    }

    /// Keys from the command line (or `ROUTER_API_KEYS`): `key-1`, `key-2`, ...
    pub fn from_flags(keys: &[String]) -> Vec<ApiKey> {
        keys.iter().enumerate().map(|(i, k)| ApiKey::plain(format!("key-{}", i + 1), k)).collect()
    }

    pub fn is_enabled(&self) -> bool {
        !self.keys.is_empty()
    }

    /// The name of the key `authorization` (the header's value) carries, if it carries
    /// one. Every key is compared, in constant time, whatever matches.
    pub fn check(&self, authorization: Option<&HeaderValue>) -> Option<&Arc<str>> {
        let presented = authorization.and_then(|v| v.as_bytes().strip_prefix(b"Bearer ")).unwrap_or_default();
        let digest: Option<[u8; 32]> = self
            .keys
            .iter()
            .any(|k| matches!(k.secret, Secret::Sha256(_)))
            .then(|| Sha256::digest(presented).into());
        let mut found = None;
        for key in self.keys.iter() {
            let matched = match (&key.secret, &digest) {
                (Secret::Plain(secret), _) => secret.as_slice().ct_eq(presented),
                (Secret::Sha256(secret), Some(digest)) => secret.ct_eq(digest),
                (Secret::Sha256(_), None) => subtle::Choice::from(0),
            };
            if bool::from(matched) && found.is_none() {
                found = Some(&key.name);
            }
        }
        found.filter(|_| !presented.is_empty())
    }

    pub fn accepts(&self, authorization: Option<&HeaderValue>) -> bool {
        self.check(authorization).is_some()
    }
}

/// Read `--api-keys-file`.
pub fn load_file(path: &Path) -> Result<Vec<ApiKey>, String> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct File {
        #[serde(default)]
        keys: Vec<Entry>,
    }
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Entry {
        name: String,
        key: Option<String>,
        key_sha256: Option<String>,
    }
    let at = |e: &dyn std::fmt::Display| format!("--api-keys-file {}: {e}", path.display());
    let text = std::fs::read_to_string(path).map_err(|e| at(&e))?;
    let file: File = toml::from_str(&text).map_err(|e| at(&e.message().to_owned()))?;
    let mut keys = Vec::with_capacity(file.keys.len());
    for entry in file.keys {
        let secret = match (entry.key, entry.key_sha256) {
            (Some(key), None) if !key.is_empty() => Secret::Plain(key.into_bytes()),
            (None, Some(hex)) => Secret::Sha256(
                hex_digest(&hex)
                    .ok_or_else(|| at(&format!("key `{}`: key_sha256 is not 64 hex digits", entry.name)))?,
            ),
            _ => return Err(at(&format!("key `{}`: give exactly one of key and key_sha256", entry.name))),
        };
        if keys.iter().any(|k: &ApiKey| *k.name == *entry.name) {
            return Err(at(&format!("the name `{}` is used twice", entry.name)));
        }
        keys.push(ApiKey { name: entry.name.into(), secret });
    }
    if keys.is_empty() {
        return Err(at(&"no [[keys]]: a keys file that lets nobody in is a mistake"));
    }
    Ok(keys)
}

fn hex_digest(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.trim().as_bytes();
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in hex.chunks_exact(2).enumerate() {
        out[i] = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(v: &str) -> HeaderValue {
        HeaderValue::from_str(v).unwrap()
    }

    #[test]
    fn keys_need_bearer_and_an_exact_match() {
        let keys = ApiKeys::new(ApiKeys::from_flags(&["k1".into(), "secret-2".into()]));
        assert_eq!(keys.check(Some(&h("Bearer k1"))).map(|n| &**n), Some("key-1"));
        assert_eq!(keys.check(Some(&h("Bearer secret-2"))).map(|n| &**n), Some("key-2"));
        assert!(!keys.accepts(Some(&h("Bearer k"))));
        assert!(!keys.accepts(Some(&h("Bearer k12"))));
        assert!(!keys.accepts(Some(&h("k1"))));
        assert!(!keys.accepts(None));
        assert!(!ApiKeys::default().is_enabled());
    }

    #[test]
    fn a_file_names_keys_and_may_hold_digests_only() {
        let dir = std::env::temp_dir().join(format!("llm-router-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("keys.toml");
        // sha256("test")
        std::fs::write(
            &path,
            r#"
[[keys]]
name = "team-a"
key = "sk-a"

[[keys]]
name = "team-b"
key_sha256 = "9F86D081884C7D659A2FEAA0C55AD015A3BF4F1B2B0B822CD15D6C15B0F00A08"
"#,
        )
        .unwrap();
        let keys = ApiKeys::new(load_file(&path).unwrap());
        assert_eq!(keys.check(Some(&h("Bearer sk-a"))).map(|n| &**n), Some("team-a"));
        assert_eq!(keys.check(Some(&h("Bearer test"))).map(|n| &**n), Some("team-b"));
        assert_eq!(keys.check(Some(&h("Bearer tess"))), None);
        for (bad, needle) in [
            ("[[keys]]\nname = \"x\"\n", "exactly one of"),
            ("[[keys]]\nname = \"x\"\nkey = \"a\"\nkey_sha256 = \"00\"\n", "exactly one of"),
            ("[[keys]]\nname = \"x\"\nkey_sha256 = \"abc\"\n", "64 hex"),
            ("[[keys]]\nname = \"x\"\nkey = \"a\"\nrequests_per_minute = 5\n", "requests_per_minute"),
            ("[[keys]]\nname = \"x\"\nkey = \"a\"\n[[keys]]\nname = \"x\"\nkey = \"b\"\n", "twice"),
            ("", "no [[keys]]"),
            ("keys = 3", "keys"),
        ] {
            std::fs::write(&path, bad).unwrap();
            let err = load_file(&path).unwrap_err();
            assert!(err.contains(needle) && err.contains("--api-keys-file"), "{bad:?}: {err}");
        }
        assert!(load_file(&dir.join("missing.toml")).unwrap_err().contains("missing.toml"));
    }
}
