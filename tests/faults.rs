//! Replica faults seen through the router, injected with vllm-sim's fault switches: a
//! replica dying mid-stream, a stream going silent, a replica too slow to answer.
//! The client always gets what was produced and then a clear end, never a hang.

use std::time::{Duration, Instant};

use llm_router::config::RouterConfig;
use llm_router::replicas::ReplicaUrl;
use llm_router::server::RunningRouter;
use serde_json::{Value, json};
use vllm_sim::faults::FaultConfig;
use vllm_sim::{self as sim, RunningSim, SimConfig};

async fn setup(n: usize, configure: impl FnOnce(&mut RouterConfig)) -> (Vec<RunningSim>, RunningRouter) {
    let sims = sim::start_fleet(n, &SimConfig { time_scale: 20.0, ..SimConfig::default() }).await.unwrap();
    let mut config = RouterConfig::new(sims.iter().map(|s| ReplicaUrl::parse(&s.url()).unwrap()).collect());
    // Slow health checks: what the tests see is the data path's doing.
    config.health.interval = Duration::from_secs(60);
    configure(&mut config);
    let router = llm_router::server::start(config).await.unwrap();
    (sims, router)
}

async fn post(router: &RunningRouter, body: &Value) -> (u16, String) {
    let r = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
        .post(format!("http://{}/v1/completions", router.addr))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

fn events(sse: &str) -> Vec<&str> {
    sse.split("\n\n").filter_map(|e| e.strip_prefix("data: ")).collect()
}

fn metric(text: &str, series: &str) -> f64 {
    text.lines().find_map(|l| l.strip_prefix(series)?.trim().parse().ok()).unwrap_or(0.0)
}

fn stream_body() -> Value {
    json!({"model": "Qwen/Qwen3-0.6B-FP8", "prompt": "count", "max_tokens": 50, "ignore_eos": true, "stream": true})
}

#[tokio::test]
async fn replica_dying_mid_stream_gives_tokens_then_an_error_event() {
    let (sims, router) = setup(1, |_| {}).await;
    sims[0].faults().set(FaultConfig { drop_after_tokens: Some(3), ..Default::default() });
    let (status, body) = post(&router, &stream_body()).await;
    assert_eq!(status, 200);
    let events = events(&body);
    assert_eq!(events.len(), 5, "3 tokens, an error, [DONE]: {body}");
    for e in &events[..3] {
        assert!(serde_json::from_str::<Value>(e).unwrap()["choices"][0]["text"].is_string());
    }
    let error: Value = serde_json::from_str(events[3]).unwrap();
    assert_eq!(error["error"]["code"], 502);
    assert!(error["error"]["message"].as_str().unwrap().contains("mid-stream"));
    assert_eq!(events[4], "[DONE]");
    let r0 = sims[0].url();
    let text = router.metrics.render();
    assert_eq!(
        metric(&text, &format!(r#"router_upstream_errors_total{{kind="mid_body",replica="{r0}"}}"#)),
        1.0
    );
    // Its only replica: the ejection ceiling (50% of one, rounded down) keeps it.
    assert!(!router.registry.get(0).is_ejected(), "a lone replica is never ejected");
    assert_eq!(metric(&text, &format!(r#"router_ejections_total{{replica="{r0}",result="refused"}}"#)), 1.0);
    router.shutdown().await;
}

#[tokio::test]
async fn a_silent_stream_ends_after_the_idle_timeout() {
    let (sims, router) = setup(1, |c| c.timeouts.stream_idle = Duration::from_millis(300)).await;
    sims[0].faults().set(FaultConfig { stall_after_tokens: Some(2), ..Default::default() });
    let start = Instant::now();
    // Long enough that the replica is still generating when the router gives up.
    let mut long = stream_body();
    long["max_tokens"] = json!(20_000);
    let (status, body) = post(&router, &long).await;
    assert_eq!(status, 200);
    assert!(start.elapsed() < Duration::from_secs(5));
    let events = events(&body);
    assert_eq!(events.len(), 4, "2 tokens, an error, [DONE]: {body}");
    assert!(events[2].contains("sent nothing"));
    assert_eq!(events[3], "[DONE]");
    // The upstream connection was closed, so the replica aborted the request.
    for _ in 0..250 {
        if metric(&sims[0].metrics().render(), "sim_requests_aborted_total ") == 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(metric(&sims[0].metrics().render(), "sim_requests_aborted_total "), 1.0);
    let text = router.metrics.render();
    let r0 = sims[0].url();
    assert_eq!(
        metric(&text, &format!(r#"router_upstream_errors_total{{kind="idle_timeout",replica="{r0}"}}"#)),
        1.0
    );
    router.shutdown().await;
}

#[tokio::test]
async fn a_replica_too_slow_to_answer_is_retried_then_504() {
    let (sims, router) = setup(2, |c| {
        c.timeouts.response_headers = Duration::from_millis(300);
        c.policy = llm_router::policy::PolicyKind::RoundRobin;
    })
    .await;
    let slow = FaultConfig { slowdown: 10_000.0, ..Default::default() };
    sims[0].faults().set(slow.clone());
    let body = json!({"model": "Qwen/Qwen3-0.6B-FP8", "prompt": "x", "max_tokens": 5});
    for _ in 0..2 {
        let (status, text) = post(&router, &body).await;
        assert_eq!(status, 200, "the slow replica's requests are retried on the other: {text}");
    }
    sims[1].faults().set(slow);
    let start = Instant::now();
    let (status, text) = post(&router, &body).await;
    assert_eq!(status, 504, "{text}");
    assert!(start.elapsed() < Duration::from_secs(5));
    let error: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(error["error"]["type"], "GatewayTimeoutError");
    router.shutdown().await;
}

#[tokio::test]
async fn circuit_breaker_stops_sending_to_a_failing_but_healthy_replica() {
    let (sims, router) = setup(2, |c| {
        c.policy = llm_router::policy::PolicyKind::RoundRobin;
        c.breaker = llm_router::replicas::BreakerSettings {
            failures: 3,
            cooldown: Duration::from_millis(500),
            error_rate: None,
            ..Default::default()
        };
        c.health.interval = Duration::from_millis(100);
    })
    .await;
    // It answers 500 to requests, yet its /health stays 200.
    sims[0].faults().set(FaultConfig { fail_500: true, ..Default::default() });
    let body = json!({"model": "Qwen/Qwen3-0.6B-FP8", "prompt": "x", "max_tokens": 3});
    for _ in 0..12 {
        let (status, text) = post(&router, &body).await;
        assert_eq!(status, 200, "failures are retried on the other replica: {text}");
    }
    let tried = |s: &RunningSim| {
        let text = s.metrics().render();
        metric(&text, r#"sim_faults_injected_total{fault="fail_500"}"#)
            + metric(&text, "vllm:request_success_total{")
    };
    assert_eq!(tried(&sims[0]), 3.0, "the breaker opened after 3 failures");
    let r0 = sims[0].url();
    let open = format!(r#"router_replica_circuit_open{{replica="{r0}"}}"#);
    assert_eq!(metric(&router.metrics.render(), &open), 1.0);
    assert!(router.registry.get(0).is_healthy(), "health checks alone would have kept it");
    // Fixed: after the cool-down one success closes the breaker and traffic returns.
    sims[0].faults().set(FaultConfig::default());
    tokio::time::sleep(Duration::from_millis(600)).await;
    for _ in 0..4 {
        assert_eq!(post(&router, &body).await.0, 200);
    }
    assert_eq!(metric(&router.metrics.render(), &open), 0.0);
    let served = metric(
        &sims[0].metrics().render(),
        r#"vllm:request_success_total{engine="0",finished_reason="length",model_name="Qwen/Qwen3-0.6B-FP8"}"#,
    );
    assert!(served >= 1.0, "the replica serves again");
    router.shutdown().await;
}

#[tokio::test]
async fn killing_one_of_four_replicas_under_256_streams_loses_nothing() {
    let sims = sim::start_fleet(4, &SimConfig { time_scale: 10.0, ..SimConfig::default() }).await.unwrap();
    let mut config = RouterConfig::new(sims.iter().map(|s| ReplicaUrl::parse(&s.url()).unwrap()).collect());
    config.health.interval = Duration::from_millis(200);
    // The streams cut by the kill end with an error event (tests/continuation.rs has
    // them continued instead).
    config.continuation_attempts = 0;
    let router = llm_router::server::start(config).await.unwrap();
    let url = format!("http://{}/v1/completions", router.addr);
    let client = reqwest::Client::builder().pool_max_idle_per_host(512).build().unwrap();
    let body =
        json!({"model": "Qwen/Qwen3-0.6B-FP8", "prompt": "stream", "max_tokens": 200, "ignore_eos": true,
        "stream": true})
        .to_string();
    let tasks: Vec<_> = (0..256)
        .map(|i| {
            let (client, url, body) = (client.clone(), url.clone(), body.clone());
            tokio::spawn(async move {
                // Stagger the starts so some requests arrive after the kill.
                tokio::time::sleep(Duration::from_millis(i as u64 * 2)).await;
                let outcome = async {
                    let r =
                        client.post(&url).header("content-type", "application/json").body(body).send().await;
                    let r = match r {
                        Ok(r) => r,
                        Err(e) => return format!("transport error: {e}"),
                    };
                    let status = r.status().as_u16();
                    let text = r.text().await.unwrap_or_else(|e| format!("body error: {e}"));
                    if status != 200 {
                        return format!("status {status}");
                    }
                    let done = text.matches("data: [DONE]").count();
                    let errors = text.matches("data: {\"error\"").count();
                    let tokens = text.matches("\"text\":").count();
                    match (done, errors) {
                        (1, 0) if tokens == 200 => "complete".to_owned(),
                        (1, 1) => "error event".to_owned(),
                        _ => format!("malformed: {done} [DONE], {errors} errors, {tokens} tokens"),
                    }
                };
                tokio::time::timeout(Duration::from_secs(30), outcome)
                    .await
                    .unwrap_or_else(|_| "hung".to_owned())
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(250)).await;
    // Kill it while it has streams in flight (streams are short at this time scale; on a
    // busy machine the moment alone is not enough). Bounded: 2 s at most.
    for _ in 0..200 {
        if router.registry.get(2).in_flight() > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    sims[2].shutdown();
    let mut outcomes = std::collections::BTreeMap::<String, usize>::new();
    for t in tasks {
        *outcomes.entry(t.await.unwrap()).or_default() += 1;
    }
    println!("outcomes of 256 streams with a replica killed: {outcomes:?}");
    let complete = outcomes.get("complete").copied().unwrap_or(0);
    let errored = outcomes.get("error event").copied().unwrap_or(0);
    assert_eq!(complete + errored, 256, "every request completes or ends with a clear error: {outcomes:?}");
    assert!(errored > 0, "streams on the killed replica end with an error event: {outcomes:?}");
    assert!(complete > 150, "{outcomes:?}");
    assert!(!router.registry.get(2).in_rotation(), "the killed replica is out of rotation");
    let text = router.metrics.render();
    let killed = sims[2].url();
    assert_eq!(
        metric(&text, &format!(r#"router_upstream_errors_total{{kind="mid_body",replica="{killed}"}}"#)),
        errored as f64,
        "each cut stream is counted once"
    );
    router.shutdown().await;
}
