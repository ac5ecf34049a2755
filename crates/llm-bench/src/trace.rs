//! The agentic workload: an AIPerf "mooncake trace" (JSONL) replayed session by session,
//! as AIPerf 0.8.0 replays it (`--custom-dataset-type mooncake_trace`).
//!
//! Each row is one turn: `input_length` new prompt tokens, described as `hash_ids` of
//! `--isl-block-size` (64) token blocks, `output_length` tokens to generate, and for turns
//! after a session's first a `delay` in milliseconds after the previous response. Rows with
//! the same `session_id` form a session, in file order; a row without one is a session of
//! its own. A hash id always stands for the same block of text ([`super::text::hash_block`]),
//! so prefixes the trace shares between sessions are shared on the wire too; the last block
//! of a turn is cut to what remains of `input_length` (AIPerf's rule). A row may carry its
//! prompt as `text_input` instead; rows without either get random text of their length.
//!
//! The study's dataset (`bench-scripts/agentic_dataset.sh`: 2200 sessions of 20 turns, a
//! 12k-token prefix shared by all, 8k shared within 20 groups) is the one this project
//! benchmarks with. Its statistics, as AIPerf's `quality.json` reports them, come from
//! [`stats`].

use std::collections::HashMap;
use std::io::BufRead;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// AIPerf's default block size for hash ids (`--isl-block-size`).
pub const DEFAULT_BLOCK_SIZE: usize = 64;

/// One turn of a session.
#[derive(Debug, Clone, PartialEq)]
pub struct TraceTurn {
    /// Wait after the previous response before sending (zero for a session's first turn).
    pub delay: Duration,
    /// New prompt tokens this turn adds.
    pub input_length: usize,
    /// Tokens to generate (`max_completion_tokens`, with `ignore_eos`).
    pub output_length: usize,
    pub prompt: TurnPrompt,
}

/// Where a turn's new text comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum TurnPrompt {
    /// Blocks named by hash id.
    Blocks(Vec<u64>),
    /// Literal text from the trace.
    Text(String),
    /// Random text of `input_length` tokens, unique to the turn.
    Random,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TraceSession {
    pub session_id: String,
    pub turns: Vec<TraceTurn>,
}

#[derive(Deserialize)]
struct Row {
    session_id: Option<String>,
    input_length: Option<usize>,
    output_length: Option<usize>,
    #[serde(default)]
    hash_ids: Vec<u64>,
    /// Milliseconds.
    delay: Option<f64>,
    text_input: Option<String>,
    messages: Option<serde::de::IgnoredAny>,
}

/// Read a trace: sessions in the order their first row appears, turns in file order.
pub fn read_trace(input: impl BufRead, block_size: usize) -> Result<Vec<TraceSession>, String> {
    let mut sessions: Vec<TraceSession> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    for (n, line) in input.lines().enumerate() {
        let line_no = n + 1;
        let line = line.map_err(|e| format!("reading line {line_no}: {e}"))?;
        if line.trim().is_empty() {
            continue;
        }
        let row: Row =
            serde_json::from_str(&line).map_err(|e| format!("line {line_no}: not a trace row: {e}"))?;
        let turn = turn_of(row_checked(&row, line_no, block_size)?, &row);
        let id = row.session_id.unwrap_or_else(|| format!("trace-row-{line_no}"));
        match index.get(&id) {
            Some(&i) => sessions[i].turns.push(turn),
            None => {
                index.insert(id.clone(), sessions.len());
                sessions.push(TraceSession { session_id: id, turns: vec![turn] });
            }
        }
    }
    if sessions.is_empty() {
        return Err("the trace has no rows".into());
    }
    Ok(sessions)
}

/// The row's input length, once the row is known to be replayable.
fn row_checked(row: &Row, line: usize, block_size: usize) -> Result<usize, String> {
    if row.messages.is_some() {
        return Err(format!(
            "line {line}: rows with `messages` are not supported (use hash_ids or text_input)"
        ));
    }
    let input = row.input_length.ok_or_else(|| format!("line {line}: `input_length` is required"))?;
    if row.output_length.is_none() {
        return Err(format!("line {line}: `output_length` is required"));
    }
    if row.text_input.is_none() && input == 0 {
        return Err(format!("line {line}: `input_length` must be at least 1"));
    }
    if !row.hash_ids.is_empty() && row.text_input.is_none() {
        let last = input as i64 - ((row.hash_ids.len() - 1) * block_size) as i64;
        if last <= 0 || last > block_size as i64 {
            return Err(format!(
                "line {line}: {} hash ids of {block_size} tokens cannot make input_length {input}",
                row.hash_ids.len()
            ));
        }
    }
    if row.delay.is_some_and(|d| !(d.is_finite() && d >= 0.0)) {
        return Err(format!("line {line}: `delay` must be a non-negative number of milliseconds"));
    }
    Ok(input)
}

fn turn_of(input_length: usize, row: &Row) -> TraceTurn {
    let prompt = match (&row.text_input, row.hash_ids.is_empty()) {
        (Some(text), _) => TurnPrompt::Text(text.clone()),
        (None, false) => TurnPrompt::Blocks(row.hash_ids.clone()),
        (None, true) => TurnPrompt::Random,
    };
    TraceTurn {
        delay: Duration::from_secs_f64(row.delay.unwrap_or(0.0) / 1e3),
        input_length,
        output_length: row.output_length.unwrap_or(0),
        prompt,
    }
}

/// Summary statistics of one quantity, as AIPerf's `quality.json` gives them.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Distribution {
    pub count: usize,
    pub mean: f64,
    pub std: f64,
    pub median: f64,
    pub p05: f64,
    pub p25: f64,
    pub p75: f64,
    pub p95: f64,
    pub p99: f64,
}

impl Distribution {
    pub fn of(mut values: Vec<f64>) -> Distribution {
        values.sort_by(f64::total_cmp);
        let n = values.len();
        let mean = if n == 0 { 0.0 } else { values.iter().sum::<f64>() / n as f64 };
        let var =
            if n == 0 { 0.0 } else { values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n as f64 };
        let q = |p: f64| super::report::percentile(&values, p);
        Distribution {
            count: n,
            mean,
            std: var.sqrt(),
            median: q(50.0),
            p05: q(5.0),
            p25: q(25.0),
            p75: q(75.0),
            p95: q(95.0),
            p99: q(99.0),
        }
    }
}

/// What a trace holds: AIPerf's `quality.json` quantities, plus the prompt each turn
/// sends when replayed (the whole conversation so far, each response `output_length`
/// tokens long), before any chat template.
#[derive(Debug, Clone, Serialize)]
pub struct TraceStats {
    pub sessions: usize,
    pub turns: usize,
    /// First turn's input length.
    pub initial_context: Distribution,
    /// Later turns' input lengths.
    pub new_tokens_per_turn: Distribution,
    pub generation_length: Distribution,
    pub inter_turn_delay_ms: Distribution,
    pub turns_per_session: Distribution,
    /// The replayed prompt of every turn.
    pub replayed_prompt_tokens: Distribution,
    /// Distinct hash ids, and how many of them more than one session uses.
    pub distinct_blocks: usize,
    pub shared_blocks: usize,
}

pub fn stats(sessions: &[TraceSession]) -> TraceStats {
    let (mut initial, mut new, mut generation, mut delays, mut turns, mut replayed) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut users: HashMap<u64, (usize, u32)> = HashMap::new();
    for (s, session) in sessions.iter().enumerate() {
        turns.push(session.turns.len() as f64);
        let mut context = 0usize;
        for (i, turn) in session.turns.iter().enumerate() {
            if i == 0 {
                initial.push(turn.input_length as f64);
            } else {
                new.push(turn.input_length as f64);
                delays.push(turn.delay.as_secs_f64() * 1e3);
            }
            generation.push(turn.output_length as f64);
            context += turn.input_length;
            replayed.push(context as f64);
            context += turn.output_length;
            if let TurnPrompt::Blocks(ids) = &turn.prompt {
                for &id in ids {
                    let entry = users.entry(id).or_insert((s, 0));
                    if entry.0 != s {
                        entry.1 = 1;
                    }
                }
            }
        }
    }
    TraceStats {
        sessions: sessions.len(),
        turns: sessions.iter().map(|s| s.turns.len()).sum(),
        initial_context: Distribution::of(initial),
        new_tokens_per_turn: Distribution::of(new),
        generation_length: Distribution::of(generation),
        inter_turn_delay_ms: Distribution::of(delays),
        turns_per_session: Distribution::of(turns),
        replayed_prompt_tokens: Distribution::of(replayed),
        distinct_blocks: users.len(),
        shared_blocks: users.values().filter(|(_, shared)| *shared == 1).count(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(text: &str) -> Result<Vec<TraceSession>, String> {
        read_trace(text.as_bytes(), DEFAULT_BLOCK_SIZE)
    }

    #[test]
    fn rows_group_into_sessions_in_file_order() {
        let trace = r#"
{"session_id":"a","input_length":100,"output_length":5,"hash_ids":[1,2],"timestamp":0.0,"group_id":3}
{"session_id":"b","input_length":64,"output_length":7,"hash_ids":[1]}
{"session_id":"a","input_length":10,"output_length":3,"hash_ids":[9],"delay":1375.9}
{"input_length":20,"output_length":2}
{"session_id":"c","input_length":3,"output_length":2,"text_input":"hello there friend"}
"#;
        let sessions = read(trace).unwrap();
        let ids: Vec<&str> = sessions.iter().map(|s| s.session_id.as_str()).collect();
        assert_eq!(ids, ["a", "b", "trace-row-5", "c"]);
        let a = &sessions[0];
        assert_eq!(a.turns.len(), 2);
        assert_eq!(a.turns[0].prompt, TurnPrompt::Blocks(vec![1, 2]));
        assert_eq!(a.turns[0].delay, Duration::ZERO);
        assert_eq!(a.turns[1].delay, Duration::from_micros(1_375_900));
        assert_eq!((a.turns[1].input_length, a.turns[1].output_length), (10, 3));
        assert_eq!(sessions[2].turns[0].prompt, TurnPrompt::Random);
        assert_eq!(sessions[3].turns[0].prompt, TurnPrompt::Text("hello there friend".into()));
        let s = stats(&sessions);
        assert_eq!((s.sessions, s.turns), (4, 5));
        assert_eq!(s.initial_context.count, 4);
        assert_eq!(s.new_tokens_per_turn.mean, 10.0);
        // a: 100, then 100 + 5 + 10 = 115.
        assert_eq!(s.replayed_prompt_tokens.count, 5);
        assert!(s.replayed_prompt_tokens.mean > 0.0);
        assert_eq!((s.distinct_blocks, s.shared_blocks), (3, 1), "block 1 is in a and b");
    }

    #[test]
    fn bad_rows_are_named() {
        let err = |t: &str| read(t).unwrap_err();
        assert!(err("{\"input_length\": 10}\n").contains("line 1: `output_length`"));
        assert!(err("\n{\"output_length\": 1}\n").contains("line 2: `input_length`"));
        assert!(err("{\"input_length\":200,\"output_length\":1,\"hash_ids\":[1,2]}").contains("cannot make"));
        assert!(err("{\"input_length\":64,\"output_length\":1,\"hash_ids\":[1,2]}").contains("cannot make"));
        assert!(err("{\"input_length\":5,\"output_length\":1,\"messages\":[]}").contains("not supported"));
        assert!(err("{\"input_length\":5,\"output_length\":1,\"delay\":-1}").contains("delay"));
        assert!(err("not json").contains("line 1"));
        assert!(err("\n\n").contains("no rows"));
        assert!(read("{\"input_length\":65,\"output_length\":1,\"hash_ids\":[1,2]}").is_ok());
        assert!(read("{\"input_length\":128,\"output_length\":1,\"hash_ids\":[1,2]}").is_ok());
    }

    #[test]
    fn distributions_are_numpy_like() {
        let d = Distribution::of(vec![4.0, 1.0, 3.0, 2.0]);
        assert_eq!((d.count, d.mean, d.median), (4, 2.5, 2.5));
        assert!((d.std - 1.118).abs() < 1e-3);
        assert!((d.p99 - 3.97).abs() < 1e-9);
    }
}
