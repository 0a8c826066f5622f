//! Subscriber queues. Classic queues are declared exactly as
//! django-outbox-pattern's STOMP subscriber makes RabbitMQ declare them
//! (spec §5.2, §8.5-C), so Python and Rust consumers can share or replace
//! each other's queues; quorum queues (`consumer.queue_type = "quorum"`) get
//! RabbitMQ's at-least-once dead-lettering. The same arguments on every run.

use lapin::Channel;
use lapin::options::{QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use tracing::warn;

use super::{Amqp, channel_error, codec, lapin_error};
use crate::broker::{QueueDeclaration, SubscriptionSpec};
use crate::settings::{DeadLetter, QueueType};
use crate::{DestinationKind, Error, Result};

/// Declare `DLQ.<queue>` and the consumed queue, and bind it as the STOMP
/// plugin would for the destination. `/amq/queue/<q>` declares nothing but
/// `DLQ.<q>` (when the consumer copies failures there).
///
/// django-outbox-pattern 3.2.1 gives `DLQ.<queue>` the dead-letter routing key
/// `DLQ.DLQ.DLQ.<queue>` (it prefixes an already prefixed name), observed on a
/// real broker; declaring anything else there fails with PRECONDITION_FAILED.
pub(crate) async fn declare_subscription(
    amqp: &Amqp,
    channel: &Channel,
    spec: &SubscriptionSpec,
) -> Result<QueueDeclaration> {
    let settings = &spec.consumer;
    let quorum = settings.queue_type == QueueType::Quorum;
    let (queue, binding) = match spec.destination.kind() {
        DestinationKind::Topic { routing_key } => (
            spec.queue.as_str(),
            Some(("amq.topic", routing_key.as_str())),
        ),
        DestinationKind::Exchange {
            exchange,
            routing_key,
        } => (
            spec.queue.as_str(),
            Some((exchange.as_str(), routing_key.as_str())),
        ),
        // The plugin ignores `x-queue-name` for queue destinations.
        DestinationKind::Queue { name } => (name.as_str(), None),
        DestinationKind::AmqQueue { name } => {
            return existing_queue(amqp, channel, spec, name).await;
        }
    };
    let dead_letter_queue = format!("DLQ.{queue}");
    let (dlq_arguments, arguments) = if quorum {
        (
            quorum_arguments(None, settings.delivery_limit),
            quorum_arguments(Some(&dead_letter_queue), settings.delivery_limit),
        )
    } else {
        (
            classic_arguments(&format!("DLQ.DLQ.{dead_letter_queue}")),
            classic_arguments(&dead_letter_queue),
        )
    };
    let destination = &spec.destination;
    declare(
        amqp,
        channel,
        destination,
        &dead_letter_queue,
        false,
        dlq_arguments,
    )
    .await?;
    declare(
        amqp,
        channel,
        destination,
        queue,
        settings.exclusive_queue,
        arguments,
    )
    .await?;
    if let Some((exchange, routing_key)) = binding {
        bind(amqp, channel, spec, queue, exchange, routing_key).await?;
    }
    Ok(QueueDeclaration {
        queue: queue.to_owned(),
        dead_letter_queue,
    })
}

/// `/amq/queue/<q>`: the queue must exist and is not declared. Failures are
/// copied to `DLQ.<q>` (declared here), or, with `consumer.dead_letter =
/// "nack"`, rejected, which keeps them only if the queue dead-letters.
async fn existing_queue(
    amqp: &Amqp,
    channel: &Channel,
    spec: &SubscriptionSpec,
    name: &str,
) -> Result<QueueDeclaration> {
    let settings = &spec.consumer;
    let dead_letter_queue = format!("DLQ.{name}");
    match settings.dead_letter {
        DeadLetter::Publish => {
            let arguments = if settings.queue_type == QueueType::Quorum {
                quorum_arguments(None, settings.delivery_limit)
            } else {
                FieldTable::default()
            };
            declare(
                amqp,
                channel,
                &spec.destination,
                &dead_letter_queue,
                false,
                arguments,
            )
            .await?;
        }
        DeadLetter::Nack => warn!(
            queue = name,
            "consumer.dead_letter = \"nack\" on /amq/queue/{name}: a failed message is kept only if the queue dead-letters it (arguments or a policy)"
        ),
    }
    passive(amqp, channel, spec, name).await?;
    Ok(QueueDeclaration {
        queue: name.to_owned(),
        dead_letter_queue,
    })
}

fn classic_arguments(dead_letter_routing_key: &str) -> FieldTable {
    let mut arguments = FieldTable::default();
    insert(&mut arguments, "x-dead-letter-exchange", "");
    insert(
        &mut arguments,
        "x-dead-letter-routing-key",
        dead_letter_routing_key,
    );
    arguments
}

/// A quorum queue; with `dead_letter_queue`, at-least-once dead-lettering
/// to it (which needs `reject-publish` overflow) and an explicit delivery
/// limit (RabbitMQ 4 sets 20 when none is given; 3.x has none). Nothing
/// RabbitMQ 4 removed (`x-queue-mode`, `x-queue-version`) is sent.
fn quorum_arguments(dead_letter_queue: Option<&str>, delivery_limit: u32) -> FieldTable {
    let mut arguments = FieldTable::default();
    insert(&mut arguments, "x-queue-type", "quorum");
    if let Some(dead_letter_queue) = dead_letter_queue {
        insert(&mut arguments, "x-dead-letter-exchange", "");
        insert(
            &mut arguments,
            "x-dead-letter-routing-key",
            dead_letter_queue,
        );
        insert(&mut arguments, "x-dead-letter-strategy", "at-least-once");
        insert(&mut arguments, "x-overflow", "reject-publish");
        arguments.insert(
            ShortString::from("x-delivery-limit"),
            AMQPValue::LongLongInt(i64::from(delivery_limit)),
        );
    }
    arguments
}

fn insert(table: &mut FieldTable, key: &'static str, value: &str) {
    table.insert(
        ShortString::from(key),
        AMQPValue::LongString(LongString::from(value)),
    );
}

async fn declare(
    amqp: &Amqp,
    channel: &Channel,
    destination: &crate::Destination,
    queue: &str,
    exclusive: bool,
    arguments: FieldTable,
) -> Result<()> {
    let name = codec::short(queue).map_err(|reason| Error::SubscriptionRefused {
        destination: destination.to_string(),
        reason,
        fix: "use a shorter queue name".to_owned(),
    })?;
    let declared = amqp
        .call(
            "queue.declare",
            channel.queue_declare(
                name,
                QueueDeclareOptions {
                    durable: true,
                    exclusive,
                    auto_delete: false,
                    ..Default::default()
                },
                arguments,
            ),
        )
        .await;
    declared.map(|_| ()).map_err(|err| {
        refused(err, destination, |code| match code {
            406 => format!(
                "queue `{queue}` exists with other arguments (another queue type or dead-letter setting); \
                 delete it (`rabbitmqctl delete_queue {queue}`) or subscribe with another queue name"
            ),
            403 => format!(
                "the broker user may not declare queue `{queue}`: names starting with `amq.` are reserved, \
                 and the user needs configure permission on it"
            ),
            _ => "check the destination and the broker user's permissions".to_owned(),
        })
    })
}

async fn bind(
    amqp: &Amqp,
    channel: &Channel,
    spec: &SubscriptionSpec,
    queue: &str,
    exchange: &str,
    routing_key: &str,
) -> Result<()> {
    let short = |name: &str| {
        codec::short(name).map_err(|reason| Error::SubscriptionRefused {
            destination: spec.destination.to_string(),
            reason,
            fix: "use a shorter name".to_owned(),
        })
    };
    let bound = amqp
        .call(
            "queue.bind",
            channel.queue_bind(
                short(queue)?,
                short(exchange)?,
                short(routing_key)?,
                QueueBindOptions::default(),
                FieldTable::default(),
            ),
        )
        .await;
    bound.map_err(|err| {
        refused(err, &spec.destination, |code| match code {
            404 => format!(
                "exchange `{exchange}` does not exist; create it (the relay never creates exchanges) or fix the destination"
            ),
            403 => format!("the broker user may not bind to exchange `{exchange}`; grant read permission on it"),
            _ => "check the destination and the broker user's permissions".to_owned(),
        })
    })
}

async fn passive(
    amqp: &Amqp,
    channel: &Channel,
    spec: &SubscriptionSpec,
    queue: &str,
) -> Result<()> {
    let name = codec::short(queue).map_err(|reason| Error::SubscriptionRefused {
        destination: spec.destination.to_string(),
        reason,
        fix: "use a shorter queue name".to_owned(),
    })?;
    let declared = amqp
        .call(
            "queue.declare",
            channel.queue_declare(
                name,
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            ),
        )
        .await;
    declared.map(|_| ()).map_err(|err| {
        refused(err, &spec.destination, |_| {
            format!("create queue `{queue}` first: /amq/queue/ destinations are never declared")
        })
    })
}

/// A refused declaration is a setup problem (permanent, with the fix); a
/// lost connection stays an outage.
fn refused(err: Error, destination: &crate::Destination, fix: impl Fn(u16) -> String) -> Error {
    match lapin_error(&err).and_then(channel_error) {
        Some((code, text)) => Error::SubscriptionRefused {
            destination: destination.to_string(),
            reason: format!("the broker refused it ({code}): {text}"),
            fix: fix(code),
        },
        None => err,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quorum_queues_dead_letter_at_least_once() {
        let table = quorum_arguments(Some("DLQ.q"), 7);
        let get = |key: &str| table.inner().get(key).cloned();
        assert_eq!(
            get("x-queue-type"),
            Some(AMQPValue::LongString("quorum".into()))
        );
        assert_eq!(
            get("x-dead-letter-strategy"),
            Some(AMQPValue::LongString("at-least-once".into()))
        );
        assert_eq!(
            get("x-overflow"),
            Some(AMQPValue::LongString("reject-publish".into()))
        );
        assert_eq!(get("x-delivery-limit"), Some(AMQPValue::LongLongInt(7)));
        assert_eq!(get("x-queue-mode"), None);
        let dlq = quorum_arguments(None, 7);
        assert_eq!(dlq.inner().len(), 1);
    }
}
