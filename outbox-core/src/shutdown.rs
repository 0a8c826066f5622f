//! Asking long-running loops (relay, consumer) to stop.

use tokio::sync::watch;

/// The sending side: call [`ShutdownTrigger::trigger`] once to stop.
#[derive(Debug, Clone)]
pub struct ShutdownTrigger(watch::Sender<bool>);

/// The receiving side, handed to `Relay::run` and `Consumer::run`.
#[derive(Debug, Clone)]
pub struct Shutdown {
    stop: watch::Receiver<bool>,
    // `never()` keeps its own sender alive so `wait` stays pending.
    _keep_alive: Option<std::sync::Arc<watch::Sender<bool>>>,
}

/// A connected trigger and receiver.
pub fn shutdown_channel() -> (ShutdownTrigger, Shutdown) {
    let (tx, rx) = watch::channel(false);
    (
        ShutdownTrigger(tx),
        Shutdown {
            stop: rx,
            _keep_alive: None,
        },
    )
}

impl ShutdownTrigger {
    /// Ask every holder of the matching [`Shutdown`] to stop.
    pub fn trigger(&self) {
        self.0.send_replace(true);
    }
}

impl Shutdown {
    /// A receiver that never fires.
    pub fn never() -> Shutdown {
        let (tx, rx) = watch::channel(false);
        Shutdown {
            stop: rx,
            _keep_alive: Some(std::sync::Arc::new(tx)),
        }
    }

    /// Whether a stop was asked for, or the trigger is gone (nobody can ask
    /// any more: stop rather than run unattended).
    pub fn is_triggered(&self) -> bool {
        *self.stop.borrow() || self.stop.has_changed().is_err()
    }

    /// Resolves once a stop is asked for.
    pub async fn wait(&mut self) {
        // An error means the trigger is gone: treat that as a stop.
        let _ = self.stop.wait_for(|stop| *stop).await;
    }
}
