//! Dead-letter queues: look without taking, and replay with confirms.

use std::collections::BTreeMap;

use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection};
use tracing::info;

use super::{Amqp, channel_error, codec, lapin_error};
use crate::{DeadLetter, Error, Result, headers};

/// Look at up to `limit` messages in `DLQ.<queue>` without removing them
/// (they are taken unacknowledged and returned when the channel closes).
pub(crate) async fn dead_letters(
    amqp: &Amqp,
    queue: &str,
    limit: usize,
) -> Result<Vec<DeadLetter>> {
    let connection = amqp.connect("outbox-cli dlq list").await?;
    let dlq = format!("DLQ.{queue}");
    ensure_queue_exists(amqp, &connection, &dlq).await?;
    let channel = amqp
        .call("channel.open", connection.create_channel())
        .await?;
    let mut letters = Vec::new();
    while letters.len() < limit {
        let Some(message) = amqp
            .call(
                "basic.get",
                channel.basic_get(name(&dlq)?, BasicGetOptions { no_ack: false }),
            )
            .await?
        else {
            break;
        };
        letters.push(dead_letter(
            &message.delivery.properties,
            &message.delivery.data,
        ));
    }
    close(connection).await;
    Ok(letters)
}

/// Move up to `limit` messages from `DLQ.<queue>` back to `<queue>`, each
/// acked in the DLQ only after the broker confirmed the republish.
/// `progress` is called after each message with the count so far.
pub(crate) async fn replay_dead_letters(
    amqp: &Amqp,
    queue: &str,
    limit: Option<u64>,
    mut progress: impl FnMut(u64),
) -> Result<u64> {
    let connection = amqp.connect("outbox-cli dlq replay").await?;
    let dlq = format!("DLQ.{queue}");
    ensure_queue_exists(amqp, &connection, &dlq).await?;
    ensure_queue_exists(amqp, &connection, queue).await?;
    let get = amqp
        .call("channel.open", connection.create_channel())
        .await?;
    let publish = amqp
        .call("channel.open", connection.create_channel())
        .await?;
    amqp.call(
        "confirm.select",
        publish.confirm_select(ConfirmSelectOptions::default()),
    )
    .await?;
    let mut moved = 0;
    while limit.is_none_or(|limit| moved < limit) {
        let Some(message) = amqp
            .call(
                "basic.get",
                get.basic_get(name(&dlq)?, BasicGetOptions { no_ack: false }),
            )
            .await?
        else {
            break;
        };
        let delivery = message.delivery;
        let mut properties = delivery.properties.clone();
        if let Some(headers) = properties.headers().clone() {
            let kept: BTreeMap<_, _> = headers
                .inner()
                .iter()
                .filter(|(k, _)| {
                    let k = k.as_str();
                    !k.starts_with("x-death")
                        && !k.starts_with("x-first-death")
                        && !k.starts_with("x-last-death")
                        && !k.starts_with("x-outbox-")
                })
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            properties = properties.with_headers(FieldTable::from(kept));
        }
        let confirmation = replay_one(amqp, &publish, queue, &delivery.data, properties).await?;
        if !matches!(confirmation, Confirmation::Ack(None)) {
            return Err(Error::NotDelivered {
                destination: format!("/queue/{queue}"),
                reason: format!("the broker did not take the replayed message; it stays in {dlq}"),
            });
        }
        amqp.call("basic.ack", delivery.acker.ack(BasicAckOptions::default()))
            .await?;
        moved += 1;
        progress(moved);
    }
    info!(queue, dlq = %dlq, moved, "dead letters replayed");
    close(connection).await;
    Ok(moved)
}

fn name(queue: &str) -> Result<ShortString> {
    codec::short(queue).map_err(|reason| Error::NotDelivered {
        destination: format!("/queue/{queue}"),
        reason,
    })
}

async fn close(connection: Connection) {
    // Unacked gets go back to the queue when the connection closes.
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(2),
        connection.close(200, "bye".into()),
    )
    .await;
}

async fn replay_one(
    amqp: &Amqp,
    channel: &Channel,
    queue: &str,
    body: &[u8],
    properties: BasicProperties,
) -> Result<Confirmation> {
    let confirm = amqp
        .call(
            "basic.publish",
            channel.basic_publish(
                ShortString::from(""),
                name(queue)?,
                BasicPublishOptions {
                    mandatory: true,
                    immediate: false,
                },
                body,
                properties,
            ),
        )
        .await?;
    amqp.call("publisher confirm", confirm).await
}

/// A missing queue is an error of its own; a broker that is down is another.
async fn ensure_queue_exists(amqp: &Amqp, connection: &Connection, queue: &str) -> Result<()> {
    let channel = amqp
        .call("channel.open", connection.create_channel())
        .await?;
    let declared = amqp
        .call(
            "queue.declare",
            channel.queue_declare(
                name(queue)?,
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            ),
        )
        .await;
    match declared {
        Ok(_) => Ok(()),
        Err(err) => match lapin_error(&err).and_then(channel_error) {
            Some((404, _)) => Err(Error::NotDelivered {
                destination: format!("/queue/{queue}"),
                reason: format!("queue `{queue}` does not exist"),
            }),
            _ => Err(err),
        },
    }
}

fn dead_letter(properties: &BasicProperties, body: &[u8]) -> DeadLetter {
    let mut headers = BTreeMap::new();
    let mut death = None;
    let mut count = None;
    if let Some(table) = properties.headers() {
        for (name, value) in table.inner() {
            match value {
                AMQPValue::FieldArray(deaths) if name.as_str() == "x-death" => {
                    if let Some(AMQPValue::FieldTable(first)) = deaths.as_slice().first() {
                        let text = |key: &str| {
                            first
                                .inner()
                                .get(key)
                                .and_then(codec::value_text)
                                .unwrap_or_default()
                        };
                        death = Some(format!("{} from {}", text("reason"), text("queue")));
                        if let Some(AMQPValue::LongLongInt(n)) = first.inner().get("count") {
                            count = Some(*n);
                        }
                    }
                }
                other => {
                    if let Some(text) = codec::value_text(other) {
                        headers.insert(name.to_string(), text);
                    }
                }
            }
        }
    }
    let error = headers.get("x-outbox-error").cloned();
    if death.is_none()
        && let Some(from) = headers.get("x-outbox-queue")
    {
        death = Some(format!("copied from {from}"));
    }
    let msg_id = headers
        .get(headers::CAP_MSG_ID)
        .or_else(|| headers.get(headers::MSG_ID))
        .cloned()
        .or_else(|| properties.message_id().as_ref().map(|id| id.to_string()));
    DeadLetter {
        msg_id,
        death,
        count,
        error,
        body: String::from_utf8_lossy(body).into_owned(),
        headers,
    }
}
