//! What the simulator's integration tests share: a simulator on 127.0.0.1, a client,
//! requests, its metrics, and bounded waits.
#![allow(dead_code)]

use std::time::Duration;

use serde_json::Value;
use vllm_sim::{self as sim, RunningSim, SimConfig};

pub const MODEL: &str = "Qwen/Qwen3-0.6B-FP8";

pub fn config() -> SimConfig {
    SimConfig { time_scale: 20.0, ..SimConfig::default() }
}

pub async fn sim_with(config: SimConfig) -> RunningSim {
    sim::start(config).await.unwrap()
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap()
}

pub async fn post(sim: &RunningSim, path: &str, body: &Value) -> (u16, String) {
    let r = client().post(format!("{}{path}", sim.url())).json_body(body).send().await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

pub trait JsonBody {
    fn json_body(self, body: &Value) -> Self;
}

impl JsonBody for reqwest::RequestBuilder {
    fn json_body(self, body: &Value) -> Self {
        self.header("content-type", "application/json").body(body.to_string())
    }
}

pub fn metric(sim: &RunningSim, name: &str) -> f64 {
    sim.metrics()
        .render()
        .lines()
        .find(|l| {
            l.starts_with(name)
                && (l.as_bytes().get(name.len()) == Some(&b' ')
                    || l.as_bytes().get(name.len()) == Some(&b'{'))
        })
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}

pub async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..500 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for {what}");
}

pub trait JsonValue {
    async fn json_value(self) -> Value;
}

impl JsonValue for reqwest::Response {
    async fn json_value(self) -> Value {
        serde_json::from_slice(&self.bytes().await.unwrap()).unwrap()
    }
}
