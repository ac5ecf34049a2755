//! Prefill/decode disaggregation as vLLM's NixlConnector does it on the wire.
//!
//! A request whose `kv_transfer_params` has `do_remote_decode: true` is a prefill-stage
//! request: the engine computes the prompt, returns one token, and the response carries
//! the parameters a decode replica needs to pull the KV blocks (`do_remote_prefill`,
//! `remote_engine_id`, `remote_block_ids`, `remote_host`, `remote_port`,
//! `remote_request_id`, `tp_size`). A decode-stage request carrying valid parameters
//! skips the prefill and waits for the transfer instead (blocks not already in its own
//! prefix cache x bytes per block / `--kv-bandwidth`). Parameters that are missing, malformed, name an engine that is not
//! a simulator engine, or list the wrong number of blocks for the prompt are rejected:
//! the request falls back to a full local prefill and is counted.

use std::time::Duration;

use serde_json::{Value, json};

use super::kv_cache::BLOCK_SIZE;

/// What a request's `kv_transfer_params` ask of this replica.
#[derive(Debug, Clone, PartialEq)]
pub enum Handoff {
    /// No P/D involved.
    None,
    /// Prefill stage: compute the prompt, answer with transfer parameters.
    Prefill,
    /// Decode stage with valid parameters: pull `blocks` blocks instead of prefilling.
    Decode { blocks: usize },
    /// Decode stage whose parameters cannot be used; the reason is logged.
    Invalid(String),
}

pub fn engine_id(port: u16) -> String {
    format!(
        "sim-{:016x}",
        xxhash_rust::xxh3::xxh3_64(format!("{}:{port}:{}", std::process::id(), fastrand::u64(..)).as_bytes())
    )
}

fn is_sim_engine_id(id: &str) -> bool {
    id.strip_prefix("sim-").is_some_and(|hex| hex.len() == 16 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
}

pub fn classify(params: Option<&Value>, prompt_len: usize) -> Handoff {
    let Some(params) = params else { return Handoff::None };
    if params.get("do_remote_decode").and_then(Value::as_bool) == Some(true) {
        return Handoff::Prefill;
    }
    if params.get("do_remote_prefill").and_then(Value::as_bool) != Some(true) {
        return Handoff::None;
    }
    let engine = params.get("remote_engine_id").and_then(Value::as_str).unwrap_or("");
    if !is_sim_engine_id(engine) {
        return Handoff::Invalid(format!("unknown remote_engine_id `{engine}`"));
    }
    if params.get("remote_host").and_then(Value::as_str).is_none()
        || params.get("remote_port").and_then(Value::as_u64).is_none()
    {
        return Handoff::Invalid("remote_host and remote_port are required".into());
    }
    let Some(blocks) = params.get("remote_block_ids").and_then(Value::as_array) else {
        return Handoff::Invalid("remote_block_ids is required".into());
    };
    let expected = prompt_len.div_ceil(BLOCK_SIZE);
    if blocks.len() != expected {
        return Handoff::Invalid(format!(
            "remote_block_ids lists {} blocks, the prompt needs {expected}",
            blocks.len()
        ));
    }
    Handoff::Decode { blocks: blocks.len() }
}

/// The parameters a prefill replica returns for the decode stage.
pub fn prefill_response(engine_id: &str, host: &str, port: u16, request_id: &str, blocks: &[u32]) -> Value {
    json!({
        "do_remote_prefill": true,
        "do_remote_decode": false,
        "remote_engine_id": engine_id,
        "remote_block_ids": blocks,
        "remote_host": host,
        "remote_port": port,
        "remote_request_id": request_id,
        "tp_size": 1,
    })
}

/// Time to pull one KV block over the transfer link.
pub fn block_transfer_time(kv_bytes_per_token: f64, bandwidth: f64) -> Duration {
    Duration::from_secs_f64(BLOCK_SIZE as f64 * kv_bytes_per_token / bandwidth.max(1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_rejections() {
        let id = engine_id(8000);
        let params = prefill_response(&id, "127.0.0.1", 8000, "cmpl-1", &[4, 5, 6]);
        assert_eq!(classify(Some(&params), 40), Handoff::Decode { blocks: 3 });
        assert!(matches!(classify(Some(&params), 80), Handoff::Invalid(_)));
        let mut bad = params.clone();
        bad["remote_engine_id"] = json!("engine-from-elsewhere");
        assert!(matches!(classify(Some(&bad), 40), Handoff::Invalid(_)));
        assert_eq!(classify(Some(&json!({"do_remote_decode": true})), 40), Handoff::Prefill);
        assert_eq!(classify(None, 40), Handoff::None);
        let t = block_transfer_time(114_688.0, 50e9) * 1000;
        assert!((t.as_secs_f64() - 0.0367).abs() < 0.001, "{t:?}");
    }
}
