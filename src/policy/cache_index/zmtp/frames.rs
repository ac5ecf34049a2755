//! ZMTP 3 framing, pure: frame headers read with every announced length checked before
//! anything is reserved, whole messages taken from a read buffer, and the greeting and
//! commands we send.

use bytes::{BufMut, Bytes, BytesMut};

use super::{Limits, SocketType, ZmtpError};

pub(super) const GREETING: usize = 64;
pub(super) const FLAG_MORE: u8 = 0x01;
pub(super) const FLAG_LONG: u8 = 0x02;
pub(super) const FLAG_COMMAND: u8 = 0x04;
/// Commands (READY, PING, ERROR) are small; anything larger is not a peer we know.
pub(super) const MAX_COMMAND: usize = 4096;

/// A whole message (or command) at the front of the read buffer, taken out of it;
/// or how many more bytes it needs. Every announced length is checked first.
pub(crate) fn take_message(read: &mut BytesMut, limits: &Limits) -> Result<Parsed, ZmtpError> {
    let limit = limits.max_message_bytes;
    let mut at = 0;
    let mut frames = 0;
    let mut total = 0usize;
    let mut bodies = Vec::new();
    loop {
        let Some(header) = frame_header(&read[at..])? else {
            return Ok(Parsed::Need(1));
        };
        if header.command {
            if frames > 0 {
                return Err(ZmtpError::Framing("a command inside a message"));
            }
            if header.size > MAX_COMMAND as u64 {
                return Err(ZmtpError::Framing("a command larger than any ZMTP command"));
            }
        } else {
            frames += 1;
            if frames > limits.max_frames {
                return Err(ZmtpError::TooManyFrames(limits.max_frames));
            }
        }
        let size = usize::try_from(header.size)
            .ok()
            .filter(|&size| total.checked_add(size).is_some_and(|sum| sum <= limit))
            .ok_or(ZmtpError::TooLarge { announced: header.size, limit })?;
        total += size;
        let start = at + header.length;
        let end = start + size;
        if read.len() < end {
            return Ok(Parsed::Need(end - read.len()));
        }
        bodies.push(start..end);
        at = end;
        if header.command || !header.more {
            let message = read.split_to(at).freeze();
            if header.command {
                return Ok(Parsed::Command);
            }
            let frames = bodies.into_iter().map(|range| message.slice(range)).collect();
            return Ok(Parsed::Message(frames));
        }
    }
}

pub(crate) enum Parsed {
    Message(Vec<Bytes>),
    Command,
    /// At least this many more bytes are needed.
    Need(usize),
}

pub(super) struct Frame {
    pub(super) command: bool,
    pub(super) body: Bytes,
}

pub(super) struct Header {
    pub(super) more: bool,
    pub(super) command: bool,
    /// The body's announced size (checked by the caller).
    pub(super) size: u64,
    /// Bytes of the header itself.
    pub(super) length: usize,
}

/// The frame header at the start of `bytes`, if it is all there.
pub(super) fn frame_header(bytes: &[u8]) -> Result<Option<Header>, ZmtpError> {
    let Some(&flags) = bytes.first() else { return Ok(None) };
    if flags & !(FLAG_MORE | FLAG_LONG | FLAG_COMMAND) != 0 {
        return Err(ZmtpError::Framing("reserved flag bits set"));
    }
    let (more, command) = (flags & FLAG_MORE != 0, flags & FLAG_COMMAND != 0);
    if more && command {
        return Err(ZmtpError::Framing("a command with the MORE flag"));
    }
    if flags & FLAG_LONG != 0 {
        let Some(size) = bytes.get(1..9) else { return Ok(None) };
        let size = u64::from_be_bytes(size.try_into().expect("eight bytes"));
        Ok(Some(Header { more, command, size, length: 9 }))
    } else {
        let Some(&size) = bytes.get(1) else { return Ok(None) };
        Ok(Some(Header { more, command, size: u64::from(size), length: 2 }))
    }
}

pub(super) fn put_frame(out: &mut BytesMut, flags: u8, body: &[u8]) {
    if body.len() > 255 {
        out.put_u8(flags | FLAG_LONG);
        out.put_u64(body.len() as u64);
    } else {
        out.put_u8(flags);
        out.put_u8(body.len() as u8);
    }
    out.put_slice(body);
}

/// Our greeting: ZMTP 3.0, the NULL mechanism, as a client. The signature's padding
/// carries an empty identity's length plus one, as libzmq writes it.
pub(super) fn greeting() -> [u8; GREETING] {
    let mut g = [0u8; GREETING];
    g[0] = 0xff;
    g[8] = 0x01;
    g[9] = 0x7f;
    g[10] = 3;
    g[11] = 0;
    g[12..16].copy_from_slice(b"NULL");
    g
}

/// The READY command naming our socket type (and, for a DEALER, an empty identity).
pub(super) fn ready(socket: SocketType) -> BytesMut {
    let mut body = BytesMut::new();
    body.put_u8(5);
    body.put_slice(b"READY");
    let mut put_property = |name: &[u8], value: &[u8]| {
        body.put_u8(name.len() as u8);
        body.put_slice(name);
        body.put_u32(value.len() as u32);
        body.put_slice(value);
    };
    put_property(b"Socket-Type", socket.name());
    if socket == SocketType::Dealer {
        put_property(b"Identity", b"");
    }
    let mut out = BytesMut::new();
    put_frame(&mut out, FLAG_COMMAND, &body);
    out
}

/// A command's name and the bytes after it.
pub(super) fn command_name(body: &[u8]) -> Result<(&[u8], &[u8]), ZmtpError> {
    let (&length, rest) = body.split_first().ok_or(ZmtpError::Handshake("an empty command"))?;
    let length = length as usize;
    if rest.len() < length {
        return Err(ZmtpError::Handshake("a command name longer than its frame"));
    }
    Ok(rest.split_at(length))
}

/// A command property: its name, its value, and the bytes after it.
pub(super) type Property<'a> = (&'a [u8], &'a [u8], &'a [u8]);

/// One `name-length name value-length(4) value` property, and the bytes after it.
pub(super) fn property(bytes: &[u8]) -> Result<Property<'_>, ZmtpError> {
    let bad = ZmtpError::Handshake("a property longer than its command");
    let (&name_length, rest) = bytes.split_first().ok_or(ZmtpError::Handshake("an empty property"))?;
    let name = rest.get(..name_length as usize).ok_or(ZmtpError::Handshake("a property name cut short"))?;
    let rest = &rest[name.len()..];
    let length = rest.get(..4).ok_or(ZmtpError::Handshake("a property length cut short"))?;
    let length = u32::from_be_bytes(length.try_into().expect("four bytes")) as usize;
    let value = rest.get(4..).and_then(|r| r.get(..length)).ok_or(bad)?;
    Ok((name, value, &rest[4 + length..]))
}
