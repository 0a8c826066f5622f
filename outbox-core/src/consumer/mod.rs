//! The consumer: a queue's deliveries → deduplicate → callback in its own
//! transaction → ack after commit; failures to `DLQ.<queue>`; outages wait.
//!
//! Works on any transport behind the seam (`crate::broker`): the transport
//! decodes deliveries and settles them; everything here is about the
//! message and the database.

mod batch;
mod batch_callback;
mod callback;
mod inbox;
mod payload;

pub use batch_callback::{Batch, BatchHandled, BatchResult};
pub use callback::{
    BatchCallback, BatchFuture, Callback, CallbackEntry, CallbackFuture, CallbackResult, Handler,
    find_callback, registered_callbacks,
};
pub use payload::{Handled, Payload, Transaction};

use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use futures_util::FutureExt as _;
use sea_orm::DatabaseConnection;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tracing::{debug, error, info, warn};
use uuid::Uuid;

use crate::backoff::Backoff;
use crate::broker::{
    Delivery, QueueDeclaration, Settle, Settler, Subscription, SubscriptionSpec, Transport,
};
use crate::metrics::Metrics;
use crate::retention::{Retention, Table};
use crate::{
    Destination, DestinationKind, Error, Result, Settings, Shutdown, headers, report,
    with_correlation_id,
};

use payload::Decision;

/// The longest message id the `received.msg_id` column holds.
pub const MAX_MSG_ID_LEN: usize = 100;

/// What a consumer run did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConsumerReport {
    /// Messages saved and acked.
    pub saved: u64,
    /// Duplicates acked without running the callback (or rolled back on the race).
    pub duplicates: u64,
    /// Messages sent to the dead-letter queue.
    pub dead_lettered: u64,
    /// Messages given back to the queue because the database was unreachable.
    pub requeued: u64,
}

/// Consumes one destination with one callback.
pub struct Consumer {
    shared: Arc<Shared>,
    destination: Destination,
    queue: String,
    transport: Option<Transport>,
}

impl std::fmt::Debug for Consumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumer")
            .field("destination", &self.destination)
            .field("queue", &self.queue)
            .finish_non_exhaustive()
    }
}

/// What every delivery's task needs.
struct Shared {
    db: DatabaseConnection,
    settings: Settings,
    handler: Handler,
    metrics: Arc<Metrics>,
    retention: Arc<Retention>,
    next_token: AtomicU64,
    report: Counters,
    /// Set when a delivery was given back because the database is down:
    /// take no more until it answers.
    database_down: AtomicBool,
    name: String,
}

#[derive(Default)]
struct Counters {
    saved: AtomicU64,
    duplicates: AtomicU64,
    dead_lettered: AtomicU64,
    requeued: AtomicU64,
}

impl Consumer {
    /// Consume `destination` from `queue` (default: the text after the last
    /// `/` of the destination) with `callback`: any [`Callback`] (run per
    /// message), or [`Handler::batch`] of a [`BatchCallback`] (run per batch).
    pub fn new(
        db: DatabaseConnection,
        settings: Settings,
        destination: &str,
        queue: Option<&str>,
        callback: impl Into<Handler>,
    ) -> Result<Consumer> {
        let destination = Destination::parse(destination)?;
        let queue = queue.filter(|q| !q.is_empty());
        let queue = match (destination.kind(), queue) {
            (DestinationKind::Queue { name } | DestinationKind::AmqQueue { name }, Some(given))
                if given != name =>
            {
                return Err(Error::InvalidSetting {
                    key: "queue".to_owned(),
                    value: format!("{given:?}"),
                    allowed: format!(
                        "`{destination}` is consumed from queue `{name}` (and fails to DLQ.{name}); \
                         leave the queue argument out, or use /topic/ or /exchange/ to name your own queue"
                    ),
                });
            }
            (_, Some(given)) => given.to_owned(),
            (_, None) => destination.default_queue().to_owned(),
        };
        Ok(Consumer {
            shared: Arc::new(Shared {
                retention: Arc::new(Retention::new(settings.retention.clone())),
                db,
                settings,
                handler: callback.into(),
                metrics: Arc::new(Metrics::default()),
                next_token: AtomicU64::new(1),
                report: Counters::default(),
                database_down: AtomicBool::new(false),
                name: format!("outbox-consumer@{}", std::process::id()),
            }),
            destination,
            queue,
            transport: None,
        })
    }

    /// Consume through `transport` instead of the one `broker.url` names
    /// (e.g. a [`MemoryBroker`](crate::MemoryBroker) in tests).
    pub fn with_transport(mut self, transport: impl Into<Transport>) -> Self {
        self.transport = Some(transport.into());
        self
    }

    /// Count into `metrics` (e.g. to serve them with `--metrics-addr`).
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        if let Some(shared) = Arc::get_mut(&mut self.shared) {
            shared.metrics = metrics;
        }
        self
    }

    /// The queue consumed.
    pub fn queue(&self) -> &str {
        &self.queue
    }

    fn transport(&self) -> Result<Transport> {
        match &self.transport {
            Some(transport) => Ok(transport.clone()),
            None => Transport::from_settings(&self.shared.settings),
        }
    }

    fn spec(&self) -> SubscriptionSpec {
        SubscriptionSpec {
            destination: self.destination.clone(),
            queue: self.queue.clone(),
            consumer: self.shared.settings.consumer.clone(),
            name: self.shared.name.clone(),
        }
    }

    /// Declare the queues now (idempotent), so messages published before
    /// [`Consumer::run`] starts are routed to the queue instead of returned.
    pub async fn declare(&self) -> Result<QueueDeclaration> {
        self.shared.settings.check_consumer()?;
        let subscription = self.transport()?.subscribe(&self.spec()).await?;
        let declared = subscription.declaration().clone();
        subscription.close().await;
        Ok(declared)
    }

    /// Consume until `shutdown` fires, surviving broker and database
    /// restarts. On shutdown, stop taking deliveries, let in-flight callbacks
    /// finish (up to `consumer.shutdown_timeout`) and settle them. Refused
    /// credentials, a subscription the broker refuses and missing tables
    /// end the run with an error that says how to fix them.
    pub async fn run(self, mut shutdown: Shutdown) -> Result<ConsumerReport> {
        let settings = &self.shared.settings;
        settings.check_consumer()?;
        crate::schema::check(&self.shared.db, crate::schema::Need::Inbox).await?;
        let transport = self.transport()?;
        let spec = self.spec();
        let mut backoff = Backoff::new(settings.broker.maximum_backoff);
        info!(consumer = %self.shared.name, broker = %transport.endpoint(), destination = %self.destination, queue = %self.queue, prefetch = settings.consumer.effective_prefetch(), concurrency = settings.consumer.concurrency, batch_size = settings.consumer.batch_size, batch_wait = ?settings.consumer.batch_wait, "consumer started");
        let mut consumed_before = false;
        while !shutdown.is_triggered() {
            let subscription = match transport.subscribe(&spec).await {
                Ok(subscription) => subscription,
                Err(err) if !err.is_transient() => {
                    error!(consumer = %self.shared.name, error = %report(&err), "cannot consume");
                    return Err(err);
                }
                Err(err) => {
                    let delay = backoff.next_delay();
                    warn!(consumer = %self.shared.name, error = %report(&err), retry_in = ?delay, "cannot start consuming (broker unreachable); retrying");
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = shutdown.wait() => {}
                    }
                    continue;
                }
            };
            if consumed_before || backoff.failures() > 0 {
                info!(consumer = %self.shared.name, "broker connection restored; consuming again");
            }
            backoff.reset();
            consumed_before = true;
            let declaration = subscription.declaration().clone();
            info!(consumer = %self.shared.name, queue = %declaration.queue, dead_letter_queue = %declaration.dead_letter_queue, "waiting for messages");
            if let Err(err) = self.session(subscription, &mut shutdown).await {
                let delay = backoff.next_delay();
                warn!(consumer = %self.shared.name, error = %report(&err), retry_in = ?delay, "broker connection lost; reconnecting");
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = shutdown.wait() => {}
                }
            }
        }
        let counters = &self.shared.report;
        let report = ConsumerReport {
            saved: counters.saved.load(Ordering::Relaxed),
            duplicates: counters.duplicates.load(Ordering::Relaxed),
            dead_lettered: counters.dead_lettered.load(Ordering::Relaxed),
            requeued: counters.requeued.load(Ordering::Relaxed),
        };
        info!(consumer = %self.shared.name, saved = report.saved, duplicates = report.duplicates, dead_lettered = report.dead_lettered, requeued = report.requeued, "consumer stopped");
        Ok(report)
    }

    /// One connection's life: hand deliveries to callbacks until shutdown
    /// (`Ok`) or the connection breaks (`Err`).
    async fn session(
        &self,
        mut subscription: impl Subscription,
        shutdown: &mut Shutdown,
    ) -> Result<()> {
        let settings = &self.shared.settings;
        let permits = Arc::new(Semaphore::new(settings.consumer.concurrency));
        let settler = subscription.settler();
        let mut in_flight = JoinSet::new();
        let outcome = loop {
            // Reap finished handlers so the set does not grow.
            while in_flight.try_join_next().is_some() {}
            if self.shared.database_down.load(Ordering::Acquire)
                && !self.wait_for_database(shutdown).await
            {
                break Ok(());
            }
            let permit = tokio::select! {
                permit = Arc::clone(&permits).acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => break Ok(()),
                },
                () = shutdown.wait() => break Ok(()),
            };
            let first = tokio::select! {
                next = subscription.next() => next,
                () = shutdown.wait() => break Ok(()),
            };
            let taken = std::time::Instant::now();
            let mut deliveries = match first {
                Ok(delivery) => vec![delivery],
                Err(err) => break Err(err),
            };
            // Fill the batch for at most batch_wait; on shutdown the
            // deliveries already taken are still handled.
            let mut broken = None;
            let deadline = tokio::time::Instant::now() + settings.consumer.batch_wait;
            while deliveries.len() < settings.consumer.batch_size {
                tokio::select! {
                    biased;
                    next = subscription.next() => match next {
                        Ok(delivery) => deliveries.push(delivery),
                        Err(err) => {
                            broken = Some(err);
                            break;
                        }
                    },
                    () = tokio::time::sleep_until(deadline) => break,
                    () = shutdown.wait() => break,
                }
            }
            let shared = Arc::clone(&self.shared);
            let destination = self.destination.clone();
            let settler = settler.clone();
            in_flight.spawn(async move {
                batch::handle(&shared, &destination, deliveries, &settler, taken).await;
                shared
                    .retention
                    .maybe_spawn(&shared.db, Table::Received)
                    .await;
                drop(permit);
            });
            if let Some(err) = broken {
                break Err(err);
            }
        };
        if outcome.is_ok() {
            self.drain(&mut in_flight).await;
        } else {
            // The connection broke: handlers finish; their settles go
            // nowhere and the broker redelivers, which the inbox deduplicates.
            while in_flight.join_next().await.is_some() {}
        }
        drop(settler);
        subscription.close().await;
        outcome
    }

    /// Wait until the database answers again; `false` on shutdown.
    async fn wait_for_database(&self, shutdown: &mut Shutdown) -> bool {
        let mut backoff = Backoff::new(self.shared.settings.broker.maximum_backoff);
        loop {
            match self.shared.db.ping().await {
                Ok(()) => {
                    info!(consumer = %self.shared.name, "database reachable again; consuming");
                    self.shared.database_down.store(false, Ordering::Release);
                    return true;
                }
                Err(err) => {
                    let delay = backoff.next_delay();
                    warn!(consumer = %self.shared.name, error = %report(&Error::from(err)), retry_in = ?delay, "database unreachable; not taking messages until it answers");
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = shutdown.wait() => return false,
                    }
                }
            }
        }
    }

    async fn drain(&self, in_flight: &mut JoinSet<()>) {
        while in_flight.try_join_next().is_some() {}
        if in_flight.is_empty() {
            return;
        }
        let timeout = self.shared.settings.consumer.shutdown_timeout;
        info!(consumer = %self.shared.name, in_flight = in_flight.len(), timeout = ?timeout, "waiting for in-flight messages to finish");
        let wait_all = async { while in_flight.join_next().await.is_some() {} };
        match timeout {
            None => wait_all.await,
            Some(limit) => {
                if tokio::time::timeout(limit, wait_all).await.is_err() {
                    warn!(consumer = %self.shared.name, ?limit, "message processing did not complete within the shutdown timeout; proceeding with shutdown (unsettled messages will be redelivered)");
                    in_flight.abort_all();
                }
            }
        }
    }
}

/// Count and log `decision`, then settle delivery `tag` with it.
fn settle(shared: &Shared, settler: &Settler, tag: u64, msg_id: Option<&str>, decision: Decision) {
    let id = msg_id.unwrap_or("<none>");
    let settle = match decision {
        Decision::Saved => {
            shared.report.saved.fetch_add(1, Ordering::Relaxed);
            Metrics::add(&shared.metrics.consumed, 1);
            Settle::Ack
        }
        Decision::Duplicate => {
            shared.report.duplicates.fetch_add(1, Ordering::Relaxed);
            Metrics::add(&shared.metrics.duplicates, 1);
            Metrics::add(&shared.metrics.consumed, 1);
            Settle::Ack
        }
        Decision::Nack(reason) => {
            shared.report.dead_lettered.fetch_add(1, Ordering::Relaxed);
            Metrics::add(&shared.metrics.dead_lettered, 1);
            warn!(msg_id = id, reason = %reason, "message sent to the dead-letter queue");
            Settle::DeadLetter(reason)
        }
        Decision::Requeue(reason) => {
            shared.report.requeued.fetch_add(1, Ordering::Relaxed);
            Metrics::add(&shared.metrics.requeued, 1);
            shared.database_down.store(true, Ordering::Release);
            warn!(msg_id = id, error = %reason, "database unreachable; the message goes back to the queue");
            Settle::Retry
        }
    };
    settler.settle(tag, settle);
}

/// The payload a callback gets for `delivery`.
fn payload(
    shared: &Shared,
    delivery: &Delivery,
    msg_id: &Option<String>,
    correlation_id: &str,
    batch: Option<Arc<payload::BatchTxn>>,
) -> Payload {
    let payload = Payload::new(
        Arc::new(delivery.body.clone()),
        delivery.headers.clone(),
        msg_id.clone(),
        correlation_id.to_owned(),
        shared.db.clone(),
        batch,
        shared.token(),
    );
    if let Some(err) = payload.body_error() {
        debug!(
            msg_id = msg_id.as_deref().unwrap_or("<none>"),
            error = err,
            "body is not JSON; the callback gets it as a string"
        );
    }
    payload
}

impl Shared {
    /// A new payload's or batch's token: what ties a decision to it.
    fn token(&self) -> u64 {
        self.next_token.fetch_add(1, Ordering::Relaxed)
    }
}

/// What one run of a callback came to.
enum Ran {
    Decided(Decision),
    /// A database error another try may cure.
    Transient(String),
    /// An error or a panic: the message fails.
    Failed(String),
}

/// Run the callback on `payload` under its correlation id, catching panics.
async fn call(
    shared: &Shared,
    payload: Payload,
    correlation_id: &str,
    msg_id: Option<&str>,
) -> Ran {
    let Handler::Message(callback) = &shared.handler else {
        return Ran::Failed("a message reached a batch callback alone".to_owned());
    };
    let id = msg_id.unwrap_or("<none>");
    let token = payload.token();
    // The call itself inside the future: a closure that panics before
    // returning its future is caught like one that panics later.
    let run = with_correlation_id(correlation_id.to_owned(), async move {
        callback.call(payload).await
    });
    match AssertUnwindSafe(run).catch_unwind().await {
        Ok(Ok(handled)) if handled.token == token => Ran::Decided(handled.decision),
        Ok(Ok(_)) => {
            error!(msg_id = %id, "the callback returned the decision of another message; rejecting");
            Ran::Failed("callback returned a decision made for another payload".to_owned())
        }
        Ok(result) => ran_err(result.err()),
        Err(panic) => panicked(panic),
    }
}

/// Run the batch callback on `batch` under `correlation_id`, catching
/// panics. `Decided(Saved)` means it saved; its nacks are in the batch.
async fn call_batch(shared: &Shared, batch: Batch, correlation_id: &str) -> Ran {
    let Handler::Batch(callback) = &shared.handler else {
        return Ran::Failed("a batch reached a per-message callback".to_owned());
    };
    let token = batch.token();
    let run = with_correlation_id(correlation_id.to_owned(), async move {
        callback.call(batch).await
    });
    match AssertUnwindSafe(run).catch_unwind().await {
        Ok(Ok(handled)) if handled.token == token => Ran::Decided(Decision::Saved),
        Ok(Ok(_)) => {
            error!("the batch callback returned the decision of another batch; rejecting");
            Ran::Failed("batch callback returned a decision made for another batch".to_owned())
        }
        Ok(result) => ran_err(result.err()),
        Err(panic) => panicked(panic),
    }
}

fn ran_err(err: Option<crate::BoxError>) -> Ran {
    match err {
        Some(err) if is_transient(err.as_ref()) => Ran::Transient(report(err.as_ref())),
        Some(err) => Ran::Failed(format!("callback failed: {}", report(err.as_ref()))),
        None => Ran::Failed("callback failed".to_owned()),
    }
}

fn panicked(panic: Box<dyn std::any::Any + Send>) -> Ran {
    let text = panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic".to_owned());
    Ran::Failed(format!("callback panicked: {text}"))
}

/// One message in a transaction of its own, with retries after transient
/// database errors (every message of a batch that could not commit
/// together). `failed` is a transient error its first run already hit.
async fn alone(
    shared: &Shared,
    delivery: Delivery,
    msg_id: Option<String>,
    correlation_id: String,
    mut failed: Option<String>,
) -> Decision {
    let settings = &shared.settings.consumer;
    let id = msg_id.as_deref().unwrap_or("<none>").to_owned();
    let mut attempt = 0;
    loop {
        if let Some(text) = failed.take() {
            if attempt >= settings.max_retry_attempts {
                return Decision::Requeue(text);
            }
            attempt += 1;
            retry_wait(settings.retry_wait, attempt, &id, text).await;
        }
        let ran = match &shared.handler {
            Handler::Message(_) => {
                let payload = payload(shared, &delivery, &msg_id, &correlation_id, None);
                call(shared, payload, &correlation_id, msg_id.as_deref()).await
            }
            // A batch callback sees the message as a batch of one.
            Handler::Batch(_) => batch::one(shared, &delivery, &msg_id, &correlation_id).await,
        };
        match ran {
            Ran::Decided(decision) => return decision,
            Ran::Transient(text) => failed = Some(text),
            Ran::Failed(text) => return failure(&id, text),
        }
    }
}

/// A callback's error or panic: logged, then to the dead-letter queue.
fn failure(id: &str, text: String) -> Decision {
    error!(msg_id = %id, error = %text, "callback failed");
    Decision::Nack(text)
}

/// Linear waits like django-outbox-pattern 3.2.1: 2 s, 4 s, 6 s by default.
async fn retry_wait(unit: Duration, attempt: u32, id: &str, err: String) {
    let wait = unit * attempt;
    warn!(msg_id = %id, attempt, retry_in = ?wait, error = %err, "transient database error; running the callback again");
    tokio::time::sleep(wait).await;
}

fn is_transient(err: &(dyn std::error::Error + 'static)) -> bool {
    if let Some(err) = err.downcast_ref::<Error>() {
        return err.is_transient();
    }
    if let Some(err) = err.downcast_ref::<sea_orm::DbErr>() {
        return crate::error::is_transient_db(err);
    }
    false
}

/// The first of `cap-msg-id`, `dop-msg-id`, the transport's message id that is not empty.
fn message_id(delivery: &Delivery) -> Option<String> {
    [headers::CAP_MSG_ID, headers::MSG_ID]
        .iter()
        .filter_map(|name| delivery.headers.get(*name))
        .find(|id| !id.is_empty())
        .cloned()
        .or_else(|| delivery.transport_id.clone().filter(|id| !id.is_empty()))
}

/// The incoming correlation id, unless it is missing or too long to pass
/// on (the relay refuses ids over 255 bytes): then a new one.
fn correlation_id(headers: &BTreeMap<String, String>, msg_id: Option<&str>) -> String {
    match headers.get(headers::CORRELATION_ID) {
        Some(id) if id.len() > crate::headers::MAX_CORRELATION_ID_LEN => {
            let new = Uuid::new_v4().to_string();
            warn!(msg_id = msg_id.unwrap_or("<none>"), length = id.len(), replaced_by = %new, "incoming dop-correlation-id is longer than 255 bytes; events this callback emits carry a new one");
            new
        }
        Some(id) if !id.is_empty() => id.clone(),
        _ => Uuid::new_v4().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn over_long_correlation_ids_are_replaced() {
        let mut headers = BTreeMap::new();
        headers.insert(headers::CORRELATION_ID.to_owned(), "c".repeat(300));
        let id = correlation_id(&headers, None);
        assert_eq!(id.len(), 36, "{id}");
        headers.insert(headers::CORRELATION_ID.to_owned(), "kept".to_owned());
        assert_eq!(correlation_id(&headers, None), "kept");
    }
}
