//! A fake replica at the byte level, for the hostile tests: it reads HTTP/1.1 requests
//! off the socket itself and answers inference requests with exactly the bytes a test's
//! script gives (bad framing, lies about lengths, stalls, early closes), while answering
//! `/health` and `/v1/models` correctly so the router keeps it in rotation.
//!
//! It counts connections, requests, and connections the router closed while a response
//! was held back (a cancelled upstream request).

#![allow(dead_code)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// One request as the fake read it.
#[derive(Debug, Clone)]
pub struct RawRequest {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawRequest {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_default()
    }
}

/// What the fake does, step by step, to answer one request.
#[derive(Debug, Clone)]
pub enum Act {
    Write(Vec<u8>),
    Sleep(Duration),
    /// Close the connection.
    Close,
    /// Answer nothing more and wait for the router to close the connection.
    Hang,
    /// Write these bytes again and again until the router closes the connection.
    Flood(Vec<u8>),
}

pub type Script = Arc<dyn Fn(&RawRequest) -> Vec<Act> + Send + Sync>;

/// How the fake answers `GET /health`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    Ok,
    /// 503, as an engine that knows it is broken.
    Failing,
    /// No answer at all, as an engine too busy to answer in time.
    Silent,
}

#[derive(Default)]
pub struct Counters {
    pub connections: AtomicUsize,
    pub requests: AtomicUsize,
    /// Connections the router closed while the fake was hanging or flooding.
    pub closed_while_hanging: AtomicUsize,
    /// Connections that ended, by either side.
    pub ended: AtomicUsize,
    /// Connections that carried an inference request (not only health checks), and of
    /// those, the ones that ended.
    pub inference_connections: AtomicUsize,
    pub inference_ended: AtomicUsize,
}

pub struct RawReplica {
    pub addr: std::net::SocketAddr,
    pub counters: Arc<Counters>,
    pub seen: Arc<Mutex<Vec<RawRequest>>>,
    script: Arc<Mutex<Script>>,
    health: Arc<Mutex<Health>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for RawReplica {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A complete response with a JSON body and a correct length.
pub fn json_response(status: u16, body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// A chunk of the chunked coding.
pub fn chunk(data: &[u8]) -> Vec<u8> {
    let mut out = format!("{:x}\r\n", data.len()).into_bytes();
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
    out
}

pub const SSE_HEAD: &[u8] =
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";

impl RawReplica {
    pub async fn start(script: Script) -> RawReplica {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let counters = Arc::new(Counters::default());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let script = Arc::new(Mutex::new(script));
        let health = Arc::new(Mutex::new(Health::Ok));
        let task = {
            let (counters, seen, script, health) =
                (counters.clone(), seen.clone(), script.clone(), health.clone());
            tokio::spawn(async move {
                loop {
                    let Ok((stream, _)) = listener.accept().await else { return };
                    counters.connections.fetch_add(1, Ordering::SeqCst);
                    let _ = stream.set_nodelay(true);
                    let counters = counters.clone();
                    let (seen, script, health) = (seen.clone(), script.clone(), health.clone());
                    tokio::spawn(async move {
                        let inference = serve(stream, counters.clone(), seen, script, health).await;
                        counters.ended.fetch_add(1, Ordering::SeqCst);
                        if inference {
                            counters.inference_ended.fetch_add(1, Ordering::SeqCst);
                        }
                    });
                }
            })
        };
        RawReplica { addr, counters, seen, script, health, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set_health(&self, health: Health) {
        *self.health.lock().unwrap() = health;
    }

    pub fn set_script(&self, script: Script) {
        *self.script.lock().unwrap() = script;
    }

    pub fn requests(&self) -> Vec<RawRequest> {
        self.seen.lock().unwrap().clone()
    }

    /// Inference requests seen (health checks and model lists not counted).
    pub fn inference_count(&self) -> usize {
        self.seen.lock().unwrap().iter().filter(|r| r.path.starts_with("/v1/c")).count()
    }

    pub fn connections(&self) -> usize {
        self.counters.connections.load(Ordering::SeqCst)
    }

    /// Connections that ended, by either side.
    pub fn ended(&self) -> usize {
        self.counters.ended.load(Ordering::SeqCst)
    }

    /// Connections that carried an inference request, and how many of them ended.
    pub fn inference_connections(&self) -> (usize, usize) {
        (
            self.counters.inference_connections.load(Ordering::SeqCst),
            self.counters.inference_ended.load(Ordering::SeqCst),
        )
    }

    pub fn closed_while_hanging(&self) -> usize {
        self.counters.closed_while_hanging.load(Ordering::SeqCst)
    }
}

async fn serve(
    mut stream: TcpStream,
    counters: Arc<Counters>,
    seen: Arc<Mutex<Vec<RawRequest>>>,
    script: Arc<Mutex<Script>>,
    health: Arc<Mutex<Health>>,
) -> bool {
    let mut buffer = Vec::new();
    let mut inference = false;
    loop {
        let Some(request) = read_request(&mut stream, &mut buffer).await else { return inference };
        counters.requests.fetch_add(1, Ordering::SeqCst);
        let acts = match (request.method.as_str(), request.path.as_str()) {
            ("GET", "/health") => match *health.lock().unwrap() {
                Health::Ok => vec![Act::Write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n".to_vec())],
                Health::Failing => vec![Act::Write(json_response(503, "{}"))],
                Health::Silent => vec![Act::Hang],
            },
            ("GET", "/v1/models") => vec![Act::Write(json_response(
                200,
                r#"{"object":"list","data":[{"id":"m","object":"model","max_model_len":4096}]}"#,
            ))],
            _ => {
                if !inference {
                    inference = true;
                    counters.inference_connections.fetch_add(1, Ordering::SeqCst);
                }
                seen.lock().unwrap().push(request.clone());
                let script = script.lock().unwrap().clone();
                script(&request)
            }
        };
        for act in acts {
            match act {
                Act::Write(bytes) => {
                    if stream.write_all(&bytes).await.is_err() {
                        return inference;
                    }
                }
                Act::Sleep(d) => tokio::time::sleep(d).await,
                Act::Close => return inference,
                Act::Flood(bytes) => loop {
                    if stream.write_all(&bytes).await.is_err() {
                        counters.closed_while_hanging.fetch_add(1, Ordering::SeqCst);
                        return inference;
                    }
                },
                Act::Hang => {
                    let mut sink = [0u8; 4096];
                    loop {
                        match stream.read(&mut sink).await {
                            Ok(0) | Err(_) => {
                                counters.closed_while_hanging.fetch_add(1, Ordering::SeqCst);
                                return inference;
                            }
                            Ok(_) => {}
                        }
                    }
                }
            }
        }
    }
}

async fn read_request(stream: &mut TcpStream, buffer: &mut Vec<u8>) -> Option<RawRequest> {
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut parsed = httparse::Request::new(&mut headers);
        if let Ok(httparse::Status::Complete(used)) = parsed.parse(buffer) {
            let headers: Vec<(String, String)> = parsed
                .headers
                .iter()
                .map(|h| (h.name.to_owned(), String::from_utf8_lossy(h.value).into_owned()))
                .collect();
            let length: usize = headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
                .and_then(|(_, v)| v.parse().ok())
                .unwrap_or(0);
            let (method, path) = (parsed.method?.to_owned(), parsed.path?.to_owned());
            while buffer.len() < used + length {
                let mut more = [0u8; 64 * 1024];
                let n = stream.read(&mut more).await.ok()?;
                if n == 0 {
                    return None;
                }
                buffer.extend_from_slice(&more[..n]);
            }
            let body = buffer[used..used + length].to_vec();
            buffer.drain(..used + length);
            return Some(RawRequest { method, path, headers, body });
        }
        let mut more = [0u8; 64 * 1024];
        let n = stream.read(&mut more).await.ok()?;
        if n == 0 {
            return None;
        }
        buffer.extend_from_slice(&more[..n]);
    }
}
