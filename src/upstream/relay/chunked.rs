//! The chunked transfer coding (RFC 9112 §7.1), decoded incrementally.
//!
//! The relay reads whatever the socket has and asks [`Chunked::decode`] for the payload
//! in it: a read that holds fifteen SSE events in fifteen chunks gives one run of
//! payload bytes, gathered in the read buffer itself, which leaves the router as one
//! write. Chunk boundaries carry no
//! meaning for SSE (events end at blank lines, not at chunk ends), so nothing is lost by
//! joining them. Chunk extensions and trailer fields are read and dropped.

use bytes::{Buf, Bytes, BytesMut};

/// Where the decoder is within the coding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading the hex size; `digits` so far.
    Size {
        size: u64,
        digits: u8,
    },
    /// After the size: an extension or whitespace, up to the line end.
    Extension {
        size: u64,
    },
    /// Expecting the `\n` of the size line.
    SizeLf {
        size: u64,
    },
    /// Inside a chunk's data.
    Data {
        left: u64,
    },
    /// After the data: expecting `\r\n`.
    DataCr,
    DataLf,
    /// After the last chunk: trailer lines, until an empty one. `empty` is whether the
    /// current line has no content so far.
    Trailer {
        empty: bool,
    },
    TrailerLf {
        empty: bool,
    },
    Done,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid chunked body: {0}")]
pub struct ChunkedError(&'static str);

/// A chunked body's decoder, fed bytes as they are read.
#[derive(Debug)]
pub struct Chunked {
    state: State,
}

impl Default for Chunked {
    fn default() -> Self {
        Chunked { state: State::Size { size: 0, digits: 0 } }
    }
}

/// Longest chunk size accepted, in hex digits (16 digits = 2^64 - 1).
const MAX_DIGITS: u8 = 16;

impl Chunked {
    /// Consume `buffer` and return the payload it holds. The payload is gathered in
    /// place: framing at the front is dropped without copying, later chunks are moved
    /// down over the framing before them, so a read holding one chunk costs no copy and
    /// no allocation, and one holding many costs a move within the buffer. Everything is
    /// consumed up to the end of the coding; bytes after it stay in `buffer` (they are
    /// not this body's: the caller must not reuse the connection).
    pub fn decode(&mut self, buffer: &mut BytesMut) -> Result<Bytes, ChunkedError> {
        // Payload bytes gathered at the front, and the next byte to read. While nothing is
        // gathered, framing is dropped from the front of the buffer, so `read` stays 0.
        let (mut gathered, mut read) = (0, 0);
        while read < buffer.len() && self.state != State::Done {
            if let State::Data { left } = self.state {
                let take = (buffer.len() - read).min(usize::try_from(left).unwrap_or(usize::MAX));
                if gathered != read {
                    buffer.copy_within(read..read + take, gathered);
                }
                gathered += take;
                read += take;
                let left = left - take as u64;
                self.state = if left == 0 { State::DataCr } else { State::Data { left } };
                continue;
            }
            let byte = buffer[read];
            if gathered == 0 {
                buffer.advance(1);
            } else {
                read += 1;
            }
            self.state = self.step(byte)?;
        }
        let payload = buffer.split_to(gathered).freeze();
        buffer.advance(read - gathered);
        Ok(payload)
    }

    /// The last chunk and the trailer section have been read.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// One byte of framing (everything but chunk data).
    fn step(&self, byte: u8) -> Result<State, ChunkedError> {
        Ok(match self.state {
            State::Size { size, digits } => match hex(byte) {
                Some(d) if digits < MAX_DIGITS => {
                    State::Size { size: size << 4 | u64::from(d), digits: digits + 1 }
                }
                Some(_) => return Err(ChunkedError("chunk size too large")),
                None if digits == 0 => return Err(ChunkedError("chunk size missing")),
                None => match byte {
                    b'\r' => State::SizeLf { size },
                    b'\n' => self.after_size_line(size),
                    b';' | b' ' | b'\t' => State::Extension { size },
                    _ => return Err(ChunkedError("bad character in chunk size")),
                },
            },
            State::Extension { size } => match byte {
                b'\r' => State::SizeLf { size },
                b'\n' => self.after_size_line(size),
                _ => State::Extension { size },
            },
            State::SizeLf { size } => match byte {
                b'\n' => self.after_size_line(size),
                _ => return Err(ChunkedError("expected LF after chunk size")),
            },
            State::DataCr => match byte {
                b'\r' => State::DataLf,
                b'\n' => State::Size { size: 0, digits: 0 },
                _ => return Err(ChunkedError("expected CRLF after chunk data")),
            },
            State::DataLf => match byte {
                b'\n' => State::Size { size: 0, digits: 0 },
                _ => return Err(ChunkedError("expected LF after chunk data")),
            },
            State::Trailer { empty } => match byte {
                b'\r' => State::TrailerLf { empty },
                b'\n' if empty => State::Done,
                b'\n' => State::Trailer { empty: true },
                _ => State::Trailer { empty: false },
            },
            State::TrailerLf { empty } => match byte {
                b'\n' if empty => State::Done,
                b'\n' => State::Trailer { empty: true },
                _ => return Err(ChunkedError("expected LF in trailer")),
            },
            State::Done | State::Data { .. } => {
                unreachable!("data is consumed in bulk, nothing after the end")
            }
        })
    }

    fn after_size_line(&self, size: u64) -> State {
        if size == 0 { State::Trailer { empty: true } } else { State::Data { left: size } }
    }
}

fn hex(byte: u8) -> Option<u8> {
    match byte {
        b'0'..=b'9' => Some(byte - b'0'),
        b'a'..=b'f' => Some(byte - b'a' + 10),
        b'A'..=b'F' => Some(byte - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_in_pieces(encoded: &[u8], piece: usize) -> (Vec<u8>, bool) {
        let mut decoder = Chunked::default();
        let mut out = Vec::new();
        for part in encoded.chunks(piece) {
            let mut input = BytesMut::from(part);
            out.extend_from_slice(&decoder.decode(&mut input).unwrap());
            assert!(input.is_empty());
        }
        (out, decoder.is_done())
    }

    #[test]
    fn split_anywhere_the_payload_is_the_same() {
        let encoded =
            b"e\r\ndata: {\"a\":1}\n\r\n1;ext=1\r\n\n\r\nA\r\n0123456789\r\n0\r\nx-trailer: 1\r\n\r\n";
        for piece in 1..=encoded.len() {
            let (payload, done) = decode_in_pieces(encoded, piece);
            assert_eq!(payload, b"data: {\"a\":1}\n\n0123456789", "pieces of {piece}");
            assert!(done, "pieces of {piece}");
        }
    }

    #[test]
    fn bare_lf_line_ends_are_accepted_and_the_end_is_known() {
        let (payload, done) = decode_in_pieces(b"3\nabc\n0\n\n", 2);
        assert_eq!(payload, b"abc");
        assert!(done);
        let (_, done) = decode_in_pieces(b"3\r\nabc\r\n", 4);
        assert!(!done, "no last chunk yet");
    }

    #[test]
    fn bytes_after_the_end_are_left_and_the_body_kept() {
        let cases: [(&[u8], &[u8], &[u8]); 2] =
            [(b"3\r\nabc\r\n0\r\n\r\n\r\n", b"abc", b"\r\n"), (b"0\r\n\r\nmore", b"", b"more")];
        for (encoded, payload, stray) in cases {
            let mut decoder = Chunked::default();
            let mut input = BytesMut::from(encoded);
            assert_eq!(&decoder.decode(&mut input).unwrap()[..], payload);
            assert!(decoder.is_done());
            assert_eq!(&input[..], stray, "the stray bytes are left for the caller to see");
        }
        // Split so that the first piece ends inside the gathered data.
        let mut decoder = Chunked::default();
        let mut first = BytesMut::from(&b"3\r\nab"[..]);
        assert_eq!(&decoder.decode(&mut first).unwrap()[..], b"ab");
        let mut rest = BytesMut::from(&b"c\r\n0\r\n\r\nXY"[..]);
        assert_eq!(&decoder.decode(&mut rest).unwrap()[..], b"c");
        assert_eq!(&rest[..], b"XY");
    }

    #[test]
    fn malformed_framing_is_an_error() {
        for bad in [&b"zz\r\n"[..], b"\r\n", b"3\r\nabcX", b"11111111111111111\r\n"] {
            let mut decoder = Chunked::default();
            assert!(decoder.decode(&mut BytesMut::from(bad)).is_err(), "{bad:?}");
        }
    }
}
