//! The router against real vLLM engines, where the engines' caches are concerned: kv-aware
//! with the model's own tokenizer directory predicts the engines' prefix-cache hits
//! exactly, including through an engine restart; `--pd` between two engines running vLLM's
//! NixlConnector on CPU moves each prefill's KV over NIXL and decodes from token ids.
//! Engines and skipping as in real_vllm.rs; the tests take turns ([`SERIAL`]).

mod support;

use std::time::Duration;

use clap::Parser;
use llm_router::server::RunningRouter;
use serde_json::{Value, json};
use support::real_vllm::*;
use support::*;

/// kv-aware: the router's belief of the chosen engine's cached prompt tokens, summed over
/// requests, against each engine's own `vllm:prefix_cache_hits_total`.
struct Prediction {
    routed_cached: f64,
    hits_by_engine: Vec<f64>,
}

impl Prediction {
    fn engine_hits(&self) -> f64 {
        self.hits_by_engine.iter().sum()
    }
}

async fn predicted_and_hit(c: &reqwest::Client, e: &Engines, router: &RunningRouter) -> Prediction {
    let mut hits_by_engine = Vec::new();
    for url in &e.urls {
        hits_by_engine.push(settled(c, url, "vllm:prefix_cache_hits_total", &[]).await);
    }
    let routed_cached = sum(&scrape(c, &base(router)).await, "router_routed_cached_tokens_total", &[]);
    Prediction { routed_cached, hits_by_engine }
}

async fn until_feeds_connected(c: &reqwest::Client, e: &Engines, router: &RunningRouter) {
    for _ in 0..300 {
        let text = scrape(c, &base(router)).await;
        if sum(&text, "router_kv_events_connected", &[]) == e.urls.len() as f64 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the router's KV event feeds never connected to the engines");
}

/// Wait until the router has taken in the engines' events: no new batch for 500 ms.
async fn events_settled(c: &reqwest::Client, router: &RunningRouter) {
    let mut last = -1.0;
    for _ in 0..40 {
        let now = sum(&scrape(c, &base(router)).await, "router_kv_event_batches_total", &[]);
        if now == last {
            return;
        }
        last = now;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    panic!("KV event batches never stopped arriving");
}

/// The router's series that tell what happened to its knowledge of the engines' caches.
const FEED_SERIES: [&str; 6] = [
    "router_kv_index_resets_total",
    "router_kv_feed_errors_total",
    "router_kv_event_gaps_total",
    "router_kv_event_batches_total",
    "router_retries_total",
    "router_upstream_errors_total",
];

/// A request through the router and what `--explain-routing` said of it.
async fn send_explained(c: &reqwest::Client, router: &RunningRouter, body: &Value) -> (String, String) {
    let url = format!("{}/v1/chat/completions", base(router));
    let request = c.post(url).header("content-type", "application/json").body(body.to_string());
    let response = request.send().await.unwrap();
    let header =
        |name: &str| response.headers().get(name).and_then(|v| v.to_str().ok()).unwrap_or("-").to_owned();
    let explained = format!(
        "{} {} cached {} (best {})",
        header("x-router-replica"),
        header("x-router-reason"),
        header("x-router-cached-tokens"),
        header("x-router-best-cached-tokens")
    );
    let status = response.status();
    let text = response.text().await.unwrap();
    assert_eq!(status, 200, "{text}");
    (text, explained)
}

/// Conversations that grow turn by turn, without session keys: kv-aware places them. Each
/// request's predicted cached tokens must equal the engines' prefix-cache hits for it; a
/// failure shows every request so far (where it went, why, what the router believed) and
/// each engine's hits.
async fn conversations(c: &reqwest::Client, e: &Engines, router: &RunningRouter, seed: u64) {
    let mut trace: Vec<String> = Vec::new();
    let mut histories: Vec<Vec<Value>> =
        (0..4).map(|i| vec![json!({"role": "system", "content": words(seed + i, 250)})]).collect();
    for turn in 0..3 {
        for (i, history) in histories.iter_mut().enumerate() {
            history.push(json!({"role": "user", "content": words(seed * 100 + i as u64 * 10 + turn, 25)}));
            let body = json!({"model": MODEL, "messages": history, "max_tokens": 8, "temperature": 0});
            let before = predicted_and_hit(c, e, router).await;
            let (text, explained) = send_explained(c, router, &body).await;
            let answer: Value = serde_json::from_str(&text).unwrap();
            history.push(answer["choices"][0]["message"].clone());
            events_settled(c, router).await;
            let after = predicted_and_hit(c, e, router).await;
            let predicted = after.routed_cached - before.routed_cached;
            let hit = after.engine_hits() - before.engine_hits();
            let by_engine: Vec<f64> =
                after.hits_by_engine.iter().zip(&before.hits_by_engine).map(|(a, b)| a - b).collect();
            trace.push(format!(
                "conversation {i} turn {turn}: {} prompt tokens, {explained}, engines hit {by_engine:?}",
                answer["usage"]["prompt_tokens"]
            ));
            if predicted != hit {
                let text = scrape(c, &base(router)).await;
                let feeds: Vec<&str> = text
                    .lines()
                    .filter(|l| FEED_SERIES.iter().any(|s| l.starts_with(s)) && !l.ends_with(" 0"))
                    .collect();
                panic!(
                    "conversation {i} turn {turn}: predicted {predicted} cached tokens, the engines hit {hit}; \
                     the requests so far:\n{}\nthe router's feeds and retries:\n{}",
                    trace.join("\n"),
                    feeds.join("\n")
                );
            }
        }
    }
}

#[tokio::test]
async fn kv_aware_predicts_the_engines_prefix_cache_hits_exactly() {
    let Some(e) = engines() else { return };
    let _turn = SERIAL.lock().await;
    let mut extra: Vec<String> = vec![
        "--policy".into(),
        "kv-aware".into(),
        "--tokenizer".into(),
        e.model_dir.clone(),
        "--explain-routing".into(),
    ];
    for (i, url) in e.urls.iter().enumerate() {
        extra.push("--kv-events-endpoint".into());
        extra.push(format!("{url}={}", e.kv[i]));
        extra.push("--kv-events-replay-endpoint".into());
        extra.push(format!("{url}={}", e.replay[i]));
    }
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let router = start_router(&e, &extra).await;
    let c = http();
    until_feeds_connected(&c, &e, &router).await;
    // What the engines already hold from earlier tests and runs is not in this router's
    // index: the conversations here are new to them.
    let run = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    let (seed, seed2) = (run * 1000, run * 1000 + 500);
    let start = predicted_and_hit(&c, &e, &router).await;
    conversations(&c, &e, &router, seed).await;
    let first = predicted_and_hit(&c, &e, &router).await;
    let predicted = first.routed_cached - start.routed_cached;
    let hit = first.engine_hits() - start.engine_hits();
    eprintln!("kv-aware: predicted {predicted} cached tokens, the engines hit {hit}");
    assert!(hit >= 4.0 * 2.0 * 256.0, "later turns should hit the cache: {hit}");
    assert_eq!(predicted, hit, "the router's prediction against the engines' own count");

    // An engine restarts: its cache is empty, and the router must know.
    let restarted = e.urls.len() - 1;
    let script = e.script.clone();
    let status = tokio::task::spawn_blocking(move || {
        std::process::Command::new("bash").args([script, "restart".into(), restarted.to_string()]).status()
    })
    .await
    .unwrap()
    .unwrap();
    assert!(status.success(), "restarting engine {restarted}");
    until_all_healthy(&router, e.urls.len()).await;
    until_feeds_connected(&c, &e, &router).await;
    // The same conversations again (their prefixes are cached where they survived), then
    // new ones.
    let before = predicted_and_hit(&c, &e, &router).await;
    conversations(&c, &e, &router, seed).await;
    conversations(&c, &e, &router, seed2).await;
    let after = predicted_and_hit(&c, &e, &router).await;
    let predicted = after.routed_cached - before.routed_cached;
    let hit = after.engine_hits() - before.engine_hits();
    eprintln!("kv-aware after a restart: predicted {predicted}, the engines hit {hit}");
    assert_eq!(predicted, hit, "after engine {restarted} restarted");
    router.shutdown().await;
}

#[tokio::test]
async fn pd_moves_the_prefill_over_nixl_and_decodes_from_token_ids() {
    let Some(e) = engines() else { return };
    let _turn = SERIAL.lock().await;
    // Engine 0 prefills, engine 1 decodes; both run vLLM's NixlConnector on CPU.
    let pd = PdEngines::start(&e.script).await;
    let e = &pd.engines;
    let (prefill, decode) = (&e.urls[0], &e.urls[1]);
    let (p, d) = (format!("prefill={prefill}"), format!("decode={decode}"));
    // The router as the engines' OpenAI client, then as their frontend (token ids through
    // vLLM's generate endpoint for both stages).
    for generate in [false, true] {
        let mut args = vec![
            "router",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--pd",
            &p,
            &d,
            "--health-interval",
            "200ms",
        ];
        if generate {
            args.extend_from_slice(&["--engine-api", "generate", "--tokenizer", &e.model_dir]);
        }
        let config = llm_router::config::Cli::parse_from(args).into_config().unwrap();
        let router = router(config).await;
        until_all_healthy(&router, 2).await;
        pd_requests(&router, decode, generate).await;
        router.shutdown().await;
    }
}

async fn pd_requests(router: &llm_router::server::RunningRouter, decode: &str, generate: bool) {
    let c = http();
    // The first transfer between two engines starts with a NIXL handshake, which vLLM
    // gives 5 s (a fixed socket timeout in its NixlConnector); two NIXL engines on a
    // loaded 2-core machine can miss it, and the request then fails with the engine's
    // 500, which the router passes on. Warm the pair up first (bounded), then measure.
    let warm = json!({"model": MODEL, "prompt": words(299, 200), "max_tokens": 2, "temperature": 0});
    let mut warmed = false;
    for _ in 0..6 {
        if send(&c, &format!("{}/v1/completions", base(router)), &warm, &[]).await.0 == 200 {
            warmed = true;
            break;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    assert!(warmed, "no P/D request succeeded in 6 tries: the NIXL handshake between the engines fails");
    let transfers = "vllm:nixl_xfer_time_seconds_count";
    let failed = "vllm:nixl_num_failed_transfers_total";
    let chat = json!({"model": MODEL, "messages": [{"role": "user", "content": words(300, 200)}],
        "max_tokens": 16, "temperature": 0});
    let completion = json!({"model": MODEL, "prompt": words(301, 200), "max_tokens": 16, "temperature": 0});
    for (path, base_body) in [("/v1/chat/completions", chat), ("/v1/completions", completion)] {
        for stream in [false, true] {
            let mut body = base_body.clone();
            body["stream"] = json!(stream);
            if stream {
                body["stream_options"] = json!({"include_usage": true});
            }
            let what = format!("P/D generate={generate} {path} stream={stream}");
            let moved = settled(&c, decode, transfers, &[]).await;
            let failed_before = settled(&c, decode, failed, &[]).await;
            let once =
                sum(&scrape(&c, &base(router)).await, "router_pd_tokenize_once_total", &[r#"mode="on""#]);
            let (status, routed) = send(&c, &format!("{}{path}", base(router)), &body, &[]).await;
            assert_eq!(status, 200, "{what}: {routed}");
            // The decode engine pulled the prefill's KV over NIXL, and was given token ids.
            assert_eq!(settled(&c, decode, transfers, &[]).await, moved + 1.0, "{what}: one NIXL transfer");
            assert_eq!(settled(&c, decode, failed, &[]).await, failed_before, "{what}: a failed transfer");
            let text = scrape(&c, &base(router)).await;
            assert_eq!(sum(&text, "router_pd_tokenize_once_total", &[r#"mode="on""#]), once + 1.0, "{what}");
            assert_eq!(sum(&text, "router_pd_fallbacks_total", &[]), 0.0, "{what}");
            let generated = sum(&text, "router_engine_api_requests_total", &[r#"path="generate""#]);
            assert_eq!(generated > 0.0, generate, "{what}: through the generate endpoint");
            // What the client reads equals one engine doing it all.
            let (direct_status, direct) = send(&c, &format!("{decode}{path}"), &body, &[]).await;
            assert_eq!(direct_status, 200, "{what}: {direct}");
            assert_eq!(reading(&routed, stream), reading(&direct, stream), "{what}");
            if stream {
                assert!(routed.ends_with("data: [DONE]\n\n"), "{what}: {routed}");
            }
        }
    }
}
