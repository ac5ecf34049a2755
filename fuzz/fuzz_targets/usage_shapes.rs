//! The usage read from the end of any response body, in every shape the engines write.
#![no_main]

use libfuzzer_sys::fuzz_target;
use llm_router::fuzzing;

fuzz_target!(|data: &[u8]| fuzzing::usage_shapes(data));
