//! `--discover-dns NAME:PORT`: every address a DNS name resolves to is a replica.
//!
//! That is how a Kubernetes headless service, Consul's DNS interface or docker
//! compose's service names publish the instances behind a name. Each name is resolved
//! (A and AAAA) every `--discovery-interval` and the set follows the answer. A lookup
//! that fails (timeout, SERVFAIL, or no such name) keeps that name's last set: a DNS
//! outage must not empty the fleet, and replicas that really died are taken out by
//! their health checks anyway.
//!
//! The resolver is hickory's, reading `/etc/resolv.conf` (search domains included), or
//! asking only `--dns-server IP:PORT` when given. Nothing is cached between rounds, so
//! a change is seen at the next round whatever the records' TTLs.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::task::JoinHandle;

use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::{Resolver, TokioResolver};

use super::{Member, Membership, Role};
use crate::replicas::ReplicaUrl;

/// One name to resolve, and the stage its addresses join.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsTarget {
    pub role: Role,
    pub host: String,
    pub port: u16,
}

impl DnsTarget {
    /// `NAME:PORT` as the flag takes it.
    pub fn parse(role: Role, text: &str) -> Result<DnsTarget, String> {
        let (host, port) = text
            .rsplit_once(':')
            .ok_or_else(|| format!("`{text}` is not NAME:PORT (e.g. vllm.default.svc:8000)"))?;
        let port =
            port.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(|| format!("`{text}`: bad port"))?;
        if host.is_empty() || host.contains('/') {
            return Err(format!("`{text}` is not NAME:PORT"));
        }
        Ok(DnsTarget { role, host: host.to_owned(), port })
    }

    fn member(&self, ip: IpAddr) -> Member {
        let url = ReplicaUrl::parse(&format!("http://{}", SocketAddr::new(ip, self.port)))
            .expect("an address and a port make a valid URL");
        Member::new(self.role, &url)
    }
}

/// A resolver that asks `server` only, or the system's configured ones.
pub fn resolver(server: Option<SocketAddr>) -> Result<TokioResolver, String> {
    let mut builder = match server {
        Some(server) => {
            let mut connection = ConnectionConfig::udp();
            connection.port = server.port();
            let mut tcp = ConnectionConfig::tcp();
            tcp.port = server.port();
            let name_server = NameServerConfig::new(server.ip(), true, vec![connection, tcp]);
            Resolver::builder_with_config(
                ResolverConfig::from_name_servers(vec![name_server]),
                TokioRuntimeProvider::default(),
            )
        }
        None => Resolver::builder_tokio()
            .map_err(|e| format!("cannot read the system's DNS configuration: {e}"))?,
    };
    let options = builder.options_mut();
    options.cache_size = 0;
    options.timeout = Duration::from_secs(2);
    options.attempts = 2;
    builder.build().map_err(|e| format!("cannot build the DNS resolver: {e}"))
}

/// Resolve every target once now (the router starts with what DNS says, or with
/// nothing from DNS if a name does not resolve yet), then every `interval`.
pub async fn follow(
    targets: Vec<DnsTarget>,
    resolver: TokioResolver,
    interval: Duration,
    mut membership: Membership,
) -> JoinHandle<()> {
    let mut last: Vec<BTreeSet<Member>> = vec![BTreeSet::new(); targets.len()];
    round(&targets, &resolver, &mut last, &mut membership).await;
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(interval).await;
            round(&targets, &resolver, &mut last, &mut membership).await;
        }
    })
}

async fn round(
    targets: &[DnsTarget],
    resolver: &TokioResolver,
    last: &mut [BTreeSet<Member>],
    membership: &mut Membership,
) {
    for (target, last) in targets.iter().zip(last.iter_mut()) {
        match resolver.lookup_ip(target.host.as_str()).await {
            Ok(answer) => {
                let members: BTreeSet<Member> = answer.iter().map(|ip| target.member(ip)).collect();
                if members != *last {
                    tracing::info!(name = %target.host, addresses = members.len(), "DNS answer changed");
                    *last = members;
                }
            }
            Err(error) => {
                tracing::warn!(name = %target.host, %error, "DNS lookup failed: keeping the last set");
            }
        }
    }
    membership.apply(last.iter().flatten().cloned().collect()).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse() {
        let t = DnsTarget::parse(Role::Main, "vllm.default.svc.cluster.local:8000").unwrap();
        assert_eq!((t.host.as_str(), t.port), ("vllm.default.svc.cluster.local", 8000));
        assert_eq!(t.member("10.1.2.3".parse().unwrap()).name, "http://10.1.2.3:8000");
        assert_eq!(t.member("fd00::1".parse().unwrap()).name, "http://[fd00::1]:8000");
        for bad in ["vllm", "vllm:0", "vllm:http", ":8000", "http://vllm:8000"] {
            assert!(DnsTarget::parse(Role::Main, bad).is_err(), "{bad}");
        }
    }
}
