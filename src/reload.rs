//! Files read again while the router runs (the API keys file, TLS certificates): a task
//! that reloads when a file's modification time or size changes (checked every
//! [`POLL`]) or when the router gets SIGHUP.
//!
//! A file is loaded only once it is whole: a change is acted on when two looks a poll
//! apart see the same file (a writer still writing changes it between them), and a
//! load whose files changed while they were read is not kept but tried again. So a
//! keys file caught half-written (its first keys, not yet the rest) is never what the
//! router serves with. The reading (metadata and contents) runs on a blocking thread,
//! never on the async workers.
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

/// Read the files again with `load` (on a blocking thread) whenever `paths` change and
/// are whole, or SIGHUP arrives, and hand what was read to `apply`, until the task is
/// aborted. `file` names them in logs and metrics.
pub fn watch<T, L, A>(
    file: &'static str,
    paths: Vec<PathBuf>,
    counter: IntCounterVec,
    mut load: L,
    mut apply: A,
) -> JoinHandle<()>
where
    T: Send + 'static,
    L: FnMut() -> Result<T, String> + Send + 'static,
    A: FnMut(T) + Send + 'static,
{
    for outcome in ["ok", "error"] {
        counter.with_label_values(&[file, outcome]);
    }
    // What the files look like now, just after the router loaded them (taken here, not in
    // the task, so that a change made before the task first runs is not missed).
    let mut loaded = stamp(&paths);
    tokio::spawn(async move {
        let mut hangup = hangup_signal();
        let paths = std::sync::Arc::new(paths);
        let mut last = loaded.clone();
        loop {
            let signalled = tokio::select! {
                _ = tokio::time::sleep(POLL) => false,
                Some(()) = recv(&mut hangup) => true,
            };
            let now = stamped(&paths).await;
            // Unchanged since the last look: not being written.
            let settled = now == last;
            last = now.clone();
            if !signalled && (!settled || now == loaded) {
                continue;
            }
            let (result, back) = match tokio::task::spawn_blocking(move || {
                let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(&mut load));
                (result, load)
            })
            .await
            {
                Ok(done) => done,
                Err(error) => {
                    tracing::error!(file, %error, "the reload task failed; no more reloads");
                    return;
                }
            };
            load = back;
            let after = stamped(&paths).await;
            if after != now {
                // Written while it was read: what was read may be half; not kept.
                last = after;
                continue;
            }
            loaded = now;
            match result {
                Ok(Ok(read)) => {
                    apply(read);
                    counter.with_label_values(&[file, "ok"]).inc();
                    tracing::info!(file, signalled, "reloaded");
                }
                Ok(Err(error)) => {
                    counter.with_label_values(&[file, "error"]).inc();
                    tracing::warn!(file, %error, "reload failed; keeping what was loaded before");
                }
                Err(_) => {
                    counter.with_label_values(&[file, "error"]).inc();
                    tracing::error!(file, "reload panicked; keeping what was loaded before");
                }
            }
        }
    })
}

/// [`stamp`], read on a blocking thread.
async fn stamped(paths: &std::sync::Arc<Vec<PathBuf>>) -> Stamp {
    let paths = paths.clone();
    tokio::task::spawn_blocking(move || stamp(&paths)).await.unwrap_or_default()
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
