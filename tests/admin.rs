//! The runtime admin API against simulated replicas on 127.0.0.1: off unless a token
//! is set, bearer-guarded, URLs validated; replicas added, drained and removed while
//! streams are in flight, with those streams finishing and new requests going only
//! where they should.

use llm_router::admission::ApiKeys;
use std::time::Duration;

use llm_router::config::RouterConfig;
use llm_router::policy::PolicyKind;
use llm_router::replicas::ReplicaUrl;
use llm_router::server::RunningRouter;
use serde_json::{Value, json};
use tokio_stream::StreamExt;
use vllm_sim::{self as sim, RunningSim, SimConfig};

const TOKEN: &str = "s3cret-admin";
const MODEL: &str = "Qwen/Qwen3-0.6B-FP8";

async fn sims(n: usize) -> Vec<RunningSim> {
    sim::start_fleet(n, &SimConfig { time_scale: 20.0, ..SimConfig::default() }).await.unwrap()
}

async fn router(sims: &[RunningSim], configure: impl FnOnce(&mut RouterConfig)) -> RunningRouter {
    let mut config = RouterConfig::new(sims.iter().map(|s| ReplicaUrl::parse(&s.url()).unwrap()).collect());
    config.policy = PolicyKind::RoundRobin;
    config.admin_token = Some(TOKEN.into());
    configure(&mut config);
    llm_router::server::start(config).await.unwrap()
}

fn client() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(20)).build().unwrap()
}

async fn admin(
    base: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (u16, Value) {
    let mut r = client().request(method.parse().unwrap(), format!("{base}{path}"));
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    if let Some(b) = body {
        r = r.header("content-type", "application/json").body(b.to_string());
    }
    let response = r.send().await.unwrap();
    let status = response.status().as_u16();
    (status, serde_json::from_slice(&response.bytes().await.unwrap()).unwrap_or(Value::Null))
}

async fn complete(router: &RunningRouter) -> u16 {
    client()
        .post(format!("http://{}/v1/completions", router.addr))
        .header("content-type", "application/json")
        .body(json!({"model": MODEL, "prompt": "hi", "max_tokens": 2}).to_string())
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

fn served(sim: &RunningSim) -> usize {
    sim.state.log.entries().len()
}

#[tokio::test]
async fn off_without_a_token_and_guarded_with_one() {
    let fleet = sims(1).await;
    let off = router(&fleet, |c| c.admin_token = None).await;
    let (status, _) =
        admin(&format!("http://{}", off.addr), "GET", "/admin/replicas", Some(TOKEN), None).await;
    assert_eq!(status, 404, "no admin API without --admin-token");

    let on = router(&fleet, |c| c.api_keys = ApiKeys::from_flags(&["client-key".into()])).await;
    let base = format!("http://{}", on.addr);
    for token in [None, Some("wrong"), Some("client-key")] {
        let (status, body) = admin(&base, "GET", "/admin/replicas", token, None).await;
        assert_eq!(status, 401, "{token:?}");
        assert_eq!(body["error"]["type"], "AuthenticationError");
    }
    let (status, body) = admin(&base, "GET", "/admin/replicas", Some(TOKEN), None).await;
    assert_eq!(status, 200, "the admin token works without the client API key");
    assert_eq!(body["replicas"][0]["url"], fleet[0].url());
    assert_eq!(body["replicas"][0]["healthy"], true);
    assert_eq!(body["replicas"][0]["models"][0], MODEL);
}

#[tokio::test]
async fn urls_are_validated_and_duplicates_refused() {
    let fleet = sims(1).await;
    let r = router(&fleet, |_| {}).await;
    let base = format!("http://{}", r.addr);
    for bad in [
        "ftp://127.0.0.1:1",
        "http://",
        "127.0.0.1:8000",
        "http://127.0.0.1:1/v1/completions",
        "http://u:p@h:1",
    ] {
        let (status, body) =
            admin(&base, "POST", "/admin/replicas", Some(TOKEN), Some(json!({"url": bad}))).await;
        assert_eq!(status, 400, "{bad}");
        assert_eq!(body["error"]["param"], "url");
    }
    let (status, _) =
        admin(&base, "POST", "/admin/replicas", Some(TOKEN), Some(json!({"address": "x"}))).await;
    assert_eq!(status, 400);
    let (status, body) =
        admin(&base, "POST", "/admin/replicas", Some(TOKEN), Some(json!({"url": fleet[0].url()}))).await;
    assert_eq!(status, 409, "{body}");
    let (status, _) = admin(
        &base,
        "POST",
        "/admin/replicas",
        Some(TOKEN),
        Some(json!({"url": "http://127.0.0.1:9", "role": "prefill"})),
    )
    .await;
    assert_eq!(status, 400, "no prefill stage outside P/D mode");
    let (status, _) =
        admin(&base, "DELETE", "/admin/replicas?url=http://127.0.0.1:9", Some(TOKEN), None).await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn replicas_join_drain_and_leave_without_losing_a_stream() {
    let fleet = sims(2).await;
    let r = router(&fleet[..1], |_| {}).await;
    let base = format!("http://{}", r.addr);

    // Add: probed at once, in rotation at once.
    let (status, body) =
        admin(&base, "POST", "/admin/replicas", Some(TOKEN), Some(json!({"url": fleet[1].url()}))).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["healthy"], true);
    for _ in 0..6 {
        assert_eq!(complete(&r).await, 200);
    }
    assert_eq!((served(&fleet[0]), served(&fleet[1])), (3, 3), "round-robin over both");

    // A slow stream (replicas slowed 10x), then drain its replica while it runs.
    for sim in &fleet {
        sim.faults().set(vllm_sim::faults::FaultConfig { slowdown: 10.0, ..Default::default() });
    }
    let stream = client()
        .post(format!("{base}/v1/completions"))
        .header("content-type", "application/json")
        .body(
            json!({"model": MODEL, "prompt": "long", "max_tokens": 400, "ignore_eos": true, "stream": true})
                .to_string(),
        )
        .send()
        .await
        .unwrap();
    let mut stream = stream.bytes_stream();
    let first = stream.next().await.unwrap().unwrap();
    assert!(first.starts_with(b"data: "));
    let on_zero = served(&fleet[0]) == 4;
    let (draining, other) = if on_zero { (0, 1) } else { (1, 0) };
    let (status, body) = admin(
        &base,
        "POST",
        "/admin/replicas/drain",
        Some(TOKEN),
        Some(json!({"url": fleet[draining].url()})),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!((body["draining"].as_bool(), body["in_flight"].as_u64()), (Some(true), Some(1)));
    let before = (served(&fleet[draining]), served(&fleet[other]));
    for _ in 0..4 {
        assert_eq!(complete(&r).await, 200);
    }
    assert_eq!(served(&fleet[draining]), before.0, "a draining replica gets nothing new");
    assert_eq!(served(&fleet[other]), before.1 + 4);

    // Remove it with the stream still running: the stream finishes whole.
    let (status, body) =
        admin(&base, "DELETE", &format!("/admin/replicas?url={}", fleet[draining].url()), Some(TOKEN), None)
            .await;
    assert_eq!(status, 200);
    assert_eq!(body["in_flight"], 1);
    let mut rest = Vec::new();
    while let Some(chunk) = stream.next().await {
        rest.extend_from_slice(&chunk.unwrap());
    }
    let text = String::from_utf8(rest).unwrap();
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    assert!(!text.contains("{\"error\""), "no error event: {text}");
    let (_, list) = admin(&base, "GET", "/admin/replicas", Some(TOKEN), None).await;
    assert_eq!(list["replicas"].as_array().unwrap().len(), 1);
    let metrics = client().get(format!("{base}/metrics")).send().await.unwrap().text().await.unwrap();
    let gauge = format!("router_replica_healthy{{replica=\"{}\"}}", fleet[draining].url());
    assert!(!metrics.contains(&gauge), "a removed replica's gauges are gone");

    // Removing the last replica leaves nothing to serve: a clear 503, then adding one back.
    let (status, _) =
        admin(&base, "DELETE", &format!("/admin/replicas?url={}", fleet[other].url()), Some(TOKEN), None)
            .await;
    assert_eq!(status, 200);
    assert_eq!(complete(&r).await, 503);
    let (status, _) =
        admin(&base, "POST", "/admin/replicas", Some(TOKEN), Some(json!({"url": fleet[other].url()}))).await;
    assert_eq!(status, 201);
    assert_eq!(complete(&r).await, 200);
}

#[tokio::test]
async fn a_separate_admin_address_keeps_the_api_off_the_serving_port() {
    let fleet = sims(1).await;
    let r = router(&fleet, |c| c.admin_listen = Some("127.0.0.1:0".parse().unwrap())).await;
    let admin_base = format!("http://{}", r.admin_addr.expect("admin listener"));
    let (status, _) = admin(&format!("http://{}", r.addr), "GET", "/admin/replicas", Some(TOKEN), None).await;
    assert_eq!(status, 404, "not on the serving port");
    let (status, body) = admin(&admin_base, "GET", "/admin/replicas", Some(TOKEN), None).await;
    assert_eq!(status, 200);
    assert_eq!(body["replicas"][0]["role"], "replica");
    let (status, _) = admin(&admin_base, "GET", "/admin/replicas", None, None).await;
    assert_eq!(status, 401);
    let (status, _) = admin(&admin_base, "GET", "/v1/models", Some(TOKEN), None).await;
    assert_eq!(status, 404, "the admin address serves only the admin API");
    r.shutdown().await;
}

#[tokio::test]
async fn in_pd_mode_each_stage_is_named_by_its_role() {
    let config = |role| SimConfig { role, time_scale: 20.0, ..SimConfig::default() };
    let prefill = sim::start_fleet(2, &config(sim::Role::Prefill)).await.unwrap();
    let decode = sim::start_fleet(1, &config(sim::Role::Decode)).await.unwrap();
    let r = router(&decode, |c| {
        c.pd = Some(llm_router::config::PdConfig {
            prefill: vec![ReplicaUrl::parse(&prefill[0].url()).unwrap()],
            prefill_policy: PolicyKind::RoundRobin,
            decode_policy: PolicyKind::RoundRobin,
            tokenize_once: true,
            sim_prefill: 0,
        })
    })
    .await;
    let base = format!("http://{}", r.addr);
    let (_, list) = admin(&base, "GET", "/admin/replicas", Some(TOKEN), None).await;
    let roles: Vec<&str> =
        list["replicas"].as_array().unwrap().iter().map(|r| r["role"].as_str().unwrap()).collect();
    assert_eq!(roles, ["decode", "prefill"]);
    let add = json!({"url": prefill[1].url(), "role": "prefill"});
    let (status, body) = admin(&base, "POST", "/admin/replicas", Some(TOKEN), Some(add)).await;
    assert_eq!((status, body["role"].as_str()), (201, Some("prefill")));
    for _ in 0..4 {
        assert_eq!(complete(&r).await, 200);
    }
    assert_eq!((served(&prefill[0]), served(&prefill[1])), (2, 2), "prefill round-robin over both");
    assert_eq!(served(&decode[0]), 4);
}
