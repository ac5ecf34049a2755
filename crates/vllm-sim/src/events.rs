//! What the engine sends each request on its channel: its tokens as they are sampled,
//! the blocks a P/D prefill left, or why it can never run.

use crate::kv_cache::BlockId;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// `max_tokens` reached.
    Length,
    /// The model's end of sequence.
    Stop,
    /// The text now contains `stop[i]`.
    StopString(usize),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A generated token; `finish` is set on the last one.
    Token { id: u32, finish: Option<Finish> },
    /// Prefill done (for `PrefillOnly`): the blocks that hold the prompt's KV.
    PrefillBlocks(Vec<BlockId>),
    /// The request can never run (e.g. larger than the whole KV cache).
    Rejected(String),
}
