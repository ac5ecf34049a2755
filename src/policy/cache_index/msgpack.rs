//! msgpack read as a stream of items over a byte slice, for payloads a peer chose.
//!
//! `rmpv` reads msgpack into a tree of values: tens of bytes per element, so a few
//! megabytes of small integers become hundreds of megabytes of tree before anything can
//! check them. The KV event decoder instead walks the payload item by item and keeps
//! only what it needs. Every length is checked against the bytes left before anything
//! is sliced, a capacity for announced elements is capped by the bytes that could hold
//! them ([`Cursor::fit`]), and skipping a value of any depth is a loop with a counter,
//! never recursion.

/// One msgpack item's head: scalars whole, strings and bytes as slices of the payload,
/// arrays and maps as their announced length (their elements follow).
#[derive(Debug, Clone, Copy)]
pub enum Item<'a> {
    Nil,
    Bool,
    Uint(u64),
    /// A negative integer.
    Int(i64),
    Float(f64),
    Str(&'a [u8]),
    Bin(&'a [u8]),
    Array(usize),
    Map(usize),
    Ext,
}

/// A reader of msgpack items over the payload. Lengths are checked against the bytes
/// left before anything is sliced or reserved.
#[derive(Clone, Copy)]
pub struct Cursor<'a> {
    bytes: &'a [u8],
}

/// Why bytes are not msgpack.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct NotMsgpack(pub &'static str);

const TRUNCATED: NotMsgpack = NotMsgpack("the payload ends inside an item");

impl<'a> Cursor<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        Cursor { bytes }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], NotMsgpack> {
        if self.bytes.len() < n {
            return Err(TRUNCATED);
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }

    fn uint_be(&mut self, n: usize) -> Result<u64, NotMsgpack> {
        Ok(self.take(n)?.iter().fold(0u64, |acc, &b| acc << 8 | u64::from(b)))
    }

    fn length(&mut self, n: usize) -> Result<usize, NotMsgpack> {
        usize::try_from(self.uint_be(n)?).map_err(|_| TRUNCATED)
    }

    /// A capacity for `n` announced elements: no more than the bytes left could hold
    /// (every element takes at least one).
    pub fn fit(&self, n: usize) -> usize {
        n.min(self.bytes.len())
    }

    pub fn item(&mut self) -> Result<Item<'a>, NotMsgpack> {
        let marker = self.take(1)?[0];
        Ok(match marker {
            0x00..=0x7f => Item::Uint(u64::from(marker)),
            0x80..=0x8f => Item::Map(usize::from(marker & 0x0f)),
            0x90..=0x9f => Item::Array(usize::from(marker & 0x0f)),
            0xa0..=0xbf => Item::Str(self.take(usize::from(marker & 0x1f))?),
            0xc0 => Item::Nil,
            0xc2 | 0xc3 => Item::Bool,
            0xc4..=0xc6 => {
                let n = self.length(1 << (marker - 0xc4))?;
                Item::Bin(self.take(n)?)
            }
            0xc7..=0xc9 => {
                let n = self.length(1 << (marker - 0xc7))?;
                self.take(n.checked_add(1).ok_or(TRUNCATED)?)?;
                Item::Ext
            }
            0xca => Item::Float(f64::from(f32::from_bits(self.uint_be(4)? as u32))),
            0xcb => Item::Float(f64::from_bits(self.uint_be(8)?)),
            0xcc..=0xcf => Item::Uint(self.uint_be(1 << (marker - 0xcc))?),
            0xd0..=0xd3 => {
                let width = 1usize << (marker - 0xd0);
                let raw = self.uint_be(width)?;
                // Sign-extend from `width` bytes.
                let shift = 64 - 8 * width as u32;
                let value = ((raw << shift) as i64) >> shift;
                if value >= 0 { Item::Uint(value as u64) } else { Item::Int(value) }
            }
            0xd4..=0xd8 => {
                self.take((1 << (marker - 0xd4)) + 1)?;
                Item::Ext
            }
            0xd9..=0xdb => {
                let n = self.length(1 << (marker - 0xd9))?;
                Item::Str(self.take(n)?)
            }
            0xdc | 0xdd => Item::Array(self.length(2 << (marker - 0xdc))?),
            0xde | 0xdf => Item::Map(self.length(2 << (marker - 0xde))?),
            0xe0..=0xff => Item::Int(i64::from(marker as i8)),
            0xc1 => return Err(NotMsgpack("the reserved marker 0xc1")),
        })
    }

    /// Skip one whole value, however nested, without recursion: a count of the items
    /// still owed, which can never exceed the bytes left.
    pub fn skip_value(&mut self) -> Result<(), NotMsgpack> {
        let mut owed: usize = 1;
        while owed > 0 {
            owed -= 1;
            let children = match self.item()? {
                Item::Array(n) => n,
                Item::Map(n) => n.checked_mul(2).ok_or(TRUNCATED)?,
                _ => 0,
            };
            owed = owed.checked_add(children).filter(|&o| o <= self.bytes.len()).ok_or(TRUNCATED)?;
        }
        Ok(())
    }
}
