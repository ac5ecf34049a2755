//! The load generator's OpenAI streaming client: send one request, time every event of
//! its stream the way `vllm bench serve` does.
//!
//! - TTFT: from sending the request to the first event that carries `choices` (for chat,
//!   vLLM's role chunk, which it sends with the first token).
//! - ITL: the gaps between consecutive events that carry `choices`.
//! - Latency (E2EL): from sending the request to the last event that carries `choices`.
//! - Output tokens: the `usage` event's `completion_tokens` (requests ask for it with
//!   `stream_options.include_usage`).
//!
//! A request succeeds only if it is answered 200, its stream ends with `data: [DONE]`
//! and no event in it is an error: a stream a router cut short, even politely with an
//! error event, is a failure. Events are found by scanning for their blank line
//! ([`SseEvents`]) and parsed with borrowed fields only, so the client spends about a
//! microsecond per token and is never the bottleneck of a benchmark on a small machine.
//!
//! The client spreads requests over one or more base URLs: through a router there is
//! one; going direct to the engines (the benchmark's limit) there is one per replica,
//! and requests are spread round-robin, or by session so a session keeps its replica.

use std::borrow::Cow;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method, Request, StatusCode, Uri, header};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;
use xxhash_rust::xxh3::xxh3_64;

use llm_common::sse::{SseEvents, data_payload};

/// How requests are spread over several base URLs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Spread {
    /// In turn.
    RoundRobin,
    /// By session id (a session always goes to the same URL); round-robin without one.
    Session,
}

/// One request, ready to send.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// `/v1/completions` or `/v1/chat/completions`.
    pub path: &'static str,
    pub body: Bytes,
    /// Prompt tokens as the workload counts them (the server's `usage` wins when given).
    pub prompt_tokens: usize,
    pub session: Option<String>,
    /// Keep the generated text (the agentic workload sends it back next turn).
    pub keep_text: bool,
}

/// What happened to one request.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    /// When the request was sent, from the start of its pass.
    pub start: Duration,
    pub ttft: Option<Duration>,
    /// Gaps between events that carried tokens, in microseconds.
    pub itl_us: Vec<u32>,
    pub latency: Duration,
    pub prompt_tokens: usize,
    pub output_tokens: usize,
    pub error: Option<String>,
    /// The client gave up on purpose (`--cancel-fraction`): not a success, not a failure.
    pub cancelled: bool,
    /// The generated text, when asked for.
    pub text: String,
}

impl Outcome {
    pub fn ok(&self) -> bool {
        self.error.is_none() && !self.cancelled
    }

    pub fn failed(&self) -> bool {
        self.error.is_some()
    }
}

/// Clients that hang up: this fraction of requests is dropped after a random time up to
/// `max_after` (soak tests; a benchmark cancels nothing).
#[derive(Debug, Clone, Copy)]
pub struct Cancellation {
    pub fraction: f64,
    pub max_after: Duration,
    pub seed: u64,
}

pub struct Client {
    http: HyperClient<HttpConnector, Full<Bytes>>,
    bases: Vec<Uri>,
    spread: Spread,
    next: AtomicUsize,
    session_header: HeaderName,
    timeout: Duration,
    cancellation: Option<Cancellation>,
    sent: AtomicUsize,
    /// `Authorization: Bearer <key>` on every request (`--api-key`).
    authorization: Option<HeaderValue>,
}

/// The fields of a stream event the client reads; everything else is skipped unparsed.
#[derive(Deserialize)]
struct Chunk<'a> {
    #[serde(default, borrow)]
    choices: Vec<Choice<'a>>,
    usage: Option<Usage>,
    #[serde(borrow)]
    error: Option<&'a serde_json::value::RawValue>,
}

#[derive(Deserialize)]
struct Choice<'a> {
    #[serde(borrow)]
    text: Option<Cow<'a, str>>,
    #[serde(borrow)]
    delta: Option<Delta<'a>>,
}

#[derive(Deserialize)]
struct Delta<'a> {
    #[serde(borrow)]
    content: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct Usage {
    prompt_tokens: Option<usize>,
    completion_tokens: Option<usize>,
}

/// Longest error body kept from a refused request.
const ERROR_BODY: usize = 512;

impl Client {
    pub fn new(bases: Vec<Uri>, spread: Spread, session_header: HeaderName, timeout: Duration) -> Self {
        assert!(!bases.is_empty(), "at least one base URL");
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let http = HyperClient::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .build(connector);
        Client {
            http,
            bases,
            spread,
            next: AtomicUsize::new(0),
            session_header,
            timeout,
            cancellation: None,
            sent: AtomicUsize::new(0),
            authorization: None,
        }
    }

    /// Send `Authorization: Bearer <key>` with every request.
    pub fn with_api_key(mut self, key: Option<&str>) -> Result<Self, String> {
        self.authorization = key
            .map(|key| HeaderValue::from_str(&format!("Bearer {key}")).map_err(|_| "bad API key".to_owned()))
            .transpose()?;
        Ok(self)
    }

    /// Speak HTTP/2 with prior knowledge (h2c): every request a stream, multiplexed on
    /// few connections.
    pub fn http2(mut self, on: bool) -> Self {
        if on {
            let mut connector = HttpConnector::new();
            connector.set_nodelay(true);
            self.http = HyperClient::builder(TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(90))
                .http2_only(true)
                .build(connector);
        }
        self
    }

    pub fn with_cancellation(mut self, cancellation: Option<Cancellation>) -> Self {
        self.cancellation = cancellation;
        self
    }

    /// When to hang up on the next request, if at all.
    fn cancel_after(&self) -> Option<Duration> {
        let c = self.cancellation?;
        let n = self.sent.fetch_add(1, Ordering::Relaxed) as u64;
        let mut rng = fastrand::Rng::with_seed(c.seed ^ n.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        (rng.f64() < c.fraction).then(|| c.max_after.mul_f64(rng.f64()))
    }

    fn base(&self, session: Option<&str>) -> &Uri {
        let i = match (self.spread, session) {
            (Spread::Session, Some(s)) => xxh3_64(s.as_bytes()) as usize,
            _ => self.next.fetch_add(1, Ordering::Relaxed),
        };
        &self.bases[i % self.bases.len()]
    }

    /// Send one request and time its stream; `epoch` is the start of the pass.
    pub async fn send(&self, request: &Prepared, epoch: Instant) -> Outcome {
        let sent = Instant::now();
        let mut outcome = Outcome {
            start: sent.saturating_duration_since(epoch),
            prompt_tokens: request.prompt_tokens,
            ..Outcome::default()
        };
        let cancel_after = self.cancel_after();
        let exchange = self.exchange(request, sent, &mut outcome);
        let bounded = tokio::time::timeout(self.timeout, exchange);
        let result = match cancel_after {
            Some(after) => tokio::select! {
                r = bounded => Some(r),
                _ = tokio::time::sleep(after) => None,
            },
            None => Some(bounded.await),
        };
        match result {
            None => outcome.cancelled = true, // dropping the exchange closes the connection
            Some(Ok(Ok(()))) => {}
            Some(Ok(Err(error))) => outcome.error = Some(error),
            Some(Err(_)) => outcome.error = Some(format!("no complete response within {:?}", self.timeout)),
        }
        outcome
    }

    async fn exchange(&self, prepared: &Prepared, sent: Instant, out: &mut Outcome) -> Result<(), String> {
        let base = self.base(prepared.session.as_deref());
        let uri = format!("{base}{}", prepared.path.trim_start_matches('/'));
        let mut request = Request::builder()
            .method(Method::POST)
            .uri(uri)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(prepared.body.clone()))
            .map_err(|e| format!("bad request: {e}"))?;
        if let Some(session) = &prepared.session {
            let value = HeaderValue::from_str(session).map_err(|_| format!("bad session id `{session}`"))?;
            request.headers_mut().insert(self.session_header.clone(), value);
        }
        if let Some(authorization) = &self.authorization {
            request.headers_mut().insert(header::AUTHORIZATION, authorization.clone());
        }
        let response = self.http.request(request).await.map_err(|e| format!("connection error: {e}"))?;
        let status = response.status();
        let mut body = response.into_body();
        if status != StatusCode::OK {
            let bytes = http_body_util::Limited::new(body, 1 << 20).collect().await.map(|b| b.to_bytes());
            let text = bytes.map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default();
            return Err(format!("HTTP {}: {}", status.as_u16(), truncate(&text, ERROR_BODY)));
        }
        let mut events = SseEvents::new();
        let mut last_token: Option<Instant> = None;
        let mut done = false;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| format!("stream broken: {e}"))?;
            let Ok(data) = frame.into_data() else { continue };
            events.push(&data);
            while let Some(event) = events.next_event() {
                let Some(payload) = data_payload(&event) else { continue }; // comments
                if payload == b"[DONE]" {
                    done = true;
                    continue;
                }
                let now = Instant::now();
                let chunk: Chunk = serde_json::from_slice(payload).map_err(|e| {
                    format!("unreadable event ({e}): {}", truncate_bytes(payload, ERROR_BODY))
                })?;
                if let Some(error) = chunk.error {
                    return Err(format!("error event: {}", truncate(error.get(), ERROR_BODY)));
                }
                if let Some(usage) = chunk.usage {
                    out.output_tokens = usage.completion_tokens.unwrap_or(out.output_tokens);
                    out.prompt_tokens = usage.prompt_tokens.unwrap_or(out.prompt_tokens);
                }
                let Some(choice) = chunk.choices.first() else { continue };
                match last_token {
                    None => out.ttft = Some(now - sent),
                    Some(previous) => {
                        out.itl_us.push((now - previous).as_micros().min(u32::MAX as u128) as u32)
                    }
                }
                last_token = Some(now);
                if prepared.keep_text {
                    let text =
                        choice.text.as_deref().or(choice.delta.as_ref().and_then(|d| d.content.as_deref()));
                    out.text.push_str(text.unwrap_or_default());
                }
            }
        }
        let Some(last) = last_token else {
            return Err("the stream carried no tokens".into());
        };
        out.latency = last - sent;
        if !done {
            return Err("the stream ended without [DONE]".into());
        }
        Ok(())
    }

    /// The first model `GET /v1/models` lists on the first base URL.
    pub async fn first_model(&self) -> Result<String, String> {
        let uri = format!("{}v1/models", self.bases[0]);
        let mut request = Request::builder()
            .uri(&uri)
            .body(Full::new(Bytes::new()))
            .map_err(|e| format!("bad URL {uri}: {e}"))?;
        if let Some(authorization) = &self.authorization {
            request.headers_mut().insert(header::AUTHORIZATION, authorization.clone());
        }
        let fetch = async {
            let response = self.http.request(request).await.map_err(|e| format!("GET {uri}: {e}"))?;
            let bytes =
                response.into_body().collect().await.map_err(|e| format!("GET {uri}: {e}"))?.to_bytes();
            let list: serde_json::Value =
                serde_json::from_slice(&bytes).map_err(|e| format!("GET {uri}: not JSON: {e}"))?;
            list["data"][0]["id"]
                .as_str()
                .map(str::to_owned)
                .ok_or_else(|| format!("GET {uri}: no models listed"))
        };
        tokio::time::timeout(Duration::from_secs(10), fetch)
            .await
            .unwrap_or_else(|_| Err(format!("GET {uri}: no answer in 10s")))
    }
}

fn truncate(text: &str, max: usize) -> &str {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].trim()
}

fn truncate_bytes(bytes: &[u8], max: usize) -> String {
    String::from_utf8_lossy(&bytes[..bytes.len().min(max)]).into_owned()
}

/// Parse a base URL (`http://host:port`, an optional path prefix allowed), ending in `/`.
pub fn parse_base(text: &str) -> Result<Uri, String> {
    let uri: Uri = text.trim().parse().map_err(|e| format!("`{text}` is not a URL: {e}"))?;
    if uri.scheme_str() != Some("http") || uri.authority().is_none() {
        return Err(format!("`{text}`: expected http://host:port"));
    }
    let path = uri.path().trim_end_matches('/');
    format!("http://{}{path}/", uri.authority().expect("checked"))
        .parse()
        .map_err(|e| format!("`{text}`: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_urls_end_in_a_slash_and_must_be_http() {
        assert_eq!(parse_base("http://127.0.0.1:8000").unwrap().to_string(), "http://127.0.0.1:8000/");
        assert_eq!(parse_base("http://h:1/prefix/").unwrap().to_string(), "http://h:1/prefix/");
        assert!(parse_base("https://h:1").is_err());
        assert!(parse_base("h:1").is_err());
    }

    #[test]
    fn sessions_keep_their_base_and_keyless_requests_rotate() {
        let bases = (1..=4).map(|p| parse_base(&format!("http://h:{p}")).unwrap()).collect();
        let c = Client::new(
            bases,
            Spread::Session,
            HeaderName::from_static("x-session-id"),
            Duration::from_secs(1),
        );
        let a = c.base(Some("s-1")).clone();
        assert!((0..10).all(|_| *c.base(Some("s-1")) == a));
        let rotated: std::collections::HashSet<_> = (0..4).map(|_| c.base(None).clone()).collect();
        assert_eq!(rotated.len(), 4);
    }
}
