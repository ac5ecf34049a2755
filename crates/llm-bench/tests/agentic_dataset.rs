//! The study's agentic dataset, as `llm-bench` reads it: the file AIPerf 0.8.0 synthesizes
//! (`bench-scripts/agentic_dataset.sh`) has the study's checksum, and the statistics
//! `llm-bench dataset-stats` computes from it are the ones the study's `quality.json`
//! published (datasets/agentic_loop_2200s_seed42/quality.json in
//! anyscale/llm-direct-streaming-benchmarks), as is its cache structure (188 blocks shared by
//! every session, 20 groups sharing 125 more).
//!
//! The dataset is generated, not committed: CI runs the script first and sets
//! `REQUIRE_AGENTIC_DATASET=1`, so there a missing dataset fails the test. Elsewhere a
//! missing dataset is reported and the test passes without checking anything.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::process::Command;

use llm_bench::trace::{self, Distribution, TurnPrompt};
use serde_json::Value;

const SHA256: &str = "81147c2fcb71288abd4a329c6a074e4839a209404a483161d8da521752a9e045";

fn dataset() -> Option<PathBuf> {
    let path = std::env::var_os("AGENTIC_DATASET").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../..")
            .join("target/bench-data/agentic_loop_2200s_seed42/dataset.jsonl")
    });
    if path.exists() {
        return Some(path);
    }
    if std::env::var("REQUIRE_AGENTIC_DATASET").as_deref() == Ok("1") {
        panic!("{} is missing: run bench-scripts/agentic_dataset.sh", path.display());
    }
    eprintln!("skipped: {} is missing (bench-scripts/agentic_dataset.sh makes it)", path.display());
    None
}

/// Within `tolerance` of the published figure (quality.json rounds to two decimals; the
/// dataset rounds delays to one).
fn matches(name: &str, d: &Distribution, published: [f64; 4], tolerance: f64) {
    let [mean, median, p05, p99] = published;
    for (what, ours, theirs) in
        [("mean", d.mean, mean), ("median", d.median, median), ("p05", d.p05, p05), ("p99", d.p99, p99)]
    {
        assert!((ours - theirs).abs() <= tolerance, "{name} {what}: ours {ours}, the study's {theirs}");
    }
}

#[test]
fn the_dataset_is_the_studys_and_llm_bench_reads_it_as_published() {
    let Some(path) = dataset() else { return };
    let out = Command::new(env!("CARGO_BIN_EXE_llm-bench")).arg("dataset-stats").arg(&path).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stats: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(stats["sha256"], SHA256, "the study's checksum");
    assert_eq!((stats["sessions"].as_u64(), stats["turns"].as_u64()), (Some(2200), Some(44_000)));

    let sessions = trace::read_trace(std::fs::read(&path).unwrap().as_slice(), 64).unwrap();
    let s = trace::stats(&sessions);
    // quality.json, "observed": mean, median, p05, p99.
    matches("initial context", &s.initial_context, [24_943.89, 23_745.5, 20_838.85, 38_165.87], 0.006);
    matches("generation length", &s.generation_length, [231.37, 77.0, 30.0, 2_142.0], 0.006);
    matches("new tokens per turn", &s.new_tokens_per_turn, [1_044.81, 410.0, 29.0, 8_149.0], 0.006);
    matches("inter-turn delay (ms)", &s.inter_turn_delay_ms, [1_281.82, 1_288.04, 1_179.69, 1_371.99], 0.06);
    assert_eq!(
        (s.initial_context.count, s.new_tokens_per_turn.count, s.generation_length.count),
        (2200, 41_800, 44_000)
    );
    assert!(
        (s.initial_context.std - 3_962.62).abs() < 0.01 && (s.generation_length.std - 395.86).abs() < 0.01
    );
    assert_eq!((s.turns_per_session.mean, s.turns_per_session.std), (20.0, 0.0));

    // Cache structure (cache_structure.json: l1_blocks 188, l15_blocks 125, 20 groups):
    // the first 188 blocks of every session's first turn are the same; the next 125 are
    // shared within one of 20 groups; the rest of the trace is per session.
    let first: Vec<&Vec<u64>> = sessions
        .iter()
        .map(|s| match &s.turns[0].prompt {
            TurnPrompt::Blocks(ids) => ids,
            other => panic!("first turn without blocks: {other:?}"),
        })
        .collect();
    assert!(first.iter().all(|ids| ids[..188] == first[0][..188]), "a 188-block prefix shared by all");
    let groups: HashSet<&[u64]> = first.iter().map(|ids| &ids[188..313]).collect();
    assert_eq!(groups.len(), 20, "20 groups of 125 blocks");
    let mut users: HashMap<u64, usize> = HashMap::new();
    for ids in &first {
        for &id in &ids[313..] {
            *users.entry(id).or_default() += 1;
        }
    }
    assert!(users.values().all(|&n| n == 1), "the rest of each context is its own");

    // Replayed as AIPerf replays it (each turn resends the conversation so far with the
    // engine's answers, `output_length` tokens each), the study's first 512 sessions (its
    // c=64 slice) send prompts of about 37k tokens: AIPerf measured a mean ISL of 37,090.7
    // with Qwen3's tokenizer and chat template, which adds a few tokens per message. Our
    // count is message contents only (37,111).
    let c64 = trace::stats(&sessions[..512]);
    let isl = c64.replayed_prompt_tokens.mean;
    assert!((isl - 37_090.7).abs() < 0.01 * 37_090.7, "replayed mean ISL {isl}, AIPerf measured 37,090.7");
}
