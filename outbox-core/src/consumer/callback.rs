//! Callbacks: what a subscriber runs per message, and the registry that finds
//! them by path (`#[callback]` registers an async fn under its full path).

use std::future::Future;
use std::pin::Pin;

use crate::{BoxError, Error, Handled, Payload, Result};

/// What a callback returns: [`Handled`] comes only from
/// [`Payload::save`]/[`Payload::save_alone`] or [`Payload::nack`], so a
/// callback cannot finish without a decision. An `Err` nacks the message to
/// the dead-letter queue (after retries, for transient database errors).
pub type CallbackResult = std::result::Result<Handled, BoxError>;

/// The boxed future a stored callback returns.
pub type CallbackFuture = Pin<Box<dyn Future<Output = CallbackResult> + Send + 'static>>;

/// Something the consumer can run per message. Any
/// `Fn(Payload) -> impl Future<Output = CallbackResult>` is one.
pub trait Callback: Send + Sync + 'static {
    /// Handle one message.
    fn call(&self, payload: Payload) -> CallbackFuture;
}

impl<F, Fut> Callback for F
where
    F: Fn(Payload) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = CallbackResult> + Send + 'static,
{
    fn call(&self, payload: Payload) -> CallbackFuture {
        Box::pin(self(payload))
    }
}

/// A callback registered with `#[callback]`.
#[doc(hidden)]
#[derive(Debug)]
pub struct CallbackEntry {
    path: &'static str,
    handler: fn(Payload) -> CallbackFuture,
}

impl CallbackEntry {
    /// Used by `#[callback]`.
    pub const fn new(path: &'static str, handler: fn(Payload) -> CallbackFuture) -> Self {
        CallbackEntry { path, handler }
    }
}

inventory::collect!(CallbackEntry);

/// The full paths of every callback linked into this binary, sorted.
pub fn registered_callbacks() -> Vec<&'static str> {
    let mut paths: Vec<&'static str> = inventory::iter::<CallbackEntry>
        .into_iter()
        .map(|entry| entry.path)
        .collect();
    paths.sort_unstable();
    paths
}

/// The callback registered under `path`, or an error listing what is registered.
pub fn find_callback(path: &str) -> Result<fn(Payload) -> CallbackFuture> {
    inventory::iter::<CallbackEntry>
        .into_iter()
        .find(|entry| entry.path == path)
        .map(|entry| entry.handler)
        .ok_or_else(|| Error::UnknownCallback {
            path: path.to_owned(),
            registered: registered_callbacks()
                .into_iter()
                .map(str::to_owned)
                .collect(),
        })
}
