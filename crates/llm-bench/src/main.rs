//! The `llm-bench` binary: the benchmark's load generator (see the `llm_bench` library).
//!
//! It runs on one thread: on a small machine shared with the servers it measures, a
//! client that takes one core at most leaves the rest to them, and one thread handles
//! hundreds of streams.

use llm_bench::cli::{self, Cli, Command};
use llm_common::cli::parse_args;

fn main() -> std::process::ExitCode {
    let cli: Cli = match parse_args() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    let result = match cli.command {
        Command::DatasetStats { path, isl_block_size } => cli::dataset_stats(&path, isl_block_size),
        Command::Run(args) => {
            let runtime =
                tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
            runtime.block_on(cli::run(*args))
        }
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            std::process::ExitCode::FAILURE
        }
    }
}
