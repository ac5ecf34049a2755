//! Progress of a pass: counters the workers bump, and a ticker that shows them. On a
//! terminal it redraws one line twice a second; otherwise (CI logs, files) it prints a
//! plain line every ten seconds.

use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use super::client::Outcome;

#[derive(Debug, Default)]
pub struct Progress {
    pub started: AtomicUsize,
    pub completed: AtomicUsize,
    pub failed: AtomicUsize,
}

impl Progress {
    pub fn begin(&self) {
        self.started.fetch_add(1, Ordering::Relaxed);
    }

    pub fn end(&self, outcome: &Outcome) {
        // A cancelled request ends without completing; it shows as neither.
        let counter = if outcome.failed() { &self.failed } else { &self.completed };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Requests started and not yet ended.
    pub fn in_flight(&self) -> usize {
        let done = self.completed.load(Ordering::Relaxed) + self.failed.load(Ordering::Relaxed);
        self.started.load(Ordering::Relaxed).saturating_sub(done)
    }

    fn line(&self, name: &str, total: Option<usize>, elapsed: Duration) -> String {
        let started = self.started.load(Ordering::Relaxed);
        let completed = self.completed.load(Ordering::Relaxed);
        let failed = self.failed.load(Ordering::Relaxed);
        let done = completed + failed;
        let rate = completed as f64 / elapsed.as_secs_f64().max(1e-9);
        let of = total.map(|t| format!("/{t}")).unwrap_or_default();
        format!(
            "[{name}] {done}{of} done, {} in flight, {failed} failed, {rate:.1} req/s, {:.0}s",
            started - done,
            elapsed.as_secs_f64()
        )
    }

    /// Show progress until the returned handle is dropped; `show` false shows nothing.
    pub fn ticker(self: &Arc<Self>, name: &'static str, total: Option<usize>, show: bool) -> Ticker {
        let progress = self.clone();
        let start = Instant::now();
        let terminal = std::io::stderr().is_terminal();
        let task = show.then(|| {
            tokio::spawn(async move {
                let every = if terminal { Duration::from_millis(500) } else { Duration::from_secs(10) };
                loop {
                    tokio::time::sleep(every).await;
                    let line = progress.line(name, total, start.elapsed());
                    let mut err = std::io::stderr().lock();
                    let _ = if terminal { write!(err, "\r{line}\x1b[K") } else { writeln!(err, "{line}") };
                    let _ = err.flush();
                }
            })
        });
        Ticker { task, progress: self.clone(), name, total, start, terminal, show }
    }
}

/// Stops the progress display when dropped, leaving a final line.
pub struct Ticker {
    task: Option<tokio::task::JoinHandle<()>>,
    progress: Arc<Progress>,
    name: &'static str,
    total: Option<usize>,
    start: Instant,
    terminal: bool,
    show: bool,
}

impl Drop for Ticker {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
        if self.show {
            let line = self.progress.line(self.name, self.total, self.start.elapsed());
            let clear = if self.terminal { "\r\x1b[K" } else { "" };
            eprintln!("{clear}{line}");
        }
    }
}
