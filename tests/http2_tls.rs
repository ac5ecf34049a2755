//! The router's listener as an ingress: HTTP/2 with prior knowledge (h2c), TLS with
//! ALPN h2 and http/1.1, a certificate renewed while serving, and HTTP/2 stream resets
//! cancelling the upstream request. Real clients (curl, hyper's HTTP/2 client, rustls)
//! against a real router on 127.0.0.1.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use llm_router::config::RouterConfig;
use llm_router::ingress::tls::TlsFiles;
use llm_router::replicas::ReplicaUrl;
use llm_router::server::RunningRouter;
use support::{Mode, eventually};

const CHAT: &str = r#"{"model":"Qwen/Qwen3-0.6B-FP8","messages":[{"role":"user","content":"hi"}],"max_tokens":8,"stream":true}"#;

/// A self-signed certificate for 127.0.0.1 and localhost, written as PEM files in `dir`.
fn certificate(dir: &Path) -> (TlsFiles, String) {
    std::fs::create_dir_all(dir).unwrap();
    let made =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned(), "localhost".to_owned()]).unwrap();
    let files = TlsFiles { cert: dir.join("cert.pem"), key: dir.join("key.pem") };
    std::fs::write(&files.cert, made.cert.pem()).unwrap();
    std::fs::write(&files.key, made.signing_key.serialize_pem()).unwrap();
    (files, made.cert.pem())
}

fn temp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("llm-router-tls-{}-{name}", std::process::id()))
}

async fn sim_router(configure: impl FnOnce(&mut RouterConfig)) -> (Vec<vllm_sim::RunningSim>, RunningRouter) {
    let config = vllm_sim::SimConfig { time_scale: 50.0, ..vllm_sim::SimConfig::default() };
    let sims = vllm_sim::start_fleet(1, &config).await.unwrap();
    let mut config = RouterConfig::new(sims.iter().map(|s| ReplicaUrl::parse(&s.url()).unwrap()).collect());
    configure(&mut config);
    (sims, llm_router::server::start(config).await.unwrap())
}

/// curl's output (`-w` appended) and whether it succeeded.
fn curl(args: &[&str]) -> (bool, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "20", "-H", "content-type: application/json"])
        .args(args)
        .output()
        .expect("curl is installed");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

// curl blocks its thread: the router runs on the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_streams_a_chat_over_h2c_and_over_h2_and_http1_with_tls() {
    let (_sims, plain) = sim_router(|_| {}).await;
    let url = format!("http://{}/v1/chat/completions", plain.addr);
    let (ok, out) =
        curl(&["--http2-prior-knowledge", "-N", "-d", CHAT, "-w", "\nversion=%{http_version}", &url]);
    assert!(ok, "{out}");
    assert!(out.contains("\"delta\"") && out.contains("data: [DONE]") && out.ends_with("version=2"), "{out}");
    // HTTP/1.1 on the same listener, as before.
    let (ok, out) = curl(&["--http1.1", "-d", CHAT, "-w", "\nversion=%{http_version}", &url]);
    assert!(ok && out.ends_with("version=1.1"), "{out}");
    plain.shutdown().await;

    let dir = temp("curl");
    let (files, _) = certificate(&dir);
    let (_sims, tls) = sim_router(|c| c.tls = Some(files.clone())).await;
    let url = format!("https://127.0.0.1:{}/v1/chat/completions", tls.addr.port());
    let ca = files.cert.to_str().unwrap();
    for (flag, version) in [("--http2", "2"), ("--http1.1", "1.1")] {
        let (ok, out) =
            curl(&[flag, "--cacert", ca, "-N", "-d", CHAT, "-w", "\nversion=%{http_version}", &url]);
        assert!(ok, "{flag}: {out}");
        assert!(
            out.contains("data: [DONE]") && out.ends_with(&format!("version={version}")),
            "{flag}: {out}"
        );
    }
    // Plain HTTP to the TLS port costs that connection only.
    let (ok, _) = curl(&["-d", CHAT, &format!("http://127.0.0.1:{}/v1/chat/completions", tls.addr.port())]);
    assert!(!ok);
    let (ok, out) =
        curl(&["--http2", "--cacert", ca, &format!("https://127.0.0.1:{}/health", tls.addr.port())]);
    assert!(ok && out.contains("\"ok\""), "{out}");
    tls.shutdown().await;
}

// curl blocks its thread: the router runs on the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_certificate_is_served_to_new_connections_and_a_bad_one_is_not() {
    let dir = temp("reload");
    let (files, _) = certificate(&dir);
    let (_sims, router) = sim_router(|c| c.tls = Some(files.clone())).await;
    let health = format!("https://127.0.0.1:{}/health", router.addr.port());
    let old_ca = dir.join("old-ca.pem");
    std::fs::copy(&files.cert, &old_ca).unwrap();
    assert!(curl(&["--cacert", old_ca.to_str().unwrap(), &health]).0);
    // A renewal: a new key and certificate in place of the old.
    let renewed = dir.join("renewed");
    let (new_files, _) = certificate(&renewed);
    std::fs::copy(&new_files.key, &files.key).unwrap();
    std::fs::copy(&new_files.cert, &files.cert).unwrap();
    let new_ca = new_files.cert.to_str().unwrap().to_owned();
    let mut served_new = false;
    for _ in 0..100 {
        if curl(&["--cacert", &new_ca, &health]).0 {
            served_new = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(served_new, "the renewed certificate is served");
    assert!(!curl(&["--cacert", old_ca.to_str().unwrap(), &health]).0, "the old one is not");
    // A half-written file: the last good pair stays.
    std::fs::write(&files.cert, "-----BEGIN CERTIFICATE-----\nMIIB\n").unwrap();
    eventually("the failed reload is counted", || {
        let text = router.metrics.render();
        text.contains(r#"router_config_reloads_total{file="tls",outcome="error"} 1"#)
    })
    .await;
    assert!(curl(&["--cacert", &new_ca, &health]).0, "still served with the last good certificate");
    router.shutdown().await;
}

// curl blocks its thread: the router runs on the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_listener_serves_tls_with_its_own_certificate() {
    let (serving, _) = certificate(&temp("admin-serving"));
    let (admin, _) = certificate(&temp("admin-admin"));
    let (_sims, router) = sim_router(|c| {
        c.tls = Some(serving.clone());
        c.admin_tls = Some(admin.clone());
        c.admin_token = Some("admin-secret".into());
        c.admin_listen = Some("127.0.0.1:0".parse().unwrap());
    })
    .await;
    let url = format!("https://127.0.0.1:{}/admin/replicas", router.admin_addr.unwrap().port());
    let auth = ["-H", "authorization: Bearer admin-secret"];
    let (ok, out) = curl(&[auth[0], auth[1], "--cacert", admin.cert.to_str().unwrap(), &url]);
    assert!(ok && out.contains("replicas"), "{out}");
    let (ok, _) = curl(&[auth[0], auth[1], "--cacert", serving.cert.to_str().unwrap(), &url]);
    assert!(!ok, "the admin listener has its own certificate, not the serving one");
    router.shutdown().await;
}

#[tokio::test]
async fn tls_with_a_key_that_is_not_the_certificates_stops_start_up_with_one_line() {
    let (a, _) = certificate(&temp("mismatch-a"));
    let (b, _) = certificate(&temp("mismatch-b"));
    let mut config = RouterConfig::new(vec![ReplicaUrl::parse("http://127.0.0.1:9").unwrap()]);
    config.tls = Some(TlsFiles { cert: a.cert, key: b.key.clone() });
    let error = llm_router::server::start(config).await.err().expect("refused");
    assert!(error.to_string().starts_with("TLS: "), "{error}");
    let mut config = RouterConfig::new(vec![ReplicaUrl::parse("http://127.0.0.1:9").unwrap()]);
    config.tls = Some(TlsFiles { cert: temp("missing").join("cert.pem"), key: b.key });
    let error = llm_router::server::start(config).await.err().expect("refused");
    assert!(error.to_string().contains("cert.pem"), "{error}");
}

/// An HTTP/2 (prior knowledge) connection to the router.
async fn h2(router: &RunningRouter) -> hyper::client::conn::http2::SendRequest<Full<Bytes>> {
    let stream = tokio::net::TcpStream::connect(router.addr).await.unwrap();
    let (send, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await.unwrap();
    tokio::spawn(connection);
    send
}

fn post(router: &RunningRouter, body: &str) -> http::Request<Full<Bytes>> {
    http::Request::post(format!("http://{}/v1/chat/completions", router.addr))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_owned())))
        .unwrap()
}

#[tokio::test]
async fn a_reset_http2_stream_cancels_its_upstream_request_and_spares_the_connections_others() {
    let mocks = support::mocks(1).await;
    let mock = &mocks[0];
    let router = support::router(support::config(&mocks)).await;
    let mut send = h2(&router).await;
    mock.set_mode(Mode::Hold);
    let streaming = r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":true}"#;
    // Reset after the first event: the replica sees its request cancelled.
    let response = send.send_request(post(&router, streaming)).await.unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert!(first.starts_with(b"data: "), "{first:?}");
    drop(body);
    eventually("the replica sees the stream cancelled", || mock.cancelled() == 1).await;
    // Reset before any header: the same.
    let waiting = r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;
    let pending = tokio::spawn(send.send_request(post(&router, waiting)));
    eventually("the request reached the replica", || mock.request_count() == 2).await;
    pending.abort();
    eventually("the replica sees the waiting request cancelled", || mock.cancelled() == 2).await;
    // The connection still serves.
    mock.set_mode(Mode::Normal);
    let response = send.send_request(post(&router, streaming)).await.unwrap();
    let text = response.into_body().collect().await.unwrap().to_bytes();
    assert!(text.ends_with(b"data: [DONE]\n\n"), "{text:?}");
    router.shutdown().await;
}

#[tokio::test]
async fn many_http2_streams_on_one_connection_are_each_answered() {
    let mocks = support::mocks(2).await;
    let router = Arc::new(support::router(support::config(&mocks)).await);
    let send = h2(&router).await;
    let streaming = r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":true}"#;
    let mut tasks = Vec::new();
    for _ in 0..64 {
        let (mut send, request) = (send.clone(), post(&router, streaming));
        tasks.push(tokio::spawn(async move {
            send.ready().await.unwrap();
            let response = send.send_request(request).await.unwrap();
            assert_eq!(response.status(), 200);
            response.into_body().collect().await.unwrap().to_bytes()
        }));
    }
    for task in tasks {
        let text = task.await.unwrap();
        assert!(text.ends_with(b"data: [DONE]\n\n"), "{text:?}");
    }
}

#[tokio::test]
async fn rustls_clients_negotiate_h2_by_alpn() {
    let dir = temp("alpn");
    let (files, pem) = certificate(&dir);
    let (_sims, router) = sim_router(|c| c.tls = Some(files)).await;
    let mut roots = rustls::RootCertStore::empty();
    let der = rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
    roots.add(der).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    for (alpn, want) in [(vec![b"h2".to_vec(), b"http/1.1".to_vec()], Some(&b"h2"[..])), (vec![], None)] {
        let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots.clone())
            .with_no_client_auth();
        config.alpn_protocols = alpn;
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let tcp = tokio::net::TcpStream::connect(router.addr).await.unwrap();
        let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
        let tls = connector.connect(name, tcp).await.unwrap();
        assert_eq!(tls.get_ref().1.alpn_protocol(), want);
        if want.is_some() {
            let (mut send, connection) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls)).await.unwrap();
            tokio::spawn(connection);
            let request =
                http::Request::post(format!("https://localhost:{}/v1/chat/completions", router.addr.port()))
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from_static(CHAT.as_bytes())))
                    .unwrap();
            let response = send.send_request(request).await.unwrap();
            assert_eq!(response.status(), 200);
            assert_eq!(response.version(), http::Version::HTTP_2);
            let text = response.into_body().collect().await.unwrap().to_bytes();
            assert!(text.ends_with(b"data: [DONE]\n\n"));
        }
    }
    router.shutdown().await;
}

use rustls_pki_types::pem::PemObject;

#[tokio::test]
async fn tls_clients_that_never_finish_their_handshake_are_cut_off_and_cost_no_one_else() {
    let dir = temp("slow-handshake");
    let (files, pem) = certificate(&dir);
    let (_sims, router) = sim_router(|c| {
        c.tls = Some(files);
        c.header_read_timeout = Duration::from_millis(300);
    })
    .await;
    // TCP connections that send half a ClientHello and then nothing: more of them than
    // handshakes may run at once.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut silent = Vec::new();
    for _ in 0..200 {
        let mut stream = tokio::net::TcpStream::connect(router.addr).await.unwrap();
        stream.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01]).await.unwrap();
        silent.push(stream);
    }
    // Meanwhile a proper client is served.
    let mut roots = rustls::RootCertStore::empty();
    roots.add(rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()).unwrap();
    let config =
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(router.addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp).await.unwrap();
    let (mut send, connection) =
        hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(tls)).await.unwrap();
    tokio::spawn(connection);
    let health =
        http::Request::get("/health").header("host", "localhost").body(Full::new(Bytes::new())).unwrap();
    assert_eq!(send.send_request(health).await.unwrap().status(), 200);
    // The silent ones are closed once the handshake time is up (bounded wait: 10 s).
    for mut silent in silent {
        let mut buf = [0u8; 64];
        let closed = tokio::time::timeout(Duration::from_secs(10), silent.read(&mut buf)).await;
        assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "{closed:?}");
    }
    router.shutdown().await;
}

#[tokio::test]
async fn an_http2_client_over_its_stream_or_header_limits_costs_only_those_streams() {
    let mocks = support::mocks(1).await;
    let mock = &mocks[0];
    let router = Arc::new(support::router(support::config(&mocks)).await);
    mock.set_mode(Mode::Hold);
    let stream = tokio::net::TcpStream::connect(router.addr).await.unwrap();
    // 300 requests on one connection: the router lets 256 streams be open at once.
    let (send, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .handshake::<_, Full<Bytes>>(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    let waiting = r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;
    let mut held = Vec::new();
    for _ in 0..300 {
        let mut send = send.clone();
        let request = post(&router, waiting);
        held.push(tokio::spawn(async move {
            let _ = send.ready().await;
            send.send_request(request).await.map(|r| r.status().as_u16())
        }));
    }
    eventually("the router holds at most 256 streams of one connection", || mock.request_count() >= 256)
        .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(mock.request_count() <= 256, "{} streams reached the replica", mock.request_count());
    // Another client is served meanwhile: a header block over the limit is refused, a
    // normal request answered.
    let mut other = h2(&router).await;
    let mut huge = post(&router, waiting);
    huge.headers_mut().insert("x-padding", http::HeaderValue::from_str(&"a".repeat(500 * 1024)).unwrap());
    let refused = other.send_request(huge).await;
    assert_eq!(refused.map(|r| r.status().as_u16()).unwrap(), 431);
    mock.set_mode(Mode::Normal);
    mock.release();
    let mut fresh = h2(&router).await;
    let streaming = r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":true}"#;
    let response = fresh.send_request(post(&router, streaming)).await.unwrap();
    assert_eq!(response.status(), 200);
    for task in held {
        task.abort();
    }
}
