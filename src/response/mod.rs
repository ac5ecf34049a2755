//! The response: the stream back to the client. [`body`] passes the replica's frames on
//! as they arrive, never re-encoded, holding the request's in-flight guard until the last
//! byte, timing the first byte and the whole, and telling a finished stream from a broken
//! or abandoned one; [`end`] reports the end of a body (bytes sent, finished or left) to
//! the access log and the request's trace span. [`continued`] splices the rest of an
//! answer from another replica into a stream that broke ([`continuation`] is what it
//! asks and how it rewrites the events). [`sse_map`] is the one way a stream is re-framed
//! event by event (P/D chat conversion, generate mode).

pub mod body;
pub mod continuation;
pub mod continued;
pub mod end;
pub mod metered;
pub mod sse_map;
