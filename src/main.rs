//! The `router` binary: parse the command line, start the router, serve until
//! SIGTERM or SIGINT, then drain and exit 0.

use llm_router::config::{Cli, parse_args};

fn main() -> std::process::ExitCode {
    let cli: Cli = match parse_args() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    llm_router::logging::init(cli.telemetry.log_format, cli.telemetry.access_log);
    let config = match cli.into_config() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("error: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(threads) = config.worker_threads {
        runtime.worker_threads(threads);
    }
    let runtime = runtime.enable_all().build().expect("tokio runtime");
    runtime.block_on(async move {
        let stop = llm_router::server::shutdown_signal();
        let router = match llm_router::server::start(config.clone()).await {
            Ok(router) => router,
            Err(error) => {
                eprintln!("error: {error}");
                return std::process::ExitCode::FAILURE;
            }
        };
        stop.await;
        tracing::info!("shutting down: draining in-flight requests");
        router.shutdown().await;
        std::process::ExitCode::SUCCESS
    })
}
