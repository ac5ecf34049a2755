//! The engine's KV cache events on the wire, as vLLM publishes them with
//! `--kv-events-config '{"enable_kv_cache_events": true, "publisher": "zmq", ...}'`.
//!
//! A ZMQ PUB socket bound on `--kv-events-port` sends one multipart message per engine
//! step that changed the cache: `[topic, sequence, payload]`, the sequence an 8-byte
//! big-endian counter from 0, the payload a msgpack `EventBatch` in the array encoding
//! (msgspec `array_like`, events tagged by their first element) with the field order of
//! vLLM 0.10/0.11's `vllm/distributed/kv_events.py`:
//! `[ts, [event, ...], data_parallel_rank]`, where an event is
//! `["BlockStored", block_hashes, parent_block_hash, token_ids, block_size, lora_id, medium]`,
//! `["BlockRemoved", block_hashes, medium]` or `["AllBlocksCleared"]`. Block hashes are
//! the engine's own 64-bit chained hashes, as integers; blocks are 16 tokens.
//!
//! The first batch is `AllBlocksCleared`: a subscriber that knew an earlier life of this
//! engine forgets it. Like vLLM's publisher, a subscriber that is slow or not connected
//! misses messages (PUB drops them); the sequence numbers show the gap.

use std::net::IpAddr;

use bytes::Bytes;
use rmpv::Value;
use tokio::sync::mpsc;
use zeromq::{Socket, SocketSend, ZmqMessage};

use super::kv_cache::{BLOCK_SIZE, CacheEvent};

/// Where and under which topic to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublisherConfig {
    /// 0 picks a free port.
    pub port: u16,
    pub topic: String,
}

/// A running publisher: the port it is bound to, and the engine's side of its queue.
pub struct Publisher {
    pub port: u16,
    pub events: mpsc::UnboundedSender<Vec<CacheEvent>>,
}

/// Bind the PUB socket and start sending what the engine queues.
pub async fn start(host: IpAddr, config: &PublisherConfig) -> std::io::Result<Publisher> {
    let mut socket = zeromq::PubSocket::new();
    let endpoint = socket
        .bind(&format!("tcp://{}:{}", host_text(host), config.port))
        .await
        .map_err(|e| std::io::Error::other(format!("binding the KV events socket: {e}")))?;
    let port = match endpoint {
        zeromq::Endpoint::Tcp(_, port) => port,
        other => return Err(std::io::Error::other(format!("unexpected KV events endpoint {other}"))),
    };
    let (events, mut rx) = mpsc::unbounded_channel::<Vec<CacheEvent>>();
    let topic = Bytes::from(config.topic.clone().into_bytes());
    tokio::spawn(async move {
        let mut sequence: u64 = 0;
        let mut batch = Some(vec![Value::Array(vec![Value::from("AllBlocksCleared")])]);
        loop {
            let events = match batch.take() {
                Some(events) => events,
                None => match rx.recv().await {
                    Some(events) => events.iter().map(encode_event).collect(),
                    None => return,
                },
            };
            let frames =
                vec![topic.clone(), Bytes::copy_from_slice(&sequence.to_be_bytes()), encode_batch(events)];
            let message = ZmqMessage::try_from(frames).expect("three frames");
            // PUB never blocks on subscribers; an error means the socket is gone.
            if socket.send(message).await.is_err() {
                return;
            }
            sequence += 1;
        }
    });
    Ok(Publisher { port, events })
}

fn host_text(host: IpAddr) -> String {
    match host {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("[{v6}]"),
    }
}

fn encode_batch(events: Vec<Value>) -> Bytes {
    let ts =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
    let batch = Value::Array(vec![Value::F64(ts), Value::Array(events), Value::from(0)]);
    let mut out = Vec::new();
    rmpv::encode::write_value(&mut out, &batch).expect("writing to a Vec cannot fail");
    Bytes::from(out)
}

fn hashes(hashes: &[u64]) -> Value {
    Value::Array(hashes.iter().map(|&h| Value::from(h)).collect())
}

fn encode_event(event: &CacheEvent) -> Value {
    match event {
        CacheEvent::Stored { hashes: h, parent, tokens, salt } => {
            let mut fields = vec![
                Value::from("BlockStored"),
                hashes(h),
                parent.map_or(Value::Nil, Value::from),
                Value::Array(tokens.iter().map(|&t| Value::from(t)).collect()),
                Value::from(BLOCK_SIZE as u64),
                Value::Nil,
                Value::from("GPU"),
            ];
            // vLLM's `lora_name`, then `extra_keys` (one entry per block): the first
            // block's carries the cache salt. Left out, as defaults, without one.
            if let Some(salt) = salt {
                let mut extra = vec![Value::Nil; h.len()];
                extra[0] = Value::Array(vec![Value::from(salt.as_str())]);
                fields.push(Value::Nil);
                fields.push(Value::Array(extra));
            }
            Value::Array(fields)
        }
        CacheEvent::Removed { hashes: h } => {
            Value::Array(vec![Value::from("BlockRemoved"), hashes(h), Value::from("GPU")])
        }
    }
}
