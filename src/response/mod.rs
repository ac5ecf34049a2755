//! The response: the stream back to the client. [`body`] meters it (first byte, tokens,
//! stalls, phase timers) without re-encoding; [`end`] settles what the end of a body
//! means (complete, cut by the replica, abandoned by the client) for metrics and logs.

pub mod body;
pub mod end;
