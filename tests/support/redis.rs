//! A real `redis-server` (Debian's package) on a free 127.0.0.1 port, with no
//! persistence, killed when dropped; and a fake store for the hostile cases.
//!
//! Without the binary, the tests that need it skip, unless `REQUIRE_REDIS=1` (as in CI).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub struct RedisServer {
    child: Child,
    pub port: u16,
    binary: PathBuf,
}

/// The `redis-server` binary, or None (skip) when it is not installed and not required.
pub fn binary() -> Option<PathBuf> {
    let found = ["/usr/bin", "/usr/local/bin"]
        .iter()
        .map(|d| PathBuf::from(d).join("redis-server"))
        .find(|p| p.exists());
    if found.is_none() {
        assert!(
            std::env::var_os("REQUIRE_REDIS").is_none(),
            "redis-server is not installed (bash .ci/packages.sh installs it)"
        );
        eprintln!("skipped: redis-server is not installed (bash .ci/packages.sh installs it)");
    }
    found
}

impl RedisServer {
    /// Start one on a free port, or None (skip) without the binary.
    pub async fn start() -> Option<RedisServer> {
        let binary = binary()?;
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        Some(Self::start_on(binary, port).await)
    }

    async fn start_on(binary: PathBuf, port: u16) -> RedisServer {
        let child = Command::new(&binary)
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        let server = RedisServer { child, port, binary };
        for _ in 0..200 {
            if server.ping().await {
                return server;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("redis-server did not answer PING on port {port} within 5 s");
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    async fn ping(&self) -> bool {
        self.command(&["PING"]).await.is_some_and(|reply| reply.starts_with("+PONG"))
    }

    /// Send one command and return the raw reply's first read, or None.
    pub async fn command(&self, args: &[&str]) -> Option<String> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).await.ok()?;
        let mut frame = format!("*{}\r\n", args.len());
        for arg in args {
            frame.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
        }
        stream.write_all(frame.as_bytes()).await.ok()?;
        let mut buf = vec![0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(2), stream.read(&mut buf)).await.ok()?.ok()?;
        Some(String::from_utf8_lossy(&buf[..n]).into_owned())
    }

    /// Kill it (no shutdown, as a crash).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Start it again on the same port (empty: nothing was saved).
    pub async fn restart(&mut self) {
        self.kill();
        let again = Self::start_on(self.binary.clone(), self.port).await;
        *self = again;
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}
