//! See `fuzzing::chunked_body`: arbitrary bytes through the relay's reading of a replica's
//! response, which must never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use llm_router::fuzzing;

fuzz_target!(|data: &[u8]| fuzzing::chunked_body(data));
