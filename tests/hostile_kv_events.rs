//! Hostile KV event publishers (`--policy kv-aware`): a publisher that announces a huge
//! frame, sends too many frames, breaks the framing, sends absurd numbers or garbage.
//! Each case asserts that the router stays up and keeps serving, that only the bad
//! publisher's connection is dropped (and reconnected), and that a well-behaved
//! publisher beside it still steers requests.

mod support;

use std::time::Duration;

use llm_router::policy::PolicyKind;
use llm_router::policy::cache_index::FeedConfig;
use llm_router::policy::prompt_tokens::TokenizerSpec;
use llm_router::server::RunningRouter;
use serde_json::json;
use support::zmq_publisher::{FakePublisher, Subscriber, batch_payload, stored};
use support::*;

async fn kv_router(replicas: &[std::sync::Arc<MockReplica>], publishers: &[&FakePublisher]) -> RunningRouter {
    let mut cfg = config(replicas);
    cfg.policy = PolicyKind::KvAware;
    cfg.tokenizer = Some(std::sync::Arc::new(TokenizerSpec::Builtin.load(None, 1 << 20).unwrap()));
    cfg.kv_events = Some(FeedConfig {
        endpoints: publishers.iter().zip(replicas).map(|(p, r)| (r.url(), p.endpoint.clone())).collect(),
        port: None,
        replay_endpoints: Vec::new(),
        replay_port: None,
        topic: String::new(),
        silence: Duration::from_secs(60),
        max_blocks: 1 << 16,
        limits: Default::default(),
    });
    router(cfg).await
}

async fn scrape(c: &reqwest::Client, router: &RunningRouter) -> String {
    c.get(format!("{}/metrics", base(router))).send().await.unwrap().text().await.unwrap()
}

fn series(name: &str, replica: &str, extra: &str) -> String {
    format!("{name}{{{extra},replica=\"{replica}\"}}")
}

async fn until_metric(c: &reqwest::Client, router: &RunningRouter, series: &str, at_least: f64) {
    for _ in 0..250 {
        if metric(&scrape(c, router).await, series) >= at_least {
            return;
        }
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    panic!("{series} never reached {at_least}:\n{}", scrape(c, router).await);
}

/// Two mock replicas, `bad`'s events for the first and `good`'s for the second, and a
/// kv-aware router following them.
struct Setup {
    replicas: Vec<std::sync::Arc<MockReplica>>,
    bad: FakePublisher,
    good: FakePublisher,
    router: RunningRouter,
    c: reqwest::Client,
    r0: String,
    r1: String,
}

impl Setup {
    async fn start() -> Setup {
        let replicas = mocks(2).await;
        let (bad, good) = (FakePublisher::start().await, FakePublisher::start().await);
        let router = kv_router(&replicas, &[&bad, &good]).await;
        let (r0, r1) = (replicas[0].url(), replicas[1].url());
        Setup { replicas, bad, good, router, c: client(), r0, r1 }
    }
}

/// Route a completion of these token ids; the replica that served it.
async fn route(c: &reqwest::Client, router: &RunningRouter, ids: &[u32]) -> String {
    let body = json!({"model": "m", "prompt": ids, "max_tokens": 4});
    let (status, replica, _) = post(c, &format!("{}/v1/completions", base(router)), &body, &[]).await;
    assert_eq!(status, 200);
    replica.unwrap()
}

/// The good publisher (replica 1) stores 4 blocks of 16 tokens; a request holding them
/// must go to replica 1. Proves the router is up and the good feed unharmed.
async fn good_feed_still_steers(
    c: &reqwest::Client,
    router: &RunningRouter,
    good: &mut Subscriber,
    r1: &str,
    seq: u64,
) {
    let tokens: Vec<u32> = (0..64).map(|i| 50_000 + i + seq as u32 * 100).collect();
    let hashes: Vec<u64> = (0..4).map(|i| 9_000 + i + seq * 10).collect();
    good.batch(seq, &batch_payload(vec![stored(&hashes, None, &tokens, 16)])).await;
    until_metric(
        c,
        router,
        &series("router_kv_event_batches_total", r1, "outcome=\"applied\""),
        seq as f64 + 1.0,
    )
    .await;
    let mut ask = tokens.clone();
    ask.push(1);
    assert_eq!(route(c, router, &ask).await, "r1", "the good publisher's blocks attract");
}

#[tokio::test]
async fn a_frame_announcing_two_to_the_62_bytes_costs_only_its_own_connection() {
    let Setup { replicas: _replicas, mut bad, mut good, router, c, r0, r1 } = Setup::start().await;
    let mut b = bad.subscriber().await;
    let mut g = good.subscriber().await;
    assert_eq!(b.subscription, vec![0x01], "subscribed to everything");

    // A long message frame announcing 2^62 bytes: a codec that reserves the announced
    // length aborts the process here.
    let mut header = vec![0x02];
    header.extend_from_slice(&(1u64 << 62).to_be_bytes());
    b.raw(&header).await;
    assert!(b.closed_by_router(Duration::from_secs(5)).await, "the router drops the connection");
    until_metric(&c, &router, &series("router_kv_feed_errors_total", &r0, "kind=\"oversize\""), 1.0).await;
    good_feed_still_steers(&c, &router, &mut g, &r1, 0).await;

    // It reconnects, and one frame just over the 4 MiB bound is refused the same way,
    // as is a message of many small frames.
    let mut b = bad.subscriber().await;
    let mut header = vec![0x02];
    header.extend_from_slice(&((4u64 << 20) + 1).to_be_bytes());
    b.raw(&header).await;
    assert!(b.closed_by_router(Duration::from_secs(5)).await);
    let mut b = bad.subscriber().await;
    let frames: Vec<&[u8]> = vec![b"x"; 100];
    b.message(&frames).await;
    assert!(b.closed_by_router(Duration::from_secs(5)).await);
    until_metric(&c, &router, &series("router_kv_feed_errors_total", &r0, "kind=\"oversize\""), 3.0).await;
    good_feed_still_steers(&c, &router, &mut g, &r1, 1).await;
    router.shutdown().await;
}

#[tokio::test]
async fn broken_framing_and_garbage_payloads_are_counted_and_survived() {
    let Setup { replicas: _replicas, mut bad, mut good, router, c, r0, r1 } = Setup::start().await;
    let mut g = good.subscriber().await;

    // Reserved flag bits: not ZMTP.
    let mut b = bad.subscriber().await;
    b.raw(&[0xf0, 0x01, 0x00]).await;
    assert!(b.closed_by_router(Duration::from_secs(5)).await);
    until_metric(&c, &router, &series("router_kv_feed_errors_total", &r0, "kind=\"protocol\""), 1.0).await;

    // A frame cut short, then the connection closed.
    let mut b = bad.subscriber().await;
    b.raw(&[0x00, 0x20, 1, 2, 3]).await;
    drop(b);
    until_metric(&c, &router, &series("router_kv_feed_errors_total", &r0, "kind=\"closed\""), 1.0).await;

    // Well-framed messages with bad contents: a short sequence, msgpack garbage, an
    // array announcing 2^32 - 1 events, a sequence at u64::MAX followed by 0.
    let mut b = bad.subscriber().await;
    b.message(&[b"", b"\x01\x02", b"x"]).await;
    b.batch(0, b"\xc1\xc1\xc1").await;
    b.batch(1, &[0x92, 0xcb, 0, 0, 0, 0, 0, 0, 0, 0, 0xdd, 0xff, 0xff, 0xff, 0xff]).await;
    b.batch(u64::MAX, &batch_payload(vec![])).await;
    b.batch(0, &batch_payload(vec![])).await;
    let dropped = series("router_kv_event_batches_total", &r0, "outcome=\"dropped\"");
    until_metric(&c, &router, &dropped, 3.0).await;
    until_metric(&c, &router, &series("router_kv_index_resets_total", &r0, "reason=\"restart\""), 1.0).await;
    assert!(!b.closed_by_router(Duration::from_millis(200)).await, "bad contents keep the connection");
    good_feed_still_steers(&c, &router, &mut g, &r1, 0).await;
    router.shutdown().await;
}

#[tokio::test]
async fn an_absurd_block_size_is_refused_and_a_changed_one_resets_only_that_replica() {
    let Setup { replicas: _replicas, mut bad, mut good, router, c, r0, r1 } = Setup::start().await;
    let mut b = bad.subscriber().await;
    let mut g = good.subscriber().await;

    // block_size 2^60 over 4 blocks with no tokens: unchecked, 4 * 2^60 wraps to 0 and
    // the event is believed; the next prompt then asks for a 2^62-byte vector.
    b.batch(0, &batch_payload(vec![stored(&[1, 2, 3, 4], None, &[], 1 << 60)])).await;
    until_metric(&c, &router, &series("router_kv_event_batches_total", &r0, "outcome=\"dropped\""), 1.0)
        .await;
    good_feed_still_steers(&c, &router, &mut g, &r1, 0).await;
    let prompt: Vec<u32> = (0..2048).collect();
    route(&c, &router, &prompt).await;

    // A sane block size on the bad replica, then another: its own memory starts again;
    // the good replica keeps its blocks and its block size.
    let tokens: Vec<u32> = (0..64).map(|i| 70_000 + i).collect();
    b.batch(1, &batch_payload(vec![stored(&[11], None, &tokens, 64)])).await;
    b.batch(2, &batch_payload(vec![stored(&[12, 13], None, &tokens, 32)])).await;
    until_metric(&c, &router, &series("router_kv_index_resets_total", &r0, "reason=\"block_size\""), 1.0)
        .await;
    let text = scrape(&c, &router).await;
    assert_eq!(metric(&text, &series("router_kv_index_resets_total", &r1, "reason=\"block_size\"")), 0.0);
    // r0 now holds the 64 tokens in 32-token blocks, r1 its own in 16-token blocks:
    // each prompt still finds its holder although the fleet disagrees on block size.
    let mut ask = tokens.clone();
    ask.push(1);
    assert_eq!(route(&c, &router, &ask).await, "r0", "keyed at r0's block size");
    good_feed_still_steers(&c, &router, &mut g, &r1, 1).await;
    router.shutdown().await;
}
