//! The `vllm-sim` binary's command line: bad values refused in one line naming them,
//! every flag explained, and a real start that exits cleanly on SIGTERM.

use std::process::{Command, Stdio};
use std::time::Duration;

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
