//! Discovery flags: replicas from a file, DNS names or Kubernetes EndpointSlices.

use std::net::SocketAddr;
use std::time::Duration;

use crate::discovery::dns::DnsTarget;
use crate::discovery::k8s::{K8sConfig, PortSpec};
use crate::discovery::{Discovery, Role};

#[derive(Debug, clap::Args)]
#[command(next_help_heading = "Discovery")]
pub struct DiscoveryArgs {
    /// A file of replicas, one `[ROLE] URL` per line (ROLE: prefill, decode or replica),
    /// re-read when it changes; a bad file is logged and the last good set kept.
    #[arg(long, value_name = "PATH")]
    pub replicas_file: Option<std::path::PathBuf>,

    /// Every address NAME resolves to is a replica on PORT (a headless Service, Consul,
    /// docker compose), re-resolved every --discovery-interval. Repeatable.
    #[arg(long, value_name = "NAME:PORT")]
    pub discover_dns: Vec<String>,

    /// P/D: every address NAME resolves to is a prefill replica on PORT. Repeatable.
    #[arg(long, value_name = "NAME:PORT")]
    pub discover_dns_prefill: Vec<String>,

    /// Ask this DNS server (IP:PORT) instead of the system's resolvers.
    #[arg(long, value_name = "IP:PORT")]
    pub dns_server: Option<SocketAddr>,

    /// Follow the ready endpoints of the EndpointSlices that --k8s-selector picks, through
    /// the Kubernetes API (in-cluster service account, or the kubeconfig).
    #[arg(long, requires = "k8s_selector")]
    pub discover_k8s: bool,

    /// Label selector of the EndpointSlices to follow (e.g. `app=vllm`).
    #[arg(long, value_name = "SELECTOR")]
    pub k8s_selector: Option<String>,

    /// Namespace of the EndpointSlices (default: the service account's, or the
    /// kubeconfig context's).
    #[arg(long)]
    pub k8s_namespace: Option<String>,

    /// The replicas' port: a number, or the name of the slice's port (default: the
    /// slice's only port, or the one named `http`).
    #[arg(long, value_name = "PORT|NAME", value_parser = PortSpec::parse)]
    pub k8s_port: Option<PortSpec>,

    /// The EndpointSlice (Service) label naming the P/D role: prefill, decode or replica.
    #[arg(long, default_value = "llm-router/role")]
    pub k8s_role_label: String,

    /// The Kubernetes API server's URL, instead of the in-cluster or kubeconfig one.
    #[arg(long, value_name = "URL")]
    pub k8s_api_server: Option<http::Uri>,

    /// How often the replicas file is re-read and DNS names re-resolved.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub discovery_interval: Duration,
}

impl DiscoveryArgs {
    pub fn discovery(&self) -> Result<Discovery, String> {
        Ok(Discovery {
            file: self.replicas_file.clone(),
            dns: self
                .discover_dns
                .iter()
                .map(|t| DnsTarget::parse(Role::Main, t))
                .chain(self.discover_dns_prefill.iter().map(|t| DnsTarget::parse(Role::Prefill, t)))
                .collect::<Result<_, _>>()?,
            dns_server: self.dns_server,
            k8s: self.discover_k8s.then(|| K8sConfig {
                api_server: self.k8s_api_server.clone(),
                namespace: self.k8s_namespace.clone(),
                selector: self.k8s_selector.clone().unwrap_or_default(),
                port: self.k8s_port.clone(),
                role_label: self.k8s_role_label.clone(),
            }),
            interval: self.discovery_interval,
        })
    }
}
