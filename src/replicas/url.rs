//! A replica's base URL, validated once at start-up.
//!
//! Replicas are vLLM OpenAI servers addressed as `http://host:port` (a trailing `/` is
//! fine). Paths, queries and credentials are refused rather than silently dropped, and
//! so is `https`: the router speaks plain HTTP to replicas inside the cluster.

use std::fmt;

use http::uri::{Authority, PathAndQuery, Scheme, Uri};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaUrl {
    authority: Authority,
    /// `http://host:port`, the replica's name in logs, metrics and on the ring.
    name: String,
}

impl ReplicaUrl {
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let uri: Uri = text.parse().map_err(|e| format!("`{text}` is not a URL: {e}"))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some("https") => {
                return Err(format!(
                    "`{text}`: https replicas are not supported; use http inside the cluster"
                ));
            }
            Some(other) => return Err(format!("`{text}`: scheme `{other}` is not http")),
            None => return Err(format!("`{text}` has no scheme; write http://{text}")),
        }
        let authority = uri.authority().ok_or_else(|| format!("`{text}` has no host"))?.clone();
        if authority.host().is_empty() {
            return Err(format!("`{text}` has no host"));
        }
        if authority.as_str().contains('@') {
            return Err(format!("`{text}`: credentials in replica URLs are not supported"));
        }
        if let Some(pq) = uri.path_and_query()
            && (pq.path() != "/" || pq.query().is_some())
        {
            return Err(format!("`{text}`: a replica URL has no path or query, only http://host:port"));
        }
        let name = format!("http://{authority}");
        Ok(ReplicaUrl { authority, name })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `host:port` as written (the `Host` header for requests to the replica).
    pub fn authority(&self) -> &str {
        self.authority.as_str()
    }

    /// The host to connect to (an IPv6 literal without its brackets).
    pub fn host(&self) -> &str {
        self.authority.host().trim_start_matches('[').trim_end_matches(']')
    }

    /// The port to connect to (80 when the URL names none).
    pub fn port(&self) -> u16 {
        self.authority.port_u16().unwrap_or(80)
    }

    /// The URL of `path_and_query` on this replica.
    pub fn join(&self, path_and_query: &PathAndQuery) -> Uri {
        Uri::builder()
            .scheme(Scheme::HTTP)
            .authority(self.authority.clone())
            .path_and_query(path_and_query.clone())
            .build()
            .expect("scheme, authority and path are each valid")
    }
}

impl fmt::Display for ReplicaUrl {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(&self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_host_port_forms() {
        assert_eq!(ReplicaUrl::parse("http://10.0.0.1:8000").unwrap().name(), "http://10.0.0.1:8000");
        assert_eq!(ReplicaUrl::parse("http://vllm-0:8000/").unwrap().name(), "http://vllm-0:8000");
        assert_eq!(ReplicaUrl::parse("http://[::1]:9000").unwrap().name(), "http://[::1]:9000");
        let v6 = ReplicaUrl::parse("http://[::1]:9000").unwrap();
        assert_eq!((v6.host(), v6.port(), v6.authority()), ("::1", 9000, "[::1]:9000"));
        assert_eq!(ReplicaUrl::parse("http://vllm-0").unwrap().port(), 80);
        let u = ReplicaUrl::parse("http://h:1").unwrap();
        assert_eq!(u.join(&"/v1/models?x=1".parse().unwrap()).to_string(), "http://h:1/v1/models?x=1");
    }

    #[test]
    fn rejects_malformed_with_the_value_named() {
        for bad in [
            "localhost:8000",
            "ftp://h:1",
            "https://h:1",
            "http://h:1/v1",
            "http://",
            "http://u:p@h:1",
            "not a url",
            "http://h:1?x=1",
        ] {
            let err = ReplicaUrl::parse(bad).unwrap_err();
            assert!(!err.contains('\n'), "{err}");
            assert!(err.contains(bad.trim_end_matches('/')) || err.contains("http://"), "{bad}: {err}");
        }
    }
}
