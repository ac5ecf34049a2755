//! vLLM's KV cache events, decoded from the wire.
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
//! Of `extra_keys` (per block, what vLLM hashed into it besides its tokens) only the
//! first block's is read: a prompt's first block carries its `cache_salt` there, and the
//! chain of keys of a salted prompt starts from that salt's root ([`cache_root`]), as the
//! router keys a salted request's prompt, so salted and unsalted blocks never match.
//! Other fields (`lora_id`, `medium`, `lora_name`, `group_idx`, ...) are skipped, and
//! trailing fields msgspec leaves out as defaults may be missing. Block hashes (`ExternalBlockHash`) are integers or bytes; they name
//! blocks within one engine only and are never compared with anything we compute.
//!
//! The payload comes from a peer we do not control, so it is read as a stream of
//! msgpack items straight into the few vectors routing keeps (token ids as `u32`, hashes
//! as `u64`), never as a tree of values: no count a peer announces reserves more than
//! the bytes left in the payload could fill, skipped values are walked without
//! recursion, and every number is checked (`block_size` must lie in
//! 1..=[`MAX_BLOCK_SIZE`], and the token ids must fill exactly the blocks announced).

use xxhash_rust::xxh3::xxh3_64_with_seed;

use super::msgpack::{Cursor, Item, NotMsgpack};

/// One engine's name for a block: an integer, or bytes folded to 64 bits.
pub type EngineHash = u64;

/// Largest `block_size` believed: vLLM's GPU blocks are 16 to 128 tokens (some
/// attention backends 256 or 512), its CPU blocks 128.
pub const MAX_BLOCK_SIZE: usize = 1024;

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
        /// Where the keys of a block without a parent start: [`cache_root`] of the first
        /// block's cache salt (0 without one).
        root: u64,
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
    NotMsgpack(&'static str),
    #[error("malformed event batch: {0}")]
    Malformed(&'static str),
}

impl From<NotMsgpack> for WireError {
    fn from(e: NotMsgpack) -> Self {
        WireError::NotMsgpack(e.0)
    }
}

/// Decode an `EventBatch` payload, in either encoding. Events of an unknown type are
/// skipped (a newer vLLM may add some); a known event with missing, mistyped or
/// out-of-range fields fails the whole batch.
pub fn decode_batch(payload: &[u8]) -> Result<EventBatch, WireError> {
    let mut c = Cursor::new(payload);
    let (mut ts, mut events, mut rank) = (None, None, None);
    match c.item()? {
        Item::Array(n) => {
            for i in 0..n {
                match i {
                    0 => ts = c.number()?,
                    1 => events = Some(decode_events(&mut c)?),
                    2 => rank = c.optional_int()?,
                    _ => c.skip_value()?,
                }
            }
        }
        Item::Map(n) => {
            for _ in 0..n {
                match c.str()? {
                    b"ts" => ts = c.number()?,
                    b"events" => events = Some(decode_events(&mut c)?),
                    b"data_parallel_rank" => rank = c.optional_int()?,
                    _ => c.skip_value()?,
                }
            }
        }
        _ => return Err(WireError::Malformed("a batch is an array or a map")),
    }
    let ts = ts.ok_or(WireError::Malformed("batch without a numeric ts"))?;
    let events = events.ok_or(WireError::Malformed("batch without an events array"))?;
    Ok(EventBatch { ts, events, data_parallel_rank: rank })
}

fn decode_events(c: &mut Cursor) -> Result<Vec<KvEvent>, WireError> {
    let Item::Array(n) = c.item()? else {
        return Err(WireError::Malformed("batch without an events array"));
    };
    let mut events = Vec::with_capacity(c.fit(n));
    for _ in 0..n {
        if let Some(event) = decode_event(c)? {
            events.push(event);
        }
    }
    Ok(events)
}

/// Field names in the array encoding's order, after the tag.
const STORED: &[&[u8]] = &[
    b"block_hashes",
    b"parent_block_hash",
    b"token_ids",
    b"block_size",
    b"lora_id",
    b"medium",
    b"lora_name",
    b"extra_keys",
];
const REMOVED: &[&[u8]] = &[b"block_hashes"];

fn decode_event<'a>(c: &mut Cursor<'a>) -> Result<Option<KvEvent>, WireError> {
    let mut fields = Fields::default();
    let tag = match c.item()? {
        Item::Array(0) => return Err(WireError::Malformed("an event without a type tag")),
        Item::Array(n) => {
            let tag = c.str()?;
            let order: &[&[u8]] = match tag {
                b"BlockStored" => STORED,
                b"BlockRemoved" => REMOVED,
                _ => &[],
            };
            for i in 1..n {
                match order.get(i - 1) {
                    Some(name) => fields.read(name, c)?,
                    None => c.skip_value()?,
                }
            }
            tag
        }
        Item::Map(n) => {
            let mut tag = None;
            for _ in 0..n {
                let name = c.str()?;
                if name == b"type" {
                    tag = Some(c.str()?);
                } else if STORED.contains(&name) {
                    fields.read(name, c)?;
                } else {
                    c.skip_value()?;
                }
            }
            tag.ok_or(WireError::Malformed("an event without a type tag"))?
        }
        _ => return Err(WireError::Malformed("an event is an array or a map")),
    };
    fields.into_event(tag)
}

/// The fields of one event as they are read, in whichever order they come. A field of
/// the wrong type is remembered, not raised, until the tag says whether it matters.
#[derive(Default)]
struct Fields<'a> {
    block_hashes: Option<Vec<EngineHash>>,
    parent: Option<EngineHash>,
    token_ids: Option<Vec<u32>>,
    block_size: Option<u64>,
    /// The first block's cache salt: the last string of its extra keys.
    salt: Option<&'a [u8]>,
    error: Option<WireError>,
}

impl<'a> Fields<'a> {
    fn read(&mut self, name: &[u8], c: &mut Cursor<'a>) -> Result<(), WireError> {
        let start = *c;
        let read = match name {
            b"block_hashes" => c.hashes().map(|h| self.block_hashes = h),
            b"parent_block_hash" => c.optional_hash().map(|h| self.parent = h),
            b"token_ids" => c.token_ids().map(|t| self.token_ids = t),
            b"block_size" => c.optional_uint().map(|n| self.block_size = n),
            b"extra_keys" => c.first_salt().map(|s| self.salt = s),
            _ => c.skip_value().map_err(WireError::from),
        };
        match read {
            Err(error @ WireError::Malformed(_)) => {
                // Step over the whole value from its start, so the next field is read
                // from the right place.
                *c = start;
                c.skip_value()?;
                self.error.get_or_insert(error);
                Ok(())
            }
            other => other,
        }
    }

    fn into_event(self, tag: &[u8]) -> Result<Option<KvEvent>, WireError> {
        let known = matches!(tag, b"BlockStored" | b"BlockRemoved" | b"AllBlocksCleared");
        if let (true, Some(error)) = (known, self.error) {
            return Err(error);
        }
        Ok(Some(match tag {
            b"BlockStored" => {
                let block_hashes =
                    self.block_hashes.ok_or(WireError::Malformed("an event without block_hashes"))?;
                let token_ids =
                    self.token_ids.ok_or(WireError::Malformed("BlockStored without token_ids"))?;
                let block_size =
                    self.block_size.ok_or(WireError::Malformed("BlockStored without a block_size"))?;
                let block_size = usize::try_from(block_size)
                    .ok()
                    .filter(|n| (1..=MAX_BLOCK_SIZE).contains(n))
                    .ok_or(WireError::Malformed("BlockStored with a block_size out of range"))?;
                if block_hashes.len().checked_mul(block_size) != Some(token_ids.len()) {
                    return Err(WireError::Malformed("BlockStored token_ids do not fill its blocks"));
                }
                let root = match self.salt {
                    Some(salt) => cache_root(Some(&String::from_utf8_lossy(salt))),
                    None => 0,
                };
                KvEvent::BlockStored { block_hashes, parent: self.parent, token_ids, block_size, root }
            }
            b"BlockRemoved" => KvEvent::BlockRemoved {
                block_hashes: self
                    .block_hashes
                    .ok_or(WireError::Malformed("an event without block_hashes"))?,
            },
            b"AllBlocksCleared" => KvEvent::AllBlocksCleared,
            _ => return Ok(None),
        }))
    }
}

impl<'a> Cursor<'a> {
    fn str(&mut self) -> Result<&'a [u8], WireError> {
        match self.item()? {
            Item::Str(s) => Ok(s),
            _ => Err(WireError::Malformed("expected a string")),
        }
    }

    fn number(&mut self) -> Result<Option<f64>, WireError> {
        Ok(match self.item()? {
            Item::Float(f) => Some(f),
            Item::Uint(n) => Some(n as f64),
            Item::Int(n) => Some(n as f64),
            Item::Nil => None,
            _ => return Err(WireError::Malformed("batch without a numeric ts")),
        })
    }

    fn optional_int(&mut self) -> Result<Option<i64>, WireError> {
        match self.item()? {
            Item::Nil => Ok(None),
            Item::Uint(n) => Ok(i64::try_from(n).ok()),
            Item::Int(n) => Ok(Some(n)),
            Item::Array(_) | Item::Map(_) => Err(WireError::Malformed("expected an integer")),
            _ => Ok(None),
        }
    }

    fn optional_uint(&mut self) -> Result<Option<u64>, WireError> {
        match self.item()? {
            Item::Nil => Ok(None),
            Item::Uint(n) => Ok(Some(n)),
            _ => Err(WireError::Malformed("BlockStored with a block_size out of range")),
        }
    }

    fn hash(item: Item) -> Result<EngineHash, WireError> {
        match item {
            Item::Uint(n) => Ok(n),
            Item::Int(n) => Ok(n as u64),
            // vLLM's bytes hashes (sha256 and the like): any 64 bits of them name the block.
            Item::Bin(bytes) => Ok(xxh3_64_with_seed(bytes, 0)),
            _ => Err(WireError::Malformed("a block hash is an integer or bytes")),
        }
    }

    fn optional_hash(&mut self) -> Result<Option<EngineHash>, WireError> {
        match self.item()? {
            Item::Nil => Ok(None),
            item => Self::hash(item).map(Some),
        }
    }

    fn hashes(&mut self) -> Result<Option<Vec<EngineHash>>, WireError> {
        let n = match self.item()? {
            Item::Nil => return Ok(None),
            Item::Array(n) => n,
            _ => return Err(WireError::Malformed("an event without block_hashes")),
        };
        let mut hashes = Vec::with_capacity(self.fit(n));
        for _ in 0..n {
            hashes.push(Self::hash(self.item()?)?);
        }
        Ok(Some(hashes))
    }

    /// The cache salt in `extra_keys` (one entry per block): the last string of the
    /// first block's entry, where vLLM puts it after any LoRA and multimodal keys. A shape
    /// not known here means no salt, not a bad event.
    fn first_salt(&mut self) -> Result<Option<&'a [u8]>, WireError> {
        let start = *self;
        let blocks = match self.item()? {
            Item::Array(n) => n,
            _ => {
                *self = start;
                self.skip_value()?;
                return Ok(None);
            }
        };
        let mut salt = None;
        for block in 0..blocks {
            let entry = *self;
            let keys = match self.item()? {
                Item::Array(n) if block == 0 => n,
                _ => {
                    *self = entry;
                    self.skip_value()?;
                    continue;
                }
            };
            for _ in 0..keys {
                let start = *self;
                match self.item()? {
                    Item::Str(s) => salt = Some(s),
                    _ => {
                        *self = start;
                        self.skip_value()?;
                    }
                }
            }
        }
        Ok(salt)
    }

    fn token_ids(&mut self) -> Result<Option<Vec<u32>>, WireError> {
        let n = match self.item()? {
            Item::Nil => return Ok(None),
            Item::Array(n) => n,
            _ => return Err(WireError::Malformed("BlockStored without token_ids")),
        };
        let mut ids = Vec::with_capacity(self.fit(n));
        for _ in 0..n {
            match self.item()? {
                Item::Uint(id) => ids.push(
                    u32::try_from(id).map_err(|_| WireError::Malformed("token_ids are not token ids"))?,
                ),
                _ => return Err(WireError::Malformed("token_ids are not token ids")),
            }
        }
        Ok(Some(ids))
    }
}

/// Where a prompt's chain of keys starts: 0, or for a request with vLLM's `cache_salt`
/// (whose first block the engine hashes with it) a root of that salt's own.
pub fn cache_root(salt: Option<&str>) -> u64 {
    salt.map_or(0, |salt| xxh3_64_with_seed(salt.as_bytes(), 0x73616c74) | 1)
}

/// Our keys for consecutive blocks of `block_size` tokens, the first chained to `parent`
/// (0 for a prompt's start). Only whole blocks get keys, as the engine caches only those.
pub fn token_block_keys(tokens: &[u32], block_size: usize, parent: u64) -> Vec<u64> {
    let block_size = block_size.clamp(1, MAX_BLOCK_SIZE);
    let mut seed = parent;
    let mut bytes = Vec::with_capacity(block_size * 4);
    tokens
        .chunks_exact(block_size)
        .map(|block| {
            bytes.clear();
            bytes.extend(block.iter().flat_map(|t| t.to_le_bytes()));
            seed = xxh3_64_with_seed(&bytes, seed);
            seed
        })
        .collect()
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

    fn batch(events: Vec<V>) -> Vec<u8> {
        encode(&V::Array(vec![V::F64(1.0), V::Array(events)]))
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
                    block_size: 2,
                    root: 0,
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
            (V::from("medium"), V::from("GPU")),
            (V::from("block_hashes"), V::Array(vec![V::Binary(vec![7; 32])])),
            (V::from("parent_block_hash"), V::Nil),
            (V::from("token_ids"), ints(&[1, 2])),
            (V::from("type"), V::from("BlockStored")),
            (V::from("block_size"), V::from(2)),
            (V::from("extra_keys"), V::Array(vec![V::Map(vec![(V::from(1), V::Array(vec![V::Nil]))])])),
            (V::from("group_idx"), V::from(0)),
        ]);
        let unknown = V::Map(vec![
            (V::from("type"), V::from("SomethingNew")),
            (V::from("token_ids"), V::from("not ids: fine for an unknown type")),
        ]);
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
    fn a_first_blocks_cache_salt_roots_its_keys() {
        let event = |extra: V| {
            V::Array(vec![
                V::from("BlockStored"),
                ints(&[5, 6]),
                V::Nil,
                ints(&[1, 2, 3, 4]),
                V::from(2),
                V::Nil,
                V::from("GPU"),
                V::Nil,
                extra,
            ])
        };
        let root = |extra: V| {
            let batch = V::Array(vec![V::F64(1.0), V::Array(vec![event(extra)])]);
            match &decode_batch(&encode(&batch)).unwrap().events[0] {
                KvEvent::BlockStored { root, .. } => *root,
                other => panic!("{other:?}"),
            }
        };
        // The salt is the last string of the first block's keys (after a LoRA's name).
        let salted = V::Array(vec![V::Array(vec![V::from("lora-x"), V::from("router-s")]), V::Nil]);
        assert_eq!(root(salted), cache_root(Some("router-s")));
        assert_ne!(cache_root(Some("router-s")), 0);
        assert_eq!(root(V::Nil), 0);
        assert_eq!(root(V::Array(vec![V::Nil, V::Nil])), 0);
        assert_eq!(root(V::Array(vec![V::Array(vec![V::Binary(vec![1, 2])])])), 0, "no string: no salt");
        // A shape not known is no salt, not a bad batch.
        assert_eq!(root(V::from(7)), 0);
        assert_eq!(root(V::Array(vec![V::Map(vec![])])), 0);
    }

    #[test]
    fn malformed_batches_are_errors() {
        assert!(matches!(decode_batch(b""), Err(WireError::NotMsgpack(_))));
        assert!(decode_batch(&encode(&V::from(3))).is_err());
        assert!(decode_batch(&encode(&V::Array(vec![V::F64(1.0)]))).is_err());
        // token_ids that do not fill the blocks
        assert!(decode_batch(&batch(vec![stored_array(&[1, 2], None, &[1, 2, 3], 2)])).is_err());
        // a token id beyond u32, a negative one
        assert!(decode_batch(&batch(vec![stored_array(&[1], None, &[1 << 40], 1)])).is_err());
        let negative = V::Array(vec![
            V::from("BlockStored"),
            ints(&[1]),
            V::Nil,
            V::Array(vec![V::from(-1)]),
            V::from(1),
        ]);
        assert!(decode_batch(&batch(vec![negative])).is_err());
    }

    #[test]
    fn absurd_block_sizes_are_refused_without_overflow() {
        // 2^60 tokens per block over 4 blocks wraps to 0 in unchecked arithmetic: the
        // check must not accept an empty token list for it.
        for size in [0u64, 1 << 60, u64::MAX, MAX_BLOCK_SIZE as u64 + 1] {
            let event = stored_array(&[1, 2, 3, 4], None, &[], size);
            assert_eq!(
                decode_batch(&batch(vec![event])),
                Err(WireError::Malformed("BlockStored with a block_size out of range")),
                "{size}"
            );
        }
        let ok = stored_array(&[1], None, &vec![3; MAX_BLOCK_SIZE], MAX_BLOCK_SIZE as u64);
        assert!(decode_batch(&batch(vec![ok])).is_ok());
    }

    #[test]
    fn announced_lengths_never_reserve_beyond_the_payload() {
        // An array announcing 2^32 - 1 elements with none following; a string announcing
        // 4 GB; a bin announcing 4 GB; a deep nest of arrays to skip.
        for payload in [
            vec![0xdd, 0xff, 0xff, 0xff, 0xff],
            vec![0x92, 0xcb, 0, 0, 0, 0, 0, 0, 0, 0, 0xdd, 0xff, 0xff, 0xff, 0xff],
            vec![0x81, 0xdb, 0xff, 0xff, 0xff, 0xff],
            vec![0x92, 0x01, 0x91, 0x92, 0xa5, b'X', b'X', b'X', b'X', b'X', 0xc6, 0xff, 0xff, 0xff, 0xff],
        ] {
            assert!(decode_batch(&payload).is_err(), "{payload:?}");
        }
        let mut nest = vec![0x92, 0x01, 0x91, 0x92, 0xa3, b'N', b'e', b'w'];
        nest.extend(std::iter::repeat_n(0x91, 100_000));
        nest.push(0xc0);
        let decoded = decode_batch(&nest).unwrap();
        assert!(decoded.events.is_empty(), "an unknown event's deep nest is skipped, iteratively");
    }

    #[test]
    fn keys_chain_and_ignore_the_tail() {
        let keys = token_block_keys(&[1, 2, 3, 4, 5], 2, 0);
        assert_eq!(keys.len(), 2);
        assert_eq!(keys[0], token_block_keys(&[1, 2], 2, 0)[0]);
        assert_ne!(keys[1], token_block_keys(&[3, 4], 2, 0)[0], "chained to the first block");
        assert_eq!(token_block_keys(&[1, 2], 0, 0).len(), 2, "a zero size is one token per block");
    }
}
