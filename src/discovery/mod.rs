//! Discovery: replica sets that come from outside the command line and change while
//! the router serves. Three sources, each its own file:
//!
//! - [`file`] (`--replicas-file`): a file of replica URLs, re-read when it changes;
//! - [`dns`] (`--discover-dns`): every address a name resolves to (a Kubernetes
//!   headless service, Consul, docker compose), re-resolved on an interval;
//! - [`k8s`] (`--discover-k8s`): the ready endpoints of EndpointSlices chosen by a
//!   label selector, watched through the Kubernetes API.
//!
//! A source produces the whole set it currently sees; [`Membership`] turns the
//! difference from the last set into joins and leaves on the stages, the same calls
//! the admin API makes. So a discovered replica enters rotation once a health check
//! passes, a vanished one gets no new requests while those in flight finish, and with
//! `consistent-hash` only the sessions the ring gives to (or took from) that replica
//! move. A source only ever removes what it added: replicas from the command line or
//! the admin API are left alone.

pub mod dns;
pub mod file;
pub mod k8s;

use std::collections::BTreeSet;

use tokio::task::JoinHandle;

use crate::replicas::{MembershipError, ReplicaUrl, Stage};

/// The discovery sources that are on.
#[derive(Debug, Clone, Default)]
pub struct Discovery {
    pub file: Option<std::path::PathBuf>,
    pub dns: Vec<dns::DnsTarget>,
    pub dns_server: Option<std::net::SocketAddr>,
    pub k8s: Option<k8s::K8sConfig>,
    pub interval: std::time::Duration,
}

impl Discovery {
    pub fn is_on(&self) -> bool {
        self.file.is_some() || !self.dns.is_empty() || self.k8s.is_some()
    }
}

/// How long start-up waits for the Kubernetes API's first list of slices.
const K8S_FIRST_LIST: std::time::Duration = std::time::Duration::from_secs(10);

/// Start the sources that are on, each with its first set applied (so the router
/// starts with the fleet), following changes in tasks returned to be stopped at
/// shutdown. Errors when a source cannot start (a missing or bad replicas file, no DNS
/// configuration, no Kubernetes API).
pub async fn start(
    discovery: &Discovery,
    main: &Stage,
    prefill: Option<&Stage>,
) -> Result<Vec<JoinHandle<()>>, String> {
    let membership = |source| Membership::new(source, main.clone(), prefill.cloned());
    let mut tasks = Vec::new();
    if let Some(path) = &discovery.file {
        tasks.push(file::follow(path.clone(), discovery.interval, membership("file")).await?);
    }
    if !discovery.dns.is_empty() {
        let resolver = dns::resolver(discovery.dns_server)?;
        tasks.push(dns::follow(discovery.dns.clone(), resolver, discovery.interval, membership("dns")).await);
    }
    if let Some(k8s) = &discovery.k8s {
        tasks.push(k8s::follow(k8s.clone(), K8S_FIRST_LIST, membership("k8s")).await?);
    }
    Ok(tasks)
}

/// Which stage a discovered replica belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// The default stage: every replica, or in P/D mode the decode replicas.
    Main,
    /// P/D mode: the prefill replicas.
    Prefill,
}

impl Role {
    /// A role as files and labels write it: `prefill`, `decode`, or `replica`.
    pub fn parse(text: &str) -> Option<Role> {
        match text {
            "prefill" => Some(Role::Prefill),
            "decode" | "replica" => Some(Role::Main),
            _ => None,
        }
    }
}

/// One replica a source sees.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Member {
    pub role: Role,
    /// The replica's name (`http://host:port`).
    pub name: String,
}

impl Member {
    pub fn new(role: Role, url: &ReplicaUrl) -> Self {
        Member { role, name: url.name().to_owned() }
    }
}

/// What one source has added to the stages, kept in step with what it sees.
pub struct Membership {
    /// The source, for logs (`file`, `dns`, `k8s`).
    source: &'static str,
    main: Stage,
    prefill: Option<Stage>,
    /// The replicas this source added and has not removed.
    owned: BTreeSet<Member>,
}

impl Membership {
    pub fn new(source: &'static str, main: Stage, prefill: Option<Stage>) -> Self {
        Membership { source, main, prefill, owned: BTreeSet::new() }
    }

    pub fn has_prefill(&self) -> bool {
        self.prefill.is_some()
    }

    fn stage(&self, role: Role) -> Option<&Stage> {
        match role {
            Role::Main => Some(&self.main),
            Role::Prefill => self.prefill.as_ref(),
        }
    }

    /// Make the stages hold exactly `seen` of what this source added: join the new
    /// ones (probed at once), remove the ones no longer seen. A replica already in a
    /// stage by another way (flag, admin API, another source) is left to its owner.
    pub async fn apply(&mut self, seen: BTreeSet<Member>) {
        let gone: Vec<Member> = self.owned.difference(&seen).cloned().collect();
        for member in gone {
            self.owned.remove(&member);
            if let Some(stage) = self.stage(member.role) {
                let _ = stage.leave(&member.name, self.source);
            }
        }
        let new: Vec<Member> = seen.into_iter().filter(|m| !self.owned.contains(m)).collect();
        for member in new {
            let Some(stage) = self.stage(member.role) else {
                tracing::warn!(replica = %member.name, source = self.source,
                    "a prefill replica outside P/D mode: ignored");
                continue;
            };
            let url = ReplicaUrl::parse(&member.name).expect("members are built from valid URLs");
            match stage.join(url, self.source).await {
                Ok(_) => {
                    self.owned.insert(member);
                }
                Err(MembershipError::Exists(_)) => {
                    tracing::debug!(replica = %member.name, source = self.source, "already in the set");
                }
                Err(error) => tracing::warn!(%error, source = self.source, "cannot add replica"),
            }
        }
    }
}
