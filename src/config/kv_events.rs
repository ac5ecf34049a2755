//! KV events flags (`kv-aware`): where each replica publishes its KV cache events, the
//! bounds on what the router reads and remembers, the cost weights, and the tokenizer
//! the router renders prompts with.

use std::time::Duration;

use super::values::parse_weight;
use crate::policy::KvOptions;
use crate::policy::cache_index::FeedConfig;
use crate::policy::prompt_tokens::{PromptTokenizer, TokenizerSpec};
use crate::replicas::ReplicaUrl;

#[derive(Debug, clap::Args)]
#[command(next_help_heading = "KV events (kv-aware)")]
pub struct KvEventsArgs {
    /// kv-aware: a replica's KV events endpoint, `REPLICA_URL=tcp://HOST:PORT`
    /// (repeatable). Replicas not named here use `--kv-events-port`.
    #[arg(long, value_name = "REPLICA=ENDPOINT", value_parser = parse_kv_endpoint)]
    pub kv_events_endpoint: Vec<(String, String)>,

    /// kv-aware: every replica publishes KV events on `tcp://{its host}:N` (vLLM's
    /// `--kv-events-config` endpoint `tcp://*:N`).
    #[arg(long, value_name = "N")]
    pub kv_events_port: Option<u16>,

    /// kv-aware: the engines' replay endpoint port (vLLM's `replay_endpoint`), used to
    /// fetch missed events after a sequence gap.
    #[arg(long, value_name = "N")]
    pub kv_events_replay_port: Option<u16>,

    /// kv-aware: a replica's replay endpoint, `REPLICA_URL=tcp://HOST:PORT` (repeatable).
    #[arg(long, value_name = "REPLICA=ENDPOINT", value_parser = parse_kv_endpoint)]
    pub kv_events_replay_endpoint: Vec<(String, String)>,

    /// kv-aware: the topic to subscribe to (vLLM's default is empty: everything).
    #[arg(long, default_value = "")]
    pub kv_events_topic: String,

    /// kv-aware: a replica that was sent prompt blocks it was not believed to hold this
    /// long ago and has published no event since is stale: its memory is forgotten and it
    /// is routed by load.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub kv_events_silence: Duration,

    /// kv-aware: largest KV event message accepted from a publisher, in bytes; a larger
    /// frame or message closes that publisher's connection (counted, then reconnected).
    #[arg(long, default_value_t = 4 << 20, value_parser = clap::value_parser!(u64).range(1024..=1 << 30))]
    pub kv_events_max_message_bytes: u64,

    /// kv-aware: engine blocks remembered per replica (least recently used forgotten).
    #[arg(long, default_value_t = 1 << 20, value_parser = clap::value_parser!(u64).range(1..=1 << 28))]
    pub kv_index_blocks: u64,

    /// kv-aware: weight of a prompt token the replica would still have to prefill.
    #[arg(long, default_value_t = 1.0, value_parser = parse_weight)]
    pub kv_prefill_weight: f64,

    /// kv-aware: weight of a prompt token of a request in flight on the replica.
    #[arg(long, default_value_t = 1.0, value_parser = parse_weight)]
    pub kv_load_weight: f64,

    /// kv-aware: choose every request by the cost alone (as Dynamo's KV router), instead
    /// of placing new conversations by hash and keeping held ones on their holder until
    /// it is overloaded.
    #[arg(long)]
    pub kv_pure_cost: bool,

    /// kv-aware and `--engine-api generate`: how the router tokenises text and chat
    /// prompts: `builtin` (the
    /// simulator's o200k_base and chat template, the default with `--sim`) or a Hugging
    /// Face model directory as shipped (or its `tokenizer.json`); the chat template is
    /// found beside it as transformers finds it (`chat_template.jinja`, then
    /// `tokenizer_config.json`), unless `--chat-template` names one.
    #[arg(long, value_parser = TokenizerSpec::parse)]
    pub tokenizer: Option<TokenizerSpec>,

    /// kv-aware and `--engine-api generate`: a Jinja chat template file, instead of the
    /// one shipped with the tokenizer.
    #[arg(long, value_name = "FILE")]
    pub chat_template: Option<std::path::PathBuf>,

    /// Threads that render and tokenise prompts, apart from the ones serving
    /// connections (default: one per CPU core).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub tokenizer_threads: Option<u16>,

    /// Prompts waiting for a tokenizer thread at most; beyond it a prompt is not
    /// tokenised by the router (generate mode sends it to the engine's OpenAI endpoint,
    /// kv-aware routes it by load).
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    pub tokenizer_queue: u32,
}

impl KvEventsArgs {
    pub fn kv_options(&self) -> KvOptions {
        KvOptions {
            prefill_weight: self.kv_prefill_weight,
            load_weight: self.kv_load_weight,
            pure_cost: self.kv_pure_cost,
        }
    }

    /// What real engines must be told for `kv-aware` (simulated ones need neither).
    pub fn check_for_engines(&self) -> Result<(), String> {
        if self.tokenizer.is_none() {
            return Err(
                "--policy kv-aware needs --tokenizer (the engines' tokenizer; `builtin` for vllm-sim)".into(),
            );
        }
        if self.kv_events_port.is_none() && self.kv_events_endpoint.is_empty() {
            return Err(
                "--policy kv-aware needs --kv-events-port N or --kv-events-endpoint REPLICA=tcp://HOST:PORT"
                    .into(),
            );
        }
        Ok(())
    }

    pub fn feed_config(&self) -> FeedConfig {
        FeedConfig {
            endpoints: self.kv_events_endpoint.clone(),
            port: self.kv_events_port,
            replay_endpoints: self.kv_events_replay_endpoint.clone(),
            replay_port: self.kv_events_replay_port,
            topic: self.kv_events_topic.clone(),
            silence: self.kv_events_silence,
            max_blocks: self.kv_index_blocks as usize,
            limits: crate::policy::cache_index::zmtp::Limits {
                max_message_bytes: self.kv_events_max_message_bytes as usize,
                ..Default::default()
            },
        }
    }

    /// `generation_config.json`'s sampling defaults, from the tokenizer's directory.
    pub fn sampling_defaults(&self) -> Result<crate::frontend::SamplingDefaults, String> {
        match &self.tokenizer {
            Some(TokenizerSpec::File(path)) => {
                let dir = if path.is_dir() { path.as_path() } else { path.parent().unwrap_or(path) };
                crate::frontend::SamplingDefaults::load(dir)
            }
            _ => Ok(crate::frontend::SamplingDefaults::default()),
        }
    }

    /// The tokenizer, loaded (`builtin` when none is named).
    pub fn load_tokenizer(&self) -> Result<std::sync::Arc<PromptTokenizer>, String> {
        let spec = self.tokenizer.clone().unwrap_or(TokenizerSpec::Builtin);
        Ok(std::sync::Arc::new(
            spec.load(self.chat_template.as_deref(), crate::replicas::TOKENIZER_CACHE_TOKENS)?,
        ))
    }
}

fn parse_kv_endpoint(text: &str) -> Result<(String, String), String> {
    let (replica, endpoint) =
        text.split_once('=').ok_or_else(|| format!("`{text}` is not REPLICA_URL=tcp://HOST:PORT"))?;
    let replica = ReplicaUrl::parse(replica)?;
    if !endpoint.starts_with("tcp://") || !endpoint[6..].contains(':') {
        return Err(format!("`{endpoint}` is not a tcp://HOST:PORT endpoint"));
    }
    Ok((replica.name().to_owned(), endpoint.to_owned()))
}
