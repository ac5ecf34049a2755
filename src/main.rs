//! The `router` binary: parse the command line, start the router, serve until
//! SIGTERM or SIGINT, then drain and exit 0.

use clap::Parser;
use llm_router::config::{Cli, one_line_error};
use tracing_subscriber::EnvFilter;

fn main() -> std::process::ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help and --version
            let _ = e.print();
            return std::process::ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("{}", one_line_error(&e));
            return std::process::ExitCode::from(2);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .init();
    let config = match cli.into_config() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("error: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    runtime.block_on(async move {
        let router = match llm_router::server::start(config.clone()).await {
            Ok(router) => router,
            Err(error) => {
                eprintln!("error: cannot listen on {}: {error}", config.listen);
                return std::process::ExitCode::FAILURE;
            }
        };
        shutdown_signal().await;
        tracing::info!("shutting down: draining in-flight requests");
        router.shutdown().await;
        std::process::ExitCode::SUCCESS
    })
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("install SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
