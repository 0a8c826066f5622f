//! The consumer: a queue's deliveries → deduplicate → callback in its own
//! transaction → ack after commit, nack to `DLQ.<queue>` on error or panic.

mod acks;
mod payload;

pub use payload::{Handled, Payload};

use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::{FutureExt as _, StreamExt as _};
use lapin::message::Delivery;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable};
use sea_orm::{ColumnTrait, DatabaseConnection, EntityTrait, QueryFilter, QuerySelect};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tracing::{debug, error, info, warn};
use uuid::Uuid;

use crate::backoff::Backoff;
use crate::broker::{Broker, with_timeout};
use crate::callback::Callback;
use crate::entity::received;
use crate::metrics::Metrics;
use crate::retention::{Retention, Table};
use crate::{
    Destination, Error, Result, Settings, Shutdown, declare_subscription, headers, report,
    with_correlation_id,
};

use acks::{AckEvent, Acks};
use payload::Decision;

/// What a consumer run did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConsumerReport {
    /// Messages saved and acked.
    pub saved: u64,
    /// Duplicates acked without running the callback (or rolled back on the race).
    pub duplicates: u64,
    /// Messages nacked to the dead-letter queue.
    pub dead_lettered: u64,
}

/// Consumes one destination with one callback.
pub struct Consumer {
    shared: Arc<Shared>,
    destination: Destination,
    queue: String,
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
    callback: Box<dyn Callback>,
    metrics: Arc<Metrics>,
    retention: Arc<Retention>,
    next_token: AtomicU64,
    report: Counters,
    name: String,
}

#[derive(Default)]
struct Counters {
    saved: AtomicU64,
    duplicates: AtomicU64,
    dead_lettered: AtomicU64,
}

impl Consumer {
    /// Consume `destination` from `queue` (default: the text after the last
    /// `/` of the destination) with `callback`.
    pub fn new(
        db: DatabaseConnection,
        settings: Settings,
        destination: &str,
        queue: Option<&str>,
        callback: impl Callback,
    ) -> Result<Consumer> {
        let destination = Destination::parse(destination)?;
        let queue = queue
            .filter(|q| !q.is_empty())
            .unwrap_or_else(|| destination.default_queue())
            .to_owned();
        Ok(Consumer {
            shared: Arc::new(Shared {
                retention: Arc::new(Retention::new(settings.retention.clone())),
                db,
                settings,
                callback: Box::new(callback),
                metrics: Arc::new(Metrics::default()),
                next_token: AtomicU64::new(1),
                report: Counters::default(),
                name: format!("outbox-consumer@{}", std::process::id()),
            }),
            destination,
            queue,
        })
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

    /// Declare the queues now (idempotent), so messages published before
    /// [`Consumer::run`] starts are routed to the queue instead of returned.
    pub async fn declare(&self) -> Result<crate::QueueDeclaration> {
        let (broker, _channel, declared) = self.connect_and_declare().await?;
        broker.close().await;
        Ok(declared)
    }

    /// A connection, a channel, and the subscription's queues declared on it.
    async fn connect_and_declare(
        &self,
    ) -> Result<(Broker, lapin::Channel, crate::QueueDeclaration)> {
        let settings = &self.shared.settings;
        let timeout = settings.broker.operation_timeout;
        let broker = Broker::connect(&settings.broker, &self.shared.name).await?;
        let channel = with_timeout(
            timeout,
            "channel.open",
            broker.connection().create_channel(),
        )
        .await?;
        let declared = declare_subscription(
            &channel,
            &self.destination,
            &self.queue,
            settings.consumer.exclusive_queue,
            timeout,
        )
        .await
        .map_err(|err| explain_declare_error(err, &self.queue))?;
        Ok((broker, channel, declared))
    }

    /// Consume until `shutdown` fires, surviving broker and database
    /// restarts. On shutdown, stop taking deliveries, let in-flight callbacks
    /// finish (up to `consumer.shutdown_timeout`) and ack or nack them.
    pub async fn run(self, mut shutdown: Shutdown) -> Result<ConsumerReport> {
        let settings = &self.shared.settings;
        let mut backoff = Backoff::new(settings.broker.maximum_backoff);
        info!(consumer = %self.shared.name, destination = %self.destination, queue = %self.queue, prefetch = settings.consumer.prefetch, concurrency = settings.consumer.concurrency, "consumer started");
        while !shutdown.is_triggered() {
            let mut consuming = false;
            match self
                .session(&mut shutdown, &mut backoff, &mut consuming)
                .await
            {
                Ok(()) => {}
                Err(err) => {
                    let delay = backoff.next_delay();
                    if err.is_transient() && !consuming {
                        warn!(consumer = %self.shared.name, error = %report(&err), retry_in = ?delay, "cannot start consuming (broker unreachable or queue refused); retrying");
                    } else if err.is_transient() {
                        warn!(consumer = %self.shared.name, error = %report(&err), retry_in = ?delay, "broker connection lost; reconnecting");
                    } else {
                        error!(consumer = %self.shared.name, error = %report(&err), retry_in = ?delay, "cannot consume; retrying");
                    }
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = shutdown.wait() => {}
                    }
                }
            }
        }
        let counters = &self.shared.report;
        let report = ConsumerReport {
            saved: counters.saved.load(Ordering::Relaxed),
            duplicates: counters.duplicates.load(Ordering::Relaxed),
            dead_lettered: counters.dead_lettered.load(Ordering::Relaxed),
        };
        info!(consumer = %self.shared.name, saved = report.saved, duplicates = report.duplicates, dead_lettered = report.dead_lettered, "consumer stopped");
        Ok(report)
    }

    /// One connection's life: declare, consume, hand deliveries out.
    async fn session(
        &self,
        shutdown: &mut Shutdown,
        backoff: &mut Backoff,
        consuming: &mut bool,
    ) -> Result<()> {
        let settings = &self.shared.settings;
        let timeout = settings.broker.operation_timeout;
        let (broker, channel, declared) = self.connect_and_declare().await?;
        with_timeout(
            timeout,
            "basic.qos",
            channel.basic_qos(settings.consumer.prefetch, BasicQosOptions::default()),
        )
        .await?;
        let tag = format!("outbox-{}", Uuid::new_v4().simple());
        let mut deliveries = with_timeout(
            timeout,
            "basic.consume",
            channel.basic_consume(
                declared.queue.as_str().into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            ),
        )
        .await?;
        *consuming = true;
        if backoff.failures() > 0 {
            info!(consumer = %self.shared.name, "broker connection restored; consuming again");
        }
        backoff.reset();
        info!(consumer = %self.shared.name, queue = %declared.queue, dead_letter_queue = %declared.dead_letter_queue, "waiting for messages");

        let permits = Arc::new(Semaphore::new(settings.consumer.concurrency));
        let mut in_flight = JoinSet::new();
        let acks = Acks::start(channel.clone());
        let ack_events = acks.sender();
        let outcome = loop {
            // Reap finished handlers so the set does not grow.
            while in_flight.try_join_next().is_some() {}
            let permit = tokio::select! {
                permit = Arc::clone(&permits).acquire_owned() => permit.map_err(|_| Error::BrokerTimeout { operation: "semaphore", timeout })?,
                () = shutdown.wait() => break Ok(()),
            };
            let delivery = tokio::select! {
                next = deliveries.next() => next,
                () = shutdown.wait() => break Ok(()),
            };
            match delivery {
                Some(Ok(delivery)) => {
                    let shared = Arc::clone(&self.shared);
                    let destination = self.destination.clone();
                    let events = ack_events.clone();
                    let _ = events.send(AckEvent::Delivered(delivery.delivery_tag));
                    in_flight.spawn(async move {
                        let tag = delivery.delivery_tag;
                        let ack = handle(&shared, &destination, delivery).await;
                        let _ = events.send(AckEvent::Done { tag, ack });
                        drop(permit);
                    });
                }
                Some(Err(err)) => break Err(Error::Broker(err)),
                None => {
                    break Err(Error::BrokerTimeout {
                        operation: "consume (the broker ended the consumer)",
                        timeout,
                    });
                }
            }
        };
        if shutdown.is_triggered() {
            // Stop new deliveries; unstarted prefetched ones return to the queue.
            let _ = with_timeout(
                timeout,
                "basic.cancel",
                channel.basic_cancel(tag.as_str().into(), BasicCancelOptions::default()),
            )
            .await;
            self.drain(in_flight).await;
            drop(ack_events);
            acks.finish().await;
            broker.close().await;
        } else {
            // The connection broke: handlers finish; their acks fail and the
            // broker redelivers, which the `received` table deduplicates.
            while in_flight.join_next().await.is_some() {}
            drop(ack_events);
            acks.finish().await;
        }
        outcome
    }

    async fn drain(&self, mut in_flight: JoinSet<()>) {
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
                    warn!(consumer = %self.shared.name, ?limit, "message processing did not complete within the shutdown timeout; proceeding with shutdown (unacknowledged messages will be redelivered)");
                }
            }
        }
    }
}

/// A queue that exists with other arguments is a setup problem: say so.
fn explain_declare_error(err: Error, queue: &str) -> Error {
    if let Error::Broker(inner) = &err
        && inner.to_string().contains("PRECONDITION_FAILED")
    {
        error!(queue, error = %inner, "queue `{queue}` (or DLQ.{queue}) exists with different arguments; delete it or use another queue name");
    }
    err
}

/// One delivery, start to decision: `true` to ack, `false` to nack (dead-letter).
async fn handle(shared: &Shared, destination: &Destination, delivery: Delivery) -> bool {
    let started = Instant::now();
    let headers = header_map(&delivery, destination);
    let msg_id = message_id(&delivery, &headers);
    let correlation_id = headers
        .get(headers::CORRELATION_ID)
        .filter(|id| !id.is_empty())
        .cloned()
        .unwrap_or_else(|| Uuid::new_v4().to_string());
    let decision = decide(shared, &delivery, headers, msg_id.clone(), correlation_id).await;
    shared.metrics.handle_latency.observe(started.elapsed());
    let id = msg_id.as_deref().unwrap_or("<none>");
    let ack = match &decision {
        Decision::Saved | Decision::Duplicate => {
            let counter = if decision == Decision::Saved {
                &shared.report.saved
            } else {
                &shared.report.duplicates
            };
            counter.fetch_add(1, Ordering::Relaxed);
            if decision == Decision::Duplicate {
                Metrics::add(&shared.metrics.duplicates, 1);
            }
            Metrics::add(&shared.metrics.consumed, 1);
            true
        }
        Decision::Nack(reason) => {
            shared.report.dead_lettered.fetch_add(1, Ordering::Relaxed);
            Metrics::add(&shared.metrics.dead_lettered, 1);
            warn!(msg_id = id, reason = %reason, "message rejected to the dead-letter queue");
            false
        }
    };
    shared
        .retention
        .maybe_spawn(&shared.db, Table::Received)
        .await;
    ack
}

async fn decide(
    shared: &Shared,
    delivery: &Delivery,
    headers: BTreeMap<String, String>,
    msg_id: Option<String>,
    correlation_id: String,
) -> Decision {
    let settings = &shared.settings.consumer;
    let id = msg_id.as_deref().unwrap_or("<none>").to_owned();
    let mut attempt = 0;
    loop {
        match already_received(&shared.db, msg_id.as_deref()).await {
            Ok(true) => {
                info!(msg_id = %id, "message already received; acking without running the callback");
                return Decision::Duplicate;
            }
            Ok(false) => {}
            Err(err) if err.is_transient() && attempt < settings.max_retry_attempts => {
                attempt += 1;
                retry_wait(settings.retry_wait, attempt, &id, report(&err)).await;
                continue;
            }
            Err(err) => {
                return Decision::Nack(format!("cannot check for duplicates: {}", report(&err)));
            }
        }
        if msg_id.is_none() {
            warn!("message has no cap-msg-id, dop-msg-id or message_id; it cannot be deduplicated");
        }
        let token = shared.next_token.fetch_add(1, Ordering::Relaxed);
        let payload = Payload::new(
            delivery.data.clone(),
            headers.clone(),
            msg_id.clone(),
            correlation_id.clone(),
            shared.db.clone(),
            token,
        );
        if let Some(err) = payload.body_error() {
            debug!(msg_id = %id, error = err, "body is not JSON; the callback gets it as a string");
        }
        let run = with_correlation_id(
            correlation_id.clone(),
            shared.callback.call(payload.clone()),
        );
        match AssertUnwindSafe(run).catch_unwind().await {
            Ok(Ok(handled)) if handled.token == payload.token() => return handled.decision,
            Ok(Ok(_)) => {
                error!(msg_id = %id, "the callback returned the decision of another message; rejecting");
                return Decision::Nack(
                    "callback returned a decision made for another payload".to_owned(),
                );
            }
            Ok(Err(err)) if is_transient(err.as_ref()) && attempt < settings.max_retry_attempts => {
                attempt += 1;
                let text = report(err.as_ref());
                drop(err);
                retry_wait(settings.retry_wait, attempt, &id, text).await;
            }
            Ok(Err(err)) => {
                let text = report(err.as_ref());
                error!(msg_id = %id, error = %text, "callback failed");
                return Decision::Nack(format!("callback failed: {text}"));
            }
            Err(panic) => {
                let text = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "non-string panic".to_owned());
                error!(msg_id = %id, panic = %text, "callback panicked");
                return Decision::Nack(format!("callback panicked: {text}"));
            }
        }
    }
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

async fn already_received(db: &DatabaseConnection, msg_id: Option<&str>) -> Result<bool> {
    let Some(msg_id) = msg_id else {
        return Ok(false);
    };
    let found: Option<Uuid> = received::Entity::find()
        .select_only()
        .column(received::Column::Id)
        .filter(received::Column::MsgId.eq(msg_id))
        .into_tuple()
        .one(db)
        .await?;
    Ok(found.is_some())
}

/// The first of `cap-msg-id`, `dop-msg-id`, the AMQP `message_id` that is not empty.
fn message_id(delivery: &Delivery, headers: &BTreeMap<String, String>) -> Option<String> {
    [headers::CAP_MSG_ID, headers::MSG_ID]
        .iter()
        .filter_map(|name| headers.get(*name))
        .find(|id| !id.is_empty())
        .cloned()
        .or_else(|| {
            delivery
                .properties
                .message_id()
                .as_ref()
                .map(|id| id.to_string())
                .filter(|id| !id.is_empty())
        })
}

/// AMQP headers as text, plus what a STOMP subscriber would see:
/// `destination` rebuilt from the delivery, and `redelivered`.
fn header_map(delivery: &Delivery, destination: &Destination) -> BTreeMap<String, String> {
    let mut map = BTreeMap::new();
    if let Some(table) = delivery.properties.headers() {
        for (name, value) in table.inner() {
            if let Some(text) = value_text(value) {
                map.insert(name.to_string(), text);
            }
        }
    }
    let exchange = delivery.exchange.as_str();
    let routing_key = delivery.routing_key.as_str();
    let delivered_to = match exchange {
        "" => format!("/queue/{routing_key}"),
        "amq.topic" => format!("/topic/{routing_key}"),
        _ if routing_key.is_empty() => format!("/exchange/{exchange}"),
        _ => format!("/exchange/{exchange}/{routing_key}"),
    };
    map.insert("destination".to_owned(), delivered_to);
    map.insert(
        "subscription-destination".to_owned(),
        destination.to_string(),
    );
    map.insert("redelivered".to_owned(), delivery.redelivered.to_string());
    if let Some(id) = delivery.properties.message_id() {
        map.insert("amqp-message-id".to_owned(), id.to_string());
    }
    map
}

fn value_text(value: &AMQPValue) -> Option<String> {
    Some(match value {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.to_string(),
        AMQPValue::Boolean(b) => b.to_string(),
        AMQPValue::ShortShortInt(n) => n.to_string(),
        AMQPValue::ShortShortUInt(n) => n.to_string(),
        AMQPValue::ShortInt(n) => n.to_string(),
        AMQPValue::ShortUInt(n) => n.to_string(),
        AMQPValue::LongInt(n) => n.to_string(),
        AMQPValue::LongUInt(n) => n.to_string(),
        AMQPValue::LongLongInt(n) => n.to_string(),
        AMQPValue::Float(n) => n.to_string(),
        AMQPValue::Double(n) => n.to_string(),
        AMQPValue::Timestamp(n) => n.to_string(),
        // Arrays (x-death), tables and byte arrays have no text form; STOMP drops them too.
        _ => return None,
    })
}
