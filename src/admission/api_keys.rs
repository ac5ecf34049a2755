//! The API keys clients must present, and where they come from: `--api-key` (also
//! `ROUTER_API_KEYS`, comma-separated, so a key need not show in `ps`), and
//! `--api-keys-file PATH`, a TOML file that names each key, can hold its SHA-256
//! digest instead of the key itself, and gives each key its limits:
//!
//! ```toml
//! [[keys]]
//! name = "team-a"             # what logs and metrics say, never the key
//! key = "sk-..."
//! requests_per_minute = 600   # optional
//! tokens_per_minute = 200000  # optional: prompt + completion tokens
//! priority = "high"           # high | normal (default) | low
//! models = ["Qwen/Qwen3-0.6B-FP8"]  # optional allow-list
//! default_max_tokens = 1024   # optional: the output a request naming no max_tokens
//!                             # reserves of tokens_per_minute (else what the model's
//!                             # context leaves)
//! cache_isolation = true      # optional: the key's prompts are cached apart from
//!                             # everyone else's (vLLM's cache_salt, set by the router)
//!
//! [[keys]]
//! name = "team-b"
//! key_sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
//! ```
//!
//! A presented key is compared with every configured one in constant time, whichever
//! matches. The file is read at start (a bad file stops the router with one line
//! naming the problem) and again when it changes or the router gets SIGHUP
//! ([`crate::admission::reload`]): a bad edit is logged and the last good set stays.
//! Unknown fields are refused, never silently ignored.

use std::path::Path;
use std::sync::Arc;

use arc_swap::ArcSwap;
use http::HeaderValue;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::fair_queue::Priority;
use super::rate_limits::Limits;

/// One key: its name, the secret or its digest, and what it may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKey {
    pub name: Arc<str>,
    secret: Secret,
    pub limits: Limits,
    pub priority: Priority,
    /// The models it may use; None: any.
    pub models: Option<Vec<String>>,
    /// The output a request that names no `max_tokens` reserves of the token limit.
    pub default_max_tokens: Option<u64>,
    /// `cache_isolation`: the `cache_salt` every request of this key carries, derived from
    /// the key's secret (the same on every router instance, guessable by no other key).
    pub cache_salt: Option<Arc<str>>,
}

impl ApiKey {
    /// Whether this key may use `model`.
    pub fn allows(&self, model: &str) -> bool {
        self.models.as_ref().is_none_or(|models| models.iter().any(|m| m == model))
    }
}

/// The key a request was let in with, in its extensions (for limits, metrics and the
/// access log).
#[derive(Debug, Clone)]
pub struct Caller(pub Arc<ApiKey>);

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
        ApiKey {
            name: name.into(),
            secret: Secret::Plain(key.as_bytes().to_vec()),
            limits: Limits::default(),
            priority: Priority::Normal,
            models: None,
            default_max_tokens: None,
            cache_salt: None,
        }
    }
}

/// The cache salt of a key whose SHA-256 digest is `digest`: a digest of the digest,
/// so that the salt, which the engines see, says nothing of the key.
fn cache_salt(digest: &[u8; 32]) -> Arc<str> {
    let salt = Sha256::new().chain_update(b"llm-router cache_salt v1\0").chain_update(digest).finalize();
    let hex: String = salt[..16].iter().map(|b| format!("{b:02x}")).collect();
    Arc::from(format!("router-{hex}"))
}

/// The keys clients must present, if any: a set that a reload replaces whole.
#[derive(Clone, Default)]
pub struct ApiKeys {
    keys: Arc<ArcSwap<Vec<Arc<ApiKey>>>>,
}

impl ApiKeys {
    pub fn new(keys: Vec<ApiKey>) -> Self {
        ApiKeys { keys: Arc::new(ArcSwap::from_pointee(keys.into_iter().map(Arc::new).collect())) }
    }

    /// Put `keys` in place of the current set (requests already let in keep theirs).
    pub fn replace(&self, keys: Vec<ApiKey>) {
        self.keys.store(Arc::new(keys.into_iter().map(Arc::new).collect()));
    }

    /// The names of the current keys.
    pub fn names(&self) -> Vec<Arc<str>> {
        self.keys.load().iter().map(|k| k.name.clone()).collect()
    }

    /// Keys from the command line (or `ROUTER_API_KEYS`): `key-1`, `key-2`, ...
    pub fn from_flags(keys: &[String]) -> Vec<ApiKey> {
        keys.iter().enumerate().map(|(i, k)| ApiKey::plain(format!("key-{}", i + 1), k)).collect()
    }

    pub fn is_enabled(&self) -> bool {
        !self.keys.load().is_empty()
    }

    /// The key `authorization` (the header's value) carries, if it carries one. Every
    /// key is compared, in constant time, whatever matches.
    pub fn check(&self, authorization: Option<&HeaderValue>) -> Option<Arc<ApiKey>> {
        let presented = authorization.and_then(|v| v.as_bytes().strip_prefix(b"Bearer ")).unwrap_or_default();
        let keys = self.keys.load();
        let digest: Option<[u8; 32]> = keys
            .iter()
            .any(|k| matches!(k.secret, Secret::Sha256(_)))
            .then(|| Sha256::digest(presented).into());
        let mut found = None;
        for key in keys.iter() {
            let matched = match (&key.secret, &digest) {
                (Secret::Plain(secret), _) => secret.as_slice().ct_eq(presented),
                (Secret::Sha256(secret), Some(digest)) => secret.ct_eq(digest),
                (Secret::Sha256(_), None) => subtle::Choice::from(0),
            };
            if bool::from(matched) && found.is_none() {
                found = Some(key.clone());
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
        requests_per_minute: Option<u32>,
        tokens_per_minute: Option<u64>,
        #[serde(default)]
        priority: Priority,
        models: Option<Vec<String>>,
        default_max_tokens: Option<u64>,
        #[serde(default)]
        cache_isolation: bool,
    }
    let at = |e: &dyn std::fmt::Display| format!("--api-keys-file {}: {e}", path.display());
    let text = std::fs::read_to_string(path).map_err(|e| at(&e))?;
    let file: File = toml::from_str(&text).map_err(|e| {
        let line = e.span().map_or(0, |span| text[..span.start.min(text.len())].matches('\n').count() + 1);
        at(&format!("line {line}: {}", e.message()))
    })?;
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
        if entry.requests_per_minute == Some(0) || entry.tokens_per_minute == Some(0) {
            return Err(at(&format!(
                "key `{}`: a limit of 0 lets nothing through; remove the key",
                entry.name
            )));
        }
        if entry.models.as_ref().is_some_and(Vec::is_empty) {
            return Err(at(&format!("key `{}`: models = [] allows no model; remove the key", entry.name)));
        }
        let limits = Limits {
            requests_per_minute: entry.requests_per_minute,
            tokens_per_minute: entry.tokens_per_minute,
        };
        let salt = entry.cache_isolation.then(|| {
            let digest = match &secret {
                Secret::Plain(key) => Sha256::digest(key).into(),
                Secret::Sha256(digest) => *digest,
            };
            cache_salt(&digest)
        });
        keys.push(ApiKey {
            name: entry.name.into(),
            secret,
            limits,
            priority: entry.priority,
            models: entry.models,
            default_max_tokens: entry.default_max_tokens,
            cache_salt: salt,
        });
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
        let name = |v: &str| keys.check(Some(&h(v))).map(|k| k.name.to_string());
        assert_eq!(name("Bearer k1").as_deref(), Some("key-1"));
        assert_eq!(name("Bearer secret-2").as_deref(), Some("key-2"));
        assert!(!keys.accepts(Some(&h("Bearer k"))));
        assert!(!keys.accepts(Some(&h("Bearer k12"))));
        assert!(!keys.accepts(Some(&h("k1"))));
        assert!(!keys.accepts(None));
        assert!(!ApiKeys::default().is_enabled());
    }

    #[test]
    fn an_isolated_key_has_a_salt_of_its_own_whichever_way_it_is_written() {
        let dir = std::env::temp_dir().join(format!("llm-router-salts-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("keys.toml");
        // sha256("test")
        std::fs::write(
            &path,
            r#"
[[keys]]
name = "plain"
key = "test"
cache_isolation = true

[[keys]]
name = "digest"
key_sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
cache_isolation = true

[[keys]]
name = "other"
key = "sk-other"
cache_isolation = true
"#,
        )
        .unwrap();
        let keys = load_file(&path).unwrap();
        let salt = |i: usize| keys[i].cache_salt.clone().unwrap();
        assert_eq!(salt(0), salt(1), "the same key, as itself or its digest");
        assert_ne!(salt(0), salt(2));
        assert!(salt(0).starts_with("router-") && !salt(0).contains("test") && !salt(0).contains("9f86"));
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
requests_per_minute = 5
tokens_per_minute = 1000
priority = "high"
models = ["m1"]
default_max_tokens = 512

[[keys]]
name = "team-b"
key_sha256 = "9F86D081884C7D659A2FEAA0C55AD015A3BF4F1B2B0B822CD15D6C15B0F00A08"
"#,
        )
        .unwrap();
        let keys = ApiKeys::new(load_file(&path).unwrap());
        let a = keys.check(Some(&h("Bearer sk-a"))).unwrap();
        assert_eq!(&*a.name, "team-a");
        assert_eq!(a.limits, Limits { requests_per_minute: Some(5), tokens_per_minute: Some(1000) });
        assert_eq!(a.priority, Priority::High);
        assert!(a.allows("m1") && !a.allows("m2"));
        assert_eq!(a.default_max_tokens, Some(512));
        assert_eq!(a.cache_salt, None, "not isolated");
        let b = keys.check(Some(&h("Bearer test"))).unwrap();
        assert_eq!((&*b.name, b.priority, b.limits), ("team-b", Priority::Normal, Limits::default()));
        assert!(b.allows("anything"));
        assert_eq!(keys.check(Some(&h("Bearer tess"))), None);
        keys.replace(vec![ApiKey::plain("new".into(), "sk-new")]);
        assert_eq!(keys.check(Some(&h("Bearer sk-a"))), None);
        assert_eq!(keys.names(), [Arc::from("new")]);
        for (bad, needle) in [
            ("[[keys]]\nname = \"x\"\n", "exactly one of"),
            ("[[keys]]\nname = \"x\"\nkey = \"a\"\nkey_sha256 = \"00\"\n", "exactly one of"),
            ("[[keys]]\nname = \"x\"\nkey_sha256 = \"abc\"\n", "64 hex"),
            ("[[keys]]\nname = \"x\"\nkey = \"a\"\nrequests_per_hour = 5\n", "requests_per_hour"),
            ("[[keys]]\nname = \"x\"\nkey = \"a\"\nrequests_per_minute = 0\n", "limit of 0"),
            ("[[keys]]\nname = \"x\"\nkey = \"a\"\nrequests_per_minute = -1\n", "line 4: invalid value"),
            ("[[keys]]\nname = \"x\"\nkey = \"a\"\npriority = \"urgent\"\n", "urgent"),
            ("[[keys]]\nname = \"x\"\nkey = \"a\"\nmodels = []\n", "no model"),
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
