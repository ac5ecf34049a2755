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

#[test]
fn vllm_sim_refuses_bad_values_and_explains_flags() {
    let sim = || Command::new(env!("CARGO_BIN_EXE_vllm-sim"));
    for (args, needle) in [
        (&["--profile", "gpt-5-h100"][..], "gpt-5-h100"),
        (&["--role", "router"][..], "router"),
        (&["--fault", "explode"][..], "explode"),
        (&["--time-scale", "0"][..], "time-scale"),
    ] {
        let out = sim().args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
        assert!(stderr.contains(needle), "{stderr}");
    }
    let help = String::from_utf8(sim().arg("--help").output().unwrap().stdout).unwrap();
    for flag in [
        "--profile",
        "--role",
        "--max-num-seqs",
        "--max-num-batched-tokens",
        "--num-gpu-blocks",
        "--time-scale",
        "--kv-bandwidth",
        "--fault",
        "--served-model-name",
        "--max-model-len",
    ] {
        assert!(help.contains(flag), "vllm-sim --help does not mention {flag}");
    }
}

#[test]
fn vllm_sim_serves_and_exits_zero_on_sigterm() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_vllm-sim"))
        .args(["--port", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let up = (0..200).any(|_| {
        std::thread::sleep(Duration::from_millis(25));
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    assert!(up, "vllm-sim did not start listening");
    Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert_eq!(child.wait().unwrap().code(), Some(0));
}
