//! Process signals: the shutdown future every server binary waits on.

/// A future that resolves on SIGTERM or SIGINT. The handlers are installed when this
/// is called, not when it is first polled: call it before listening, so a signal that
/// arrives during start-up is not fatal.
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("install SIGINT handler");
    async move {
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
    }
}
