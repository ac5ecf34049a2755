//! The KV event feed on arbitrary publisher bytes: ZMTP messages taken from the
//! buffer as they arrive, each decoded as an event batch (see `fuzzing::kv_feed`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use llm_router::fuzzing;

fuzz_target!(|data: &[u8]| fuzzing::kv_feed(data));
