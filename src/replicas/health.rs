//! Background health checks: `GET /health` on every replica each interval, and on
//! success `GET /v1/models` to keep the replica's model list current.
//!
//! A replica leaves rotation after `unhealthy_threshold` consecutive failures and
//! rejoins after `healthy_threshold` consecutive successes (the proxy also reports
//! refused connections here, so a dead replica leaves quickly under traffic). Probes run
//! concurrently and each is bounded by `timeout`, so one hung replica never delays the
//! verdict on the others.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};

use super::{ModelCard, Registry, Replica};
use crate::upstream::proxy::HttpClient;

#[derive(Debug, Clone, Copy)]
pub struct HealthConfig {
    pub interval: Duration,
    pub timeout: Duration,
}

#[derive(Clone)]
pub struct HealthChecker {
    registry: Arc<Registry>,
    client: HttpClient,
    config: HealthConfig,
}

/// Model lists larger than this are not believed.
const MAX_MODELS_BODY: usize = 4 << 20;

impl HealthChecker {
    pub fn new(registry: Arc<Registry>, client: HttpClient, config: HealthConfig) -> Self {
        HealthChecker { registry, client, config }
    }

    /// Probe every replica once, concurrently.
    pub async fn probe_all(&self) {
        let probes = self.registry.replicas().into_iter().map(|replica| {
            let checker = self.clone();
            tokio::spawn(async move { checker.probe(&replica).await })
        });
        for probe in probes.collect::<Vec<_>>() {
            let _ = probe.await;
        }
    }

    /// Probe forever, every `interval`.
    pub async fn run(self) {
        let mut tick = tokio::time::interval(self.config.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            self.probe_all().await;
        }
    }

    /// Probe one replica now (the admin API probes a replica it adds). A check that
    /// is refused or answered with an error marks the replica down; one that times out
    /// does not (an overloaded engine answers late, a dead one not at all).
    pub async fn probe(&self, replica: &Replica) {
        let (ok, down) = match self.get(replica, "/health").await {
            Ok((status, _)) => (status.is_success(), !status.is_success()),
            Err(Probe::TimedOut) => (false, false),
            Err(Probe::Failed) => (false, true),
        };
        if ok && let Some(models) = self.fetch_models(replica).await {
            replica.set_models(models);
        }
        match self.registry.record_probe(replica, ok, down) {
            Some(true) => tracing::info!(replica = replica.name(), "replica healthy"),
            Some(false) => tracing::warn!(replica = replica.name(), "replica unhealthy"),
            None => {}
        }
    }

    async fn fetch_models(&self, replica: &Replica) -> Option<Vec<ModelCard>> {
        let (status, body) = self.get(replica, "/v1/models").await.ok()?;
        if !status.is_success() {
            return None;
        }
        parse_model_list(&body)
    }

    /// GET `path` on the replica, the whole exchange bounded by the probe timeout.
    async fn get(&self, replica: &Replica, path: &'static str) -> Result<(StatusCode, Bytes), Probe> {
        let uri = replica.url.join(&http::uri::PathAndQuery::from_static(path));
        let request = Request::builder()
            .method(Method::GET)
            .uri(uri)
            .body(Full::new(Bytes::new()))
            .expect("static request is valid");
        let exchange = async {
            let response = self.client.request(request).await.map_err(|_| Probe::Failed)?;
            let status = response.status();
            let body = Limited::new(response.into_body(), MAX_MODELS_BODY)
                .collect()
                .await
                .map_err(|_| Probe::Failed)?;
            Ok((status, body.to_bytes()))
        };
        tokio::time::timeout(self.config.timeout, exchange).await.unwrap_or(Err(Probe::TimedOut))
    }
}

/// Why a check got no answer.
enum Probe {
    TimedOut,
    /// Refused, reset, or not HTTP.
    Failed,
}

/// The cards of an OpenAI model list (`{"object": "list", "data": [{"id": ...}, ...]}`).
pub fn parse_model_list(body: &[u8]) -> Option<Vec<ModelCard>> {
    #[derive(serde::Deserialize)]
    struct List {
        data: Vec<serde_json::Value>,
    }
    let list: List = serde_json::from_slice(body).ok()?;
    Some(
        list.data
            .into_iter()
            .filter_map(|card| {
                let id = card.get("id")?.as_str()?.to_owned();
                Some(ModelCard { id, card })
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_vllm_model_list() {
        let body = br#"{"object":"list","data":[{"id":"Qwen/Qwen3-0.6B-FP8","object":"model","owned_by":"vllm","max_model_len":40960},{"id":"lora-a","object":"model","parent":"Qwen/Qwen3-0.6B-FP8"},{"object":"model"}]}"#;
        let cards = parse_model_list(body).unwrap();
        let ids: Vec<_> = cards.iter().map(|c| c.id.as_str()).collect();
        assert_eq!(ids, ["Qwen/Qwen3-0.6B-FP8", "lora-a"]);
        assert_eq!(cards[0].card["max_model_len"], 40960);
        assert!(parse_model_list(b"<html>").is_none());
    }
}
