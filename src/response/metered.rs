//! What a keyed request used, read from the engine's own `usage`, for the key's token
//! limit and its usage counters.
//!
//! A response body passes through [`Metered`] unchanged except in one case: when the
//! router asked the engine for the final usage chunk of a stream (the client did not
//! ask for it, `stream_options.include_usage`), that chunk is taken out before the
//! client sees it. Then the body is cut into SSE events, and an event split across
//! frames is held until its end arrives (bounded: an event over
//! [`MAX_HELD_EVENT`] is passed on as it is). Otherwise frames pass untouched and
//! only the last [`TAIL`] bytes are kept: the usage is the last `"usage":` object
//! of a body (a JSON answer's member, or a stream's last chunk before `[DONE]`),
//! parsed once when the body ends.
//!
//! When the body is dropped, the key is charged what the engine reported (prompt plus
//! completion tokens, or the Responses API's input plus output) in place of what it
//! reserved at admission. A body that ended with no usage (the client left, the stream
//! broke) is charged its prompt estimate and what it was sent: an SSE stream's events,
//! one token each as vLLM streams them.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use axum::body::Body;
use bytes::{Bytes, BytesMut};
use http_body::{Frame, SizeHint};
use prometheus::IntCounter;
use serde_json::Value;

use crate::admission::key_limits::{KeyLimits, Ledger};

/// Bytes of a body's end kept to find its usage in.
const TAIL: usize = 16 * 1024;
/// Longest event held back while its end is awaited.
const MAX_HELD_EVENT: usize = 1024 * 1024;

/// Token counts from an engine's `usage`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt: u64,
    pub completion: u64,
    pub cached: u64,
}

impl Usage {
    /// The usage object of chat, completions and embeddings (`prompt_tokens`,
    /// `completion_tokens`) or of the Responses API (`input_tokens`, `output_tokens`).
    fn from_json(usage: &Value) -> Option<Usage> {
        let number = |key: &str| usage.get(key).and_then(Value::as_u64);
        let (prompt, completion, cached) = match number("prompt_tokens") {
            Some(prompt) => {
                (prompt, number("completion_tokens"), usage.pointer("/prompt_tokens_details/cached_tokens"))
            }
            None => (
                number("input_tokens")?,
                number("output_tokens"),
                usage.pointer("/input_tokens_details/cached_tokens"),
            ),
        };
        Some(Usage {
            prompt,
            completion: completion.unwrap_or(0),
            cached: cached.and_then(Value::as_u64).unwrap_or(0),
        })
    }
}

/// Who is charged, and where the counts go.
pub struct Meter {
    pub key: Arc<str>,
    pub limits: KeyLimits,
    /// Which ledger admitted the request: the one told what it used.
    pub ledger: Ledger,
    /// Tokens reserved at admission: the prompt and the output allowance.
    pub reserved: u64,
    /// The prompt's estimate, charged when no usage comes.
    pub prompt: u64,
    /// The router asked for the usage chunk: take it out of the stream.
    pub strip_usage_chunk: bool,
    /// `router_key_tokens_total{key, kind}` for prompt, completion, cached.
    pub counters: [IntCounter; 3],
}

impl Meter {
    /// The request was answered without a usage to read (the engine refused it, or
    /// failed): the key is charged its prompt's estimate, and gets back the rest.
    pub fn unused(self) {
        self.limits.settle(&self.key, self.ledger, self.reserved, self.prompt, Instant::now());
    }
}

/// `body`, metered.
pub fn metered(body: Body, meter: Meter) -> Body {
    Body::new(Metered {
        inner: body,
        meter,
        tail: BytesMut::new(),
        held: BytesMut::new(),
        usage: None,
        sent: 0,
    })
}

struct Metered {
    inner: Body,
    meter: Meter,
    /// SSE events passed to the client.
    sent: u64,
    /// The body's last bytes (pass-through mode).
    tail: BytesMut,
    /// The start of an event whose end has not arrived (stripping mode).
    held: BytesMut,
    usage: Option<Usage>,
}

impl Metered {
    fn keep_tail(&mut self, data: &[u8]) {
        if data.len() >= TAIL {
            self.tail.clear();
            self.tail.extend_from_slice(&data[data.len() - TAIL..]);
            return;
        }
        let excess = (self.tail.len() + data.len()).saturating_sub(TAIL);
        if excess > 0 {
            let _ = self.tail.split_to(excess);
        }
        self.tail.extend_from_slice(data);
    }

    /// Stripping mode: the complete events of `data` (after what was held), less the
    /// usage chunk; an incomplete last event is held.
    fn strip(&mut self, data: Bytes) -> Bytes {
        if self.held.is_empty() && last_event_end(&data) == data.len() && !contains(&data, b"\"usage\"") {
            return data;
        }
        let mut events = if self.held.is_empty() {
            BytesMut::from(&data[..])
        } else {
            let mut joined = std::mem::take(&mut self.held);
            joined.extend_from_slice(&data);
            joined
        };
        let complete = last_event_end(&events);
        if complete < events.len() && events.len() - complete <= MAX_HELD_EVENT {
            self.held = events.split_off(complete);
        }
        if !contains(&events, b"\"usage\"") {
            return events.freeze();
        }
        let mut out = BytesMut::with_capacity(events.len());
        for event in split_events(&events) {
            match usage_chunk(event) {
                Some(usage) => self.usage = Some(usage),
                None => out.extend_from_slice(event),
            }
        }
        out.freeze()
    }

    fn usage_in_tail(&self) -> Option<Usage> {
        usage_in(&self.tail)
    }
}

impl http_body::Body for Metered {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        loop {
            let polled = Pin::new(&mut self.inner).poll_frame(cx);
            let Poll::Ready(Some(Ok(frame))) = polled else {
                if let Poll::Ready(None) = polled
                    && !self.held.is_empty()
                {
                    let rest = std::mem::take(&mut self.held).freeze();
                    return Poll::Ready(Some(Ok(Frame::data(rest))));
                }
                return polled;
            };
            let data = match frame.into_data() {
                Ok(data) => data,
                Err(frame) => return Poll::Ready(Some(Ok(frame))),
            };
            if !self.meter.strip_usage_chunk {
                self.keep_tail(&data);
                self.sent += events_in(&data);
                return Poll::Ready(Some(Ok(Frame::data(data))));
            }
            let out = self.strip(data);
            if !out.is_empty() {
                self.sent += events_in(&out);
                return Poll::Ready(Some(Ok(Frame::data(out))));
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.held.is_empty() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        if self.meter.strip_usage_chunk { SizeHint::default() } else { self.inner.size_hint() }
    }
}

impl Drop for Metered {
    fn drop(&mut self) {
        let usage = self.usage.or_else(|| self.usage_in_tail());
        let meter = &self.meter;
        let Some(usage) = usage else {
            // No usage (the client left, the stream broke): the prompt, and what was sent.
            let used = meter.prompt.saturating_add(self.sent);
            meter.limits.settle(&meter.key, meter.ledger, meter.reserved, used, Instant::now());
            return;
        };
        let used = usage.prompt.saturating_add(usage.completion);
        meter.limits.settle(&meter.key, meter.ledger, meter.reserved, used, Instant::now());
        for (counter, n) in meter.counters.iter().zip([usage.prompt, usage.completion, usage.cached]) {
            counter.inc_by(n);
        }
    }
}

/// The usage of the last `"usage":` object in `bytes` (a body's end: a JSON answer's
/// member, a stream's last chunk before `[DONE]`, a Responses stream's last event).
pub(crate) fn usage_in(bytes: &[u8]) -> Option<Usage> {
    let at = rfind(bytes, b"\"usage\":")?;
    let rest = &bytes[at + b"\"usage\":".len()..];
    let value = serde_json::Deserializer::from_slice(rest).into_iter::<Value>().next()?.ok()?;
    Usage::from_json(&value)
}

/// The SSE events that end in `data`.
fn events_in(data: &[u8]) -> u64 {
    memchr::memmem::find_iter(data, b"\n\n").count() as u64
}

/// The usage of a stream's usage-only chunk (`"choices":[]` with a `usage` object).
pub(crate) fn usage_chunk(event: &[u8]) -> Option<Usage> {
    let json = event.strip_prefix(b"data: ").or_else(|| event.strip_prefix(b"data:"))?;
    if !contains(json, b"\"usage\"") {
        return None;
    }
    let chunk: Value = serde_json::Deserializer::from_slice(json).into_iter::<Value>().next()?.ok()?;
    if !chunk.get("choices").and_then(Value::as_array).is_some_and(Vec::is_empty) {
        return None;
    }
    Usage::from_json(chunk.get("usage")?)
}

/// Where the last complete event of `bytes` ends (after its blank line).
fn last_event_end(bytes: &[u8]) -> usize {
    let lf = rfind(bytes, b"\n\n").map(|i| i + 2);
    let crlf = rfind(bytes, b"\r\n\r\n").map(|i| i + 4);
    lf.max(crlf).unwrap_or(0)
}

/// The events of `bytes`, each with its blank line; the last may be incomplete.
fn split_events(bytes: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = bytes;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let end = find(rest, b"\n\n").map_or(rest.len(), |i| i + 2);
        let (event, after) = rest.split_at(end);
        rest = after;
        Some(event)
    })
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn rfind(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).rposition(|w| w == needle)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    find(haystack, needle).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admission::rate_limits::{Limits, RateLimits};
    use http_body_util::BodyExt;

    fn meter(strip: bool, limits: &RateLimits) -> (Meter, [IntCounter; 3]) {
        let counters = std::array::from_fn(|i| IntCounter::new(format!("c{i}"), "test").unwrap());
        let meter = Meter {
            key: Arc::from("k"),
            limits: KeyLimits::from(limits.clone()),
            ledger: Ledger::Local,
            reserved: 100,
            prompt: 10,
            strip_usage_chunk: strip,
            counters: counters.clone(),
        };
        (meter, counters)
    }

    async fn run(frames: Vec<&'static str>, strip: bool) -> (String, [u64; 3], RateLimits) {
        let limits = RateLimits::default();
        let tpm = Limits { tokens_per_minute: Some(1_000), requests_per_minute: None };
        limits.admit(&Arc::from("k"), tpm, 100, Instant::now()).unwrap();
        let (meter, counters) = meter(strip, &limits);
        let stream = tokio_stream::iter(frames.into_iter().map(|f| Ok::<_, std::io::Error>(Bytes::from(f))));
        let body = metered(Body::from_stream(stream), meter);
        let out = String::from_utf8(body.collect().await.unwrap().to_bytes().to_vec()).unwrap();
        (out, counters.map(|c| c.get()), limits)
    }

    const CHUNK: &str =
        "data: {\"id\":\"x\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"usage\"}}]}\n\n";
    const USAGE: &str = "data: {\"id\":\"x\",\"choices\":[],\"usage\":{\"prompt_tokens\":40,\"completion_tokens\":7,\"total_tokens\":47,\"prompt_tokens_details\":{\"cached_tokens\":32}}}\n\n";
    const DONE: &str = "data: [DONE]\n\n";

    #[tokio::test]
    async fn the_asked_for_usage_chunk_is_removed_even_split_across_frames() {
        let (head, tail) = USAGE.split_at(30);
        let (out, counts, _) = run(vec![CHUNK, head, tail, DONE], true).await;
        assert_eq!(out, format!("{CHUNK}{DONE}"));
        assert_eq!(counts, [40, 7, 32]);
        let (out, counts, _) =
            run(vec![&*Box::leak(format!("{CHUNK}{USAGE}{DONE}").into_boxed_str())], true).await;
        assert_eq!((out, counts), (format!("{CHUNK}{DONE}"), [40, 7, 32]));
    }

    #[tokio::test]
    async fn a_clients_own_usage_is_read_and_passed_on() {
        let (out, counts, limits) = run(vec![CHUNK, USAGE, DONE], false).await;
        assert_eq!(out, format!("{CHUNK}{USAGE}{DONE}"));
        assert_eq!(counts, [40, 7, 32]);
        // Charged 47 instead of 100: 953 left of 1,000.
        let tpm = Limits { tokens_per_minute: Some(1_000), requests_per_minute: None };
        assert!(limits.admit(&Arc::from("k"), tpm, 953, Instant::now()).is_ok());
        let json = r#"{"id":"x","choices":[{"message":{"content":"\"usage\": no"}}],"usage":{"prompt_tokens":5,"completion_tokens":2,"total_tokens":7,"prompt_tokens_details":null}}"#;
        let (out, counts, _) = run(vec![json], false).await;
        assert_eq!((out.as_str(), counts), (json, [5, 2, 0]));
    }

    #[tokio::test]
    async fn the_responses_and_embeddings_usage_shapes_are_read() {
        let responses = r#"{"id":"resp_1","object":"response","output":[{"type":"message","content":[{"type":"output_text","text":"hi"}]}],"usage":{"input_tokens":12,"input_tokens_details":{"cached_tokens":4},"output_tokens":5,"output_tokens_details":{"reasoning_tokens":0},"total_tokens":17},"user":null}"#;
        assert_eq!(run(vec![responses], false).await.1, [12, 5, 4]);
        let streamed = "event: response.created\ndata: {\"type\":\"response.created\",\"response\":{\"usage\":null}}\n\nevent: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"status\":\"completed\",\"usage\":{\"input_tokens\":7,\"output_tokens\":3,\"total_tokens\":10}}}\n\n";
        assert_eq!(run(vec![streamed], false).await.1, [7, 3, 0]);
        let embedding: &'static str = Box::leak(
            format!(
                r#"{{"id":"embd-1","object":"list","data":[{{"index":0,"object":"embedding","embedding":[{}]}}],"usage":{{"prompt_tokens":9,"total_tokens":9,"completion_tokens":0}}}}"#,
                vec!["0.0123456"; 4096].join(",")
            )
            .into_boxed_str(),
        );
        assert_eq!(run(vec![embedding], false).await.1, [9, 0, 0]);
    }

    #[tokio::test]
    async fn no_usage_charges_the_prompt_and_what_was_sent() {
        let (out, counts, limits) = run(vec![CHUNK, CHUNK, "data: {\"id\":\"x\",\"cho"], true).await;
        assert_eq!(out, format!("{CHUNK}{CHUNK}data: {{\"id\":\"x\",\"cho"));
        assert_eq!(counts, [0, 0, 0]);
        // The prompt's 10 and the two whole events sent: 988 of 1,000 left.
        let tpm = Limits { tokens_per_minute: Some(1_000), requests_per_minute: None };
        assert!(limits.admit(&Arc::from("k"), tpm, 989, Instant::now()).is_err());
        assert!(limits.admit(&Arc::from("k"), tpm, 988, Instant::now()).is_ok());
    }

    #[tokio::test]
    async fn an_event_that_never_ends_is_held_at_most_its_bound_then_passed_on() {
        // A replica streams 3 MiB with no blank line, in 64 KiB frames.
        const FRAME: usize = 64 * 1024;
        let frame: &'static str = Box::leak("x".repeat(FRAME).into_boxed_str());
        let frames = vec![frame; 48];
        let limits = RateLimits::default();
        let (meter, _) = meter(true, &limits);
        let stream = tokio_stream::iter(frames.into_iter().map(|f| Ok::<_, std::io::Error>(Bytes::from(f))));
        let mut body = metered(Body::from_stream(stream), meter);
        let mut out = 0;
        while let Some(frame) = body.frame().await {
            let data = frame.unwrap().into_data().unwrap();
            assert!(data.len() <= MAX_HELD_EVENT + FRAME, "one frame out of {} bytes", data.len());
            out += data.len();
        }
        assert_eq!(out, 48 * FRAME, "every byte passed on");
    }

    fn split_run(frames: Vec<Vec<u8>>, strip: bool) -> (Vec<u8>, [u64; 3]) {
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        runtime.block_on(async {
            let limits = RateLimits::default();
            let (meter, counters) = meter(strip, &limits);
            let stream =
                tokio_stream::iter(frames.into_iter().map(|f| Ok::<_, std::io::Error>(Bytes::from(f))));
            let body = metered(Body::from_stream(stream), meter);
            let out = body.collect().await.unwrap().to_bytes().to_vec();
            (out, counters.map(|c| c.get()))
        })
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 256, ..Default::default() })]

        /// However a stream is cut into frames, stripping takes out exactly the usage
        /// chunk and passing through changes nothing; both read the same usage.
        #[test]
        fn frames_cut_anywhere_give_the_same_stream(
            words in proptest::collection::vec("[a-z\"\\\\ ]{0,12}", 1..8),
            with_usage in proptest::bool::ANY,
            cuts in proptest::collection::vec(0usize..2000, 0..12),
        ) {
            let mut kept = String::new();
            for word in &words {
                let content = serde_json::to_string(word).unwrap();
                kept.push_str(&format!("data: {{\"id\":\"x\",\"choices\":[{{\"index\":0,\"text\":{content}}}],\"usage\":null}}\n\n"));
            }
            let mut whole = kept.clone();
            if with_usage {
                whole.push_str(USAGE);
            }
            whole.push_str(DONE);
            kept.push_str(DONE);
            let bytes = whole.as_bytes();
            let mut points: Vec<usize> = cuts.into_iter().map(|c| c % (bytes.len() + 1)).collect();
            points.extend([0, bytes.len()]);
            points.sort_unstable();
            points.dedup();
            let frames: Vec<Vec<u8>> = points.windows(2).map(|w| bytes[w[0]..w[1]].to_vec()).collect();
            let expected_counts = if with_usage { [40, 7, 32] } else { [0, 0, 0] };
            let (out, counts) = split_run(frames.clone(), true);
            proptest::prop_assert_eq!(String::from_utf8(out).unwrap(), kept);
            proptest::prop_assert_eq!(counts, expected_counts);
            let (out, counts) = split_run(frames, false);
            proptest::prop_assert_eq!(String::from_utf8(out).unwrap(), whole);
            proptest::prop_assert_eq!(counts, expected_counts);
        }
    }
}
