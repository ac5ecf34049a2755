//! RESP2, the Redis (and Valkey) wire protocol, as much of it as the router speaks:
//! commands out as arrays of bulk strings, replies in as the five RESP2 types.
//!
//! A reply is read from a buffer that may hold part of it ([`parse`] says "not yet"),
//! and everything a store sends is bounded before it is believed: a bulk string of more
//! than [`MAX_BULK`] bytes, an array of more than [`MAX_ARRAY`] elements, arrays nested
//! deeper than [`MAX_DEPTH`], or a line longer than [`MAX_LINE`] is a protocol error
//! (the connection is dropped), never an allocation the store chose.

use bytes::{BufMut, BytesMut};

/// The longest bulk string a reply may carry (the router's scripts return small
/// integers; a script's SHA1 is 40 bytes).
pub const MAX_BULK: usize = 64 * 1024;
/// The most elements of an array reply.
pub const MAX_ARRAY: usize = 64;
/// How deep arrays may nest.
pub const MAX_DEPTH: usize = 4;
/// The longest `+`, `-` or `:` line.
pub const MAX_LINE: usize = 4 * 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Simple(String),
    Error(String),
    Integer(i64),
    Bulk(Option<Vec<u8>>),
    Array(Option<Vec<Reply>>),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the state store broke RESP: {0}")]
pub struct ProtocolError(pub &'static str);

/// Append `args` to `out` as one command.
pub fn encode(out: &mut BytesMut, args: &[&[u8]]) {
    out.put_slice(format!("*{}\r\n", args.len()).as_bytes());
    for arg in args {
        out.put_slice(format!("${}\r\n", arg.len()).as_bytes());
        out.put_slice(arg);
        out.put_slice(b"\r\n");
    }
}

/// One whole reply from the start of `buf` and the bytes it took, or `None` when `buf`
/// holds only part of one.
pub fn parse(buf: &[u8]) -> Result<Option<(Reply, usize)>, ProtocolError> {
    parse_at(buf, 0)
}

fn parse_at(buf: &[u8], depth: usize) -> Result<Option<(Reply, usize)>, ProtocolError> {
    let Some(line_end) = line(buf)? else { return Ok(None) };
    let text = &buf[1..line_end];
    let after = line_end + 2;
    let reply = match buf[0] {
        b'+' => Reply::Simple(utf8(text)?),
        b'-' => Reply::Error(utf8(text)?),
        b':' => Reply::Integer(number(text)?),
        b'$' => {
            let len = number(text)?;
            if len < 0 {
                return Ok(Some((Reply::Bulk(None), after)));
            }
            let len = usize::try_from(len).map_err(|_| ProtocolError("bulk length"))?;
            if len > MAX_BULK {
                return Err(ProtocolError("bulk string over the bound"));
            }
            let Some(rest) = buf.get(after..after + len + 2) else { return Ok(None) };
            if &rest[len..] != b"\r\n" {
                return Err(ProtocolError("bulk string without its CRLF"));
            }
            return Ok(Some((Reply::Bulk(Some(rest[..len].to_vec())), after + len + 2)));
        }
        b'*' => {
            let len = number(text)?;
            if len < 0 {
                return Ok(Some((Reply::Array(None), after)));
            }
            let len = usize::try_from(len).map_err(|_| ProtocolError("array length"))?;
            if len > MAX_ARRAY {
                return Err(ProtocolError("array over the bound"));
            }
            if depth >= MAX_DEPTH {
                return Err(ProtocolError("arrays nested too deep"));
            }
            let mut items = Vec::with_capacity(len);
            let mut at = after;
            for _ in 0..len {
                let Some((item, used)) = parse_at(&buf[at..], depth + 1)? else { return Ok(None) };
                items.push(item);
                at += used;
            }
            return Ok(Some((Reply::Array(Some(items)), at)));
        }
        _ => return Err(ProtocolError("unknown reply type")),
    };
    Ok(Some((reply, after)))
}

/// Where the first line's CR is, once its CRLF is here.
fn line(buf: &[u8]) -> Result<Option<usize>, ProtocolError> {
    match memchr::memchr(b'\r', &buf[..buf.len().min(MAX_LINE + 2)]) {
        Some(0) => Err(ProtocolError("empty line")),
        Some(cr) => match buf.get(cr + 1) {
            Some(b'\n') => Ok(Some(cr)),
            Some(_) => Err(ProtocolError("CR without LF")),
            None => Ok(None),
        },
        None if buf.len() > MAX_LINE => Err(ProtocolError("line over the bound")),
        None => Ok(None),
    }
}

fn utf8(text: &[u8]) -> Result<String, ProtocolError> {
    String::from_utf8(text.to_vec()).map_err(|_| ProtocolError("line not UTF-8"))
}

fn number(text: &[u8]) -> Result<i64, ProtocolError> {
    std::str::from_utf8(text).ok().and_then(|s| s.parse().ok()).ok_or(ProtocolError("not a number"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn whole(bytes: &[u8]) -> Reply {
        let (reply, used) = parse(bytes).unwrap().unwrap();
        assert_eq!(used, bytes.len());
        reply
    }

    #[test]
    fn commands_are_arrays_of_bulk_strings() {
        let mut out = BytesMut::new();
        encode(&mut out, &[b"EVALSHA", b"ab", b"1", b"k\r\n"]);
        assert_eq!(&out[..], b"*4\r\n$7\r\nEVALSHA\r\n$2\r\nab\r\n$1\r\n1\r\n$3\r\nk\r\n\r\n");
    }

    #[test]
    fn every_reply_type_reads() {
        assert_eq!(whole(b"+OK\r\n"), Reply::Simple("OK".into()));
        assert_eq!(whole(b"-NOSCRIPT no\r\n"), Reply::Error("NOSCRIPT no".into()));
        assert_eq!(whole(b":-42\r\n"), Reply::Integer(-42));
        assert_eq!(whole(b"$3\r\na\r\n\r\n"), Reply::Bulk(Some(b"a\r\n".to_vec())));
        assert_eq!(whole(b"$-1\r\n"), Reply::Bulk(None));
        assert_eq!(
            whole(b"*2\r\n:0\r\n*1\r\n$0\r\n\r\n"),
            Reply::Array(Some(vec![Reply::Integer(0), Reply::Array(Some(vec![Reply::Bulk(Some(vec![]))]))]))
        );
    }

    #[test]
    fn a_partial_reply_waits_at_every_cut() {
        let full = b"*3\r\n:1\r\n$5\r\nhello\r\n+OK\r\n";
        for cut in 0..full.len() {
            assert_eq!(parse(&full[..cut]), Ok(None), "cut at {cut}");
        }
        assert!(parse(full).unwrap().is_some());
    }

    #[test]
    fn what_a_hostile_store_sends_is_refused_not_allocated() {
        let huge = format!("${}\r\n", MAX_BULK + 1);
        assert!(parse(huge.as_bytes()).is_err());
        assert!(parse(b"*1000000000\r\n").is_err());
        assert!(parse(b"$99999999999999999999\r\n").is_err());
        let deep = "*1\r\n".repeat(MAX_DEPTH + 1) + ":1\r\n";
        assert!(parse(deep.as_bytes()).is_err());
        assert!(parse(&vec![b'+'; MAX_LINE + 10]).is_err(), "a line that never ends");
        assert!(parse(b"?x\r\n").is_err());
        assert!(parse(b"+a\rb\r\n").is_err());
        assert!(parse(b"$1\r\nab\r\n").is_err());
        assert!(parse(b"\r\n").is_err());
    }
}
