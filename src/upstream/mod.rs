//! The upstream: one attempt at one replica. [`proxy`] decides what goes on the wire
//! (the request head rewritten for the replica, timeouts, what counts as a failure) and
//! [`relay`] owns the sockets (pooled HTTP/1.1 connections, framing read per RFC 9112,
//! bodies streamed without re-encoding).

pub mod proxy;
pub mod relay;
