//! A recording TCP hop between the router and a replica: every byte the replica sends is
//! kept, per connection, so a test can compare what the client received with exactly what
//! the replica sent for the same request (not a second run of it).

use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The bytes one connection's replica sent.
type Recording = Arc<Mutex<Vec<u8>>>;

pub struct Tap {
    pub url: String,
    /// Per connection, the bytes the replica sent, in order.
    recorded: Arc<Mutex<Vec<Recording>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Tap {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Tap {
    /// Listen on 127.0.0.1 and forward every connection to `upstream` (`host:port`).
    pub async fn start(upstream: &str) -> Tap {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let recorded: Arc<Mutex<Vec<Recording>>> = Arc::default();
        let upstream = upstream.to_owned();
        let connections = recorded.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(&upstream).await else { continue };
                let log: Recording = Arc::default();
                connections.lock().unwrap().push(log.clone());
                tokio::spawn(relay(client, server, log));
            }
        });
        Tap { url, recorded, task }
    }

    /// The body of the replica's HTTP/1.1 response that contains `marker` (chunked coding
    /// removed, nothing else touched).
    pub fn response_body_containing(&self, marker: &str) -> Option<Vec<u8>> {
        let connections = self.recorded.lock().unwrap();
        for log in connections.iter() {
            let bytes = log.lock().unwrap();
            let Some(at) = find(&bytes, marker.as_bytes()) else { continue };
            let start = rfind(&bytes[..at], b"HTTP/1.1 ")?;
            let head_end = start + find(&bytes[start..], b"\r\n\r\n")? + 4;
            let head = String::from_utf8_lossy(&bytes[start..head_end]).to_ascii_lowercase();
            let rest = &bytes[head_end..];
            if head.contains("transfer-encoding: chunked") {
                return dechunk(rest);
            }
            let length = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())?;
            return rest.get(..length).map(<[u8]>::to_vec);
        }
        None
    }
}

async fn relay(mut client: TcpStream, mut server: TcpStream, log: Recording) {
    let (mut client_read, mut client_write) = client.split();
    let (mut server_read, mut server_write) = server.split();
    let up = tokio::io::copy(&mut client_read, &mut server_write);
    let down = async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match server_read.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            log.lock().unwrap().extend_from_slice(&buf[..n]);
            if client_write.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = client_write.shutdown().await;
    };
    tokio::select! {
        _ = up => {}
        _ = down => {}
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn rfind(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).rposition(|w| w == needle)
}

/// A complete chunked body, decoded; `None` until its last chunk has arrived.
fn dechunk(mut rest: &[u8]) -> Option<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let line_end = find(rest, b"\r\n")?;
        let size_text = std::str::from_utf8(&rest[..line_end]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        rest = &rest[line_end + 2..];
        if size == 0 {
            return Some(body);
        }
        body.extend_from_slice(rest.get(..size)?);
        rest = rest.get(size + 2..)?;
    }
}
