//! `--explain-routing`: every response names the replica, the policy and its reason; for
//! kv-aware also the prompt tokens the router believed cached on the chosen replica and
//! the most any eligible replica held, and the routing loss between them is counted in
//! `router_routing_cached_tokens_total`. Without the flag no such header is sent.

mod support;

use clap::Parser;
use reqwest::header::HeaderMap;
use serde_json::{Value, json};
use support::*;

async fn kv_router(explain: bool) -> llm_router::server::RunningRouter {
    let mut args = vec!["router", "--host", "127.0.0.1", "--port", "0", "--sim", "2", "--policy", "kv-aware"];
    args.extend_from_slice(&["--sim-time-scale", "50", "--session-header", "x-session-id"]);
    if explain {
        args.push("--explain-routing");
    }
    router(llm_router::config::Cli::parse_from(args).into_config().unwrap()).await
}

fn conversation(name: &str) -> Value {
    let text: String =
        (0..60).map(|i| format!("{name} rule {i}: state the error and its cause.\n")).collect();
    json!({"model": "Qwen/Qwen3-0.6B-FP8", "max_tokens": 4,
        "messages": [{"role": "system", "content": text}, {"role": "user", "content": "go"}]})
}

async fn ask(router: &llm_router::server::RunningRouter, body: &Value, session: Option<&str>) -> HeaderMap {
    let mut request = client()
        .post(format!("{}/v1/chat/completions", base(router)))
        .header("content-type", "application/json")
        .body(body.to_string());
    if let Some(session) = session {
        request = request.header("x-session-id", session);
    }
    let response = request.send().await.unwrap();
    assert_eq!(response.status(), 200);
    let headers = response.headers().clone();
    let _ = response.bytes().await.unwrap();
    headers
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> &'a str {
    headers.get(name).unwrap_or_else(|| panic!("no {name}: {headers:?}")).to_str().unwrap()
}

fn number(headers: &HeaderMap, name: &str) -> usize {
    header(headers, name).parse().unwrap()
}

#[tokio::test]
async fn decisions_and_routing_loss_are_explained() {
    let router = kv_router(true).await;
    let shared = conversation("shared");
    let first = ask(&router, &shared, None).await;
    let holder = header(&first, "x-router-replica").to_owned();
    assert_eq!(header(&first, "x-router-policy"), "kv-aware");
    assert_eq!(
        (number(&first, "x-router-cached-tokens"), number(&first, "x-router-best-cached-tokens")),
        (0, 0)
    );

    // Asked again, it goes where it is held: nothing lost.
    let again = ask(&router, &shared, None).await;
    assert_eq!(
        (header(&again, "x-router-replica"), header(&again, "x-router-reason")),
        (holder.as_str(), "cached")
    );
    let held = number(&again, "x-router-cached-tokens");
    assert!(held > 500, "the conversation's prompt is believed held: {held}");
    assert_eq!(number(&again, "x-router-best-cached-tokens"), held);

    // A session whose home is the other replica takes the conversation there by affinity:
    // the router knew the holder had more.
    let mut other = None;
    for k in 0..32 {
        let session = format!("s{k}");
        let placed = ask(&router, &conversation(&format!("own-{k}")), Some(&session)).await;
        if header(&placed, "x-router-replica") != holder {
            other = Some(session);
            break;
        }
    }
    let session = other.expect("some session lives on the other replica");
    let moved = ask(&router, &shared, Some(&session)).await;
    assert_ne!(header(&moved, "x-router-replica"), holder);
    assert_eq!(header(&moved, "x-router-reason"), "affinity");
    let (chosen, best) =
        (number(&moved, "x-router-cached-tokens"), number(&moved, "x-router-best-cached-tokens"));
    assert!(chosen < best && best >= held, "chosen {chosen}, best {best}");

    let text = router.metrics.render();
    let total = |kind: &str| {
        metric(&text, &format!(r#"router_routing_cached_tokens_total{{kind="{kind}",policy="kv-aware"}}"#))
    };
    assert!(total("best") - total("chosen") >= (best - chosen) as f64, "the loss is counted: {text}");
    router.shutdown().await;
}

#[tokio::test]
async fn without_the_flag_no_decision_is_explained() {
    let router = kv_router(false).await;
    let headers = ask(&router, &conversation("quiet"), None).await;
    let named: Vec<&str> =
        headers.keys().map(|k| k.as_str()).filter(|k| k.starts_with("x-router-")).collect();
    assert!(named.is_empty(), "{named:?}");
    router.shutdown().await;
}

/// `body` sent with an API key; the response's headers and JSON body.
async fn ask_as(router: &llm_router::server::RunningRouter, key: &str, body: &Value) -> (HeaderMap, Value) {
    let response = client()
        .post(format!("{}/v1/chat/completions", base(router)))
        .header("content-type", "application/json")
        .header("authorization", format!("Bearer {key}"))
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let headers = response.headers().clone();
    (headers, serde_json::from_slice(&response.bytes().await.unwrap()).unwrap())
}

/// A replica's prefix-cache hits so far, in tokens (vLLM's counter).
async fn cache_hits(replica: &str) -> f64 {
    let text = client().get(format!("{replica}/metrics")).send().await.unwrap().text().await.unwrap();
    text.lines()
        .filter(|l| l.starts_with("vllm:prefix_cache_hits_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn an_isolated_tenants_prompts_are_neither_shared_nor_told_to_others() {
    let dir = std::env::temp_dir().join(format!("llm-router-isolation-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let keys = dir.join("keys.toml");
    std::fs::write(
        &keys,
        "[[keys]]\nname = \"a\"\nkey = \"sk-a\"\ncache_isolation = true\n\n[[keys]]\nname = \"b\"\nkey = \"sk-b\"\n",
    )
    .unwrap();
    let args = [
        "router",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--sim",
        "2",
        "--policy",
        "kv-aware",
        "--sim-time-scale",
        "50",
        "--explain-routing",
        "--api-keys-file",
        keys.to_str().unwrap(),
    ];
    let router = router(llm_router::config::Cli::parse_from(args).into_config().unwrap()).await;
    let secret = conversation("tenant a's private instructions");
    // A's prompt, twice: the second is served from A's own cache.
    let (first, _) = ask_as(&router, "sk-a", &secret).await;
    let holder = header(&first, "x-router-replica").to_owned();
    let before = cache_hits(&holder).await;
    let (again, _) = ask_as(&router, "sk-a", &secret).await;
    assert_eq!(header(&again, "x-router-replica"), holder);
    assert!(number(&again, "x-router-cached-tokens") > 500, "{again:?}");
    assert!(cache_hits(&holder).await - before > 500.0, "the engine served A its own cache");
    // The engines reported A's blocks (under A's salt) by now.
    eventually("the engines' events of A's blocks", || {
        router.metrics.render().lines().any(|l| {
            l.starts_with("router_kv_event_blocks_total{") && l.contains("stored") && !l.ends_with(" 0")
        })
    })
    .await;
    // B sends the same prompt: the router tells it of no cache it could hit, and the
    // engine serves it none of A's blocks.
    let mut hits = Vec::new();
    for replica in router.registry.replicas() {
        hits.push(cache_hits(replica.name()).await);
    }
    let (told, _) = ask_as(&router, "sk-b", &secret).await;
    assert_eq!(number(&told, "x-router-best-cached-tokens"), 0, "{told:?}");
    for (replica, before) in router.registry.replicas().iter().zip(hits) {
        assert_eq!(cache_hits(replica.name()).await, before, "B hit none of A's blocks");
    }
    // A salt B sends for itself is B's own business; A's is replaced whatever A sends.
    let mut guessed = secret.clone();
    guessed["cache_salt"] = json!("tenant a's salt, guessed");
    let (told, _) = ask_as(&router, "sk-a", &guessed).await;
    assert!(number(&told, "x-router-cached-tokens") > 500, "A keeps its own salt: {told:?}");
}

/// An attempt that fails is retried on the other replica. The router counts the predicted
/// hits of the attempt that served the request only, and does not go on believing that
/// the failed replica holds a prompt it never stored: what it tells of that replica
/// afterwards is what its engine hits.
#[tokio::test]
async fn a_failed_attempt_leaves_no_belief_behind() {
    let router = kv_router(true).await;
    let hits = || async {
        let mut total = 0.0;
        for sim in &router.sims {
            total += cache_hits(&sim.url()).await;
        }
        total
    };
    let predicted =
        || metric(&router.metrics.render(), r#"router_routed_cached_tokens_total{policy="kv-aware"}"#);
    let mut body = conversation("retried");
    let first = ask(&router, &body, None).await;
    let holder = header(&first, "x-router-replica").to_owned();
    let failing = router.sims.iter().find(|s| s.url() == holder).unwrap();
    let other = router.sims.iter().find(|s| s.url() != holder).unwrap().url();

    // The conversation's next turn: its holder fails it, the other replica serves it.
    let messages = body["messages"].as_array_mut().unwrap();
    messages.push(json!({"role": "assistant", "content": "Understood."}));
    messages.push(json!({"role": "user", "content": "Now list every rule again, numbered, with its cause."}));
    failing.faults().set(vllm_sim::faults::FaultConfig { fail_500: true, ..Default::default() });
    let (hits_before, predicted_before) = (hits().await, predicted());
    let retried = ask(&router, &body, None).await;
    failing.faults().set(Default::default());
    assert_eq!(
        (header(&retried, "x-router-replica"), header(&retried, "x-router-reason")),
        (other.as_str(), "retry")
    );
    assert_eq!(
        predicted() - predicted_before,
        hits().await - hits_before,
        "only the serving attempt's prediction counts"
    );

    // The same turn again, by a session whose home is the replica that failed it: what the
    // router believes that replica holds is what its engine serves from cache.
    let mut session = None;
    for k in 0..32 {
        let placed = ask(&router, &conversation(&format!("own-{k}")), Some(&format!("s{k}"))).await;
        if header(&placed, "x-router-replica") == holder {
            session = Some(format!("s{k}"));
            break;
        }
    }
    let session = session.expect("some session lives on the replica that failed");
    let before = cache_hits(&holder).await;
    let again = ask(&router, &body, Some(&session)).await;
    assert_eq!(
        (header(&again, "x-router-replica"), header(&again, "x-router-reason")),
        (holder.as_str(), "affinity")
    );
    let believed = number(&again, "x-router-cached-tokens") as f64;
    let served = cache_hits(&holder).await - before;
    assert!(served > 500.0, "the first turn's blocks are still there: {served}");
    assert_eq!(believed, served, "the failed attempt's blocks are not believed held");
    router.shutdown().await;
}
