//! vLLM's KV cache events, decoded from the wire, and what they mean for one replica's
//! memory.
//!
//! vLLM (`--kv-events-config '{"enable_kv_cache_events": true, "publisher": "zmq", ...}'`)
//! publishes on a ZMQ PUB socket multipart messages `[topic, sequence, payload]`: the
//! sequence an 8-byte big-endian counter, the payload a msgpack `EventBatch` (see
//! `vllm/distributed/kv_events.py`). Two encodings are in use and both are read here:
//!
//! - vLLM before the struct change (`array_like=True`): the batch is an array
//!   `[ts, events]` or `[ts, events, data_parallel_rank]`, each event an array whose
//!   first element is its tag: `["BlockStored", block_hashes, parent_block_hash,
//!   token_ids, block_size, lora_id, medium, ...]`, `["BlockRemoved", block_hashes,
//!   medium]`, `["AllBlocksCleared"]`;
//! - current vLLM (plain msgspec structs): the batch is a map `{ts, events,
//!   data_parallel_rank}`, each event a map with its tag in `type` and its fields by name.
//!
//! Fields after the ones we read (`lora_id`, `medium`, `lora_name`, `extra_keys`,
//! `group_idx`, ...) are ignored, and trailing fields msgspec leaves out as defaults may
//! be missing. Block hashes (`ExternalBlockHash`) are integers or bytes; they name
//! blocks within one engine only and are never compared with anything we compute.
//!
//! The index is keyed by the token ids the events carry: a stored block's key is xxh3 of
//! its `block_size` token ids seeded with its parent's key (0 for a block without a
//! parent), the chaining vLLM applies to its own hashes, so the same prompt tokens give
//! the same keys in the router (see [`token_block_keys`]). Each replica keeps a map from
//! its engine's hashes to our keys, to resolve parents and removals.

use std::collections::HashMap;

use rmpv::Value;
use xxhash_rust::xxh3::xxh3_64_with_seed;

use super::ReplicaBlocks;

/// One engine's name for a block: an integer, or bytes folded to 64 bits.
pub type EngineHash = u64;

/// A KV cache event, with the fields routing uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvEvent {
    /// Blocks now cached: consecutive blocks of `block_size` tokens, the first a child
    /// of `parent` (none for a prompt's first block).
    BlockStored {
        block_hashes: Vec<EngineHash>,
        parent: Option<EngineHash>,
        token_ids: Vec<u32>,
        block_size: usize,
    },
    /// Blocks evicted.
    BlockRemoved { block_hashes: Vec<EngineHash> },
    /// Everything evicted (cache reset, or an engine starting).
    AllBlocksCleared,
}

/// One decoded `EventBatch`.
#[derive(Debug, Clone, PartialEq)]
pub struct EventBatch {
    pub ts: f64,
    pub events: Vec<KvEvent>,
    pub data_parallel_rank: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("payload is not msgpack: {0}")]
    NotMsgpack(String),
    #[error("malformed event batch: {0}")]
    Malformed(&'static str),
}

/// Decode an `EventBatch` payload, in either encoding. Events of an unknown type are
/// skipped (a newer vLLM may add some); a known event with missing or mistyped fields
/// fails the whole batch, which the subscriber counts as a gap.
pub fn decode_batch(payload: &[u8]) -> Result<EventBatch, WireError> {
    let value =
        rmpv::decode::read_value(&mut &payload[..]).map_err(|e| WireError::NotMsgpack(e.to_string()))?;
    let (ts, events, rank) = match &value {
        Value::Array(items) => (items.first(), items.get(1), items.get(2)),
        Value::Map(_) => (field(&value, "ts"), field(&value, "events"), field(&value, "data_parallel_rank")),
        _ => return Err(WireError::Malformed("a batch is an array or a map")),
    };
    let ts = ts.and_then(Value::as_f64).ok_or(WireError::Malformed("batch without a numeric ts"))?;
    let Some(Value::Array(events)) = events else {
        return Err(WireError::Malformed("batch without an events array"));
    };
    let data_parallel_rank = rank.and_then(Value::as_i64);
    let mut decoded = Vec::with_capacity(events.len());
    for event in events {
        if let Some(event) = decode_event(event)? {
            decoded.push(event);
        }
    }
    Ok(EventBatch { ts, events: decoded, data_parallel_rank })
}

fn field<'a>(map: &'a Value, name: &str) -> Option<&'a Value> {
    match map {
        Value::Map(entries) => entries.iter().find(|(k, _)| k.as_str() == Some(name)).map(|(_, v)| v),
        _ => None,
    }
}

/// An event's fields by name, whichever encoding it came in.
struct Fields<'a> {
    value: &'a Value,
    /// For the array encoding: the field names in order after the tag.
    order: &'static [&'static str],
}

impl<'a> Fields<'a> {
    fn get(&self, name: &str) -> Option<&'a Value> {
        match self.value {
            Value::Array(items) => {
                let position = self.order.iter().position(|n| *n == name)?;
                items.get(position + 1).filter(|v| !matches!(v, Value::Nil))
            }
            map => field(map, name).filter(|v| !matches!(v, Value::Nil)),
        }
    }
}

const STORED: &[&str] = &["block_hashes", "parent_block_hash", "token_ids", "block_size"];
const REMOVED: &[&str] = &["block_hashes"];

fn decode_event(event: &Value) -> Result<Option<KvEvent>, WireError> {
    let tag = match event {
        Value::Array(items) => items.first().and_then(Value::as_str),
        map @ Value::Map(_) => field(map, "type").and_then(Value::as_str),
        _ => None,
    }
    .ok_or(WireError::Malformed("an event without a type tag"))?;
    Ok(Some(match tag {
        "BlockStored" => {
            let f = Fields { value: event, order: STORED };
            let block_hashes = hashes(f.get("block_hashes"))?;
            let parent = f.get("parent_block_hash").map(engine_hash).transpose()?;
            let token_ids = match f.get("token_ids") {
                Some(Value::Array(ids)) => ids
                    .iter()
                    .map(|id| id.as_u64().and_then(|id| u32::try_from(id).ok()))
                    .collect::<Option<Vec<u32>>>()
                    .ok_or(WireError::Malformed("token_ids are not token ids"))?,
                _ => return Err(WireError::Malformed("BlockStored without token_ids")),
            };
            let block_size = f
                .get("block_size")
                .and_then(Value::as_u64)
                .filter(|&n| n > 0)
                .ok_or(WireError::Malformed("BlockStored without a block_size"))?
                as usize;
            if token_ids.len() != block_hashes.len() * block_size {
                return Err(WireError::Malformed("BlockStored token_ids do not fill its blocks"));
            }
            KvEvent::BlockStored { block_hashes, parent, token_ids, block_size }
        }
        "BlockRemoved" => {
            let f = Fields { value: event, order: REMOVED };
            KvEvent::BlockRemoved { block_hashes: hashes(f.get("block_hashes"))? }
        }
        "AllBlocksCleared" => KvEvent::AllBlocksCleared,
        _ => return Ok(None),
    }))
}

fn hashes(value: Option<&Value>) -> Result<Vec<EngineHash>, WireError> {
    match value {
        Some(Value::Array(items)) => items.iter().map(engine_hash).collect(),
        _ => Err(WireError::Malformed("an event without block_hashes")),
    }
}

fn engine_hash(value: &Value) -> Result<EngineHash, WireError> {
    match value {
        Value::Integer(n) => n
            .as_u64()
            .or_else(|| n.as_i64().map(|i| i as u64))
            .ok_or(WireError::Malformed("a block hash out of range")),
        // vLLM's bytes hashes (sha256 and the like): any 64 bits of them name the block.
        Value::Binary(bytes) => Ok(xxh3_64_with_seed(bytes, 0)),
        _ => Err(WireError::Malformed("a block hash is an integer or bytes")),
    }
}

/// Our keys for consecutive blocks of `block_size` tokens, the first chained to `parent`
/// (0 for a prompt's start). Only whole blocks get keys, as the engine caches only those.
pub fn token_block_keys(tokens: &[u32], block_size: usize, parent: u64) -> Vec<u64> {
    let mut seed = parent;
    let mut bytes = Vec::with_capacity(block_size * 4);
    tokens
        .chunks_exact(block_size.max(1))
        .map(|block| {
            bytes.clear();
            bytes.extend(block.iter().flat_map(|t| t.to_le_bytes()));
            seed = xxh3_64_with_seed(&bytes, seed);
            seed
        })
        .collect()
}

/// What one replica's events say it holds: our keys in its [`ReplicaBlocks`], and the
/// engine's hashes mapped to them for parents and removals.
pub struct KvReplica {
    blocks: std::sync::Arc<ReplicaBlocks>,
    keys: HashMap<EngineHash, u64>,
    /// More engine hashes than this and the map is dropped whole (events were lost, or
    /// the engine never removes): the replica is then routed by load until it refills.
    max_keys: usize,
}

/// What applying an event changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Applied {
    pub stored: usize,
    pub removed: usize,
    /// A stored block whose parent we never saw (an event was missed): not indexed.
    pub orphans: usize,
}

impl KvReplica {
    pub fn new(blocks: std::sync::Arc<ReplicaBlocks>, max_keys: usize) -> Self {
        KvReplica { blocks, keys: HashMap::new(), max_keys }
    }

    pub fn apply(&mut self, event: &KvEvent, now: u64) -> Applied {
        let mut applied = Applied::default();
        match event {
            KvEvent::BlockStored { block_hashes, parent, token_ids, block_size } => {
                let parent_key = match parent {
                    None => Some(0),
                    Some(p) => self.keys.get(p).copied(),
                };
                let Some(parent_key) = parent_key else {
                    applied.orphans = block_hashes.len();
                    return applied;
                };
                let ours = token_block_keys(token_ids, *block_size, parent_key);
                for (engine, key) in block_hashes.iter().zip(&ours) {
                    self.keys.insert(*engine, *key);
                }
                self.blocks.remember(&ours, now);
                applied.stored = ours.len();
                if self.keys.len() > self.max_keys {
                    self.clear();
                }
            }
            KvEvent::BlockRemoved { block_hashes } => {
                let ours: Vec<u64> = block_hashes.iter().filter_map(|h| self.keys.remove(h)).collect();
                self.blocks.forget(&ours);
                applied.removed = ours.len();
            }
            KvEvent::AllBlocksCleared => {
                applied.removed = self.keys.len();
                self.clear();
            }
        }
        applied
    }

    /// Forget everything (cleared, restarted, or too far behind to trust).
    pub fn clear(&mut self) {
        self.keys.clear();
        self.blocks.clear();
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rmpv::Value as V;

    fn encode(value: &V) -> Vec<u8> {
        let mut out = Vec::new();
        rmpv::encode::write_value(&mut out, value).unwrap();
        out
    }

    fn ints(xs: &[u64]) -> V {
        V::Array(xs.iter().map(|&x| V::from(x)).collect())
    }

    fn stored_array(hashes: &[u64], parent: Option<u64>, tokens: &[u64], block_size: u64) -> V {
        V::Array(vec![
            V::from("BlockStored"),
            ints(hashes),
            parent.map_or(V::Nil, V::from),
            ints(tokens),
            V::from(block_size),
            V::Nil,
            V::Nil,
        ])
    }

    #[test]
    fn decodes_the_array_encoding() {
        let batch = V::Array(vec![
            V::F64(1.5),
            V::Array(vec![
                stored_array(&[11, 12], None, &[1, 2, 3, 4], 2),
                V::Array(vec![V::from("BlockRemoved"), ints(&[11]), V::Nil]),
                V::Array(vec![V::from("AllBlocksCleared")]),
            ]),
            V::from(0),
        ]);
        let decoded = decode_batch(&encode(&batch)).unwrap();
        assert_eq!(decoded.ts, 1.5);
        assert_eq!(decoded.data_parallel_rank, Some(0));
        assert_eq!(
            decoded.events,
            vec![
                KvEvent::BlockStored {
                    block_hashes: vec![11, 12],
                    parent: None,
                    token_ids: vec![1, 2, 3, 4],
                    block_size: 2
                },
                KvEvent::BlockRemoved { block_hashes: vec![11] },
                KvEvent::AllBlocksCleared,
            ]
        );
        // Without the rank (older vLLM), and with trailing defaults left out.
        let short = V::Array(vec![
            V::from(2),
            V::Array(vec![V::Array(vec![
                V::from("BlockStored"),
                ints(&[5]),
                V::from(4),
                ints(&[9, 9]),
                V::from(2),
            ])]),
        ]);
        let decoded = decode_batch(&encode(&short)).unwrap();
        assert_eq!(decoded.data_parallel_rank, None);
        assert!(matches!(decoded.events[0], KvEvent::BlockStored { parent: Some(4), .. }));
    }

    #[test]
    fn decodes_the_map_encoding_with_bytes_hashes() {
        let stored = V::Map(vec![
            (V::from("type"), V::from("BlockStored")),
            (V::from("block_hashes"), V::Array(vec![V::Binary(vec![7; 32])])),
            (V::from("parent_block_hash"), V::Nil),
            (V::from("token_ids"), ints(&[1, 2])),
            (V::from("block_size"), V::from(2)),
            (V::from("medium"), V::from("GPU")),
            (V::from("group_idx"), V::from(0)),
        ]);
        let unknown = V::Map(vec![(V::from("type"), V::from("SomethingNew"))]);
        let batch = V::Map(vec![
            (V::from("ts"), V::F64(3.0)),
            (V::from("events"), V::Array(vec![stored, unknown])),
            (V::from("data_parallel_rank"), V::from(1)),
        ]);
        let decoded = decode_batch(&encode(&batch)).unwrap();
        assert_eq!(decoded.events.len(), 1, "unknown event types are skipped");
        let KvEvent::BlockStored { block_hashes, .. } = &decoded.events[0] else { panic!() };
        assert_eq!(block_hashes, &vec![xxh3_64_with_seed(&[7; 32], 0)]);
    }

    #[test]
    fn malformed_batches_are_errors() {
        assert!(matches!(decode_batch(b""), Err(WireError::NotMsgpack(_))));
        assert!(decode_batch(&encode(&V::from(3))).is_err());
        assert!(decode_batch(&encode(&V::Array(vec![V::F64(1.0)]))).is_err());
        // token_ids that do not fill the blocks
        let bad = V::Array(vec![V::F64(1.0), V::Array(vec![stored_array(&[1, 2], None, &[1, 2, 3], 2)])]);
        assert!(decode_batch(&encode(&bad)).is_err());
    }

    #[test]
    fn stored_blocks_chain_by_tokens_and_removals_resolve() {
        let blocks = std::sync::Arc::new(ReplicaBlocks::new(1000));
        let mut replica = KvReplica::new(blocks.clone(), 1000);
        let prompt: Vec<u32> = (0..8).collect();
        // The engine stores the prompt in two events, the second a child of the first.
        let first = KvEvent::BlockStored {
            block_hashes: vec![100, 101],
            parent: None,
            token_ids: prompt[..4].to_vec(),
            block_size: 2,
        };
        let second = KvEvent::BlockStored {
            block_hashes: vec![102, 103],
            parent: Some(101),
            token_ids: prompt[4..].to_vec(),
            block_size: 2,
        };
        assert_eq!(replica.apply(&first, 0).stored, 2);
        assert_eq!(replica.apply(&second, 0).stored, 2);
        // The router computes the same keys from the prompt's tokens alone.
        let keys = token_block_keys(&prompt, 2, 0);
        assert_eq!(blocks.matched(&keys, 0, 1000), 4);
        // Removing the third block cuts the match there.
        assert_eq!(replica.apply(&KvEvent::BlockRemoved { block_hashes: vec![102, 999] }, 0).removed, 1);
        assert_eq!(blocks.matched(&keys, 0, 1000), 2);
        // A child of a block we never saw is not indexed.
        let orphan = KvEvent::BlockStored {
            block_hashes: vec![200],
            parent: Some(555),
            token_ids: vec![1, 1],
            block_size: 2,
        };
        assert_eq!(replica.apply(&orphan, 0).orphans, 1);
        replica.apply(&KvEvent::AllBlocksCleared, 0);
        assert!(replica.is_empty());
        assert_eq!(blocks.matched(&keys, 0, 1000), 0);
    }

    #[test]
    fn an_oversized_map_is_dropped_whole() {
        let blocks = std::sync::Arc::new(ReplicaBlocks::new(1000));
        let mut replica = KvReplica::new(blocks.clone(), 3);
        let e = KvEvent::BlockStored {
            block_hashes: vec![1, 2, 3, 4],
            parent: None,
            token_ids: vec![0; 4],
            block_size: 1,
        };
        replica.apply(&e, 0);
        assert!(replica.is_empty() && blocks.is_empty());
    }
}
