//! Request parsing and session-key extraction on arbitrary input: the body as the
//! ingress reads it (inference and other endpoints), the P/D rewrites of a body that
//! parsed, and the key from arbitrary headers. None may panic; what parses must be
//! consistent.
#![no_main]

use libfuzzer_sys::fuzz_target;
use llm_router::fuzzing;

fuzz_target!(|data: &[u8]| fuzzing::request_parsing(data));
