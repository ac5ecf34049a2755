//! The session key a request is routed by under `consistent-hash`.
//!
//! The key comes from the first configured header that is present and non-empty
//! (`x-session-id` unless `--session-header` says otherwise), else from the body's
//! session fields (see [`crate::ingress::request_facts`]). A request with neither has no key and
//! is routed by the keyless policy: hashing the body would send each turn of a chat,
//! whose body grows every turn, somewhere new.

use http::{HeaderMap, HeaderName};

/// A session key: opaque bytes, hashed onto the ring.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RoutingKey(Box<[u8]>);

impl RoutingKey {
    pub fn new(bytes: impl Into<Box<[u8]>>) -> Self {
        RoutingKey(bytes.into())
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl From<String> for RoutingKey {
    fn from(s: String) -> Self {
        RoutingKey(s.into_bytes().into_boxed_slice())
    }
}

/// Finds a request's key in its headers, by the configured header names in order.
#[derive(Debug, Clone)]
pub struct KeyHeaders {
    names: Vec<HeaderName>,
}

impl KeyHeaders {
    pub fn new(names: Vec<HeaderName>) -> Self {
        KeyHeaders { names }
    }

    pub fn find(&self, headers: &HeaderMap) -> Option<RoutingKey> {
        self.names
            .iter()
            .filter_map(|name| headers.get(name))
            .map(|value| value.as_bytes())
            .find(|bytes| !bytes.is_empty())
            .map(RoutingKey::new)
    }

    /// The request's key: a header key wins over a body key.
    pub fn key(&self, headers: &HeaderMap, body_session: Option<String>) -> Option<RoutingKey> {
        self.find(headers).or_else(|| body_session.map(RoutingKey::from))
    }
}

impl Default for KeyHeaders {
    fn default() -> Self {
        KeyHeaders::new(vec![HeaderName::from_static("x-session-id")])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_configured_header_wins() {
        let keys = KeyHeaders::new(vec![
            HeaderName::from_static("x-session-id"),
            HeaderName::from_static("x-correlation-id"),
        ]);
        let mut h = HeaderMap::new();
        h.insert("x-correlation-id", "corr".parse().unwrap());
        assert_eq!(keys.find(&h), Some(RoutingKey::new(*b"corr")));
        h.insert("x-session-id", "sess".parse().unwrap());
        assert_eq!(keys.find(&h), Some(RoutingKey::new(*b"sess")));
    }

    #[test]
    fn empty_header_falls_through_to_body() {
        let keys = KeyHeaders::default();
        let mut h = HeaderMap::new();
        h.insert("x-session-id", "".parse().unwrap());
        assert_eq!(keys.key(&h, Some("b".into())), Some(RoutingKey::new(*b"b")));
        assert_eq!(keys.key(&h, None), None);
    }

    #[test]
    fn header_key_beats_body_key() {
        let keys = KeyHeaders::default();
        let mut h = HeaderMap::new();
        h.insert("x-session-id", "h".parse().unwrap());
        assert_eq!(keys.key(&h, Some("b".into())), Some(RoutingKey::new(*b"h")));
    }
}
