//! Stop strings searched at once against searching each: the same match, whatever the text.
#![no_main]

use libfuzzer_sys::fuzz_target;
use llm_router::fuzzing;

fuzz_target!(|data: &[u8]| fuzzing::stop_strings(data));
