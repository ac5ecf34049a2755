//! A pass's outcomes as `vllm bench serve` reports them: the same metrics, computed the
//! same way, under the same JSON keys (`request_throughput`, `mean_ttft_ms`,
//! `p99_tpot_ms`, ...), so results from either tool can be compared and plotted alike.
//!
//! - Throughputs divide by the pass's duration (first request sent to last response
//!   ended) and count successful requests only.
//! - TPOT of a request is `(latency - ttft) / (output_tokens - 1)`, for requests with
//!   more than one output token; ITL pools every gap of every successful request.
//! - Statistics are numpy's: population standard deviation, percentiles by linear
//!   interpolation.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{Map, Value, json};

use super::client::Outcome;

/// The percentiles reported for every metric.
pub const PERCENTILES: [f64; 2] = [90.0, 99.0];

/// The metrics of a pass, keyed as `vllm bench serve` keys them.
pub fn summarize(outcomes: &[Outcome], duration: Duration) -> Map<String, Value> {
    let ok: Vec<&Outcome> = outcomes.iter().filter(|o| o.ok()).collect();
    let seconds = duration.as_secs_f64().max(1e-9);
    let total_input: usize = ok.iter().map(|o| o.prompt_tokens).sum();
    let total_output: usize = ok.iter().map(|o| o.output_tokens).sum();
    let ttfts: Vec<f64> = ok.iter().filter_map(|o| o.ttft).map(|t| t.as_secs_f64()).collect();
    let tpots: Vec<f64> = ok
        .iter()
        .filter(|o| o.output_tokens > 1)
        .map(|o| {
            let ttft = o.ttft.unwrap_or_default();
            o.latency.saturating_sub(ttft).as_secs_f64() / (o.output_tokens - 1) as f64
        })
        .collect();
    let itls: Vec<f64> = ok.iter().flat_map(|o| o.itl_us.iter().map(|&us| us as f64 / 1e6)).collect();
    let e2els: Vec<f64> = ok.iter().map(|o| o.latency.as_secs_f64()).collect();

    let mut out = Map::new();
    out.insert("duration".into(), json!(seconds));
    out.insert("completed".into(), json!(ok.len()));
    out.insert("failed".into(), json!(outcomes.iter().filter(|o| o.failed()).count()));
    out.insert("cancelled".into(), json!(outcomes.iter().filter(|o| o.cancelled).count()));
    out.insert("total_input_tokens".into(), json!(total_input));
    out.insert("total_output_tokens".into(), json!(total_output));
    out.insert("request_throughput".into(), json!(ok.len() as f64 / seconds));
    out.insert("request_goodput".into(), Value::Null);
    out.insert("output_throughput".into(), json!(total_output as f64 / seconds));
    out.insert("total_token_throughput".into(), json!((total_input + total_output) as f64 / seconds));
    out.insert("max_output_tokens_per_s".into(), json!(peak_tokens_per_second(&ok)));
    out.insert("max_concurrent_requests".into(), json!(peak_concurrency(&ok)));
    for (name, values) in [("ttft", ttfts), ("tpot", tpots), ("itl", itls), ("e2el", e2els)] {
        let mut values = values;
        values.sort_by(f64::total_cmp);
        out.insert(format!("mean_{name}_ms"), json!(mean(&values) * 1e3));
        out.insert(format!("median_{name}_ms"), json!(percentile(&values, 50.0) * 1e3));
        out.insert(format!("std_{name}_ms"), json!(std(&values) * 1e3));
        for p in PERCENTILES {
            out.insert(format!("p{p}_{name}_ms"), json!(percentile(&values, p) * 1e3));
        }
    }
    out.insert("error_counts".into(), json!(error_counts(outcomes)));
    out
}

/// Successful requests that ended within the recorded window (from the start of the
/// recorded phase until no new request could start), whichever phase they started in,
/// per second of the window: the steady-state rate, free of the ramp-up and of the
/// drain at the end. `warmup_before` is how long the warm-up ran (warm-up outcomes'
/// `start` counts from the start of the run, recorded ones from the end of the warm-up).
pub fn steady_throughput(
    recorded: &[Outcome],
    warmup: &[Outcome],
    warmup_before: Duration,
    window: Duration,
) -> f64 {
    let ends_in_window = |end: Duration| end <= window;
    let recorded_ok = recorded.iter().filter(|o| o.ok() && ends_in_window(o.start + o.latency)).count();
    let warmup_ok = warmup
        .iter()
        .filter(|o| o.ok())
        .filter_map(|o| (o.start + o.latency).checked_sub(warmup_before))
        .filter(|&end| ends_in_window(end))
        .count();
    (recorded_ok + warmup_ok) as f64 / window.as_secs_f64().max(1e-9)
}

/// Every request's timings in seconds, under `vllm bench serve --save-detailed`'s keys.
pub fn detailed(outcomes: &[Outcome]) -> Map<String, Value> {
    let secs = |d: Duration| d.as_secs_f64();
    let mut out = Map::new();
    out.insert("start_times".into(), json!(outcomes.iter().map(|o| secs(o.start)).collect::<Vec<_>>()));
    out.insert("ttfts".into(), json!(outcomes.iter().map(|o| o.ttft.map_or(0.0, secs)).collect::<Vec<_>>()));
    let itls: Vec<Vec<f64>> =
        outcomes.iter().map(|o| o.itl_us.iter().map(|&us| us as f64 / 1e6).collect()).collect();
    out.insert("itls".into(), json!(itls));
    out.insert("latencies".into(), json!(outcomes.iter().map(|o| secs(o.latency)).collect::<Vec<_>>()));
    out.insert("input_lens".into(), json!(outcomes.iter().map(|o| o.prompt_tokens).collect::<Vec<_>>()));
    out.insert("output_lens".into(), json!(outcomes.iter().map(|o| o.output_tokens).collect::<Vec<_>>()));
    out.insert(
        "errors".into(),
        json!(outcomes.iter().map(|o| o.error.clone().unwrap_or_default()).collect::<Vec<_>>()),
    );
    out
}

/// The failed requests alone: `[{start, latency, error}]`, times in seconds from the
/// run's start.
pub fn failures(outcomes: &[Outcome]) -> Value {
    json!(
        outcomes
            .iter()
            .filter_map(|o| Some(json!({"start": o.start.as_secs_f64(), "latency": o.latency.as_secs_f64(),
                "error": o.error.as_deref()?})))
            .collect::<Vec<_>>()
    )
}

/// Failed requests by error message (its first 120 characters).
fn error_counts(outcomes: &[Outcome]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for error in outcomes.iter().filter_map(|o| o.error.as_deref()) {
        let key: String = error.chars().take(120).collect();
        *counts.entry(key).or_insert(0) += 1;
    }
    counts
}

fn mean(sorted: &[f64]) -> f64 {
    if sorted.is_empty() { 0.0 } else { sorted.iter().sum::<f64>() / sorted.len() as f64 }
}

fn std(values: &[f64]) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let m = mean(values);
    (values.iter().map(|v| (v - m).powi(2)).sum::<f64>() / values.len() as f64).sqrt()
}

/// numpy's default percentile of sorted values: linear between the closest ranks.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    match sorted.len() {
        0 => 0.0,
        1 => sorted[0],
        n => {
            let rank = p / 100.0 * (n - 1) as f64;
            let (lo, hi) = (rank.floor() as usize, rank.ceil() as usize);
            sorted[lo] + (sorted[hi] - sorted[lo]) * (rank - lo as f64)
        }
    }
}

/// The most output tokens seen in one one-second bucket of the pass.
fn peak_tokens_per_second(ok: &[&Outcome]) -> f64 {
    let mut buckets: Vec<u32> = Vec::new();
    for o in ok {
        let Some(ttft) = o.ttft else { continue };
        let mut at = o.start + ttft;
        let mut count = |at: Duration| {
            let second = at.as_secs() as usize;
            if buckets.len() <= second {
                buckets.resize(second + 1, 0);
            }
            buckets[second] += 1;
        };
        count(at);
        for &gap in &o.itl_us {
            at += Duration::from_micros(gap as u64);
            count(at);
        }
    }
    buckets.into_iter().max().unwrap_or(0) as f64
}

/// The most requests in flight at once (half-open intervals from send to last token).
fn peak_concurrency(ok: &[&Outcome]) -> usize {
    let mut events: Vec<(Duration, i32)> =
        ok.iter().flat_map(|o| [(o.start, 1), (o.start + o.latency, -1)]).collect();
    events.sort();
    let (mut now, mut peak) = (0i32, 0i32);
    for (_, delta) in events {
        now += delta;
        peak = peak.max(now);
    }
    peak as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    fn outcome(start: u64, ttft: u64, itl: &[u32], tokens: usize) -> Outcome {
        let latency = ms(ttft) + itl.iter().map(|&us| Duration::from_micros(us as u64)).sum::<Duration>();
        Outcome {
            start: ms(start),
            ttft: Some(ms(ttft)),
            itl_us: itl.to_vec(),
            latency,
            prompt_tokens: 10,
            output_tokens: tokens,
            ..Outcome::default()
        }
    }

    #[test]
    fn metrics_are_computed_as_vllm_bench_serve_does() {
        let failed = Outcome { error: Some("HTTP 503: busy".into()), ..Outcome::default() };
        assert_eq!(failures(&[Outcome::default(), failed.clone()]).as_array().unwrap().len(), 1);
        let outcomes = vec![
            outcome(0, 100, &[10_000, 10_000, 10_000], 4),
            outcome(50, 200, &[20_000, 20_000, 20_000], 4),
            failed,
        ];
        let m = summarize(&outcomes, Duration::from_secs(2));
        assert_eq!(m["completed"], 2);
        assert_eq!(m["failed"], 1);
        assert_eq!(m["request_throughput"], 1.0);
        assert_eq!(m["total_output_tokens"], 8);
        assert_eq!(m["output_throughput"], 4.0);
        assert_eq!(m["total_token_throughput"], 14.0);
        assert!((m["mean_ttft_ms"].as_f64().unwrap() - 150.0).abs() < 1e-9);
        assert!((m["mean_tpot_ms"].as_f64().unwrap() - 15.0).abs() < 1e-6); // (30/3 + 60/3) / 2
        assert!((m["mean_itl_ms"].as_f64().unwrap() - 15.0).abs() < 1e-6);
        assert!((m["std_ttft_ms"].as_f64().unwrap() - 50.0).abs() < 1e-9);
        assert!((m["p90_ttft_ms"].as_f64().unwrap() - 190.0).abs() < 1e-9);
        assert_eq!(m["max_concurrent_requests"], 2);
        assert_eq!(m["max_output_tokens_per_s"], 8.0);
        assert_eq!(m["error_counts"]["HTTP 503: busy"], 1);
        assert!(m.contains_key("p99_e2el_ms") && m.contains_key("median_itl_ms"));
    }

    #[test]
    fn percentiles_interpolate_like_numpy() {
        let v = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(percentile(&v, 50.0), 2.5);
        assert_eq!(percentile(&v, 0.0), 1.0);
        assert_eq!(percentile(&v, 100.0), 4.0);
        assert!((percentile(&v, 90.0) - 3.7).abs() < 1e-12);
        assert_eq!(percentile(&[], 50.0), 0.0);
    }
}
