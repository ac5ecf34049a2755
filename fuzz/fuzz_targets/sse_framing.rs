//! SSE framing on arbitrary bytes split at arbitrary points: the events it finds,
//! followed by what is left, must be exactly the input, whatever the split.
#![no_main]

use libfuzzer_sys::fuzz_target;
use llm_router::fuzzing;

fuzz_target!(|data: &[u8]| fuzzing::sse_framing(data));
