//! HTTP/1.1 on the wire to a replica: the request as bytes, the response head parsed
//! from bytes, and how the response body is framed.
//!
//! Pure functions over buffers; the socket work is in [`super::exchange`].

use std::fmt::Write;

use bytes::{BufMut, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode, Version};

use crate::upstream::proxy::{Outbound, connection_options};

/// The request line and headers of `outbound` for a replica at `authority`.
pub fn request_head(outbound: &Outbound, authority: &str) -> BytesMut {
    let mut head = BytesMut::with_capacity(256 + 48 * outbound.headers.len());
    head.put_slice(outbound.method.as_str().as_bytes());
    head.put_u8(b' ');
    head.put_slice(outbound.path.as_str().as_bytes());
    head.put_slice(b" HTTP/1.1\r\nhost: ");
    head.put_slice(authority.as_bytes());
    head.put_slice(b"\r\n");
    for (name, value) in &outbound.headers {
        head.put_slice(name.as_str().as_bytes());
        head.put_slice(b": ");
        head.put_slice(value.as_bytes());
        head.put_slice(b"\r\n");
    }
    if !outbound.body.is_empty() || !matches!(outbound.method, Method::GET | Method::HEAD) {
        let _ = write!(head, "content-length: {}\r\n", outbound.body.len());
    }
    head.put_slice(b"\r\n");
    head
}

/// A parsed response head.
#[derive(Debug)]
pub struct Head {
    pub status: StatusCode,
    pub version: Version,
    pub headers: HeaderMap,
}

/// Most header fields accepted in a response head.
const MAX_HEADERS: usize = 96;
/// Longest response head accepted.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum HeadError {
    #[error("malformed response head: {0}")]
    Parse(#[from] httparse::Error),
    #[error("response head larger than {MAX_HEAD_BYTES} bytes")]
    TooLarge,
    #[error("invalid header in response: {0}")]
    Header(String),
}

/// The response head at the start of `buffer` and its length, or `None` if more bytes
/// are needed. Interim (1xx) responses are skipped.
pub fn parse_head(buffer: &[u8]) -> Result<Option<(Head, usize)>, HeadError> {
    let mut offset = 0;
    loop {
        let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut response = httparse::Response::new(&mut fields);
        let used = match response.parse(&buffer[offset..])? {
            httparse::Status::Complete(used) => used,
            httparse::Status::Partial if buffer.len() > MAX_HEAD_BYTES => return Err(HeadError::TooLarge),
            httparse::Status::Partial => return Ok(None),
        };
        let code = response.code.expect("complete head has a status");
        if !(100..=599).contains(&code) || code == 101 {
            // 101 would switch protocols on a connection we never asked to upgrade.
            return Err(HeadError::Header(format!("status {code}")));
        }
        let status = StatusCode::from_u16(code).map_err(|e| HeadError::Header(e.to_string()))?;
        if status.is_informational() {
            offset += used;
            continue;
        }
        let version = if response.version == Some(0) { Version::HTTP_10 } else { Version::HTTP_11 };
        let mut headers = HeaderMap::with_capacity(response.headers.len());
        for field in response.headers.iter() {
            let name = HeaderName::from_bytes(field.name.as_bytes())
                .map_err(|e| HeadError::Header(e.to_string()))?;
            let value = HeaderValue::from_bytes(field.value).map_err(|e| HeadError::Header(e.to_string()))?;
            headers.append(name, value);
        }
        return Ok(Some((Head { status, version, headers }, offset + used)));
    }
}

/// How a response body is delimited (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body: a response to HEAD, 204 or 304.
    Empty,
    Length(u64),
    Chunked,
    /// Until the replica closes the connection.
    UntilClose,
}

/// The framing of a response to `method` (RFC 9112 §6.3), strictly: the only transfer
/// coding accepted is `chunked` alone (no replica we serve sends another, and one we
/// cannot decode for the client is refused rather than passed on mislabelled); it wins
/// over any `Content-Length`; a length is digits only (`+5`, `5 5`, `0x5` are refused),
/// and several lengths must agree.
pub fn framing(method: &Method, head: &Head) -> Result<Framing, HeadError> {
    if *method == Method::HEAD
        || head.status == StatusCode::NO_CONTENT
        || head.status == StatusCode::NOT_MODIFIED
    {
        return Ok(Framing::Empty);
    }
    let mut codings = head
        .headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|c| !c.is_empty())
        .peekable();
    if codings.peek().is_some() {
        let only_chunked = codings.next().is_some_and(|c| c.eq_ignore_ascii_case(b"chunked"));
        if !only_chunked || codings.next().is_some() {
            return Err(HeadError::Header("unsupported transfer coding".into()));
        }
        return Ok(Framing::Chunked);
    }
    let mut length = None;
    for value in head.headers.get_all(header::CONTENT_LENGTH) {
        for item in value.as_bytes().split(|&b| b == b',').map(<[u8]>::trim_ascii) {
            let n = digits(item).ok_or_else(|| HeadError::Header("bad content-length".into()))?;
            if length.is_some_and(|l| l != n) {
                return Err(HeadError::Header("conflicting content-length".into()));
            }
            length = Some(n);
        }
    }
    Ok(match length {
        None => Framing::UntilClose,
        Some(0) => Framing::Empty,
        Some(n) => Framing::Length(n),
    })
}

/// A decimal length of digits only, without overflow.
fn digits(text: &[u8]) -> Option<u64> {
    if text.is_empty() || !text.iter().all(u8::is_ascii_digit) {
        return None;
    }
    text.iter().try_fold(0u64, |n, &d| n.checked_mul(10)?.checked_add(u64::from(d - b'0')))
}

/// The response's `Content-Length` as the client must see it: the body's one length
/// when it has one, none when the body is chunked or runs to the close (the router's
/// server then frames it), as it was for a response to HEAD.
pub fn normalise_length(headers: &mut HeaderMap, method: &Method, framing: Framing) {
    if *method == Method::HEAD {
        return;
    }
    match framing {
        Framing::Length(n) => {
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
        }
        Framing::Empty => {
            headers.remove(header::CONTENT_LENGTH);
        }
        Framing::Chunked | Framing::UntilClose => {
            headers.remove(header::CONTENT_LENGTH);
        }
    }
}

/// Whether the connection can carry another request once this response is read.
pub fn reusable(head: &Head, framing: Framing) -> bool {
    let close = connection_options(&head.headers).any(|option| option.eq_ignore_ascii_case("close"));
    head.version == Version::HTTP_11 && !close && framing != Framing::UntilClose
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn request_head_carries_host_headers_and_length() {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", "application/json".parse().unwrap());
        headers.insert("x-session-id", "s1".parse().unwrap());
        let o = Outbound::new(
            Method::POST,
            "/v1/completions?a=1".parse().unwrap(),
            headers,
            Bytes::from_static(b"{}"),
        );
        let head = request_head(&o, "10.0.0.1:8000");
        assert_eq!(
            &head[..],
            b"POST /v1/completions?a=1 HTTP/1.1\r\nhost: 10.0.0.1:8000\r\ncontent-type: application/json\r\n\
x-session-id: s1\r\ncontent-length: 2\r\n\r\n"
        );
        let get = Outbound::new(Method::GET, "/v1/models".parse().unwrap(), HeaderMap::new(), Bytes::new());
        assert_eq!(&request_head(&get, "h:1")[..], b"GET /v1/models HTTP/1.1\r\nhost: h:1\r\n\r\n");
    }

    #[test]
    fn heads_parse_when_complete_and_skip_interim_responses() {
        let text = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
transfer-encoding: chunked\r\n\r\n5\r\nhello";
        for cut in 0..60 {
            assert!(parse_head(&text[..cut]).unwrap().is_none(), "cut at {cut}");
        }
        let (head, used) = parse_head(text).unwrap().unwrap();
        assert_eq!(head.status, StatusCode::OK);
        assert_eq!(&text[used..], b"5\r\nhello");
        assert_eq!(framing(&Method::POST, &head).unwrap(), Framing::Chunked);
        assert!(reusable(&head, Framing::Chunked));
        assert_eq!(framing(&Method::HEAD, &head).unwrap(), Framing::Empty);
    }

    #[test]
    fn transfer_encoding_wins_and_the_length_is_dropped() {
        let (mut h, _) =
            parse_head(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n")
                .unwrap()
                .unwrap();
        let f = framing(&Method::POST, &h).unwrap();
        assert_eq!(f, Framing::Chunked);
        normalise_length(&mut h.headers, &Method::POST, f);
        assert!(h.headers.get(header::CONTENT_LENGTH).is_none());
        let (mut h, _) = parse_head(b"HTTP/1.1 200 OK\r\ncontent-length: 007\r\n\r\n").unwrap().unwrap();
        let f = framing(&Method::POST, &h).unwrap();
        normalise_length(&mut h.headers, &Method::POST, f);
        assert_eq!(h.headers[header::CONTENT_LENGTH], "7");
    }

    #[test]
    fn framing_follows_rfc_9112() {
        let head = |text: &[u8]| parse_head(text).unwrap().unwrap().0;
        let h = head(b"HTTP/1.1 200 OK\r\ncontent-length: 12\r\n\r\n");
        assert_eq!(framing(&Method::POST, &h).unwrap(), Framing::Length(12));
        let h = head(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n");
        assert_eq!(framing(&Method::POST, &h).unwrap(), Framing::Empty);
        let h = head(b"HTTP/1.1 204 No Content\r\n\r\n");
        assert_eq!(framing(&Method::POST, &h).unwrap(), Framing::Empty);
        let h = head(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n");
        assert_eq!(framing(&Method::POST, &h).unwrap(), Framing::UntilClose);
        assert!(!reusable(&h, Framing::UntilClose));
        let h = head(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\nconnection: keep-alive, close\r\n\r\n");
        assert!(!reusable(&h, Framing::Length(3)));
        let h = head(b"HTTP/1.0 200 OK\r\ncontent-length: 3\r\n\r\n");
        assert!(!reusable(&h, Framing::Length(3)));
        let h = head(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ncontent-length: 4\r\n\r\n");
        assert!(framing(&Method::POST, &h).is_err());
        for bad in ["x", "+5", "-5", "5 5", "0x5", "", "5, 6", "99999999999999999999999"] {
            let text = format!("HTTP/1.1 200 OK\r\ncontent-length: {bad}\r\n\r\n");
            let h = head(text.as_bytes());
            assert!(framing(&Method::POST, &h).is_err(), "content-length `{bad}`");
        }
        let h = head(b"HTTP/1.1 200 OK\r\ncontent-length: 7, 7\r\ncontent-length: 7\r\n\r\n");
        assert_eq!(framing(&Method::POST, &h).unwrap(), Framing::Length(7));
        for bad in ["gzip", "gzip, chunked", "chunked, gzip", "chunked, chunked"] {
            let text = format!("HTTP/1.1 200 OK\r\ntransfer-encoding: {bad}\r\n\r\n");
            assert!(framing(&Method::POST, &head(text.as_bytes())).is_err(), "transfer-encoding `{bad}`");
        }
        assert!(parse_head(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: h2c\r\n\r\n").is_err());
        assert!(parse_head(b"HTTP/1.1 700 Odd\r\n\r\n").is_err());
        assert!(parse_head(b"NOT HTTP\r\n\r\n").is_err());
        let mut endless = b"HTTP/1.1 200 OK\r\nx-long: ".to_vec();
        endless.resize(MAX_HEAD_BYTES + 1, b'a');
        assert!(matches!(parse_head(&endless), Err(HeadError::TooLarge)));
    }
}
