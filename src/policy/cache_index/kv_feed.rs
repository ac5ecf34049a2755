//! The subscriber side of vLLM's KV events: one task per replica keeps that replica's
//! memory in the [`CacheIndex`] in step with what its engine reports.
//!
//! Each task connects a ZMQ SUB socket to the replica's endpoint
//! (`--kv-events-endpoint REPLICA=tcp://HOST:PORT`, or `--kv-events-port N` meaning
//! `tcp://{replica host}:N`), subscribes to `--kv-events-topic`, and applies each
//! batch ([`super::kv_events`]). What can go wrong degrades to routing by load, never
//! to an error:
//! - a sequence gap (PUB drops messages for slow subscribers): the missed batches are
//!   fetched from the replica's replay endpoint (`--kv-events-replay-endpoint
//!   REPLICA=tcp://HOST:PORT` or `--kv-events-replay-port`, vLLM's
//!   `replay_endpoint`: a DEALER sends `[b"", start sequence]`, the engine answers
//!   `[b"", topic, sequence, payload]` per buffered batch (`[b"", sequence, payload]`
//!   before vLLM added the topic) and ends with sequence -1); without one, or if
//!   the replay does not cover the gap, the replica's memory is forgotten;
//! - the sequence starting again (the engine restarted) or `AllBlocksCleared`: forgotten;
//! - the connection lost: forgotten, and the task reconnects with back-off;
//! - silence: requests bringing the replica prompt blocks it was not believed to hold
//!   were routed to it `--kv-events-silence` ago and no events followed (the engine
//!   stopped publishing, or we are cut off): forgotten. An idle engine publishes
//!   nothing, nor does one served a prompt it held whole, and that is not silence.
//!
//! A replica that joined late is caught up from the replay endpoint's buffer when there
//! is one. The set of tasks follows the registry's replicas ([`KvFeeds::follow`]).
//!
//! The publisher is not trusted. The transport ([`super::zmtp`]) bounds every frame and
//! message (`--kv-events-max-message-bytes`) and closes a connection that breaks a bound
//! (counted in `router_kv_feed_errors_total`, then reconnected with back-off); the
//! decoder ([`super::kv_events`]) checks every count and number, and a batch it cannot
//! read is counted as `dropped` and forgets the replica's memory (its events are lost);
//! a replay is bounded in time. Each replica's feed runs under a supervisor that
//! restarts it, with back-off, if it ever ends: one bad publisher costs at most the
//! cache-aware routing of its own replica.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::task::JoinHandle;

use super::kv_events::{KvEvent, decode_batch};
use super::kv_replica::{Applied, KvReplica};
use super::zmtp::{Connection, Limits, SocketType, ZmtpError};
use super::{CacheIndex, ReplicaBlocks};
use crate::metrics::Metrics;

/// Where each replica publishes, and how to judge the feed.
#[derive(Debug, Clone, PartialEq)]
pub struct FeedConfig {
    /// Explicit endpoints by replica name (`http://host:port`).
    pub endpoints: Vec<(String, String)>,
    /// For replicas without an explicit endpoint: `tcp://{replica host}:{port}`.
    pub port: Option<u16>,
    /// Explicit replay endpoints by replica name.
    pub replay_endpoints: Vec<(String, String)>,
    /// For replicas without an explicit replay endpoint: the port on the replica's host,
    /// if the engines have one.
    pub replay_port: Option<u16>,
    pub topic: String,
    pub silence: Duration,
    /// Engine block hashes remembered per replica before the map is dropped whole.
    pub max_blocks: usize,
    /// Bounds on what a publisher may send.
    pub limits: Limits,
}

impl FeedConfig {
    /// The events endpoint of a replica, if it has one.
    pub fn endpoint(&self, replica: &str) -> Option<String> {
        if let Some((_, endpoint)) = self.endpoints.iter().find(|(name, _)| name == replica) {
            return Some(endpoint.clone());
        }
        self.port.and_then(|port| Some(format!("tcp://{}:{port}", host_of(replica)?)))
    }

    pub fn replay_endpoint(&self, replica: &str) -> Option<String> {
        if let Some((_, endpoint)) = self.replay_endpoints.iter().find(|(name, _)| name == replica) {
            return Some(endpoint.clone());
        }
        self.replay_port.and_then(|port| Some(format!("tcp://{}:{port}", host_of(replica)?)))
    }
}

fn host_of(replica: &str) -> Option<String> {
    let uri: http::Uri = replica.parse().ok()?;
    let host = uri.host()?;
    Some(if host == "localhost" { "127.0.0.1".to_owned() } else { host.to_owned() })
}

/// The running subscriptions, one per replica that has an endpoint.
pub struct KvFeeds {
    config: FeedConfig,
    index: Arc<CacheIndex>,
    metrics: Arc<Metrics>,
    running: Mutex<HashMap<String, JoinHandle<()>>>,
}

impl KvFeeds {
    pub fn new(config: FeedConfig, index: Arc<CacheIndex>, metrics: Arc<Metrics>) -> Self {
        KvFeeds { config, index, metrics, running: Mutex::new(HashMap::new()) }
    }

    /// Subscribe to exactly these replicas: new ones start, gone ones stop. Must be
    /// called within the runtime.
    pub fn follow(&self, replicas: &[String]) {
        let mut running = self.running.lock().expect("kv feeds lock");
        running.retain(|name, task| {
            let keep = replicas.contains(name);
            if !keep {
                task.abort();
            }
            keep
        });
        for name in replicas {
            if running.contains_key(name) {
                continue;
            }
            let Some(endpoint) = self.config.endpoint(name) else {
                tracing::warn!(replica = %name, "no KV events endpoint: this replica is routed by load only");
                continue;
            };
            let feed = FeedSpec {
                replica: name.clone(),
                endpoint,
                replay: self.config.replay_endpoint(name),
                config: self.config.clone(),
                index: self.index.clone(),
                metrics: self.metrics.clone(),
            };
            self.metrics.add_kv_feed(name);
            running.insert(name.clone(), tokio::spawn(supervise(feed)));
        }
    }

    /// Replicas with a running subscription.
    pub fn replicas(&self) -> Vec<String> {
        self.running.lock().expect("kv feeds lock").keys().cloned().collect()
    }
}

impl Drop for KvFeeds {
    fn drop(&mut self) {
        for task in self.running.lock().expect("kv feeds lock").values() {
            task.abort();
        }
    }
}

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait for one replayed message, and for a whole replay.
const REPLAY_TIMEOUT: Duration = Duration::from_secs(2);
const REPLAY_DEADLINE: Duration = Duration::from_secs(10);
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// A feed that ran this long before it ended starts again without delay.
const STEADY: Duration = Duration::from_secs(60);
const END_OF_REPLAY: [u8; 8] = [0xff; 8];

/// What a replica's feed is made from, kept to make it again.
struct FeedSpec {
    replica: String,
    endpoint: String,
    replay: Option<String>,
    config: FeedConfig,
    index: Arc<CacheIndex>,
    metrics: Arc<Metrics>,
}

impl FeedSpec {
    fn feed(&self) -> Feed {
        let memory = self.index.memory(&self.replica);
        Feed {
            replica: self.replica.clone(),
            endpoint: self.endpoint.clone(),
            replay: self.replay.clone(),
            topic: self.config.topic.clone(),
            silence: self.config.silence,
            limits: self.config.limits,
            state: KvReplica::new(memory.clone(), self.config.max_blocks),
            memory,
            index: self.index.clone(),
            metrics: self.metrics.clone(),
        }
    }
}

/// Run the replica's feed, and run it again whenever it ends (it only ends by a bug: a
/// panic), with back-off, forgetting what the failed run had indexed.
async fn supervise(spec: FeedSpec) {
    let mut backoff = MIN_BACKOFF;
    loop {
        let started = Instant::now();
        let mut run = AbortOnDrop(tokio::spawn(spec.feed().run()));
        let ended = (&mut run.0).await;
        spec.index.memory(&spec.replica).clear();
        spec.metrics.kv_feed_errors.with_label_values(&[&spec.replica, "restart"]).inc();
        match ended {
            Err(error) if error.is_panic() => {
                tracing::error!(replica = %spec.replica, "KV events feed failed; restarting it");
            }
            _ => tracing::warn!(replica = %spec.replica, "KV events feed ended; restarting it"),
        }
        if started.elapsed() > STEADY {
            backoff = MIN_BACKOFF;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// A task aborted when its handle is dropped (the supervisor's own abort reaches it).
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

struct Feed {
    replica: String,
    endpoint: String,
    replay: Option<String>,
    topic: String,
    silence: Duration,
    limits: Limits,
    memory: Arc<ReplicaBlocks>,
    state: KvReplica,
    index: Arc<CacheIndex>,
    metrics: Arc<Metrics>,
}

impl Feed {
    async fn run(mut self) {
        let connected = self.metrics.kv_events_connected.with_label_values(&[&self.replica]);
        let mut backoff = MIN_BACKOFF;
        loop {
            let mut connection = match self.subscribe().await {
                Ok(connection) => connection,
                Err(error) => {
                    tracing::debug!(replica = %self.replica, %error, "KV events connect failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    continue;
                }
            };
            connected.set(1);
            tracing::info!(replica = %self.replica, endpoint = %self.endpoint, "subscribed to KV events");
            let error = self.receive(&mut connection).await;
            connected.set(0);
            self.count_error(&error);
            self.reset("disconnect");
            tracing::warn!(replica = %self.replica, %error, "KV events connection lost; routing this replica by load");
            // A peer that breaks the protocol is not reconnected to at once.
            if !matches!(error, ZmtpError::Closed | ZmtpError::Io(_)) {
                backoff = (backoff * 2).min(MAX_BACKOFF);
            } else {
                backoff = MIN_BACKOFF;
            }
            tokio::time::sleep(backoff).await;
        }
    }

    async fn subscribe(&self) -> Result<Connection, ZmtpError> {
        let mut connection =
            Connection::connect(&self.endpoint, SocketType::Sub, self.limits, CONNECT_TIMEOUT).await?;
        connection.subscribe(self.topic.as_bytes()).await?;
        Ok(connection)
    }

    fn count_error(&self, error: &ZmtpError) {
        self.metrics.kv_feed_errors.with_label_values(&[&self.replica, error.kind()]).inc();
    }

    /// Apply batches until the connection fails; the failure.
    async fn receive(&mut self, connection: &mut Connection) -> ZmtpError {
        let mut last: Option<u64> = None;
        loop {
            let frames = match tokio::time::timeout(self.silence, connection.recv()).await {
                Err(_) => {
                    if self.memory.silent_since_routed(self.index.now(), self.silence.as_millis() as u64) {
                        self.reset("silence");
                    }
                    continue;
                }
                Ok(Err(error)) => return error,
                Ok(Ok(frames)) => frames,
            };
            let Some((sequence, payload)) = sequenced(&frames) else {
                self.count_batch("dropped");
                continue;
            };
            match last {
                Some(previous) if sequence <= previous => self.reset("restart"),
                Some(previous) if sequence > previous.saturating_add(1) => {
                    self.metrics.kv_event_gaps.with_label_values(&[&self.replica]).inc();
                    if !self.replay(previous + 1, sequence).await {
                        self.reset("gap");
                    }
                }
                // Joined mid-stream: catch up on what the engine still buffers.
                None if sequence > 0 => {
                    self.replay(0, sequence).await;
                }
                _ => {}
            }
            last = Some(sequence);
            self.apply(payload, "applied");
        }
    }

    /// Fetch and apply batches `from..until` from the replay endpoint; true when all of
    /// them came (within [`REPLAY_DEADLINE`]).
    async fn replay(&mut self, from: u64, until: u64) -> bool {
        let Some(endpoint) = self.replay.clone() else { return false };
        let replayed = tokio::time::timeout(REPLAY_DEADLINE, async {
            let mut dealer =
                Connection::connect(&endpoint, SocketType::Dealer, self.limits, REPLAY_TIMEOUT).await.ok()?;
            dealer.send(&[b"", &from.to_be_bytes()]).await.ok()?;
            let mut next = from;
            while let Ok(Ok(mut frames)) = tokio::time::timeout(REPLAY_TIMEOUT, dealer.recv()).await {
                if frames.first().is_some_and(|f| f.is_empty()) {
                    frames.remove(0);
                }
                if frames.iter().rev().nth(1).is_some_and(|seq| seq[..] == END_OF_REPLAY) {
                    break;
                }
                let Some((sequence, payload)) = sequenced(&frames) else { continue };
                if sequence == next && sequence < until {
                    self.apply(payload, "replayed");
                    next += 1;
                }
            }
            Some(next >= until)
        })
        .await;
        matches!(replayed, Ok(Some(true)))
    }

    fn apply(&mut self, payload: &Bytes, outcome: &str) {
        self.memory.note_events();
        let batch = match decode_batch(payload) {
            Ok(batch) => batch,
            Err(error) => {
                tracing::debug!(replica = %self.replica, %error, "undecodable KV event batch");
                self.count_batch("dropped");
                self.reset("malformed");
                return;
            }
        };
        self.count_batch(outcome);
        let now = self.index.now();
        let mut total = Applied::default();
        for event in &batch.events {
            if matches!(event, KvEvent::AllBlocksCleared) {
                self.reset("cleared");
                continue;
            }
            let applied = self.state.apply(event, now);
            if applied.resized {
                self.count_reset("block_size");
            }
            if applied.oversize {
                self.count_reset("oversize");
            }
            total.stored += applied.stored;
            total.removed += applied.removed;
            total.orphans += applied.orphans;
        }
        let blocks = |kind: &str, n: usize| {
            if n > 0 {
                self.metrics.kv_event_blocks.with_label_values(&[&self.replica, kind]).inc_by(n as u64);
            }
        };
        blocks("stored", total.stored);
        blocks("removed", total.removed);
        blocks("orphaned", total.orphans);
    }

    fn reset(&mut self, reason: &str) {
        self.state.clear();
        self.memory.note_events();
        self.count_reset(reason);
    }

    fn count_reset(&self, reason: &str) {
        self.metrics.kv_index_resets.with_label_values(&[&self.replica, reason]).inc();
    }

    fn count_batch(&self, outcome: &str) {
        self.metrics.kv_event_batches.with_label_values(&[&self.replica, outcome]).inc();
    }
}

/// `(sequence, payload)` of `[topic, sequence, payload]` or `[sequence, payload]`.
fn sequenced(frames: &[Bytes]) -> Option<(u64, &Bytes)> {
    let [.., sequence, payload] = frames else { return None };
    let sequence: [u8; 8] = sequence[..].try_into().ok()?;
    Some((u64::from_be_bytes(sequence), payload))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_by_name_or_port() {
        let config = FeedConfig {
            endpoints: vec![("http://a:8000".into(), "tcp://10.0.0.9:7000".into())],
            port: Some(5557),
            replay_endpoints: vec![("http://a:8000".into(), "tcp://10.0.0.9:7001".into())],
            replay_port: Some(5558),
            topic: String::new(),
            silence: Duration::from_secs(30),
            max_blocks: 10,
            limits: Limits::default(),
        };
        assert_eq!(config.endpoint("http://a:8000").unwrap(), "tcp://10.0.0.9:7000");
        assert_eq!(config.endpoint("http://b.svc:8000").unwrap(), "tcp://b.svc:5557");
        assert_eq!(config.endpoint("http://localhost:8000").unwrap(), "tcp://127.0.0.1:5557");
        assert_eq!(config.replay_endpoint("http://b:1").unwrap(), "tcp://b:5558");
        assert_eq!(config.replay_endpoint("http://a:8000").unwrap(), "tcp://10.0.0.9:7001");
        let none = FeedConfig { port: None, ..config };
        assert_eq!(none.endpoint("http://b:8000"), None);
    }

    #[test]
    fn sequences_with_and_without_topic() {
        let seq = Bytes::copy_from_slice(&7u64.to_be_bytes());
        let payload = Bytes::from_static(b"x");
        assert_eq!(sequenced(&[Bytes::new(), seq.clone(), payload.clone()]).unwrap().0, 7);
        assert_eq!(sequenced(&[seq, payload.clone()]).unwrap().0, 7);
        assert!(sequenced(&[payload.clone(), payload]).is_none());
    }
}
