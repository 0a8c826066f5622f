//! What operators need: the outbox's state, FAILED rows to inspect, retry or
//! discard, and dead-letter queues to list or replay.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use lapin::options::{BasicAckOptions, BasicGetOptions, BasicPublishOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Confirmation};
use sea_orm::sea_query::Expr;
use sea_orm::{
    ColumnTrait, DatabaseConnection, EntityTrait, FromQueryResult, PaginatorTrait, QueryFilter,
    QueryOrder, QuerySelect, Statement,
};
use serde::Serialize;
use tracing::info;
use uuid::Uuid;

use crate::broker::{passive, with_timeout};
use crate::entity::{published, received};
use crate::{Broker, Error, Result, Settings, Status};

/// Rows per destination and status.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct DestinationCounts {
    /// The destination.
    pub destination: String,
    /// Waiting to be sent.
    pub schedule: u64,
    /// Sent and confirmed.
    pub succeeded: u64,
    /// Given up on.
    pub failed: u64,
}

/// The outbox at a glance (`outbox-cli status`).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct OutboxStatus {
    /// Per destination.
    pub destinations: Vec<DestinationCounts>,
    /// Rows waiting, all destinations.
    pub pending: u64,
    /// FAILED rows, all destinations.
    pub failed: u64,
    /// Sent rows still kept.
    pub succeeded: u64,
    /// Age in seconds of the oldest waiting row.
    pub oldest_pending_age_seconds: Option<f64>,
    /// Rows in `received`.
    pub received: u64,
}

/// Count everything.
pub async fn outbox_status(db: &DatabaseConnection) -> Result<OutboxStatus> {
    #[derive(FromQueryResult)]
    struct Row {
        destination: String,
        status: i32,
        n: i64,
        oldest: Option<DateTime<Utc>>,
    }
    let rows = Row::find_by_statement(Statement::from_string(
        db.get_database_backend(),
        "SELECT destination, status, COUNT(*) AS n, MIN(added) AS oldest \
         FROM published GROUP BY destination, status ORDER BY destination",
    ))
    .all(db)
    .await?;
    let mut by_destination: BTreeMap<String, DestinationCounts> = BTreeMap::new();
    let mut oldest_pending: Option<DateTime<Utc>> = None;
    for row in rows {
        let entry = by_destination
            .entry(row.destination.clone())
            .or_insert_with(|| DestinationCounts {
                destination: row.destination.clone(),
                schedule: 0,
                succeeded: 0,
                failed: 0,
            });
        let n = u64::try_from(row.n).unwrap_or(0);
        match row.status {
            s if s == Status::Schedule.code() => {
                entry.schedule += n;
                oldest_pending = match (oldest_pending, row.oldest) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
            }
            s if s == Status::Succeeded.code() => entry.succeeded += n,
            _ => entry.failed += n,
        }
    }
    let destinations: Vec<DestinationCounts> = by_destination.into_values().collect();
    Ok(OutboxStatus {
        pending: destinations.iter().map(|d| d.schedule).sum(),
        failed: destinations.iter().map(|d| d.failed).sum(),
        succeeded: destinations.iter().map(|d| d.succeeded).sum(),
        oldest_pending_age_seconds: oldest_pending
            .map(|oldest| (Utc::now() - oldest).num_milliseconds() as f64 / 1000.0),
        received: received::Entity::find().count(db).await?,
        destinations,
    })
}

/// FAILED rows, oldest first, optionally for one destination.
pub async fn failed_messages(
    db: &DatabaseConnection,
    destination: Option<&str>,
    limit: u64,
) -> Result<Vec<published::Model>> {
    let mut query =
        published::Entity::find().filter(published::Column::Status.eq(Status::Failed.code()));
    if let Some(destination) = destination {
        query = query.filter(published::Column::Destination.eq(destination));
    }
    Ok(query
        .order_by_asc(published::Column::Added)
        .limit(limit)
        .all(db)
        .await?)
}

/// One FAILED row.
pub async fn failed_message(db: &DatabaseConnection, id: Uuid) -> Result<published::Model> {
    published::Entity::find_by_id(id)
        .filter(published::Column::Status.eq(Status::Failed.code()))
        .one(db)
        .await?
        .ok_or(Error::RowNotFound { what: "failed", id })
}

/// Which FAILED rows to act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FailedSelection {
    /// One row.
    Id(Uuid),
    /// Every FAILED row.
    All,
    /// Every FAILED row of a destination.
    Destination(String),
}

/// Schedule FAILED rows again with fresh attempts. Returns how many.
pub async fn retry_failed(db: &DatabaseConnection, selection: &FailedSelection) -> Result<u64> {
    let now = Utc::now();
    let mut update = published::Entity::update_many()
        .col_expr(
            published::Column::Status,
            Expr::value(Status::Schedule.code()),
        )
        .col_expr(published::Column::Retry, Expr::value(0))
        .col_expr(published::Column::NextAttemptAt, Expr::value(now))
        .filter(published::Column::Status.eq(Status::Failed.code()));
    update = match selection {
        FailedSelection::Id(id) => update.filter(published::Column::Id.eq(*id)),
        FailedSelection::All => update,
        FailedSelection::Destination(d) => {
            update.filter(published::Column::Destination.eq(d.as_str()))
        }
    };
    let rows = update.exec(db).await?.rows_affected;
    if let (FailedSelection::Id(id), 0) = (selection, rows) {
        return Err(Error::RowNotFound {
            what: "failed",
            id: *id,
        });
    }
    info!(
        ?selection,
        rows, "FAILED messages scheduled again with fresh attempts"
    );
    Ok(rows)
}

/// Delete one FAILED row for good; returns it, so the caller can log what was dropped.
pub async fn discard_failed(db: &DatabaseConnection, id: Uuid) -> Result<published::Model> {
    let row = failed_message(db, id).await?;
    published::Entity::delete_by_id(id)
        .filter(published::Column::Status.eq(Status::Failed.code()))
        .exec(db)
        .await?;
    info!(%id, destination = %row.destination, last_error = ?row.last_error, "FAILED message discarded");
    Ok(row)
}

/// A message sitting in a dead-letter queue.
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetter {
    /// `dop-msg-id` (or `cap-msg-id`, or the AMQP message id).
    pub msg_id: Option<String>,
    /// The queue it was rejected from and why, from `x-death`.
    pub death: Option<String>,
    /// How many times it was dead-lettered.
    pub count: Option<i64>,
    /// The body, as text.
    pub body: String,
    /// String headers.
    pub headers: BTreeMap<String, String>,
}

/// Look at up to `limit` messages in `DLQ.<queue>` without removing them
/// (they are taken unacknowledged and returned when the channel closes).
pub async fn dead_letters(
    settings: &Settings,
    queue: &str,
    limit: usize,
) -> Result<Vec<DeadLetter>> {
    let broker = Broker::connect(&settings.broker, "outbox-cli dlq list").await?;
    let timeout = settings.broker.operation_timeout;
    let channel = with_timeout(
        timeout,
        "channel.open",
        broker.connection().create_channel(),
    )
    .await?;
    let dlq = format!("DLQ.{queue}");
    ensure_queue_exists(&broker, &dlq, timeout).await?;
    let mut letters = Vec::new();
    while letters.len() < limit {
        let Some(message) = with_timeout(
            timeout,
            "basic.get",
            channel.basic_get(dlq.as_str().into(), BasicGetOptions { no_ack: false }),
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
    broker.close().await;
    Ok(letters)
}

/// Move up to `limit` messages from `DLQ.<queue>` back to `<queue>`, each
/// acked in the DLQ only after the broker confirmed the republish.
/// `progress` is called after each message with the count so far.
pub async fn replay_dead_letters(
    settings: &Settings,
    queue: &str,
    limit: Option<u64>,
    mut progress: impl FnMut(u64),
) -> Result<u64> {
    let mut broker = Broker::connect(&settings.broker, "outbox-cli dlq replay").await?;
    let timeout = settings.broker.operation_timeout;
    let dlq = format!("DLQ.{queue}");
    ensure_queue_exists(&broker, &dlq, timeout).await?;
    ensure_queue_exists(&broker, queue, timeout).await?;
    let get = with_timeout(
        timeout,
        "channel.open",
        broker.connection().create_channel(),
    )
    .await?;
    let mut moved = 0;
    while limit.is_none_or(|limit| moved < limit) {
        let Some(message) = with_timeout(
            timeout,
            "basic.get",
            get.basic_get(dlq.as_str().into(), BasicGetOptions { no_ack: false }),
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
                    !k.as_str().starts_with("x-death")
                        && !k.as_str().starts_with("x-first-death")
                        && !k.as_str().starts_with("x-last-death")
                })
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            properties = properties.with_headers(FieldTable::from(kept));
        }
        let confirmation =
            replay_one(&mut broker, queue, &delivery.data, properties, timeout).await?;
        if !matches!(confirmation, Confirmation::Ack(None)) {
            return Err(Error::NotDelivered {
                destination: format!("/queue/{queue}"),
                reason: format!(
                    "the broker did not take the replayed message ({confirmation:?}); it stays in {dlq}"
                ),
            });
        }
        with_timeout(
            timeout,
            "basic.ack",
            delivery.acker.ack(BasicAckOptions::default()),
        )
        .await?;
        moved += 1;
        progress(moved);
    }
    info!(queue, dlq = %dlq, moved, "dead letters replayed");
    broker.close().await;
    Ok(moved)
}

async fn replay_one(
    broker: &mut Broker,
    queue: &str,
    body: &[u8],
    properties: BasicProperties,
    timeout: Duration,
) -> Result<Confirmation> {
    let channel = broker.publish_channel();
    let confirm = with_timeout(
        timeout,
        "basic.publish",
        channel.basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions {
                mandatory: true,
                immediate: false,
            },
            body,
            properties,
        ),
    )
    .await?;
    with_timeout(timeout, "publisher confirm", confirm).await
}

async fn ensure_queue_exists(broker: &Broker, queue: &str, timeout: Duration) -> Result<()> {
    let channel = with_timeout(
        timeout,
        "channel.open",
        broker.connection().create_channel(),
    )
    .await?;
    let declare = channel.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    );
    // A broker that is down is an error of its own, not a missing queue.
    if passive(broker.connection(), timeout, declare).await? {
        Ok(())
    } else {
        Err(Error::NotDelivered {
            destination: format!("/queue/{queue}"),
            reason: format!("queue `{queue}` does not exist"),
        })
    }
}

fn dead_letter(properties: &BasicProperties, body: &[u8]) -> DeadLetter {
    let mut headers = BTreeMap::new();
    let mut death = None;
    let mut count = None;
    if let Some(table) = properties.headers() {
        for (name, value) in table.inner() {
            match value {
                AMQPValue::LongString(s) => {
                    headers.insert(
                        name.to_string(),
                        String::from_utf8_lossy(s.as_bytes()).into_owned(),
                    );
                }
                AMQPValue::FieldArray(deaths) if name.as_str() == "x-death" => {
                    if let Some(AMQPValue::FieldTable(first)) = deaths.as_slice().first() {
                        let text = |key: &str| match first.inner().get(key) {
                            Some(AMQPValue::LongString(s)) => {
                                String::from_utf8_lossy(s.as_bytes()).into_owned()
                            }
                            _ => String::new(),
                        };
                        death = Some(format!("{} from {}", text("reason"), text("queue")));
                        if let Some(AMQPValue::LongLongInt(n)) = first.inner().get("count") {
                            count = Some(*n);
                        }
                    }
                }
                _ => {}
            }
        }
    }
    let msg_id = headers
        .get(crate::headers::CAP_MSG_ID)
        .or_else(|| headers.get(crate::headers::MSG_ID))
        .cloned()
        .or_else(|| properties.message_id().as_ref().map(|id| id.to_string()));
    DeadLetter {
        msg_id,
        death,
        count,
        body: String::from_utf8_lossy(body).into_owned(),
        headers,
    }
}
