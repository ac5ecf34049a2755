//! Fleet flags: the replicas on the command line, simulated replicas started in this
//! process, and prefill/decode (P/D) mode.

use clap::Parser;

use crate::policy::PolicyKind;
use crate::replicas::ReplicaUrl;

#[derive(Debug, clap::Args)]
#[command(next_help_heading = "Fleet")]
pub struct FleetArgs {
    /// Replica base URLs (http://host:port). Give several after one flag, repeat the
    /// flag, or separate them with commas.
    #[arg(long, required_unless_present_any = ["sim", "pd", "sim_pd", "replicas_file", "discover_dns", "discover_k8s"], conflicts_with = "pd", num_args = 1.., value_delimiter = ',', value_name = "URL",
          value_parser = ReplicaUrl::parse)]
    pub replicas: Vec<ReplicaUrl>,

    /// Start N simulated vLLM replicas (vllm-sim) in this process on loopback and route
    /// to them: a working router with no other setup.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=256))]
    pub sim: Option<u16>,

    /// Timing profile of the simulated replicas.
    #[arg(long, default_value = "qwen3-0.6b-fp8-h100")]
    pub sim_profile: String,

    /// Simulated replicas run this many times faster than real time.
    #[arg(long, default_value_t = 1.0)]
    pub sim_time_scale: f64,

    /// Prefill/decode disaggregation: `--pd prefill=URL[,URL...] decode=URL[,URL...]`.
    /// Each inference request is prefilled on a prefill replica and decoded on a decode
    /// replica (vLLM NixlConnector protocol).
    #[arg(long, num_args = 2, value_names = ["prefill=URLS", "decode=URLS"], value_parser = parse_pd_side,
          conflicts_with_all = ["sim", "sim_pd"])]
    pub pd: Vec<PdSide>,

    /// P/D: policy choosing the prefill replica (consistent-hash keeps a session's
    /// prefill where its prefix is cached).
    #[arg(long, value_enum, default_value_t = PolicyKind::PowerOfTwo)]
    pub prefill_policy: PolicyKind,

    /// P/D: policy choosing the decode replica.
    #[arg(long, value_enum, default_value_t = PolicyKind::PowerOfTwo)]
    pub decode_policy: PolicyKind,

    /// P/D: send decode the prompt as text instead of the prefill's token ids (for
    /// comparison; decode then tokenises the prompt again).
    #[arg(long)]
    pub no_tokenize_once: bool,

    /// Start simulated prefill and decode replicas in this process (`P:D`, e.g. 1:1)
    /// and run in P/D mode against them.
    #[arg(long, value_name = "P:D", value_parser = parse_sim_pd, conflicts_with = "sim")]
    pub sim_pd: Option<(u16, u16)>,

    /// Run in P/D mode with prefill and decode replicas that discovery finds (file roles
    /// or the Kubernetes role label), none given on the command line.
    #[arg(long, conflicts_with_all = ["sim", "sim_pd"])]
    pub pd_discovered: bool,
}

/// One side of `--pd`.
#[derive(Debug, Clone, PartialEq)]
pub enum PdSide {
    Prefill(Vec<ReplicaUrl>),
    Decode(Vec<ReplicaUrl>),
}

/// Prefill/decode mode: replicas and policies of each stage.
#[derive(Debug, Clone)]
pub struct PdConfig {
    pub prefill: Vec<ReplicaUrl>,
    pub prefill_policy: PolicyKind,
    pub decode_policy: PolicyKind,
    pub tokenize_once: bool,
    /// Simulated prefill replicas to start (`--sim-pd`); decode ones go to `sim_replicas`.
    pub sim_prefill: usize,
}

impl FleetArgs {
    /// The simulated replicas' configuration, when `--sim` or `--sim-pd` starts some.
    pub fn sim_config(&self) -> Result<Option<vllm_sim::SimConfig>, String> {
        if self.sim.is_none() && self.sim_pd.is_none() {
            return Ok(None);
        }
        let args = <vllm_sim::SimArgs as Parser>::try_parse_from([
            "vllm-sim",
            "--port",
            "0",
            "--profile",
            &self.sim_profile,
            "--time-scale",
            &self.sim_time_scale.to_string(),
        ])
        .map_err(|e| super::one_line_error(&e))?;
        Ok(Some(args.into_config()?))
    }

    pub fn simulated(&self) -> bool {
        self.sim.is_some() || self.sim_pd.is_some()
    }

    /// Simulated (decode) replicas to start.
    pub fn sim_replicas(&self) -> usize {
        self.sim_pd.map_or(self.sim.unwrap_or(0), |(_, d)| d) as usize
    }

    /// The command line's replicas: (main or decode, prefill), duplicates dropped.
    pub fn replica_sets(&self) -> (Vec<ReplicaUrl>, Vec<ReplicaUrl>) {
        let mut replicas = self.replicas.clone();
        let mut prefill = Vec::new();
        for side in &self.pd {
            match side {
                PdSide::Prefill(urls) => prefill.extend(urls.iter().cloned()),
                PdSide::Decode(urls) => replicas.extend(urls.iter().cloned()),
            }
        }
        (dedup(replicas), dedup(prefill))
    }

    pub fn pd_config(&self, prefill: Vec<ReplicaUrl>) -> PdConfig {
        PdConfig {
            prefill,
            prefill_policy: self.prefill_policy,
            decode_policy: self.decode_policy,
            tokenize_once: !self.no_tokenize_once,
            sim_prefill: self.sim_pd.map_or(0, |(p, _)| p as usize),
        }
    }
}

fn parse_pd_side(text: &str) -> Result<PdSide, String> {
    let (side, urls) = text
        .split_once('=')
        .ok_or_else(|| format!("`{text}`: expected prefill=URL[,URL...] or decode=URL[,URL...]"))?;
    let urls =
        urls.split(',').filter(|u| !u.is_empty()).map(ReplicaUrl::parse).collect::<Result<Vec<_>, _>>()?;
    if urls.is_empty() {
        return Err(format!("`{text}`: no URLs"));
    }
    match side {
        "prefill" => Ok(PdSide::Prefill(urls)),
        "decode" => Ok(PdSide::Decode(urls)),
        _ => Err(format!("`{text}`: expected prefill=... or decode=...")),
    }
}

fn parse_sim_pd(text: &str) -> Result<(u16, u16), String> {
    let bad = || format!("`{text}` is not P:D with both at least 1 (e.g. 1:1)");
    let (p, d) = text.split_once(':').ok_or_else(bad)?;
    let (p, d) = (p.parse::<u16>().map_err(|_| bad())?, d.parse::<u16>().map_err(|_| bad())?);
    if p == 0 || d == 0 || p > 128 || d > 128 {
        return Err(bad());
    }
    Ok((p, d))
}

fn dedup(mut urls: Vec<ReplicaUrl>) -> Vec<ReplicaUrl> {
    let mut seen = std::collections::HashSet::new();
    urls.retain(|r| seen.insert(r.name().to_owned()));
    urls
}
