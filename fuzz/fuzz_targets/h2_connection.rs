//! An HTTP/2 client connection served as the router serves it, whatever frames the client sends.
#![no_main]

use libfuzzer_sys::fuzz_target;
use llm_router::fuzzing;

fuzz_target!(|data: &[u8]| fuzzing::h2_connection(data));
