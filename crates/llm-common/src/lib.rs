//! What the router, the vLLM simulator and the load generator share, and nothing else:
//! [`sse`] (server-sent event framing), [`tokenizer`] (the o200k_base text tokenizer and
//! the simulator's chat template), [`cli`] (clap errors as one line, exit codes) and
//! [`signals`] (the shutdown future).

pub mod cli;
pub mod signals;
pub mod sse;
pub mod tokenizer;
