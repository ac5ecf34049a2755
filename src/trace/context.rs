//! W3C Trace Context's `traceparent` header: `VERSION-TRACEID-PARENTID-FLAGS`, e.g.
//! `00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01`.
//!
//! Parsed as the specification says a receiver must: lowercase hex only, neither id
//! all zeros, version `ff` invalid, and a later version read by its first four fields
//! (which must be followed by nothing or a `-`). Anything else is ignored, and the
//! request starts a new trace.

/// A parsed `traceparent`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: [u8; 16],
    pub parent_id: [u8; 8],
    pub sampled: bool,
}

fn hex<const N: usize>(text: &str) -> Option<[u8; N]> {
    if text.len() != 2 * N || !text.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        return None;
    }
    let mut out = [0u8; N];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

impl TraceParent {
    pub fn parse(value: &str) -> Option<TraceParent> {
        let version: [u8; 1] = hex(value.get(0..2)?)?;
        if version[0] == 0xff || value.get(2..3)? != "-" {
            return None;
        }
        if (version[0] == 0 && value.len() != 55)
            || value.len() < 55
            || (value.len() > 55 && &value[55..56] != "-")
        {
            return None;
        }
        if &value[35..36] != "-" || &value[52..53] != "-" {
            return None;
        }
        let trace_id: [u8; 16] = hex(&value[3..35])?;
        let parent_id: [u8; 8] = hex(&value[36..52])?;
        let flags: [u8; 1] = hex(&value[53..55])?;
        if trace_id == [0; 16] || parent_id == [0; 8] {
            return None;
        }
        Some(TraceParent { trace_id, parent_id, sampled: flags[0] & 1 == 1 })
    }

    /// The header value (version 00).
    pub fn format(&self) -> String {
        use std::fmt::Write;
        let mut out = String::with_capacity(55);
        out.push_str("00-");
        self.trace_id.iter().for_each(|b| write!(out, "{b:02x}").expect("writing to a String"));
        out.push('-');
        self.parent_id.iter().for_each(|b| write!(out, "{b:02x}").expect("writing to a String"));
        out.push_str(if self.sampled { "-01" } else { "-00" });
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn the_specifications_example_round_trips() {
        let tp = TraceParent::parse(EXAMPLE).unwrap();
        assert_eq!(tp.trace_id[0], 0x4b);
        assert_eq!(tp.parent_id[7], 0xb7);
        assert!(tp.sampled);
        assert_eq!(tp.format(), EXAMPLE);
        let unsampled =
            TraceParent::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00").unwrap();
        assert!(!unsampled.sampled);
    }

    #[test]
    fn invalid_values_are_ignored() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "0x-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad}");
        }
        // A later version: its first fields are read, what follows a `-` ignored.
        assert!(TraceParent::parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-more").is_some());
        assert!(TraceParent::parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x").is_none());
    }
}
