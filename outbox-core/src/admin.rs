//! What operators need: the outbox's state, FAILED rows to inspect, retry or
//! discard, and dead-letter queues to list or replay.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use sea_orm::sea_query::Expr;
use sea_orm::{
    ColumnTrait, DatabaseConnection, EntityTrait, FromQueryResult, PaginatorTrait, QueryFilter,
    QueryOrder, QuerySelect, Statement,
};
use serde::Serialize;
use tracing::info;
use uuid::Uuid;

use crate::broker::Transport;
use crate::broker::nats::stream::{StreamChange, StreamInfo};
use crate::entity::{published, received};
use crate::{Error, Result, Settings, Status};

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
    /// The queue it was rejected from, from `x-death` (or `x-outbox-queue`).
    pub death: Option<String>,
    /// How many times it was dead-lettered.
    pub count: Option<i64>,
    /// Why it failed, when the consumer copied it there (`x-outbox-error`).
    pub error: Option<String>,
    /// The body, as text.
    pub body: String,
    /// String headers.
    pub headers: BTreeMap<String, String>,
}

/// Create the JetStream stream `nats.*` describes, or bring an existing one
/// to it (subjects, duplicate window, replicas); running it again changes
/// nothing. Needs `broker.url` to name a NATS server.
pub async fn ensure_stream(settings: &Settings) -> Result<(StreamChange, StreamInfo)> {
    nats_of(settings)?.ensure_stream().await
}

/// The JetStream stream the relay writes to, as the server has it (`None`
/// when it does not exist).
pub async fn stream_info(settings: &Settings) -> Result<Option<StreamInfo>> {
    nats_of(settings)?.stream_info().await
}

fn nats_of(settings: &Settings) -> Result<crate::broker::nats::Nats> {
    Transport::from_settings(settings)?
        .nats()
        .cloned()
        .ok_or(Error::UnsupportedByTransport(
            "streams are NATS JetStream's; broker.url names another broker (use nats://host:4222)"
                .to_owned(),
        ))
}

/// Look at up to `limit` messages in `DLQ.<queue>` without removing them
/// (on JetStream: the durable `<queue>`'s dead letters, `DLQ.<stream>.<durable>`).
pub async fn dead_letters(
    settings: &Settings,
    queue: &str,
    limit: usize,
) -> Result<Vec<DeadLetter>> {
    let transport = Transport::from_settings(settings)?;
    if let Some(nats) = transport.nats() {
        return crate::broker::nats::dead_letters::dead_letters(nats, queue, limit).await;
    }
    let amqp = transport.amqp().ok_or_else(no_dead_letter_tools)?;
    crate::broker::amqp::dead_letters(amqp, queue, limit).await
}

/// Move up to `limit` messages from `DLQ.<queue>` back to `<queue>`, each
/// acked in the DLQ only after the broker confirmed the republish (on
/// JetStream: back to the subject each failed on, deleted from the
/// dead-letter stream after the PubAck). `progress` is called after each
/// message with the count so far.
pub async fn replay_dead_letters(
    settings: &Settings,
    queue: &str,
    limit: Option<u64>,
    progress: impl FnMut(u64),
) -> Result<u64> {
    let transport = Transport::from_settings(settings)?;
    if let Some(nats) = transport.nats() {
        return crate::broker::nats::dead_letters::replay_dead_letters(
            nats, queue, limit, progress,
        )
        .await;
    }
    let amqp = transport.amqp().ok_or_else(no_dead_letter_tools)?;
    crate::broker::amqp::replay_dead_letters(amqp, queue, limit, progress).await
}

fn no_dead_letter_tools() -> Error {
    Error::UnsupportedByTransport(
        "the dead-letter tools work on RabbitMQ queues and JetStream dead-letter streams; broker.url names another broker".to_owned(),
    )
}
