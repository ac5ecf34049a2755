//! The engines' own load, read from their `/metrics` on a schedule: the signal every
//! router instance shares, where requests in flight are each instance's own.
//!
//! Every `--engine-load-interval` (on the wall clock's multiples of it, so that
//! instances read at nearly the same moment) each replica's `/metrics` is read (bounded:
//! 4 MiB, the health-check timeout) for vLLM's `vllm:num_requests_running` and
//! `vllm:num_requests_waiting` (summed over their label sets) and
//! `vllm:kv_cache_usage_perc` (the largest). A replica's load is running plus waiting.
//!
//! A replica is *overloaded* when its load is above `factor` times the mean of the
//! replicas read plus `abs` (`--engine-overload-factor`, `--engine-overload-abs`), and
//! stays so until it falls to halfway back (`(1 + factor) / 2` times the mean plus
//! `abs / 2`): hysteresis, so a replica near the bound does not flip with every reading.
//! `consistent-hash` passes the sessions of an overloaded home to the next replica of
//! their order, which every instance reading the same engines does alike. A replica whose
//! metrics cannot be read (not vLLM, or not answering) has no reading and is never
//! overloaded by this signal.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::{BodyExt, Full, Limited};
use prometheus::{IntGaugeVec, Opts};

use super::{Registry, Replica};
use crate::upstream::proxy::HttpClient;

/// `/metrics` bodies larger than this are not read.
const MAX_METRICS_BODY: usize = 4 << 20;
const UNKNOWN: u32 = u32::MAX;

/// The last reading of one replica's engine.
#[derive(Debug)]
pub struct EngineSignal {
    load: AtomicU32,
    overloaded: AtomicBool,
}

impl Default for EngineSignal {
    fn default() -> Self {
        EngineSignal { load: AtomicU32::new(UNKNOWN), overloaded: AtomicBool::new(false) }
    }
}

impl EngineSignal {
    /// Running plus waiting requests at the last reading; None without one.
    pub fn load(&self) -> Option<u32> {
        Some(self.load.load(Ordering::Relaxed)).filter(|&l| l != UNKNOWN)
    }

    pub fn is_overloaded(&self) -> bool {
        self.overloaded.load(Ordering::Relaxed)
    }
}

/// `--engine-overload-factor` and `--engine-overload-abs`, and how often to read.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OverloadBound {
    pub interval: Duration,
    pub factor: f64,
    pub abs: f64,
}

impl Default for OverloadBound {
    fn default() -> Self {
        OverloadBound { interval: Duration::from_secs(1), factor: 1.5, abs: 4.0 }
    }
}

impl OverloadBound {
    /// Which replicas are overloaded now, from their loads (None: no reading) and
    /// whether they were.
    pub fn overloaded(&self, loads: &[Option<u32>], were: &[bool]) -> Vec<bool> {
        let read: Vec<f64> = loads.iter().flatten().map(|&l| f64::from(l)).collect();
        if read.is_empty() {
            return vec![false; loads.len()];
        }
        let mean = read.iter().sum::<f64>() / read.len() as f64;
        let enter = self.factor * mean + self.abs;
        let leave = (1.0 + self.factor) / 2.0 * mean + self.abs / 2.0;
        loads
            .iter()
            .zip(were)
            .map(|(load, &was)| match load {
                None => false,
                Some(load) if was => f64::from(*load) > leave,
                Some(load) => f64::from(*load) > enter,
            })
            .collect()
    }
}

/// Reads every replica's engine on a schedule.
pub struct EngineLoadReader {
    registry: Arc<Registry>,
    client: HttpClient,
    bound: OverloadBound,
    timeout: Duration,
    gauges: IntGaugeVec,
}

impl EngineLoadReader {
    pub fn new(
        registry: Arc<Registry>,
        client: HttpClient,
        bound: OverloadBound,
        timeout: Duration,
        metrics: &crate::metrics::Metrics,
    ) -> Self {
        let gauges = IntGaugeVec::new(
            Opts::new(
                "router_engine_load",
                "The engines' own load as last read from their /metrics (kind: running, waiting, kv_cache_usage_permille, overloaded)",
            ),
            &["replica", "kind"],
        )
        .expect("valid metric");
        metrics.register(Box::new(gauges.clone()));
        EngineLoadReader { registry, client, bound, timeout, gauges }
    }

    /// Read forever, on the wall clock's multiples of the interval.
    pub async fn run(self) {
        let interval = self.bound.interval.max(Duration::from_millis(50));
        loop {
            let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
            let into = Duration::from_nanos((now.as_nanos() % interval.as_nanos()) as u64);
            tokio::time::sleep(interval - into).await;
            self.read_all().await;
        }
    }

    /// Read every replica once, concurrently, and decide which are overloaded.
    pub async fn read_all(&self) {
        let replicas = self.registry.replicas();
        // Together, each bounded by the timeout: one slow engine delays no other reading.
        let reads: Vec<_> = replicas
            .iter()
            .map(|replica| tokio::spawn(read(self.client.clone(), replica.clone(), self.timeout)))
            .collect();
        let mut readings = Vec::with_capacity(reads.len());
        for read in reads {
            readings.push(read.await.ok().flatten());
        }
        let loads: Vec<Option<u32>> = readings.iter().map(|r| r.map(|r| r.running + r.waiting)).collect();
        let were: Vec<bool> = replicas.iter().map(|r| r.engine.is_overloaded()).collect();
        let now = self.bound.overloaded(&loads, &were);
        for ((replica, reading), overloaded) in replicas.iter().zip(&readings).zip(now) {
            replica.engine.load.store(reading.map_or(UNKNOWN, |r| r.running + r.waiting), Ordering::Relaxed);
            replica.engine.overloaded.store(overloaded, Ordering::Relaxed);
            if let Some(reading) = reading {
                let name = replica.name();
                self.gauges.with_label_values(&[name, "running"]).set(i64::from(reading.running));
                self.gauges.with_label_values(&[name, "waiting"]).set(i64::from(reading.waiting));
                self.gauges.with_label_values(&[name, "kv_cache_usage_permille"]).set(reading.kv_permille);
                self.gauges.with_label_values(&[name, "overloaded"]).set(i64::from(overloaded));
            }
        }
    }
}

/// One replica's `/metrics`, read within `timeout`.
async fn read(client: HttpClient, replica: Arc<Replica>, timeout: Duration) -> Option<Reading> {
    let uri = replica.url.join(&http::uri::PathAndQuery::from_static("/metrics"));
    let request = Request::builder()
        .method(Method::GET)
        .uri(uri)
        .body(Full::new(Bytes::new()))
        .expect("a valid request");
    let exchange = async {
        let response = client.request(request).await.ok()?;
        if !response.status().is_success() {
            return None;
        }
        let body = Limited::new(response.into_body(), MAX_METRICS_BODY).collect().await.ok()?;
        parse(&body.to_bytes())
    };
    tokio::time::timeout(timeout, exchange).await.ok().flatten()
}

/// What one `/metrics` said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reading {
    pub running: u32,
    pub waiting: u32,
    pub kv_permille: i64,
}

/// vLLM's load gauges from a Prometheus text exposition; None without the running gauge.
pub fn parse(text: &[u8]) -> Option<Reading> {
    let text = std::str::from_utf8(text).ok()?;
    let (mut running, mut waiting, mut kv) = (None::<f64>, 0.0f64, 0.0f64);
    for line in text.lines() {
        let Some((name, value)) = sample(line) else { continue };
        match name {
            "vllm:num_requests_running" => *running.get_or_insert(0.0) += value,
            "vllm:num_requests_waiting" => waiting += value,
            "vllm:kv_cache_usage_perc" => kv = kv.max(value),
            _ => {}
        }
    }
    let clamp = |v: f64| v.clamp(0.0, f64::from(u32::MAX / 4)) as u32;
    Some(Reading {
        running: clamp(running?),
        waiting: clamp(waiting),
        kv_permille: (kv.clamp(0.0, 1.0) * 1000.0) as i64,
    })
}

/// A sample line's metric name and value (labels skipped); None for comments and junk.
fn sample(line: &str) -> Option<(&str, f64)> {
    if line.starts_with('#') {
        return None;
    }
    let name_end = line.find(['{', ' '])?;
    let rest = &line[name_end..];
    let rest = match rest.strip_prefix('{') {
        Some(labels) => &labels[labels.find('}')? + 1..],
        None => rest,
    };
    let value: f64 = rest.split_whitespace().next()?.parse().ok()?;
    value.is_finite().then_some((&line[..name_end], value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vllms_gauges_are_read_and_summed_over_label_sets() {
        let text = b"# HELP vllm:num_requests_running x\n# TYPE vllm:num_requests_running gauge\n\
            vllm:num_requests_running{engine=\"0\",model_name=\"m\"} 3.0\n\
            vllm:num_requests_running{engine=\"1\",model_name=\"m\"} 4.0\n\
            vllm:num_requests_waiting{engine=\"0\",model_name=\"m\"} 2.0\n\
            vllm:kv_cache_usage_perc{engine=\"0\",model_name=\"m\"} 0.25\n\
            vllm:kv_cache_usage_perc{engine=\"1\",model_name=\"m\"} 0.5\n\
            vllm:num_requests_running_total 99\n";
        assert_eq!(parse(text), Some(Reading { running: 7, waiting: 2, kv_permille: 500 }));
        assert_eq!(parse(b"up 1\n"), None, "not vLLM: no reading");
        let hostile = b"vllm:num_requests_running{a=\"}\"} NaN\nvllm:num_requests_running 1e300\nvllm:num_requests_waiting -5\n";
        let r = parse(hostile).unwrap();
        assert_eq!((r.running, r.waiting), (u32::MAX / 4, 0), "bounded, never negative");
        assert_eq!(parse(&[0xff, 0xfe]), None);
    }

    #[test]
    fn overload_enters_above_the_bound_and_leaves_halfway_back() {
        let bound = OverloadBound::default(); // 1.5 x mean + 4 to enter; 1.25 x mean + 2 to leave
        let loads = [Some(40), Some(12), Some(12), Some(16)]; // mean 20: enter above 34, leave at 27
        assert_eq!(bound.overloaded(&loads, &[false; 4]), [true, false, false, false]);
        let loads = [Some(30), Some(16), Some(16), Some(18)]; // mean 20: 30 is between
        assert_eq!(bound.overloaded(&loads, &[true, false, false, false]), [true, false, false, false]);
        assert_eq!(bound.overloaded(&loads, &[false; 4]), [false; 4], "not entered below 34");
        let loads = [Some(26), Some(18), Some(18), Some(18)]; // mean 20: 26 is below 27
        assert_eq!(bound.overloaded(&loads, &[true, false, false, false]), [false; 4]);
        assert_eq!(
            bound.overloaded(&[None, Some(100)], &[true, false]),
            [false, false],
            "alone it is the mean"
        );
        assert_eq!(bound.overloaded(&[None, None], &[true, true]), [false, false]);
    }
}
