//! The bodies of the fuzz targets (`fuzz/`, run by `bench-scripts/fuzz.sh`), kept in
//! the library so that `cargo test` replays every input the fuzzer ever found
//! (`fuzz/regressions/`) through exactly the same code.
//!
//! Each function must never panic, whatever its input; the asserts inside check the
//! invariants the router relies on.

use http::{HeaderMap, HeaderName, HeaderValue};

use crate::dispatch::pd::members::Members;
use crate::dispatch::pd::requests;
use crate::ingress::request_facts;
use crate::ingress::routing_key::KeyHeaders;
use llm_common::sse::{SseEvents, data_payload};

/// Request parsing and session-key extraction: the input is a request body, and also,
/// split at its first blank line, header lines (`name: value`) followed by a body.
pub fn request_parsing(data: &[u8]) {
    body(data);
    let split = data.windows(2).position(|w| w == b"\n\n");
    let (head, body_part) = match split {
        Some(at) => (&data[..at], &data[at + 2..]),
        None => (&data[..0], data),
    };
    let facts = body(body_part);
    let mut headers = HeaderMap::new();
    for line in head.split(|&b| b == b'\n') {
        let Some(colon) = line.iter().position(|&b| b == b':') else { continue };
        let (Ok(name), Ok(value)) =
            (HeaderName::from_bytes(&line[..colon]), HeaderValue::from_bytes(line[colon + 1..].trim_ascii()))
        else {
            continue;
        };
        headers.append(name, value);
    }
    let keys =
        KeyHeaders::new(vec![HeaderName::from_static("x-session-id"), HeaderName::from_static("x-user-id")]);
    let session = facts.and_then(|f| f.session);
    let key = keys.key(&headers, session.clone());
    match (keys.find(&headers), &session) {
        // A header key wins over the body's.
        (Some(from_header), _) => assert_eq!(key.as_ref(), Some(&from_header)),
        (None, Some(s)) => assert_eq!(key.as_ref().map(|k| k.as_bytes()), Some(s.as_bytes())),
        (None, None) => assert!(key.is_none()),
    }
}

/// One body through the ingress parser, and, when it is an inference request, through
/// the P/D rewrites.
fn body(data: &[u8]) -> Option<request_facts::BodyFacts> {
    let any = request_facts::parse(data);
    let inference = request_facts::parse_inference(data);
    match (&any, &inference) {
        (Ok(a), Ok(i)) => assert_eq!(a, i, "the inference parse is the general one plus a model"),
        (Ok(a), Err(_)) => assert!(a.model.is_none(), "only a missing model fails the inference parse"),
        (Err(_), Ok(_)) => panic!("an inference body that is not a body"),
        (Err(_), Err(_)) => {}
    }
    let facts = inference.ok()?;
    // The P/D path reads the body's top-level members; what it cannot read gets a 400.
    // Every rewrite is a JSON object again with the members it sets, and every other
    // member of the client's body exactly as it was (byte for byte).
    let Ok(members) = Members::parse(data) else { return Some(facts) };
    let reread = |bytes: &[u8]| -> Vec<(String, String)> {
        let m = Members::parse(bytes).expect("a rewrite is a JSON object");
        let keys: Vec<String> = m.keys().map(str::to_owned).collect();
        keys.into_iter().map(|k| (k.clone(), m.get(&k).expect("listed").get().to_owned())).collect()
    };
    let get = |members: &[(String, String)], key: &str| {
        members.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v.clone())
    };
    let prefill = reread(&requests::prefill_request(&members));
    assert_eq!(get(&prefill, "stream").as_deref(), Some("false"));
    assert_eq!(get(&prefill, "max_tokens").as_deref(), Some("1"));
    assert!(get(&prefill, "stream_options").is_none());
    let _ = requests::read_prefill_response(data);
    let kv = serde_json::value::RawValue::from_string(r#"{"do_remote_prefill":true}"#.into()).expect("JSON");
    let ids = serde_json::value::RawValue::from_string("[1,2,3]".into()).expect("JSON");
    for chat in [false, true] {
        for tokenize_once in [false, true] {
            let decode =
                requests::decode_request(&members, chat, &kv, Some((&ids, 3)), tokenize_once, Some(4096));
            let body = reread(&decode.body);
            assert_eq!(get(&body, "kv_transfer_params").as_deref(), Some(kv.get()));
            if !decode.convert_to_chat {
                for key in members.keys().filter(|k| !matches!(*k, "kv_transfer_params" | "prompt")) {
                    assert_eq!(get(&body, key).as_deref(), members.get(key).map(|v| v.get()), "{key}");
                }
            }
        }
    }
    Some(facts)
}

/// SSE framing: `data` is split into frames at the points its first byte chooses; the
/// events found, then whatever is left, must be the input unchanged.
pub fn sse_framing(data: &[u8]) {
    let Some((&step, stream)) = data.split_first() else { return };
    let step = usize::from(step).max(1);
    let mut sse = SseEvents::new();
    let mut out = Vec::with_capacity(stream.len());
    for frame in stream.chunks(step) {
        sse.push(frame);
        while let Some(event) = sse.next_event() {
            assert!(event.ends_with(b"\n\n"), "an event ends at its blank line");
            assert!(!event[..event.len() - 2].windows(2).any(|w| w == b"\n\n"), "one event at a time");
            if let Some(payload) = data_payload(&event) {
                assert!(payload.len() <= event.len());
            }
            out.extend_from_slice(&event);
        }
    }
    if let Some(rest) = sse.take_rest() {
        out.extend_from_slice(&rest);
    }
    assert_eq!(out, stream, "framing loses or invents no byte");
}

/// The KV event feed's receiving side: `data` after its first byte is what a publisher
/// sent after the handshake, arriving in pieces of the size the first byte chooses.
/// Messages are taken from the buffer as the connection takes them, and each one's last
/// frame is decoded as an event batch. Nothing may panic; no message may exceed the
/// bounds; nothing decoded may claim more than its payload carried.
pub fn kv_feed(data: &[u8]) {
    use crate::policy::cache_index::kv_events::{KvEvent, MAX_BLOCK_SIZE, decode_batch};
    use crate::policy::cache_index::zmtp::{Limits, Parsed, take_message};
    let Some((&step, stream)) = data.split_first() else { return };
    let limits = Limits { max_message_bytes: 4096, max_frames: 4 };
    let mut read = bytes::BytesMut::new();
    for piece in stream.chunks(usize::from(step).max(1)) {
        read.extend_from_slice(piece);
        loop {
            match take_message(&mut read, &limits) {
                Ok(Parsed::Message(frames)) => {
                    assert!(frames.len() <= limits.max_frames);
                    assert!(frames.iter().map(|f| f.len()).sum::<usize>() <= limits.max_message_bytes);
                    let Some(payload) = frames.last() else { continue };
                    let Ok(batch) = decode_batch(payload) else { continue };
                    for event in &batch.events {
                        if let KvEvent::BlockStored { block_hashes, token_ids, block_size, .. } = event {
                            assert!((1..=MAX_BLOCK_SIZE).contains(block_size));
                            assert_eq!(token_ids.len(), block_hashes.len() * block_size);
                            assert!(token_ids.len() <= payload.len());
                        }
                    }
                }
                Ok(Parsed::Command) => {}
                Ok(Parsed::Need(n)) => {
                    assert!(n <= limits.max_message_bytes + 9, "never asks for more than a bound allows");
                    break;
                }
                Err(_) => return,
            }
        }
    }
}

/// The relay's reading of a replica's response head: any bytes parse to a head or an
/// error, never a panic; a head's framing is decided strictly, and after normalisation
/// the client sees a `Content-Length` exactly when the body has that one length.
pub fn response_head(data: &[u8]) {
    use crate::upstream::relay::message::{Framing, framing, normalise_length, parse_head};
    let Ok(Some((mut head, used))) = parse_head(data) else { return };
    assert!(used <= data.len());
    for method in [http::Method::POST, http::Method::GET] {
        let Ok(f) = framing(&method, &head) else { continue };
        let mut headers = head.headers.clone();
        normalise_length(&mut headers, &method, f);
        let lengths: Vec<_> = headers.get_all(http::header::CONTENT_LENGTH).iter().collect();
        match f {
            Framing::Length(n) => assert_eq!(lengths, [&http::HeaderValue::from(n)]),
            _ => assert!(lengths.is_empty(), "no length on a body that has none: {f:?}"),
        }
    }
    normalise_length(&mut head.headers, &http::Method::HEAD, Framing::Empty);
}

/// The chunked decoder: `data` after its first byte is a body, fed in pieces of the size
/// the first byte chooses. Whatever the split, the payload, the end and the bytes left
/// after the end are those of decoding it whole; the payload is never longer than the
/// input.
pub fn chunked_body(data: &[u8]) {
    use crate::upstream::relay::chunked::Chunked;
    let Some((&step, body)) = data.split_first() else { return };
    let decode = |pieces: &mut dyn Iterator<Item = &[u8]>| -> Option<(Vec<u8>, bool, Vec<u8>)> {
        let mut decoder = Chunked::default();
        let (mut payload, mut left) = (Vec::new(), Vec::new());
        for piece in pieces {
            if decoder.is_done() {
                left.extend_from_slice(piece);
                continue;
            }
            let mut buffer = bytes::BytesMut::from(piece);
            payload.extend_from_slice(&decoder.decode(&mut buffer).ok()?);
            assert!(buffer.is_empty() || decoder.is_done(), "input is kept only after the end");
            left.extend_from_slice(&buffer);
        }
        Some((payload, decoder.is_done(), left))
    };
    let whole = decode(&mut std::iter::once(body));
    let split = decode(&mut body.chunks(usize::from(step).max(1)));
    if let (Some(whole), Some(split)) = (&whole, &split) {
        assert_eq!(whole, split, "the split changed what was decoded");
        assert!(whole.0.len() <= body.len());
    }
    assert_eq!(whole.is_some(), split.is_some(), "an error is an error however the bytes arrive");
}

/// A multipart form's `model` field (an audio request's): `data`'s first line is the
/// boundary the content type names, the rest the body. A value found is a slice of the
/// body within the bound; nothing panics.
pub fn multipart_form(data: &[u8]) {
    use crate::ingress::multipart::{boundary, field};
    let split = data.iter().position(|&b| b == b'\n').unwrap_or(data.len());
    let (name, body) = (&data[..split], data.get(split + 1..).unwrap_or_default());
    let Ok(name) = std::str::from_utf8(name) else { return };
    let content_type = format!("multipart/form-data; boundary={name}");
    let Some(Ok(boundary)) = boundary(&content_type) else { return };
    if let Ok(Some(value)) = field(body, boundary, "model", 64) {
        assert!(value.len() <= 64);
        let at = value.as_ptr() as usize - body.as_ptr() as usize;
        assert!(at + value.len() <= body.len(), "a slice of the body");
    }
}

/// Stop strings against generated text: `data` is up to 8 stop strings and a text, NUL
/// separated (the first byte's low bits choose how many strings, its high ones how much
/// of the text is new). The automaton finds what searching each string finds (vLLM's
/// rule: the match that ends first in the new text, ties to the first listed).
pub fn stop_strings(data: &[u8]) {
    use crate::frontend::stop_strings::{StopStrings, floor_boundary};
    let Some((&choice, rest)) = data.split_first() else { return };
    let Ok(rest) = std::str::from_utf8(rest) else { return };
    let mut parts = rest.split('\0');
    let count = usize::from(choice & 7) + 1;
    let stops: Vec<String> =
        parts.by_ref().take(count).filter(|s| !s.is_empty()).map(str::to_owned).collect();
    let text: String = parts.collect::<Vec<_>>().join("\0");
    let old = floor_boundary(&text, text.len() * usize::from(choice >> 3) / 31);
    let automaton = StopStrings::new(stops.clone());
    let found = automaton.find(&text, text.len() - old);
    let mut expected: Option<(usize, usize, usize)> = None;
    for (i, stop) in stops.iter().enumerate() {
        let first = (0..text.len())
            .filter(|&at| text.is_char_boundary(at) && text[at..].starts_with(stop.as_str()))
            .find(|at| at + stop.len() > old);
        if let Some(start) = first
            && expected.is_none_or(|(end, _, _)| start + stop.len() < end)
        {
            expected = Some((start + stop.len(), i, start));
        }
    }
    let expected = expected.filter(|_| text.len() > old).map(|(_, i, start)| (stops[i].as_str(), start));
    assert_eq!(found, expected);
}

/// The usage a response ends with, in any of its shapes (chat and completions,
/// embeddings, the Responses API), read from any bytes: never a panic, and what is read
/// came from a `"usage"` object in the input.
pub fn usage_shapes(data: &[u8]) {
    use crate::response::metered::{usage_chunk, usage_in};
    if let Some(usage) = usage_in(data) {
        assert!(data.windows(8).any(|w| w == b"\"usage\":"));
        let _ = usage.prompt.checked_add(usage.completion);
    }
    let _ = usage_chunk(data);
}

/// An HTTP/2 client connection as the router serves it (its stream executor, the stall
/// watch on every response): `data` is what the client sends after the preface. Any
/// frames end in responses, resets or a closed connection, never a panic or a hang.
pub fn h2_connection(data: &[u8]) {
    use crate::ingress::h2_streams::{ConnectionStreams, StreamCounters, StreamExecutor, watched_body};
    use std::time::Duration;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build();
    let Ok(runtime) = runtime else { return };
    runtime.block_on(async {
        let counters = StreamCounters {
            stalls: prometheus::IntCounter::new("stalls", "fuzz").expect("a valid name"),
            premature_resets: prometheus::IntCounter::new("resets", "fuzz").expect("a valid name"),
        };
        let executor = StreamExecutor { limit: Duration::from_millis(200), counters };
        let (client, server) = tokio::io::duplex(64 * 1024);
        let service =
            hyper::service::service_fn(|request: http::Request<hyper::body::Incoming>| async move {
                let body = http_body_util::BodyExt::collect(request.into_body()).await.map(|b| b.to_bytes());
                let answer = axum::body::Body::from(body.unwrap_or_default());
                Ok::<_, std::convert::Infallible>(http::Response::new(watched_body(answer, ())))
            });
        let connection = hyper::server::conn::http2::Builder::new(executor)
            .max_concurrent_streams(16)
            .max_header_list_size(16 * 1024)
            .serve_connection(hyper_util::rt::TokioIo::new(server), service);
        let streams = ConnectionStreams::new();
        let serving = tokio::spawn(streams.clone().scope(connection));
        let (_reader, mut writer) = tokio::io::split(client);
        use tokio::io::AsyncWriteExt;
        let _ = writer.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;
        let _ = writer.write_all(data).await;
        // The client is done: the connection ends once its streams have.
        let _ = writer.shutdown().await;
        drop(writer);
        let ended = tokio::time::timeout(Duration::from_secs(10), serving).await;
        assert!(ended.is_ok(), "the connection ended after its client did");
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn well_formed_inputs_pass() {
        request_parsing(br#"{"model": "m", "messages": [], "session_id": "s"}"#);
        request_parsing(b"x-session-id: abc\nx-user-id: u\n\n{\"model\": \"m\", \"user\": 7}");
        request_parsing(b"not json at all");
        sse_framing(b"\x03data: {}\n\ndata: [DONE]\n\n: tail");
        response_head(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 5\r\n\r\n");
        chunked_body(b"\x02\x33\r\nabc\r\n0\r\n\r\n\r\n");
        kv_feed(b"\x05\x01\x00\x01\x08\x00\x00\x00\x00\x00\x00\x00\x01\x00\x04\x92\x01\x90\xc0");
        multipart_form(b"xyz\n--xyz\r\ncontent-disposition: form-data; name=\"model\"\r\n\r\nm\r\n--xyz--");
        stop_strings(b"\x91ab\0b\0xxabyyb");
        usage_shapes(br#"{"usage":{"input_tokens":3,"output_tokens":4}}"#);
        // SETTINGS, then a HEADERS frame (stream 1) that is not valid HPACK.
        h2_connection(
            b"\x00\x00\x00\x04\x00\x00\x00\x00\x00\x00\x00\x03\x01\x05\x00\x00\x00\x01\xff\xff\xff",
        );
    }
}
