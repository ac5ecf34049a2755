//! The `router` binary's command line: every flag explained, bad values refused at
//! start with one line naming them, and a real start that serves and exits cleanly on
//! SIGTERM.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

fn router() -> Command {
    Command::new(env!("CARGO_BIN_EXE_router"))
}

fn refused(args: &[&str]) -> String {
    let out = router().args(args).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{args:?} should be refused");
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(stderr.trim_end().lines().count(), 1, "one line, got: {stderr}");
    stderr
}

#[test]
fn help_explains_every_flag() {
    let out = router().arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    for flag in [
        "--replicas",
        "--policy",
        "--host",
        "--port",
        "--session-header",
        "--hash-balance-factor",
        "--virtual-nodes",
        "--max-body-bytes",
        "--health-interval",
        "--health-timeout",
        "--unhealthy-threshold",
        "--healthy-threshold",
        "--connect-timeout",
        "--drain-timeout",
    ] {
        assert!(help.contains(flag), "--help does not mention {flag}");
    }
    for policy in ["round-robin", "random", "power-of-two", "least-loaded", "consistent-hash"] {
        assert!(help.contains(policy), "--help does not list {policy}");
    }
}

#[test]
fn bad_values_are_refused_in_one_line_naming_them() {
    assert!(refused(&["--replicas", "http://127.0.0.1:9", "--policy", "fastest"]).contains("fastest"));
    assert!(refused(&["--replicas", "127.0.0.1:9000"]).contains("127.0.0.1:9000"));
    assert!(refused(&["--replicas", "http://a:1,ftp://b:2"]).contains("ftp://b:2"));
    assert!(refused(&["--replicas", "http://a:1", "--health-interval", "soon"]).contains("soon"));
    assert!(refused(&[]).contains("--replicas"));
}

#[tokio::test]
async fn starts_serves_and_exits_zero_on_sigterm() {
    let replica = support::MockReplica::start("r0", &["m"]).await;
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut child = router()
        .args(["--host", "127.0.0.1", "--port", &port.to_string(), "--replicas", &replica.url()])
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Wait for the "listening" log line (bounded).
    let stdout = child.stdout.take().unwrap();
    let ready = tokio::task::spawn_blocking(move || {
        BufReader::new(stdout).lines().take(50).any(|l| l.is_ok_and(|l| l.contains("router listening")))
    });
    assert!(tokio::time::timeout(Duration::from_secs(20), ready).await.unwrap().unwrap());
    let body = serde_json::json!({"model": "m", "prompt": "hi"});
    let (status, replica_name, _) =
        support::post(&support::client(), &format!("http://127.0.0.1:{port}/v1/completions"), &body, &[])
            .await;
    assert_eq!((status, replica_name.as_deref()), (200, Some("r0")));
    Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    let status = tokio::task::spawn_blocking(move || child.wait()).await.unwrap().unwrap();
    assert_eq!(status.code(), Some(0));
}

/// Start the router binary on a free port with `args`, its stdout collected line by
/// line; returns once it logs that it listens.
async fn spawn_logging(
    args: &[&str],
    rust_log: &str,
) -> (std::process::Child, u16, std::sync::mpsc::Receiver<String>) {
    spawn_logging_with(args, rust_log, &[]).await
}

/// [`spawn_logging`] with these environment variables.
async fn spawn_logging_with(
    args: &[&str],
    rust_log: &str,
    envs: &[(&str, &str)],
) -> (std::process::Child, u16, std::sync::mpsc::Receiver<String>) {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut child = router()
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args(args)
        .envs(envs.iter().copied())
        .env("RUST_LOG", rust_log)
        .env_remove("NO_COLOR")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut seen = Vec::new();
    while std::time::Instant::now() < deadline {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(100)) {
            let ready = line.contains("router listening");
            seen.push(line);
            if ready {
                let (tx, rx2) = std::sync::mpsc::channel();
                for line in seen {
                    tx.send(line).unwrap();
                }
                std::thread::spawn(move || {
                    while let Ok(line) = rx.recv() {
                        if tx.send(line).is_err() {
                            break;
                        }
                    }
                });
                return (child, port, rx2);
            }
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("the router did not start: {seen:?}");
}

/// SIGTERM, wait for exit, and return every line it wrote.
async fn stop(mut child: std::process::Child, lines: std::sync::mpsc::Receiver<String>) -> Vec<String> {
    Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    let status = tokio::task::spawn_blocking(move || child.wait()).await.unwrap().unwrap();
    assert_eq!(status.code(), Some(0));
    lines.into_iter().collect()
}

// Multi-threaded: `spawn_logging` blocks its thread while the mock answers probes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirected_log_has_no_escape_codes_and_json_is_one_object_per_line() {
    let replica = support::MockReplica::start("r0", &["m"]).await;
    let (child, _, lines) = spawn_logging(&["--replicas", &replica.url()], "info").await;
    let text = stop(child, lines).await;
    assert!(text.len() >= 2, "{text:?}");
    assert!(text.iter().all(|l| !l.contains('\x1b')), "escape codes in a redirected log: {text:?}");

    // At `warn` (the server's start line kept), the access log still writes.
    let (child, port, lines) = spawn_logging(
        &["--replicas", &replica.url(), "--log-format", "json", "--access-log"],
        "warn,llm_router::server=info",
    )
    .await;
    let body = serde_json::json!({"model": "m", "prompt": "hi", "stream": true});
    let url = format!("http://127.0.0.1:{port}/v1/completions");
    let (status, _, answer) =
        support::post(&support::client(), &url, &body, &[("x-request-id", "req-abc")]).await;
    assert_eq!(status, 200, "{answer:?}");
    let (status, _, _) =
        support::post(&support::client(), &format!("http://127.0.0.1:{port}/v2/nothing"), &body, &[]).await;
    assert_eq!(status, 404);
    let json = stop(child, lines).await;
    let objects: Vec<serde_json::Value> = json
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not one JSON object: {l}: {e}")))
        .collect();
    assert!(objects.iter().all(|o| o.is_object() && o["level"].is_string() && o["timestamp"].is_string()));
    assert!(objects.iter().any(|o| o["message"] == "router listening"), "{json:?}");
    let access: Vec<&serde_json::Value> = objects.iter().filter(|o| o["target"] == "access").collect();
    assert_eq!(access.len(), 2, "one line per request: {json:?}");
    assert!(
        objects
            .iter()
            .all(|o| o["target"] == "access" || o["target"] == "llm_router::server" || o["level"] != "INFO"),
        "RUST_LOG still applies to everything else: {json:?}"
    );
    let served = access.iter().find(|o| o["client_request_id"] == "req-abc").expect("the client's id");
    assert!(served["request_id"].as_str().unwrap().starts_with("req-"), "and the router's own");
    assert_eq!(served["status"], 200);
    assert_eq!(served["replica"], replica.url().as_str());
    assert_eq!(served["path"], "/v1/completions");
    assert_eq!(served["outcome"], "complete");
    assert!(served["bytes"].as_u64().unwrap() > 0 && served["duration_s"].as_f64().unwrap() >= 0.0);
    let refused = access.iter().find(|o| o["path"] == "/v2/nothing").unwrap();
    assert_eq!((refused["status"].as_u64(), refused["replica"].as_str()), (Some(404), Some("none")));
}

// Multi-threaded: `spawn_logging` blocks its thread while the mock answers probes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_come_from_the_environment_and_a_file_and_logs_name_them() {
    let replica = support::MockReplica::start("r0", &["m"]).await;
    let dir = std::env::temp_dir().join(format!("llm-router-cli-keys-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("keys.toml");
    // sha256("test"): the file holds only the digest of team-b's key.
    std::fs::write(
        &file,
        "[[keys]]\nname = \"team-b\"\nkey_sha256 = \"9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08\"\n",
    )
    .unwrap();
    let (child, port, lines) = spawn_logging_with(
        &[
            "--replicas",
            &replica.url(),
            "--api-keys-file",
            file.to_str().unwrap(),
            "--log-format",
            "json",
            "--access-log",
        ],
        "warn,llm_router::server=info",
        &[("ROUTER_API_KEYS", "env-key-1,env-key-2")],
    )
    .await;
    let url = format!("http://127.0.0.1:{port}/v1/completions");
    let body = serde_json::json!({"model": "m", "prompt": "hi"});
    let c = support::client();
    for (auth, status) in [(None, 401), (Some("Bearer env-key-2"), 200), (Some("Bearer test"), 200)] {
        let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("authorization", *a)).collect();
        assert_eq!(support::post(&c, &url, &body, &headers).await.0, status, "{auth:?}");
    }
    let json = stop(child, lines).await;
    let access: Vec<serde_json::Value> = json
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|o| o["target"] == "access")
        .collect();
    let keys: Vec<&str> = access.iter().map(|o| o["api_key"].as_str().unwrap()).collect();
    // (The 401 was answered by admission, outside the access log.)
    assert_eq!(keys, ["key-2", "team-b"], "the key's name, never the key");
    assert!(json.iter().all(|l| !l.contains("env-key-2")), "the key itself is never logged");
    let _ = std::fs::remove_dir_all(&dir);
}

// Multi-threaded: `spawn_logging` blocks its thread while the router starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_keys_file_even_when_it_looks_unchanged() {
    let dir = std::env::temp_dir().join(format!("llm-router-sighup-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("keys.toml");
    std::fs::write(&path, "[[keys]]\nname = \"a\"\nkey = \"sk-aaaa\"\n").unwrap();
    let (child, port, lines) = spawn_logging(
        &["--sim", "1", "--sim-time-scale", "50", "--api-keys-file", path.to_str().unwrap()],
        "info",
    )
    .await;
    let models = |key: &'static str| async move {
        let r = reqwest::Client::new()
            .get(format!("http://127.0.0.1:{port}/v1/models"))
            .header("authorization", format!("Bearer {key}"))
            .send()
            .await
            .unwrap();
        r.status().as_u16()
    };
    assert_eq!(models("sk-aaaa").await, 200);
    // The same size and modification time: the file watch cannot see the edit.
    let modified = std::fs::metadata(&path).unwrap().modified().unwrap();
    std::fs::write(&path, "[[keys]]\nname = \"a\"\nkey = \"sk-bbbb\"\n").unwrap();
    std::fs::File::options().write(true).open(&path).unwrap().set_modified(modified).unwrap();
    tokio::time::sleep(llm_router::reload::POLL * 2).await;
    assert_eq!(models("sk-bbbb").await, 401, "not reloaded without a signal");
    Command::new("kill").args(["-HUP", &child.id().to_string()]).status().unwrap();
    let mut reloaded = false;
    for _ in 0..100 {
        if models("sk-bbbb").await == 200 {
            reloaded = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(reloaded, "SIGHUP reloads the keys");
    assert_eq!(models("sk-aaaa").await, 401);
    let text = stop(child, lines).await;
    assert!(text.iter().any(|l| l.contains("API keys reloaded")), "{text:?}");
}

// Multi-threaded: `spawn_logging` blocks its thread while the router starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_with_nothing_to_reload_does_not_end_the_router() {
    let (child, port, lines) = spawn_logging(&["--sim", "1", "--sim-time-scale", "50"], "info").await;
    Command::new("kill").args(["-HUP", &child.id().to_string()]).status().unwrap();
    let mut logged = false;
    for _ in 0..100 {
        let health = reqwest::get(format!("http://127.0.0.1:{port}/health")).await.unwrap();
        assert_eq!(health.status(), 200, "still serving after SIGHUP");
        if let Ok(line) = lines.try_recv() {
            logged |= line.contains("SIGHUP received");
        }
        if logged {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let text = stop(child, lines).await;
    assert!(logged || text.iter().any(|l| l.contains("SIGHUP received")), "{text:?}");
}
