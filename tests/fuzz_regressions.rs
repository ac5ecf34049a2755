//! Every input in fuzz/regressions/ (crashes the fuzzer found, and hand-written edge
//! cases) through the fuzz targets' code: none may panic again.

use std::path::Path;

fn replay(target: &str, run: fn(&[u8])) -> usize {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/regressions").join(target);
    let mut count = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        if std::panic::catch_unwind(|| run(&data)).is_err() {
            panic!("{} panics on {}", target, path.display());
        }
        count += 1;
    }
    count
}

#[test]
fn request_parsing_survives_every_recorded_input() {
    assert!(replay("request_parsing", llm_router::fuzzing::request_parsing) > 0);
}

#[test]
fn sse_framing_survives_every_recorded_input() {
    assert!(replay("sse_framing", llm_router::fuzzing::sse_framing) > 0);
}

#[test]
fn kv_feed_survives_every_recorded_input() {
    assert!(replay("kv_feed", llm_router::fuzzing::kv_feed) > 0);
}

#[test]
fn response_head_survives_every_recorded_input() {
    assert!(replay("response_head", llm_router::fuzzing::response_head) > 0);
}

#[test]
fn chunked_body_survives_every_recorded_input() {
    assert!(replay("chunked_body", llm_router::fuzzing::chunked_body) > 0);
}

#[test]
fn multipart_form_survives_every_recorded_input() {
    assert!(replay("multipart_form", llm_router::fuzzing::multipart_form) > 0);
}

#[test]
fn stop_strings_survives_every_recorded_input() {
    assert!(replay("stop_strings", llm_router::fuzzing::stop_strings) > 0);
}

#[test]
fn usage_shapes_survives_every_recorded_input() {
    assert!(replay("usage_shapes", llm_router::fuzzing::usage_shapes) > 0);
}

#[test]
fn h2_connection_survives_every_recorded_input() {
    assert!(replay("h2_connection", llm_router::fuzzing::h2_connection) > 0);
}
