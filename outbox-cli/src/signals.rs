//! SIGTERM/SIGINT: the first asks for a graceful stop, the second exits at once.

use outbox_core::{Shutdown, shutdown_channel};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{info, warn};

/// A shutdown that fires on the first SIGTERM or SIGINT.
pub(crate) fn on_signals() -> anyhow::Result<Shutdown> {
    let (trigger, shutdown) = shutdown_channel();
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => info!("SIGTERM received, finishing in-flight work (send it again to exit at once)"),
            _ = int.recv() => info!("SIGINT received, finishing in-flight work (send it again to exit at once)"),
        }
        trigger.trigger();
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        warn!("second signal: forcing immediate exit");
        std::process::exit(130);
    });
    Ok(shutdown)
}
