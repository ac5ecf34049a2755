//! `llm-bench`: the load generator of the side-by-side benchmark.
//!
//! It sends the study's workloads to any OpenAI-compatible endpoint (this router,
//! vllm-router, Ray Serve LLM, or the engines directly) and measures what `vllm bench
//! serve` measures, under the same JSON keys. The pieces:
//! [`random`] and [`trace`] (the workloads: random prompts, and the study's agentic
//! sessions replayed from an AIPerf trace; text from [`text`], a session's history in
//! [`conversation`]) -> [`runner`] (passes at a concurrency or a rate) ->
//! [`client`] (one streamed request, timed event by event) -> [`report`] (the metrics).
//! [`cli`] is the command line; [`progress`] shows a pass as it runs.

pub mod cli;
pub mod client;
pub mod conversation;
pub mod progress;
pub mod random;
pub mod report;
pub mod runner;
pub mod text;
pub mod trace;
