//! Files read again while the router runs (the API keys file, TLS certificates): a task
//! that reloads when a file's modification time or size changes (checked every
//! [`POLL`]) or when the router gets SIGHUP.
//!
//! A reload that fails leaves what was loaded before in place: the failure is logged
//! and counted (`router_config_reloads_total{file, outcome="error"}`), and the next
//! change is tried again. Nothing about a reload touches connections or requests in
//! flight.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use prometheus::IntCounterVec;
use tokio::task::JoinHandle;

/// How often the files' metadata is checked.
pub const POLL: Duration = Duration::from_secs(1);

/// What a file looked like: its modification time and size (None: unreadable).
type Stamp = Vec<Option<(SystemTime, u64)>>;

fn stamp(paths: &[PathBuf]) -> Stamp {
    paths
        .iter()
        .map(|path| {
            std::fs::metadata(path).ok().map(|m| (m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len()))
        })
        .collect()
}

/// Call `reload` whenever `paths` change or SIGHUP arrives, until the task is aborted.
/// `file` names them in logs and metrics.
pub fn watch<F>(
    file: &'static str,
    paths: Vec<PathBuf>,
    counter: IntCounterVec,
    mut reload: F,
) -> JoinHandle<()>
where
    F: FnMut() -> Result<(), String> + Send + 'static,
{
    for outcome in ["ok", "error"] {
        counter.with_label_values(&[file, outcome]);
    }
    tokio::spawn(async move {
        let mut hangup = hangup_signal();
        let mut seen = stamp(&paths);
        loop {
            let signalled = tokio::select! {
                _ = tokio::time::sleep(POLL) => false,
                Some(()) = recv(&mut hangup) => true,
            };
            let now = stamp(&paths);
            if !signalled && now == seen {
                continue;
            }
            seen = now;
            match reload() {
                Ok(()) => {
                    counter.with_label_values(&[file, "ok"]).inc();
                    tracing::info!(file, signalled, "reloaded");
                }
                Err(error) => {
                    counter.with_label_values(&[file, "error"]).inc();
                    tracing::warn!(file, %error, "reload failed; keeping what was loaded before");
                }
            }
        }
    })
}

/// Keep SIGHUP from ending the process when nothing is configured to reload (its
/// default action is to terminate): an operator's `kill -HUP` is logged, not fatal.
pub fn absorb_hangup() -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut hangup = hangup_signal();
        while recv(&mut hangup).await.is_some() {
            tracing::info!("SIGHUP received");
        }
    })
}

#[cfg(unix)]
fn hangup_signal() -> Option<tokio::signal::unix::Signal> {
    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok()
}

#[cfg(not(unix))]
fn hangup_signal() -> Option<()> {
    None
}

#[cfg(unix)]
async fn recv(signal: &mut Option<tokio::signal::unix::Signal>) -> Option<()> {
    match signal {
        Some(signal) => signal.recv().await,
        None => std::future::pending().await,
    }
}

#[cfg(not(unix))]
async fn recv(_: &mut Option<()>) -> Option<()> {
    std::future::pending().await
}
