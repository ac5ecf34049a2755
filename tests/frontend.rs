//! `--engine-api generate` through the whole request path, against vllm-sim: the router
//! renders, tokenises and detokenises, the simulated engine sees token ids only, and a
//! client reads what the engine's own OpenAI endpoints would have said. Requests the
//! router cannot serve that way go to the OpenAI endpoint, counted by reason.

mod support;

use serde_json::{Value, json};
use support::*;
use vllm_sim::{RunningSim, SimConfig};

const MODEL: &str = "Qwen/Qwen3-0.6B-FP8";

async fn engine(scale_out: bool) -> RunningSim {
    vllm_sim::start(SimConfig { time_scale: 20.0, enable_scale_out: scale_out, ..SimConfig::default() })
        .await
        .unwrap()
}

async fn generate_router(engine: &RunningSim) -> llm_router::server::RunningRouter {
    let mut config = config_for(&[engine.url()]);
    config.engine_api = llm_router::frontend::EngineApi::Generate;
    config.tokenizer =
        Some(std::sync::Arc::new(llm_router::policy::prompt_tokens::PromptTokenizer::Builtin(
            llm_router::policy::prompt_tokens::BuiltinTokenizer::new(1 << 20),
        )));
    let router = router(config).await;
    eventually("the engine healthy", || router.registry.healthy_count() == 1).await;
    router
}

#[tokio::test]
async fn the_corpus_reads_the_same_through_generate_as_from_the_engine() {
    let sim = engine(true).await;
    let router = generate_router(&sim).await;
    let c = real_vllm::http();
    let coverage = corpus::run(&c, &sim.url(), &base(&router), MODEL, true).await;
    assert!(coverage.compared >= 60, "{coverage:?}");
    assert!(coverage.by_length > 0 && coverage.by_stop_string > 0 && coverage.by_eos > 0, "{coverage:?}");
    assert!(coverage.multi_byte > 0, "{coverage:?}");
    // Every one of them went through generate: none fell back.
    let metrics = c.get(format!("{}/metrics", base(&router))).send().await.unwrap().text().await.unwrap();
    let generated = real_vllm::sum(&metrics, "router_engine_api_requests_total", &[r#"path="generate""#]);
    let fallbacks = real_vllm::sum(&metrics, "router_engine_api_requests_total", &[r#"path="fallback""#]);
    assert_eq!(fallbacks, 0.0, "{metrics}");
    assert!(generated >= coverage.compared as f64, "{generated} {coverage:?}");
}

#[tokio::test]
async fn what_generate_cannot_serve_goes_to_the_openai_endpoint_counted() {
    let sim = engine(true).await;
    let router = generate_router(&sim).await;
    let c = client();
    let url = format!("{}/v1/chat/completions", base(&router));
    let messages = json!([{"role": "user", "content": "hi"}]);
    for (extra, reason) in [
        (json!({"logprobs": true, "top_logprobs": 2}), "logprobs"),
        (json!({"n": 2}), "n"),
        (json!({"logit_bias": {"12": 1.0}}), "unknown_field"),
        // More than the context: the engine's chat endpoint refuses it in its words.
        (json!({"max_tokens": 1_000_000}), "context_length"),
    ] {
        let mut body = json!({"model": MODEL, "messages": messages, "max_tokens": 3});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let (status, _, answer) = post(&c, &url, &body, &[]).await;
        // Whatever the engine's own endpoint says, the client reads.
        let direct = c
            .post(format!("{}/v1/chat/completions", sim.url()))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(status, direct.status().as_u16(), "{reason}: {}", String::from_utf8_lossy(&answer));
        let metrics = c.get(format!("{}/metrics", base(&router))).send().await.unwrap().text().await.unwrap();
        let series = format!(
            r#"router_engine_api_requests_total{{endpoint="chat_completions",path="fallback",reason="{reason}"}}"#
        );
        assert_eq!(metric(&metrics, &series), 1.0, "{series}\n{metrics}");
    }
}

#[tokio::test]
async fn an_engine_without_the_generate_endpoint_answers_403_and_errors_pass_through() {
    let sim = engine(false).await;
    let router = generate_router(&sim).await;
    let c = client();
    let body = json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3});
    let (status, _, answer) = post(&c, &format!("{}/v1/chat/completions", base(&router)), &body, &[]).await;
    assert_eq!(status, 403, "{}", String::from_utf8_lossy(&answer));
    let error: Value = serde_json::from_slice(&answer).unwrap();
    assert!(error["error"]["message"].as_str().unwrap().contains("--enable-scale-out"), "{error}");
    // The engine's own refusals (an unknown model, a bad value) pass through, in its shape.
    let sim = engine(true).await;
    let router = generate_router(&sim).await;
    for (body, want) in [
        (json!({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}), 404),
        (json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": -1}), 400),
        (json!({"model": MODEL, "prompt": "x", "stream": true, "max_tokens": 0}), 400),
    ] {
        let (status, _, answer) = post(
            &c,
            &format!("{}/v1/chat/completions", base(&router)).replace(
                "/v1/chat/completions",
                if body.get("prompt").is_some() { "/v1/completions" } else { "/v1/chat/completions" },
            ),
            &body,
            &[],
        )
        .await;
        assert_eq!(status, want, "{body}: {}", String::from_utf8_lossy(&answer));
        let error: Value = serde_json::from_slice(&answer).unwrap();
        assert!(error["error"]["message"].is_string(), "{error}");
    }
}

/// P/D in generate mode: both stages get the router's token ids through the generate
/// endpoint (prefill: one token, not streamed, `do_remote_decode`; decode: the prefill's
/// `kv_transfer_params`), and the client reads what a collocated engine says.
#[tokio::test]
async fn pd_sends_token_ids_to_both_stages_and_reads_as_collocated() {
    use llm_router::config::PdConfig;
    use llm_router::policy::PolicyKind;
    use llm_router::replicas::ReplicaUrl;
    let start = |role| {
        vllm_sim::start(SimConfig { role, time_scale: 20.0, enable_scale_out: true, ..SimConfig::default() })
    };
    let (prefill, decode, collocated) = (
        start(vllm_sim::Role::Prefill).await.unwrap(),
        start(vllm_sim::Role::Decode).await.unwrap(),
        engine(true).await,
    );
    let mut config = config_for(&[decode.url()]);
    config.pd = Some(PdConfig {
        prefill: vec![ReplicaUrl::parse(&prefill.url()).unwrap()],
        prefill_policy: PolicyKind::RoundRobin,
        decode_policy: PolicyKind::RoundRobin,
        tokenize_once: true,
        sim_prefill: 0,
    });
    config.engine_api = llm_router::frontend::EngineApi::Generate;
    config.tokenizer =
        Some(std::sync::Arc::new(llm_router::policy::prompt_tokens::PromptTokenizer::Builtin(
            llm_router::policy::prompt_tokens::BuiltinTokenizer::new(1 << 20),
        )));
    let router = router(config).await;
    eventually("both stages healthy", || router.registry.healthy_count() == 1).await;
    let c = real_vllm::http();
    let chat = json!({"model": MODEL, "messages": [{"role": "user", "content": "Explain KV caches 🦀."}],
        "max_tokens": 24, "seed": 3});
    let completion = json!({"model": MODEL, "prompt": "Disaggregated serving splits prefill and decode.",
        "max_tokens": 24, "seed": 4});
    let mut sent = 0;
    for (path, body) in [("/v1/chat/completions", chat), ("/v1/completions", completion)] {
        for stream in [false, true] {
            let mut body = body.clone();
            body["stream"] = json!(stream);
            let (status, routed) = real_vllm::send(&c, &format!("{}{path}", base(&router)), &body, &[]).await;
            assert_eq!(status, 200, "{routed}");
            let (_, direct) = real_vllm::send(&c, &format!("{}{path}", collocated.url()), &body, &[]).await;
            assert_eq!(
                real_vllm::reading(&routed, stream),
                real_vllm::reading(&direct, stream),
                "{path} {stream}"
            );
            sent += 1;
        }
    }
    let log = |sim: &RunningSim| {
        let c = c.clone();
        let url = format!("{}/sim/requests", sim.url());
        async move {
            serde_json::from_str::<Vec<Value>>(&c.get(url).send().await.unwrap().text().await.unwrap())
                .unwrap()
        }
    };
    for (stage, sim) in [("prefill", &prefill), ("decode", &decode)] {
        let requests = log(sim).await;
        assert_eq!(requests.len(), sent, "{stage}: {requests:?}");
        for r in &requests {
            assert_eq!(r["path"], "/inference/v1/generate", "{stage}");
            assert_eq!(r["prompt_from_text"], false, "{stage}: token ids");
            assert!(r["kv_transfer_params"].is_object(), "{stage}: {r}");
        }
    }
    let handoffs = vllm_sim::RunningSim::metrics(&decode).render();
    assert!(handoffs.contains(&format!("sim_pd_handoffs_accepted_total {sent}")), "{handoffs}");
}

/// A chat body whose one message is `bytes` of words that share no segments (each
/// costs the tokenizer afresh).
fn big_chat(bytes: usize, seed: u64) -> Value {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut text = String::with_capacity(bytes + 16);
    while text.len() < bytes {
        text.push_str(&format!("w{} ", rng.u32(..)));
    }
    json!({"model": "m", "messages": [{"role": "user", "content": text}], "max_tokens": 4})
}

// Two workers, as on a two-core machine: neither may be taken by a prompt's tokenising.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn big_prompts_are_tokenised_off_the_workers_and_a_full_queue_falls_back() {
    let mocks = mocks(1).await;
    let mut config = config(&mocks);
    config.engine_api = llm_router::frontend::EngineApi::Generate;
    config.tokenizer =
        Some(std::sync::Arc::new(llm_router::policy::prompt_tokens::PromptTokenizer::Builtin(
            llm_router::policy::prompt_tokens::BuiltinTokenizer::new(1 << 20),
        )));
    config.tokenizer_threads = 1;
    config.tokenizer_queue = 1;
    let router = std::sync::Arc::new(router(config).await);
    let url = format!("{}/v1/chat/completions", base(&router));
    // Two prompts of 3.9 MiB: one tokenised (seconds of CPU), one waiting its turn.
    let mut big = Vec::new();
    // (Tokenising one takes seconds, longer on a loaded machine: the clients wait.)
    let patient = reqwest::Client::builder().timeout(std::time::Duration::from_secs(300)).build().unwrap();
    for seed in [1, 2] {
        let (c, url, body) = (patient.clone(), url.clone(), big_chat(3_900_000, seed));
        big.push(tokio::spawn(async move { post(&c, &url, &body, &[]).await.0 }));
    }
    eventually("one prompt tokenised, one waiting", || {
        let metrics = router.metrics.render();
        metric(&metrics, "router_tokenizer_busy_threads") == 1.0
            && metric(&metrics, "router_tokenizer_queued") == 1.0
    })
    .await;
    // Meanwhile the router answers at once: its health...
    let health = client().get(format!("{}/health", base(&router))).send().await.unwrap();
    assert_eq!(health.status(), 200);
    // ...and a request that finds the queue full, through the engine's OpenAI endpoint.
    let small = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
    let (status, _, _) = post(&client(), &url, &small, &[]).await;
    assert_eq!(status, 200);
    let metrics = router.metrics.render();
    assert_eq!(
        metric(&metrics, r#"router_tokenizer_jobs_total{outcome="done"}"#),
        0.0,
        "the first prompt was still being tokenised: nothing above waited for it"
    );
    assert_eq!(metric(&metrics, r#"router_tokenizer_jobs_total{outcome="busy"}"#), 1.0);
    assert_eq!(
        metric(
            &metrics,
            r#"router_engine_api_requests_total{endpoint="chat_completions",path="fallback",reason="tokenizer_busy"}"#
        ),
        1.0,
        "{metrics}"
    );
    // The waiting prompt's client leaves: once the first is tokenised (and answered),
    // the second's tokenising is skipped.
    big[1].abort();
    assert_eq!(big.remove(0).await.unwrap(), 200, "the first, once tokenised, is answered");
    eventually("the abandoned prompt is skipped", || {
        metric(&router.metrics.render(), r#"router_tokenizer_jobs_total{outcome="abandoned"}"#) == 1.0
    })
    .await;
}
