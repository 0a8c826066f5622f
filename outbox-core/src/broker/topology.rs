//! Subscriber queues, declared exactly as django-outbox-pattern's STOMP
//! subscriber makes RabbitMQ declare them (spec §5.2, §8.5-C), so Python and
//! Rust consumers can share or replace each other's queues.

use std::time::Duration;

use lapin::Channel;
use lapin::options::{QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};

use super::with_timeout;
use crate::{Destination, DestinationKind, Result};

/// The queues a subscription uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueDeclaration {
    /// The queue consumed from.
    pub queue: String,
    /// Its dead-letter queue, `DLQ.<queue name given or derived>`.
    pub dead_letter_queue: String,
}

/// Declare `DLQ.<queue>` and the consumed queue with the Python library's
/// flags and arguments, and bind it as the STOMP plugin would for `destination`.
///
/// django-outbox-pattern 3.2.1 gives `DLQ.<queue>` the dead-letter routing key
/// `DLQ.DLQ.DLQ.<queue>` (it prefixes an already prefixed name), observed on a
/// real broker; declaring anything else there fails with PRECONDITION_FAILED.
pub async fn declare_subscription(
    channel: &Channel,
    destination: &Destination,
    queue: &str,
    exclusive: bool,
    timeout: Duration,
) -> Result<QueueDeclaration> {
    let dead_letter_queue = format!("DLQ.{queue}");
    declare(
        channel,
        &dead_letter_queue,
        &format!("DLQ.DLQ.{dead_letter_queue}"),
        false,
        timeout,
    )
    .await?;
    let consumed = match destination.kind() {
        DestinationKind::Topic { routing_key } => {
            declare(channel, queue, &dead_letter_queue, exclusive, timeout).await?;
            bind(channel, queue, "amq.topic", routing_key, timeout).await?;
            queue.to_owned()
        }
        DestinationKind::Exchange {
            exchange,
            routing_key,
        } => {
            declare(channel, queue, &dead_letter_queue, exclusive, timeout).await?;
            bind(channel, queue, exchange, routing_key, timeout).await?;
            queue.to_owned()
        }
        // The plugin ignores `x-queue-name` for queue destinations.
        DestinationKind::Queue { name } => {
            declare(channel, name, &dead_letter_queue, exclusive, timeout).await?;
            name.clone()
        }
        DestinationKind::AmqQueue { name } => name.clone(),
    };
    Ok(QueueDeclaration {
        queue: consumed,
        dead_letter_queue,
    })
}

async fn declare(
    channel: &Channel,
    queue: &str,
    dead_letter_routing_key: &str,
    exclusive: bool,
    timeout: Duration,
) -> Result<()> {
    let mut arguments = FieldTable::default();
    arguments.insert(
        ShortString::from("x-dead-letter-exchange"),
        AMQPValue::LongString(LongString::from("")),
    );
    arguments.insert(
        ShortString::from("x-dead-letter-routing-key"),
        AMQPValue::LongString(LongString::from(dead_letter_routing_key)),
    );
    with_timeout(
        timeout,
        "queue.declare",
        channel.queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                exclusive,
                auto_delete: false,
                ..Default::default()
            },
            arguments,
        ),
    )
    .await?;
    Ok(())
}

async fn bind(
    channel: &Channel,
    queue: &str,
    exchange: &str,
    routing_key: &str,
    timeout: Duration,
) -> Result<()> {
    with_timeout(
        timeout,
        "queue.bind",
        channel.queue_bind(
            queue.into(),
            exchange.into(),
            routing_key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        ),
    )
    .await
}
