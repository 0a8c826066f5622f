//! Asking long-running loops (relay, consumer) to stop.

use tokio::sync::watch;

/// The sending side: call [`ShutdownTrigger::trigger`] once to stop.
#[derive(Debug, Clone)]
pub struct ShutdownTrigger(watch::Sender<bool>);

/// The receiving side, handed to `Relay::run` and `Consumer::run`.
#[derive(Debug, Clone)]
pub struct Shutdown(watch::Receiver<bool>);

/// A connected trigger and receiver.
pub fn shutdown_channel() -> (ShutdownTrigger, Shutdown) {
    let (tx, rx) = watch::channel(false);
    (ShutdownTrigger(tx), Shutdown(rx))
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
        // Keep the sender alive forever so `wait` stays pending.
        std::mem::forget(tx);
        Shutdown(rx)
    }

    /// Whether a stop was asked for.
    pub fn is_triggered(&self) -> bool {
        *self.0.borrow()
    }

    /// Resolves once a stop is asked for.
    pub async fn wait(&mut self) {
        // An error means the trigger is gone: treat that as a stop.
        let _ = self.0.wait_for(|stop| *stop).await;
    }
}
