//! Properties of the KV event decoder over generated inputs: whatever vLLM can encode
//! (either encoding, any field order in the map one, extra fields) decodes to what was
//! encoded; whatever bytes arrive, decoding never panics, and what it accepts obeys the
//! invariants routing relies on (block sizes in range, token ids filling their blocks,
//! nothing larger than the payload could carry).

use llm_router::policy::cache_index::kv_events::{KvEvent, MAX_BLOCK_SIZE, decode_batch};
use proptest::prelude::*;
use rmpv::Value as V;

fn encode(value: &V) -> Vec<u8> {
    let mut out = Vec::new();
    rmpv::encode::write_value(&mut out, value).unwrap();
    out
}

/// An event as vLLM sends it, and what the decoder must make of it.
#[derive(Debug, Clone)]
struct Case {
    hashes: Vec<u64>,
    parent: Option<u64>,
    tokens: Vec<u32>,
    block_size: usize,
    removed: bool,
}

fn case() -> impl Strategy<Value = Case> {
    (1usize..=64, 0usize..4, any::<Option<u64>>(), any::<bool>(), any::<u32>()).prop_map(
        |(block_size, blocks, parent, removed, seed)| {
            let hashes: Vec<u64> = (0..blocks as u64).map(|i| u64::from(seed).wrapping_mul(31) + i).collect();
            let tokens: Vec<u32> = (0..(blocks * block_size) as u32).map(|i| seed.wrapping_add(i)).collect();
            Case { hashes, parent, tokens, block_size, removed }
        },
    )
}

fn ints(xs: impl IntoIterator<Item = u64>) -> V {
    V::Array(xs.into_iter().map(V::from).collect())
}

fn as_array(c: &Case) -> V {
    if c.removed {
        return V::Array(vec![V::from("BlockRemoved"), ints(c.hashes.clone()), V::from("GPU")]);
    }
    V::Array(vec![
        V::from("BlockStored"),
        ints(c.hashes.clone()),
        c.parent.map_or(V::Nil, V::from),
        ints(c.tokens.iter().map(|&t| u64::from(t))),
        V::from(c.block_size as u64),
        V::Nil,
        V::from("GPU"),
        V::from("extra field"),
    ])
}

fn as_map(c: &Case, rotate: usize) -> V {
    let mut fields = if c.removed {
        vec![(V::from("type"), V::from("BlockRemoved")), (V::from("block_hashes"), ints(c.hashes.clone()))]
    } else {
        vec![
            (V::from("type"), V::from("BlockStored")),
            (V::from("block_hashes"), ints(c.hashes.clone())),
            (V::from("parent_block_hash"), c.parent.map_or(V::Nil, V::from)),
            (V::from("token_ids"), ints(c.tokens.iter().map(|&t| u64::from(t)))),
            (V::from("block_size"), V::from(c.block_size as u64)),
            (V::from("lora_name"), V::Nil),
            (V::from("extra_keys"), V::Array(vec![V::Array(vec![V::from(1), V::from("x")])])),
        ]
    };
    let n = fields.len();
    fields.rotate_left(rotate % n);
    V::Map(fields)
}

/// The event decoded from `c`; the map encoding's first block carries the cache salt
/// `x` in its extra keys, which roots its keys.
fn expected(c: &Case, map: bool) -> KvEvent {
    if c.removed {
        KvEvent::BlockRemoved { block_hashes: c.hashes.clone() }
    } else {
        KvEvent::BlockStored {
            block_hashes: c.hashes.clone(),
            parent: c.parent,
            token_ids: c.tokens.clone(),
            block_size: c.block_size,
            root: if map { llm_router::policy::cache_index::kv_events::cache_root(Some("x")) } else { 0 },
        }
    }
}

/// What any accepted batch must satisfy.
fn check_invariants(payload: &[u8]) {
    let Ok(batch) = decode_batch(payload) else { return };
    let mut carried = 0usize;
    for event in &batch.events {
        match event {
            KvEvent::BlockStored { block_hashes, token_ids, block_size, .. } => {
                assert!((1..=MAX_BLOCK_SIZE).contains(block_size));
                assert_eq!(token_ids.len(), block_hashes.len() * block_size);
                carried += token_ids.len() + block_hashes.len();
            }
            KvEvent::BlockRemoved { block_hashes } => carried += block_hashes.len(),
            KvEvent::AllBlocksCleared => {}
        }
    }
    // Every id and hash took at least one byte of the payload.
    assert!(carried <= payload.len());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn what_vllm_encodes_decodes_to_the_same_events(
        cases in prop::collection::vec(case(), 0..6),
        map in any::<bool>(),
        rotate in 0usize..8,
        rank in any::<Option<i32>>(),
    ) {
        let events: Vec<V> = cases.iter().map(|c| if map { as_map(c, rotate) } else { as_array(c) }).collect();
        let rank_value = rank.map_or(V::Nil, |r| V::from(i64::from(r)));
        let batch = if map {
            V::Map(vec![
                (V::from("events"), V::Array(events)),
                (V::from("data_parallel_rank"), rank_value),
                (V::from("ts"), V::F64(12.5)),
            ])
        } else {
            V::Array(vec![V::F64(12.5), V::Array(events), rank_value])
        };
        let decoded = decode_batch(&encode(&batch)).unwrap();
        prop_assert_eq!(decoded.ts, 12.5);
        prop_assert_eq!(decoded.data_parallel_rank, rank.map(i64::from));
        prop_assert_eq!(decoded.events, cases.iter().map(|c| expected(c, map)).collect::<Vec<_>>());
    }

    #[test]
    fn any_bytes_decode_or_fail_without_panicking(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        check_invariants(&bytes);
    }

    #[test]
    fn damaged_batches_never_break_the_invariants(
        cases in prop::collection::vec(case(), 1..4),
        cut in any::<prop::sample::Index>(),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
    ) {
        let events: Vec<V> = cases.iter().map(as_array).collect();
        let mut payload = encode(&V::Array(vec![V::F64(1.0), V::Array(events)]));
        for (at, byte) in flips {
            let i = at.index(payload.len());
            payload[i] ^= byte;
        }
        check_invariants(&payload);
        let cut = cut.index(payload.len() + 1);
        check_invariants(&payload[..cut]);
    }

    #[test]
    fn block_sizes_out_of_range_are_refused(size in prop_oneof![Just(0u64), (MAX_BLOCK_SIZE as u64 + 1)..], blocks in 0usize..5) {
        let c = Case { hashes: (0..blocks as u64).collect(), parent: None, tokens: Vec::new(), block_size: 1, removed: false };
        let mut event = as_array(&c);
        if let V::Array(fields) = &mut event {
            fields[4] = V::from(size);
        }
        let payload = encode(&V::Array(vec![V::F64(1.0), V::Array(vec![event])]));
        prop_assert!(decode_batch(&payload).is_err());
    }
}
