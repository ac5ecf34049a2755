//! A multipart form's model field, from any bytes and any boundary.
#![no_main]

use libfuzzer_sys::fuzz_target;
use llm_router::fuzzing;

fuzz_target!(|data: &[u8]| fuzzing::multipart_form(data));
