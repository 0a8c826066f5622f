//! Callbacks: what a subscriber runs per message (or per batch), and the
//! registry that finds them by path (`#[callback]` registers an async fn
//! under its full path).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use super::batch_callback::{Batch, BatchResult};
use crate::{BoxError, Error, Handled, Payload, Result};

/// What a callback returns: [`Handled`] comes only from
/// [`Payload::save`]/[`Payload::save_alone`] or [`Payload::nack`], so a
/// callback cannot finish without a decision. An `Err` nacks the message to
/// the dead-letter queue (after retries, for transient database errors).
pub type CallbackResult = std::result::Result<Handled, BoxError>;

/// The boxed future a stored callback returns.
pub type CallbackFuture = Pin<Box<dyn Future<Output = CallbackResult> + Send + 'static>>;

/// The boxed future a stored batch callback returns.
pub type BatchFuture = Pin<Box<dyn Future<Output = BatchResult> + Send + 'static>>;

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

/// Something the consumer can run per batch of messages. Any
/// `Fn(Batch) -> impl Future<Output = BatchResult>` is one; hand it to
/// [`Consumer::new`](crate::Consumer::new) through [`Handler::batch`].
pub trait BatchCallback: Send + Sync + 'static {
    /// Handle the messages of one batch.
    fn call(&self, batch: Batch) -> BatchFuture;
}

impl<F, Fut> BatchCallback for F
where
    F: Fn(Batch) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = BatchResult> + Send + 'static,
{
    fn call(&self, batch: Batch) -> BatchFuture {
        Box::pin(self(batch))
    }
}

/// What a consumer runs: a callback per message (any [`Callback`] converts
/// into one) or a callback per batch ([`Handler::batch`]).
#[derive(Clone)]
pub enum Handler {
    /// One call per message.
    Message(Arc<dyn Callback>),
    /// One call per batch of new messages, in the batch's transaction.
    Batch(Arc<dyn BatchCallback>),
}

impl Handler {
    /// Run `callback` once per batch instead of once per message.
    pub fn batch(callback: impl BatchCallback) -> Handler {
        Handler::Batch(Arc::new(callback))
    }
}

impl<C: Callback> From<C> for Handler {
    fn from(callback: C) -> Handler {
        Handler::Message(Arc::new(callback))
    }
}

impl std::fmt::Debug for Handler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Handler::Message(_) => "Handler::Message",
            Handler::Batch(_) => "Handler::Batch",
        })
    }
}

/// A callback registered with `#[callback]` or `#[callback(batch)]`.
#[doc(hidden)]
#[derive(Debug)]
pub struct CallbackEntry {
    path: &'static str,
    handler: Registered,
}

#[derive(Debug, Clone, Copy)]
enum Registered {
    Message(fn(Payload) -> CallbackFuture),
    Batch(fn(Batch) -> BatchFuture),
}

impl CallbackEntry {
    /// Used by `#[callback]`.
    pub const fn new(path: &'static str, handler: fn(Payload) -> CallbackFuture) -> Self {
        CallbackEntry {
            path,
            handler: Registered::Message(handler),
        }
    }

    /// Used by `#[callback(batch)]`.
    pub const fn batch(path: &'static str, handler: fn(Batch) -> BatchFuture) -> Self {
        CallbackEntry {
            path,
            handler: Registered::Batch(handler),
        }
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
pub fn find_callback(path: &str) -> Result<Handler> {
    inventory::iter::<CallbackEntry>
        .into_iter()
        .find(|entry| entry.path == path)
        .map(|entry| match entry.handler {
            Registered::Message(handler) => Handler::from(handler),
            Registered::Batch(handler) => Handler::batch(handler),
        })
        .ok_or_else(|| Error::UnknownCallback {
            path: path.to_owned(),
            registered: registered_callbacks()
                .into_iter()
                .map(str::to_owned)
                .collect(),
        })
}
