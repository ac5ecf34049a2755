//! Keys with limits, and fair queueing, through a real router and simulated replicas on
//! 127.0.0.1: requests and tokens per minute (429 with Retry-After, no over-admission
//! under concurrency), a model allow-list, the usage chunk asked for and taken out
//! again, per-key usage counters, the keys file reloaded while serving, and a key's
//! flood that another key's requests do not queue behind.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use llm_router::admission::{QueueOrder, load_api_keys_file};
use llm_router::config::{KeySource, RouterConfig};
use llm_router::replicas::ReplicaUrl;
use llm_router::server::RunningRouter;
use serde_json::{Value, json};
use vllm_sim::{self as sim, RunningSim, SimConfig};

const MODEL: &str = "Qwen/Qwen3-0.6B-FP8";

fn keys_file(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("llm-router-key-limits-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("keys.toml");
    std::fs::write(&path, text).unwrap();
    path
}

async fn setup(
    time_scale: f64,
    keys: &std::path::Path,
    configure: impl FnOnce(&mut RouterConfig),
) -> (Vec<RunningSim>, RunningRouter) {
    let sims = sim::start_fleet(1, &SimConfig { time_scale, ..SimConfig::default() }).await.unwrap();
    let mut config = RouterConfig::new(sims.iter().map(|s| ReplicaUrl::parse(&s.url()).unwrap()).collect());
    config.api_keys = load_api_keys_file(keys).unwrap();
    config.key_source = KeySource::from_file(keys.to_path_buf());
    configure(&mut config);
    (sims, llm_router::server::start(config).await.unwrap())
}

async fn complete(router: &RunningRouter, key: &str, body: Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("http://{}/v1/completions", router.addr))
        .header("authorization", format!("Bearer {key}"))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap()
}

fn small() -> Value {
    json!({"model": MODEL, "prompt": "hello", "max_tokens": 2})
}

async fn scrape(router: &RunningRouter, key: &str) -> String {
    let r = reqwest::Client::new()
        .get(format!("http://{}/metrics", router.addr))
        .header("authorization", format!("Bearer {key}"))
        .send()
        .await
        .unwrap();
    r.text().await.unwrap()
}

fn metric(text: &str, series: &str) -> f64 {
    text.lines().find_map(|l| l.strip_prefix(series)?.trim().parse().ok()).unwrap_or(f64::NAN)
}

#[tokio::test]
async fn a_key_over_its_requests_per_minute_gets_429_while_another_is_served() {
    let keys = keys_file(
        "rpm",
        r#"
[[keys]]
name = "five"
key = "sk-five"
requests_per_minute = 5

[[keys]]
name = "free"
key = "sk-free"
"#,
    );
    let (_sims, router) = setup(50.0, &keys, |_| {}).await;
    for _ in 0..5 {
        assert_eq!(complete(&router, "sk-five", small()).await.status(), 200);
    }
    let sixth = complete(&router, "sk-five", small()).await;
    assert_eq!(sixth.status(), 429);
    let retry: u64 = sixth.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=12).contains(&retry), "one request comes back every 12 s: {retry}");
    let body: Value = sixth.json_value().await;
    assert_eq!(body["error"]["type"], "RateLimitError");
    assert_eq!(body["error"]["code"], 429);
    assert!(body["error"]["message"].as_str().unwrap().contains("5 requests per minute"), "{body}");
    assert_eq!(complete(&router, "sk-free", small()).await.status(), 200, "another key is served");
    let text = scrape(&router, "sk-five").await;
    assert_eq!(metric(&text, r#"router_key_rate_limited_total{key="five",limit="requests"}"#), 1.0);
    assert_eq!(metric(&text, r#"router_key_requests_total{key="five",status="200"}"#), 5.0);
    assert_eq!(metric(&text, r#"router_key_requests_total{key="five",status="429"}"#), 1.0);
    assert!(!text.contains("sk-five"), "metrics name keys, never the secret");
    assert!(!text.contains(r#"key="free""#), "a key sees its own series only");
    // Another key sees its own, and nothing of "five"'s.
    let text = scrape(&router, "sk-free").await;
    assert_eq!(metric(&text, r#"router_key_requests_total{key="free",status="200"}"#), 1.0);
    assert!(!text.contains(r#"key="five""#), "{text}");
    router.shutdown().await;
}

#[tokio::test]
async fn concurrent_requests_never_exceed_the_limit() {
    let keys = keys_file("burst", "[[keys]]\nname = \"k\"\nkey = \"sk-k\"\nrequests_per_minute = 7\n");
    let (_sims, router) = setup(50.0, &keys, |_| {}).await;
    let router = Arc::new(router);
    let sent: Vec<_> = (0..40)
        .map(|_| {
            let router = router.clone();
            tokio::spawn(async move { complete(&router, "sk-k", small()).await.status().as_u16() })
        })
        .collect();
    let mut statuses = Vec::new();
    for task in sent {
        statuses.push(task.await.unwrap());
    }
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 7, "{statuses:?}");
    assert_eq!(statuses.iter().filter(|s| **s == 429).count(), 33, "{statuses:?}");
}

#[tokio::test]
async fn tokens_are_charged_from_the_engines_usage_and_its_chunk_is_asked_for_and_removed() {
    let keys = keys_file(
        "tpm",
        r#"
[[keys]]
name = "tokens"
key = "sk-t"
tokens_per_minute = 150
models = ["Qwen/Qwen3-0.6B-FP8"]

[[keys]]
name = "elsewhere"
key = "sk-e"
models = ["another-model"]
"#,
    );
    let (_sims, router) = setup(50.0, &keys, |_| {}).await;
    let stream = json!({"model": MODEL, "prompt": "hello there", "max_tokens": 60, "stream": true,
        "ignore_eos": true});
    let first = complete(&router, "sk-t", stream.clone()).await;
    assert_eq!(first.status(), 200);
    let text = first.text().await.unwrap();
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    assert!(!text.contains("\"usage\""), "the client did not ask for usage: {text}");
    // The engine was asked for it: its counts are the key's.
    let metrics = scrape(&router, "sk-t").await;
    assert_eq!(metric(&metrics, r#"router_key_tokens_total{key="tokens",kind="completion"}"#), 60.0);
    let prompt = metric(&metrics, r#"router_key_tokens_total{key="tokens",kind="prompt"}"#);
    assert!(prompt >= 1.0, "{prompt}");
    // A client that asks for usage gets it; with what it reserves (its prompt and 60
    // tokens), a third does not fit in 150 per minute.
    let asked = json!({"model": MODEL, "prompt": "hello there", "max_tokens": 60, "stream": true,
        "ignore_eos": true, "stream_options": {"include_usage": true}});
    let second = complete(&router, "sk-t", asked).await;
    assert_eq!(second.status(), 200);
    assert!(second.text().await.unwrap().contains("\"usage\""));
    let third = complete(&router, "sk-t", stream).await;
    assert_eq!(third.status(), 429, "120+ tokens used, 60+ more reserved, of 150 per minute");
    assert!(third.headers().contains_key("retry-after"));
    let body: Value = third.json_value().await;
    assert!(body["error"]["message"].as_str().unwrap().contains("tokens per minute"), "{body}");
    // The allow-list: /v1/models lists only what the key may use.
    let listed = reqwest::Client::new()
        .get(format!("http://{}/v1/models", router.addr))
        .header("authorization", "Bearer sk-t")
        .send()
        .await
        .unwrap()
        .json_value()
        .await;
    assert_eq!(listed["data"][0]["id"], MODEL);
    let listed = reqwest::Client::new()
        .get(format!("http://{}/v1/models", router.addr))
        .header("authorization", "Bearer sk-e")
        .send()
        .await
        .unwrap()
        .json_value()
        .await;
    assert_eq!(listed["data"], serde_json::json!([]), "a key sees only its models");
    // Another model is one this key cannot see.
    let other = complete(&router, "sk-t", json!({"model": "other", "prompt": "x"})).await;
    assert_eq!(other.status(), 404);
    let body: Value = other.json_value().await;
    assert_eq!(body["error"]["param"], "model");
    router.shutdown().await;
}

#[tokio::test]
async fn concurrent_requests_reserve_their_output_and_cannot_exceed_the_token_limit() {
    let keys = keys_file("tpm-burst", "[[keys]]\nname = \"k\"\nkey = \"sk-k\"\ntokens_per_minute = 1000\n");
    let (_sims, router) = setup(20.0, &keys, |_| {}).await;
    let router = Arc::new(router);
    // 16 at once, each a tiny prompt that may generate 400 tokens: two fit in 1,000.
    let body = json!({"model": MODEL, "prompt": "hi", "max_tokens": 400, "ignore_eos": true});
    let sent: Vec<_> = (0..16)
        .map(|_| {
            let (router, body) = (router.clone(), body.clone());
            tokio::spawn(async move { complete(&router, "sk-k", body).await.status().as_u16() })
        })
        .collect();
    let mut statuses = Vec::new();
    for task in sent {
        statuses.push(task.await.unwrap());
    }
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 2, "{statuses:?}");
    let metrics = scrape(&router, "sk-k").await;
    let used = metric(&metrics, r#"router_key_tokens_total{key="k",kind="prompt"}"#)
        + metric(&metrics, r#"router_key_tokens_total{key="k",kind="completion"}"#);
    assert!(used <= 1000.0, "{used} tokens used of 1,000 per minute");
    // n and a batch of prompts multiply what a request may cost: 3 x 2 x 200 > 1,000
    // (the simulator refuses both: what it refuses costs the key its prompt only).
    let keys = keys_file("tpm-n", "[[keys]]\nname = \"k\"\nkey = \"sk-k\"\ntokens_per_minute = 1000\n");
    let (_sims, router) = setup(20.0, &keys, |_| {}).await;
    let batch = json!({"model": MODEL, "prompt": ["a", "b", "c"], "n": 2, "max_tokens": 200});
    assert_eq!(complete(&router, "sk-k", batch.clone()).await.status(), 400, "a full bucket lets it in");
    assert_eq!(complete(&router, "sk-k", small()).await.status(), 200, "its reservation came back");
    let held = json!({"model": MODEL, "prompt": "hi", "max_tokens": 900, "stream": true});
    let mut holding = complete(&router, "sk-k", held).await;
    assert_eq!(holding.status(), 200);
    assert_eq!(complete(&router, "sk-k", batch).await.status(), 429, "900 reserved: 1,200 do not fit");
    while holding.chunk().await.unwrap().is_some() {}
}

#[tokio::test]
async fn a_request_naming_no_max_tokens_reserves_the_keys_default() {
    let keys = keys_file(
        "default-max",
        "[[keys]]\nname = \"k\"\nkey = \"sk-k\"\ntokens_per_minute = 1000\ndefault_max_tokens = 300\n",
    );
    let (_sims, router) = setup(20.0, &keys, |_| {}).await;
    let router = Arc::new(router);
    let chat = || async {
        reqwest::Client::new()
            .post(format!("http://{}/v1/chat/completions", router.addr))
            .header("authorization", "Bearer sk-k")
            .header("content-type", "application/json")
            .body(
                json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": true})
                    .to_string(),
            )
            .send()
            .await
            .unwrap()
    };
    // Three of 300 (and their prompts) fit in 1,000, a fourth does not, while they stream.
    let mut streams = Vec::new();
    for _ in 0..3 {
        let response = chat().await;
        assert_eq!(response.status(), 200);
        streams.push(response);
    }
    assert_eq!(chat().await.status(), 429);
    for mut stream in streams {
        while stream.chunk().await.unwrap().is_some() {}
    }
}

#[tokio::test]
async fn a_client_that_hangs_up_is_charged_what_it_was_sent() {
    let keys = keys_file("hangup", "[[keys]]\nname = \"k\"\nkey = \"sk-k\"\ntokens_per_minute = 5000\n");
    let (_sims, router) = setup(1.0, &keys, |_| {}).await;
    let stream =
        json!({"model": MODEL, "prompt": "hi", "max_tokens": 2000, "stream": true, "ignore_eos": true});
    let mut response = complete(&router, "sk-k", stream).await;
    assert_eq!(response.status(), 200);
    let mut events = 0;
    while events < 60 {
        let chunk = response.chunk().await.unwrap().unwrap();
        events += chunk.windows(2).filter(|w| w == b"\n\n").count();
    }
    drop(response);
    // The key was charged what it was sent (60 events at least), not its prompt alone:
    // 5,000 less 2 for the prompt and 60 sent is less than this request reserves.
    let mut refused = None;
    for _ in 0..50 {
        let fits_without_charge = json!({"model": MODEL, "prompt": "hi", "max_tokens": 4945});
        let status = complete(&router, "sk-k", fits_without_charge).await.status();
        if status == 429 {
            refused = Some(status);
            break;
        }
        // Not settled yet (the router notices the hang-up when it next writes).
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(refused.map(|s| s.as_u16()), Some(429), "the hang-up was charged what was sent");
    // ...and given back the rest of what it reserved (2,000 tokens less the few sent).
    let rest = json!({"model": MODEL, "prompt": "hi", "max_tokens": 2, "ignore_eos": true});
    assert_eq!(complete(&router, "sk-k", rest).await.status(), 200);
}

#[tokio::test]
async fn the_keys_file_is_reloaded_and_a_bad_edit_keeps_the_last_good_set() {
    let keys = keys_file("reload", "[[keys]]\nname = \"old\"\nkey = \"sk-old\"\n");
    let (_sims, router) = setup(50.0, &keys, |_| {}).await;
    assert_eq!(complete(&router, "sk-old", small()).await.status(), 200);
    assert_eq!(complete(&router, "sk-new", small()).await.status(), 401);
    std::fs::write(&keys, "[[keys]]\nname = \"new\"\nkey = \"sk-new\"\nrequests_per_minute = 1\n").unwrap();
    let mut reloaded = false;
    for _ in 0..100 {
        if complete(&router, "sk-new", small()).await.status() == 200 {
            reloaded = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(reloaded, "the new key works after the file changed");
    assert_eq!(complete(&router, "sk-old", small()).await.status(), 401, "the old one is gone");
    assert_eq!(complete(&router, "sk-new", small()).await.status(), 429, "with its limit");
    std::fs::write(&keys, "[[keys]]\nname = \"broken\"\nkey = \n").unwrap();
    let mut counted = false;
    for _ in 0..100 {
        let text = scrape(&router, "sk-new").await;
        if metric(&text, r#"router_config_reloads_total{file="api_keys",outcome="error"}"#) >= 1.0 {
            counted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(counted, "the failed reload is counted");
    assert_eq!(complete(&router, "sk-new", small()).await.status(), 429, "the last good set stays");
    router.shutdown().await;
}

#[tokio::test]
async fn a_keys_file_caught_half_written_is_not_loaded() {
    let keys = keys_file("half", "[[keys]]\nname = \"old\"\nkey = \"sk-old\"\n");
    let (_sims, router) = setup(50.0, &keys, |_| {}).await;
    // Start just after one of the router's looks at the file (one a second).
    std::fs::write(&keys, "[[keys]]\nname = \"old\"\nkey = \"sk-old\"\n\n").unwrap();
    for _ in 0..100 {
        let text = scrape(&router, "sk-old").await;
        if metric(&text, r#"router_config_reloads_total{file="api_keys",outcome="ok"}"#) == 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A writer that writes the file in two parts, 0.6 s apart: the first part is valid
    // TOML on its own (a new key, and the old key not yet written). A router that loads
    // what it sees at its next look (every second) serves the half file in most rounds.
    for round in 0..4 {
        // (The router looked at the file just before the last round's reload was seen:
        // 0.45 s on, the half file's 0.6 s span its next look.)
        tokio::time::sleep(Duration::from_millis(450)).await;
        let first = format!("[[keys]]\nname = \"first{round}\"\nkey = \"sk-first{round}\"\n");
        std::fs::write(&keys, &first).unwrap();
        for _ in 0..6 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            assert_eq!(complete(&router, "sk-old", small()).await.status(), 200, "the half file served");
        }
        std::fs::write(&keys, format!("{first}\n[[keys]]\nname = \"old\"\nkey = \"sk-old\"\n")).unwrap();
        let mut reloaded = false;
        for _ in 0..100 {
            if complete(&router, &format!("sk-first{round}"), small()).await.status() == 200 {
                reloaded = true;
                break;
            }
            assert_eq!(complete(&router, "sk-old", small()).await.status(), 200, "the half file served");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(reloaded, "the whole file is loaded (round {round})");
    }
    let text = scrape(&router, "sk-old").await;
    assert_eq!(
        metric(&text, r#"router_config_reloads_total{file="api_keys",outcome="ok"}"#),
        5.0,
        "whole files only"
    );
    router.shutdown().await;
}

/// One key floods a router with 2 slots while another sends one request; returns how
/// many of the flood's requests finished before the other's did.
async fn flood_finished_before_the_trickle(order: QueueOrder) -> usize {
    let keys = keys_file(
        &format!("fair-{order:?}"),
        "[[keys]]\nname = \"flood\"\nkey = \"sk-flood\"\n\n[[keys]]\nname = \"trickle\"\nkey = \"sk-trickle\"\n",
    );
    let (_sims, router) = setup(2.0, &keys, |c| {
        c.limit = Some((2, 100, Duration::from_secs(60)));
        c.queue_order = order;
    })
    .await;
    let router = Arc::new(router);
    let finished = Arc::new(std::sync::Mutex::new(Vec::new()));
    let body = json!({"model": MODEL, "prompt": "flood", "max_tokens": 100, "ignore_eos": true});
    let mut tasks = Vec::new();
    for i in 0..16 {
        let (router, finished, body) = (router.clone(), finished.clone(), body.clone());
        tasks.push(tokio::spawn(async move {
            assert_eq!(complete(&router, "sk-flood", body).await.status(), 200);
            finished.lock().unwrap().push(format!("flood-{i}"));
        }));
    }
    // Every slot is taken and the flood is queued before the other key's request.
    let text_router = router.clone();
    let mut queued = false;
    for _ in 0..100 {
        let text = scrape(&text_router, "sk-trickle").await;
        if metric(&text, "router_queued_requests") >= 12.0 {
            queued = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(queued);
    assert_eq!(complete(&router, "sk-trickle", body.clone()).await.status(), 200);
    finished.lock().unwrap().push("trickle".into());
    for task in tasks {
        task.await.unwrap();
    }
    let order = finished.lock().unwrap().clone();
    order.iter().position(|name| name == "trickle").unwrap()
}

#[tokio::test]
async fn a_floods_requests_do_not_queue_ahead_of_another_keys() {
    let fair = flood_finished_before_the_trickle(QueueOrder::Fair).await;
    assert!(
        fair <= 6,
        "fair: the other key waited for the next free slot, {fair} of the flood finished first"
    );
    let fifo = flood_finished_before_the_trickle(QueueOrder::Fifo).await;
    assert!(fifo >= 11, "fifo: the other key waited behind the flood, {fifo} finished first");
}

trait JsonValue {
    async fn json_value(self) -> Value;
}

impl JsonValue for reqwest::Response {
    async fn json_value(self) -> Value {
        serde_json::from_str(&self.text().await.unwrap()).unwrap()
    }
}
