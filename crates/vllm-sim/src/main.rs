//! The `vllm-sim` binary: one simulated vLLM replica on the given address, until
//! SIGTERM or SIGINT (exit 0).

use llm_common::cli::parse_args;
use tracing_subscriber::EnvFilter;
use vllm_sim::{self as sim, SimArgs};

fn main() -> std::process::ExitCode {
    let args: SimArgs = match parse_args() {
        Ok(args) => args,
        Err(code) => return code,
    };
    let config = match args.into_config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .init();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
    runtime.block_on(async move {
        let stop = llm_common::signals::shutdown_signal();
        let sim = match sim::start(config.clone()).await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("error: cannot listen on {}: {e}", config.listen);
                return std::process::ExitCode::FAILURE;
            }
        };
        tracing::info!(addr = %sim.addr, model = %config.served_model_name, profile = config.profile.name,
            role = ?config.role, time_scale = config.time_scale, "vllm-sim listening");
        stop.await;
        std::process::ExitCode::SUCCESS
    })
}
