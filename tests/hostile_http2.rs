//! Hostile HTTP/2 clients, played frame by frame with the `h2` crate against a real router
//! on 127.0.0.1: a client that never opens its flow-control window, one that resets every
//! stream it opens (rapid reset), and one that resets a stream while it waits for a slot.
//! Each must cost only its own streams: slots, upstream requests and engine work are freed,
//! and other clients are served.

mod support;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use h2::client::SendRequest;
use support::{Mode, eventually};

const STREAMING: &str = r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":true}"#;
const PLAIN: &str = r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;

fn request(router: &llm_router::server::RunningRouter) -> http::Request<()> {
    http::Request::post(format!("http://{}/v1/chat/completions", router.addr))
        .header("content-type", "application/json")
        .body(())
        .unwrap()
}

/// An HTTP/2 client connection (prior knowledge) made with `builder`, driven in the
/// background; the handle resolves with how the connection ended.
async fn connect(
    router: &llm_router::server::RunningRouter,
    builder: h2::client::Builder,
) -> (SendRequest<Bytes>, tokio::task::JoinHandle<Result<(), h2::Error>>) {
    let tcp = tokio::net::TcpStream::connect(router.addr).await.unwrap();
    let (send, connection) = builder.handshake(tcp).await.unwrap();
    (send, tokio::spawn(connection))
}

#[tokio::test]
async fn a_client_that_never_opens_its_window_loses_its_streams_and_their_slots() {
    let mocks = support::mocks(1).await;
    let mock = &mocks[0];
    mock.set_mode(Mode::Hold);
    let mut config = support::config(&mocks);
    config.limit = Some((4, 8, Duration::from_secs(8)));
    config.client_idle_timeout = Duration::from_millis(600);
    let router = support::router(config).await;
    // Stream windows of 0, never raised; pings are answered (the h2 crate does that).
    let mut builder = h2::client::Builder::new();
    builder.initial_window_size(0);
    let (mut send, _connection) = connect(&router, builder).await;
    let mut stalled = Vec::new();
    for _ in 0..4 {
        send = send.ready().await.unwrap();
        let (response, mut body) = send.send_request(request(&router), false).unwrap();
        body.send_data(Bytes::from_static(STREAMING.as_bytes()), true).unwrap();
        stalled.push(response);
    }
    eventually("the four streams reached the replica", || mock.request_count() == 4).await;
    // Every slot is held by a stream that accepts nothing; a fifth client waits in the
    // queue and is served once the stalled streams are reset.
    let fifth = {
        let (client, url) = (support::client(), format!("{}/v1/chat/completions", support::base(&router)));
        tokio::spawn(async move {
            support::post(&client, &url, &serde_json::from_str(PLAIN).unwrap(), &[]).await.0
        })
    };
    eventually("the fifth request got a slot and reached the replica", || mock.request_count() == 5).await;
    mock.release();
    assert_eq!(fifth.await.unwrap(), 200, "the stalled streams gave their slots back");
    eventually("the replica sees the four stalled requests cancelled", || mock.cancelled() == 4).await;
    for response in stalled {
        let response = response.await.unwrap();
        assert_eq!(response.status(), 200);
        let mut body = response.into_body();
        let ended = tokio::time::timeout(Duration::from_secs(10), body.data()).await.unwrap();
        let error = ended.expect("a reset, not an end").expect_err("the stream is reset");
        assert_eq!(error.reason(), Some(h2::Reason::CANCEL), "{error}");
    }
    let metrics = router.metrics.render();
    assert_eq!(support::metric(&metrics, r#"router_client_stalls_total{kind="stream"}"#), 4.0, "{metrics}");
    router.shutdown().await;
}

#[tokio::test]
async fn a_burst_of_streams_reset_on_arrival_gets_goaway_and_none_is_dispatched() {
    let mocks = support::mocks(1).await;
    let mock = &mocks[0];
    let router = support::router(support::config(&mocks)).await;
    let (mut send, connection) = connect(&router, h2::client::Builder::new()).await;
    let mut opened = 0;
    'rounds: for _round in 0..5 {
        for _ in 0..100 {
            send = match send.ready().await {
                Ok(send) => send,
                Err(_) => break 'rounds,
            };
            let Ok((_response, mut body)) = send.send_request(request(&router), false) else { break 'rounds };
            let _ = body.send_data(Bytes::from_static(PLAIN.as_bytes()), true);
            body.send_reset(h2::Reason::CANCEL);
            opened += 1;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ended = tokio::time::timeout(Duration::from_secs(10), connection).await.unwrap().unwrap();
    let error = ended.expect_err("the router ended the connection");
    assert!(error.is_go_away() && error.reason() == Some(h2::Reason::ENHANCE_YOUR_CALM), "{error}");
    assert!(opened < 500, "the connection was closed before the client opened all 500 ({opened})");
    // Give any stream the router did dispatch time to arrive.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let dispatched = mock.request_count();
    assert!(dispatched < 20, "{dispatched} of {opened} reset streams reached the replica");
    router.shutdown().await;
}

#[tokio::test]
async fn streams_reset_as_they_arrive_are_never_dispatched() {
    let mocks = support::mocks(1).await;
    let mock = &mocks[0];
    let router = support::router(support::config(&mocks)).await;
    let (mut send, _connection) = connect(&router, h2::client::Builder::new()).await;
    // One at a time, far below any per-connection limit: the request and its reset
    // arrive together, and the router drops it before it reaches a replica.
    for _ in 0..40 {
        send = send.ready().await.unwrap();
        let (_response, mut body) = send.send_request(request(&router), false).unwrap();
        body.send_data(Bytes::from_static(PLAIN.as_bytes()), true).unwrap();
        body.send_reset(h2::Reason::CANCEL);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(mock.request_count(), 0, "reset streams reached the replica");
    router.shutdown().await;
}

#[tokio::test]
async fn a_client_that_resets_each_stream_once_it_is_dispatched_gets_goaway() {
    let mocks = support::mocks(1).await;
    let mock = &mocks[0];
    mock.set_mode(Mode::Hold);
    let router = support::router(support::config(&mocks)).await;
    let (mut send, connection) = connect(&router, h2::client::Builder::new()).await;
    let mut opened = 0;
    for i in 0..500 {
        send = match send.ready().await {
            Ok(send) => send,
            Err(_) => break,
        };
        let Ok((_response, mut body)) = send.send_request(request(&router), false) else { break };
        let _ = body.send_data(Bytes::from_static(PLAIN.as_bytes()), true);
        opened += 1;
        // Reset it once the replica has it: the most a rapid-reset client can cost.
        let reached = async {
            while mock.request_count() <= i {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        };
        if tokio::time::timeout(Duration::from_secs(5), reached).await.is_err() {
            break;
        }
        body.send_reset(h2::Reason::CANCEL);
    }
    let ended = tokio::time::timeout(Duration::from_secs(10), connection).await.unwrap().unwrap();
    if let Err(error) = ended {
        assert!(error.is_go_away(), "{error}");
    }
    let limit = llm_router::ingress::h2_streams::MAX_PREMATURE_RESETS as usize;
    assert!(opened <= limit + 1, "GOAWAY after {limit} premature resets; {opened} streams were opened");
    let metrics = router.metrics.render();
    assert_eq!(
        support::metric(&metrics, r#"router_client_goaways_total{reason="premature_resets"}"#),
        1.0,
        "{metrics}"
    );
    eventually("every reset stream's upstream request is cancelled", || {
        mock.cancelled() == mock.request_count()
    })
    .await;
    // Another client is served as usual.
    mock.set_mode(Mode::Normal);
    let client = support::client();
    let url = format!("{}/v1/chat/completions", support::base(&router));
    let (status, _, _) = support::post(&client, &url, &serde_json::from_str(PLAIN).unwrap(), &[]).await;
    assert_eq!(status, 200);
    router.shutdown().await;
}

#[tokio::test]
async fn a_client_that_cancels_some_streams_keeps_its_connection() {
    let mocks = support::mocks(1).await;
    let router = Arc::new(support::router(support::config(&mocks)).await);
    let (mut send, connection) = connect(&router, h2::client::Builder::new()).await;
    // One stream in four cancelled: a client changing its mind, not an attack.
    for i in 0..400 {
        send = send.ready().await.unwrap();
        let (response, mut body) = send.send_request(request(&router), false).unwrap();
        body.send_data(Bytes::from_static(PLAIN.as_bytes()), true).unwrap();
        if i % 4 == 0 {
            body.send_reset(h2::Reason::CANCEL);
        } else {
            let response = response.await.unwrap();
            assert_eq!(response.status(), 200);
            let mut body = response.into_body();
            while let Some(chunk) = body.data().await {
                let chunk = chunk.unwrap();
                let _ = body.flow_control().release_capacity(chunk.len());
            }
        }
    }
    assert!(!connection.is_finished(), "the connection is still open");
    drop(send);
}

#[tokio::test]
async fn a_stream_reset_while_it_waits_for_a_slot_is_never_dispatched() {
    let mocks = support::mocks(1).await;
    let mock = &mocks[0];
    mock.set_mode(Mode::Hold);
    let mut config = support::config(&mocks);
    config.limit = Some((1, 4, Duration::from_secs(10)));
    let router = Arc::new(support::router(config).await);
    // One request holds the only slot.
    let holder = {
        let (client, url) = (support::client(), format!("{}/v1/chat/completions", support::base(&router)));
        tokio::spawn(async move {
            support::post(&client, &url, &serde_json::from_str(PLAIN).unwrap(), &[]).await.0
        })
    };
    eventually("the first request reached the replica", || mock.request_count() == 1).await;
    let (send, _connection) = connect(&router, h2::client::Builder::new()).await;
    let mut send = send.ready().await.unwrap();
    let (_response, mut body) = send.send_request(request(&router), false).unwrap();
    body.send_data(Bytes::from_static(PLAIN.as_bytes()), true).unwrap();
    eventually("the second request is queued", || {
        support::metric(&router.metrics.render(), "router_queued_requests") == 1.0
    })
    .await;
    body.send_reset(h2::Reason::CANCEL);
    eventually("the reset stream left the queue", || {
        support::metric(&router.metrics.render(), "router_queued_requests") == 0.0
    })
    .await;
    mock.release();
    assert_eq!(holder.await.unwrap(), 200);
    mock.set_mode(Mode::Normal);
    let (status, _, _) = support::post(
        &support::client(),
        &format!("{}/v1/chat/completions", support::base(&router)),
        &serde_json::from_str(PLAIN).unwrap(),
        &[],
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(mock.request_count(), 2, "the reset stream never reached the replica");
}
