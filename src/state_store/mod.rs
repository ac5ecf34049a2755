//! The store router instances share state through (`--state-store redis://...`): Redis,
//! or anything that speaks its protocol and runs its Lua scripts (Valkey, KeyDB).
//!
//! The router keeps one pipelined connection to it ([`connection`]) and speaks only
//! RESP2 ([`resp`]); what it keeps there are the per-key limits
//! ([`crate::admission::shared_limits`]), each changed by one server-side script, so
//! every instance's admissions are serialised by the store and none can overspend.

pub mod connection;
pub mod resp;

use std::fmt;
use std::time::Duration;

pub use connection::Connection;

/// Why a call to the store gave no answer the router can use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("the state store is unreachable")]
    Down,
    #[error("the state store did not answer within {0:?}")]
    Timeout(Duration),
    #[error("too many calls are waiting for the state store")]
    Busy,
    #[error("the state store answered with an error: {0}")]
    Replied(String),
    #[error("the state store's answer was not what the script returns: {0}")]
    Unexpected(String),
}

impl StoreError {
    /// The `kind` label of `router_state_store_errors_total`.
    pub fn label(&self) -> &'static str {
        match self {
            StoreError::Down => "down",
            StoreError::Timeout(_) => "timeout",
            StoreError::Busy => "busy",
            StoreError::Replied(_) => "replied",
            StoreError::Unexpected(_) => "unexpected",
        }
    }

    pub const LABELS: [&'static str; 5] = ["down", "timeout", "busy", "replied", "unexpected"];
}

/// Where the store is: `redis://[[USER]:PASSWORD@]HOST[:PORT][/DB]`.
#[derive(Clone, PartialEq, Eq)]
pub struct Target {
    pub address: String,
    pub username: Option<String>,
    pub password: Option<String>,
    pub database: u32,
    pub connect_timeout: Duration,
}

impl fmt::Display for Target {
    /// The address and database, never the password.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "redis://{}/{}", self.address, self.database)
    }
}

impl fmt::Debug for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl Target {
    pub fn parse(url: &str) -> Result<Target, String> {
        let rest = url.strip_prefix("redis://").ok_or_else(|| {
            if url.starts_with("rediss://") {
                format!("--state-store {url}: TLS to the store (rediss://) is not supported; reach it on a private network or through a TLS sidecar")
            } else {
                format!("--state-store {url}: expected redis://[[USER]:PASSWORD@]HOST[:PORT][/DB]")
            }
        })?;
        let (authority, database) = match rest.split_once('/') {
            Some((authority, "")) => (authority, 0),
            Some((authority, db)) => (
                authority,
                db.parse()
                    .map_err(|_| format!("--state-store {url}: the database is a number, not {db:?}"))?,
            ),
            None => (rest, 0),
        };
        let (credentials, host) = match authority.rsplit_once('@') {
            Some((credentials, host)) => (Some(credentials), host),
            None => (None, authority),
        };
        let (username, password) = match credentials {
            Some(credentials) => match credentials.split_once(':') {
                Some(("", password)) => (None, Some(password.to_owned())),
                Some((user, password)) => (Some(user.to_owned()), Some(password.to_owned())),
                None => (None, Some(credentials.to_owned())),
            },
            None => (None, None),
        };
        if host.is_empty() || host.contains(['?', '#', ' ']) {
            return Err(format!("--state-store {url}: no host"));
        }
        let address = if host.rsplit_once(':').is_some_and(|(_, port)| port.parse::<u16>().is_ok())
            && !host.ends_with(']')
        {
            host.to_owned()
        } else {
            format!("{host}:6379")
        };
        Ok(Target { address, username, password, database, connect_timeout: Duration::from_secs(1) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_host_port_credentials_and_database() {
        let t = Target::parse("redis://10.0.0.5").unwrap();
        assert_eq!((t.address.as_str(), t.database, t.password.as_deref()), ("10.0.0.5:6379", 0, None));
        let t = Target::parse("redis://:s3cret@redis.limits.svc:6380/2").unwrap();
        assert_eq!(t.address, "redis.limits.svc:6380");
        assert_eq!((t.username, t.password.as_deref(), t.database), (None, Some("s3cret"), 2));
        let t = Target::parse("redis://router:pw@127.0.0.1:7000/").unwrap();
        assert_eq!((t.username.as_deref(), t.password.as_deref()), (Some("router"), Some("pw")));
        assert_eq!(Target::parse("redis://[::1]:7000").unwrap().address, "[::1]:7000");
        assert_eq!(Target::parse("redis://[::1]").unwrap().address, "[::1]:6379");
        assert!(!format!("{t} {t:?}").contains("pw"), "the password stays out of logs");
        for bad in ["http://x", "redis://", "redis://h/db1", "rediss://h", "redis://:pw@"] {
            assert!(Target::parse(bad).is_err(), "{bad}");
        }
    }
}
