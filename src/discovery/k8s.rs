//! `--discover-k8s`: the ready endpoints of the EndpointSlices a label selector picks,
//! watched through the Kubernetes API (`kube`'s watcher: list, then watch, re-listing
//! after a watch error or an expired resource version).
//!
//! EndpointSlices are what Services publish: one Service (or two in P/D mode, one per
//! role) in front of the vLLM pods, and the router follows which pods are ready. A
//! slice's role comes from a label on it (`--k8s-role-label`, default
//! `llm-router/role`: `prefill`, `decode` or `replica`; absent means the default
//! stage); the EndpointSlice controller copies a Service's labels onto its slices, so
//! the label goes on the Service. The port is `--k8s-port` (a number, or the name of
//! the slice's port), or the slice's only port, or its port named `http`.
//!
//! Only endpoints whose `ready` condition is not false count (Kubernetes says an unset
//! one is to be read as ready); a terminating pod turns not ready and leaves rotation
//! while its in-flight requests finish.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use tokio::task::JoinHandle;

use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client};
use tokio_stream::StreamExt;

use super::{Member, Membership, Role};
use crate::replicas::ReplicaUrl;

/// What to watch and how to read it.
#[derive(Debug, Clone)]
pub struct K8sConfig {
    /// The API server; None means the in-cluster service account or the kubeconfig.
    pub api_server: Option<http::Uri>,
    pub namespace: Option<String>,
    pub selector: String,
    pub port: Option<PortSpec>,
    pub role_label: String,
}

/// `--k8s-port`: a port number, or the name of the slice's port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortSpec {
    Number(u16),
    Name(String),
}

impl PortSpec {
    pub fn parse(text: &str) -> Result<PortSpec, String> {
        match text.parse::<u16>() {
            Ok(0) => Err("port 0".into()),
            Ok(n) => Ok(PortSpec::Number(n)),
            Err(_) if !text.is_empty() => Ok(PortSpec::Name(text.to_owned())),
            Err(_) => Err("empty port".into()),
        }
    }
}

/// The replicas one slice holds: its ready endpoints' addresses on the chosen port.
pub fn members(slice: &EndpointSlice, port: Option<&PortSpec>, role_label: &str) -> BTreeSet<Member> {
    let labels = slice.metadata.labels.as_ref();
    let role = match labels.and_then(|l| l.get(role_label)) {
        None => Role::Main,
        Some(value) => match Role::parse(value) {
            Some(role) => role,
            None => {
                tracing::warn!(slice = ?slice.metadata.name, label = role_label, %value,
                    "unknown role label: slice ignored");
                return BTreeSet::new();
            }
        },
    };
    let ports = slice.ports.as_deref().unwrap_or_default();
    let port = match port {
        Some(PortSpec::Number(n)) => Some(*n),
        Some(PortSpec::Name(name)) => ports
            .iter()
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .and_then(|p| p.port)
            .and_then(|p| u16::try_from(p).ok()),
        None if ports.len() == 1 => ports[0].port.and_then(|p| u16::try_from(p).ok()),
        None => ports
            .iter()
            .find(|p| p.name.as_deref() == Some("http"))
            .and_then(|p| p.port)
            .and_then(|p| u16::try_from(p).ok()),
    };
    let Some(port) = port else {
        tracing::warn!(slice = ?slice.metadata.name, "no usable port on the slice (see --k8s-port): ignored");
        return BTreeSet::new();
    };
    if slice.address_type == "FQDN" {
        return BTreeSet::new();
    }
    slice
        .endpoints
        .iter()
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true))
        .flat_map(|e| e.addresses.iter())
        .filter_map(|address| {
            let ip: std::net::IpAddr = address.parse().ok()?;
            let url = ReplicaUrl::parse(&format!("http://{}", std::net::SocketAddr::new(ip, port))).ok()?;
            Some(Member::new(role, &url))
        })
        .collect()
}

/// Connect to the API server. Errors when there is no cluster to talk to.
pub async fn client(config: &K8sConfig) -> Result<(Client, String), String> {
    let kube_config = match &config.api_server {
        Some(url) => kube::Config::new(url.clone()),
        None => kube::Config::infer().await.map_err(|e| format!("--discover-k8s: no Kubernetes API: {e}"))?,
    };
    let namespace = config.namespace.clone().unwrap_or_else(|| kube_config.default_namespace.clone());
    let client = Client::try_from(kube_config).map_err(|e| format!("--discover-k8s: {e}"))?;
    Ok((client, namespace))
}

/// Watch the slices until the task is dropped. Waits up to `first_wait` for the first
/// complete list, so the router starts with the fleet when the API answers in time.
pub async fn follow(
    config: K8sConfig,
    first_wait: Duration,
    mut membership: Membership,
) -> Result<JoinHandle<()>, String> {
    let (client, namespace) = client(&config).await?;
    let api: Api<EndpointSlice> = Api::namespaced(client, &namespace);
    let watch = watcher::Config::default().labels(&config.selector);
    let (listed, first_list) = tokio::sync::oneshot::channel::<()>();
    tracing::info!(%namespace, selector = %config.selector, "watching EndpointSlices");
    let task = tokio::spawn(async move {
        let mut stream = std::pin::pin!(watcher::watcher(api, watch).default_backoff());
        let mut slices: HashMap<String, BTreeSet<Member>> = HashMap::new();
        let mut listing: HashMap<String, BTreeSet<Member>> = HashMap::new();
        let mut listed = Some(listed);
        while let Some(event) = stream.next().await {
            let port = config.port.as_ref();
            let key = |s: &EndpointSlice| s.metadata.name.clone().unwrap_or_default();
            match event {
                Ok(Event::Init) => listing.clear(),
                Ok(Event::InitApply(slice)) => {
                    listing.insert(key(&slice), members(&slice, port, &config.role_label));
                }
                Ok(Event::InitDone) => {
                    slices = std::mem::take(&mut listing);
                    membership.apply(slices.values().flatten().cloned().collect()).await;
                    if let Some(listed) = listed.take() {
                        let _ = listed.send(());
                    }
                }
                Ok(Event::Apply(slice)) => {
                    slices.insert(key(&slice), members(&slice, port, &config.role_label));
                    membership.apply(slices.values().flatten().cloned().collect()).await;
                }
                Ok(Event::Delete(slice)) => {
                    slices.remove(&key(&slice));
                    membership.apply(slices.values().flatten().cloned().collect()).await;
                }
                // The watcher re-lists by itself (after its backoff); the last set stays.
                Err(error) => tracing::warn!(%error, "EndpointSlice watch failed: resyncing"),
            }
        }
    });
    if tokio::time::timeout(first_wait, first_list).await.is_err() {
        tracing::warn!(?first_wait, "no EndpointSlice list yet: starting without it");
    }
    Ok(task)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slice(json: serde_json::Value) -> EndpointSlice {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn ready_endpoints_on_the_chosen_port_with_their_role() {
        let s = slice(serde_json::json!({
            "metadata": {"name": "vllm-prefill-abc", "labels": {"llm-router/role": "prefill"}},
            "addressType": "IPv4",
            "ports": [{"name": "metrics", "port": 9000}, {"name": "http", "port": 8000}],
            "endpoints": [
                {"addresses": ["10.0.0.1"], "conditions": {"ready": true}},
                {"addresses": ["10.0.0.2"], "conditions": {"ready": false, "terminating": true}},
                {"addresses": ["10.0.0.3"]}
            ]
        }));
        let got: Vec<(Role, String)> =
            members(&s, None, "llm-router/role").into_iter().map(|m| (m.role, m.name)).collect();
        assert_eq!(
            got,
            [(Role::Prefill, "http://10.0.0.1:8000".into()), (Role::Prefill, "http://10.0.0.3:8000".into())]
        );
        let by_name = members(&s, Some(&PortSpec::Name("metrics".into())), "llm-router/role");
        assert!(by_name.iter().all(|m| m.name.ends_with(":9000")));
        assert!(members(&s, Some(&PortSpec::Name("grpc".into())), "llm-router/role").is_empty());
        let unlabelled = members(&s, Some(&PortSpec::Number(7000)), "other/label");
        assert!(unlabelled.iter().all(|m| m.role == Role::Main && m.name.ends_with(":7000")));
    }
}
