//! HTTP/1.1 on the wire to a replica: the request as bytes, the response head parsed
//! from bytes, and how the response body is framed.
//!
//! Pure functions over buffers; the socket work is in [`super::exchange`].

use std::fmt::Write;

use bytes::{BufMut, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode, Version};

use crate::proxy::{Outbound, connection_options};

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
        let status = StatusCode::from_u16(code).map_err(|e| HeadError::Header(e.to_string()))?;
        if status.is_informational() && status != StatusCode::SWITCHING_PROTOCOLS {
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

pub fn framing(method: &Method, head: &Head) -> Result<Framing, HeadError> {
    if *method == Method::HEAD
        || head.status == StatusCode::NO_CONTENT
        || head.status == StatusCode::NOT_MODIFIED
    {
        return Ok(Framing::Empty);
    }
    if let Some(coding) = head.headers.get_all(header::TRANSFER_ENCODING).iter().next_back() {
        let last = coding.to_str().ok().and_then(|v| v.rsplit(',').next()).map(str::trim);
        return Ok(match last {
            Some(c) if c.eq_ignore_ascii_case("chunked") => Framing::Chunked,
            _ => Framing::UntilClose,
        });
    }
    let mut lengths = head.headers.get_all(header::CONTENT_LENGTH).iter();
    match lengths.next() {
        None => Ok(Framing::UntilClose),
        Some(value) => {
            let length = value
                .to_str()
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .ok_or_else(|| HeadError::Header("bad content-length".into()))?;
            if lengths.any(|other| other != value) {
                return Err(HeadError::Header("conflicting content-length".into()));
            }
            Ok(if length == 0 { Framing::Empty } else { Framing::Length(length) })
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
        let h = head(b"HTTP/1.1 200 OK\r\ncontent-length: x\r\n\r\n");
        assert!(framing(&Method::POST, &h).is_err());
        assert!(parse_head(b"NOT HTTP\r\n\r\n").is_err());
        let mut endless = b"HTTP/1.1 200 OK\r\nx-long: ".to_vec();
        endless.resize(MAX_HEAD_BYTES + 1, b'a');
        assert!(matches!(parse_head(&endless), Err(HeadError::TooLarge)));
    }
}
