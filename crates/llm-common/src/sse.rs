//! SSE framing: find where each server-sent event ends in a byte stream, without parsing
//! what is inside.
//!
//! An event ends at a blank line (`\n\n`). Bytes arrive in frames that may split an
//! event anywhere, so [`SseEvents`] buffers what it is given and hands out each complete
//! event as soon as its terminator arrives. It remembers how far it has already scanned,
//! so a long event arriving in many small frames is scanned once, not once per frame.
//! Used where a stream must be understood event by event: the P/D chat conversion and
//! the load generator's client. The plain proxy path never frames events: it passes
//! bytes through.

use bytes::{Bytes, BytesMut};

#[derive(Debug, Default)]
pub struct SseEvents {
    buffer: BytesMut,
    /// Bytes of `buffer` already known to hold no terminator (less the last byte, which
    /// may be the first half of one).
    scanned: usize,
}

impl SseEvents {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&mut self, bytes: &[u8]) {
        self.buffer.extend_from_slice(bytes);
    }

    /// The next complete event, terminator included.
    pub fn next_event(&mut self) -> Option<Bytes> {
        let start = self.scanned.saturating_sub(1);
        match memchr_pair(&self.buffer[start..]) {
            Some(at) => {
                self.scanned = 0;
                Some(self.buffer.split_to(start + at + 2).freeze())
            }
            None => {
                self.scanned = self.buffer.len();
                None
            }
        }
    }

    /// Bytes held that belong to no complete event yet (what a caller bounds).
    pub fn buffered(&self) -> usize {
        self.buffer.len()
    }

    /// Whatever is left after the stream ended (an event without its terminator).
    pub fn take_rest(&mut self) -> Option<Bytes> {
        self.scanned = 0;
        (!self.buffer.is_empty()).then(|| self.buffer.split().freeze())
    }
}

/// The position of the first `\n\n` in `bytes`.
fn memchr_pair(bytes: &[u8]) -> Option<usize> {
    let mut from = 0;
    while let Some(i) = bytes[from..].iter().position(|&b| b == b'\n') {
        let at = from + i;
        match bytes.get(at + 1) {
            Some(b'\n') => return Some(at),
            Some(_) => from = at + 1,
            None => return None,
        }
    }
    None
}

/// The payload of a `data:` event (`data: {...}\n\n` gives `{...}`), if it is one.
pub fn data_payload(event: &[u8]) -> Option<&[u8]> {
    let payload = event.strip_prefix(b"data:")?;
    let payload = payload.strip_prefix(b" ").unwrap_or(payload);
    let end = payload.iter().rposition(|b| !b.is_ascii_whitespace()).map_or(0, |i| i + 1);
    Some(&payload[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_split_anywhere_come_out_whole() {
        let stream = b"data: {\"a\":1}\n\ndata: {\"b\":2}\n\n: comment\n\ndata: [DONE]\n\n";
        for size in 1..stream.len() {
            let mut sse = SseEvents::new();
            let mut events = Vec::new();
            for chunk in stream.chunks(size) {
                sse.push(chunk);
                while let Some(e) = sse.next_event() {
                    events.push(e);
                }
            }
            assert_eq!(events.len(), 4, "frames of {size}");
            assert_eq!(&events[0][..], b"data: {\"a\":1}\n\n");
            assert_eq!(data_payload(&events[1]), Some(&b"{\"b\":2}"[..]));
            assert_eq!(data_payload(&events[2]), None);
            assert_eq!(data_payload(&events[3]), Some(&b"[DONE]"[..]));
            assert!(sse.take_rest().is_none());
        }
    }

    #[test]
    fn an_unterminated_tail_is_kept() {
        let mut sse = SseEvents::new();
        sse.push(b"data: 1\n\ndata: 2\n");
        assert_eq!(&sse.next_event().unwrap()[..], b"data: 1\n\n");
        assert!(sse.next_event().is_none());
        assert_eq!(&sse.take_rest().unwrap()[..], b"data: 2\n");
        assert_eq!(data_payload(b"data:x\n\n"), Some(&b"x"[..]));
    }
}
