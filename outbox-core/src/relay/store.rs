//! The relay's SQL: claim a batch, mark outcomes, release on outage.
//!
//! A claim moves `next_attempt_at` a lease into the future in one short
//! transaction (`FOR UPDATE SKIP LOCKED` on PostgreSQL and MariaDB, a single
//! `UPDATE .. RETURNING` statement on SQLite, whose one writer serializes
//! claims). Publishing happens after the claim has committed.

use chrono::{DateTime, Utc};
use sea_orm::sea_query::Expr;
use sea_orm::{
    ColumnTrait, DatabaseConnection, DbBackend, EntityTrait, FromQueryResult, QueryFilter,
    Statement, TransactionTrait, Value,
};
use uuid::Uuid;

use crate::entity::published::{self, Column};
use crate::{Error, Result, Status};

/// A claimed row: what the relay needs to publish it.
#[derive(Debug, Clone, FromQueryResult)]
pub(crate) struct ClaimedRow {
    pub(crate) id: Uuid,
    pub(crate) destination: String,
    pub(crate) body: serde_json::Value,
    pub(crate) headers: serde_json::Value,
    pub(crate) retry: i32,
    pub(crate) added: DateTime<Utc>,
}

const COLUMNS: &str = "id, destination, body, headers, retry, added";

#[derive(Debug, Clone)]
pub(crate) struct Store {
    db: DatabaseConnection,
    backend: DbBackend,
}

impl Store {
    pub(crate) fn new(db: DatabaseConnection) -> Self {
        let backend = db.get_database_backend();
        Store { db, backend }
    }

    pub(crate) fn backend(&self) -> DbBackend {
        self.backend
    }

    /// Claim up to `limit` schedulable rows, oldest first, until `lease_until`.
    pub(crate) async fn claim(
        &self,
        limit: u32,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
    ) -> Result<Vec<ClaimedRow>> {
        let mut rows = match self.backend {
            DbBackend::Postgres => {
                let sql = format!(
                    "UPDATE published SET next_attempt_at = $1 WHERE id IN (\
                       SELECT id FROM published WHERE status = 1 AND next_attempt_at <= $2 \
                       ORDER BY next_attempt_at LIMIT $3 FOR UPDATE SKIP LOCKED) \
                     RETURNING {COLUMNS}"
                );
                self.query(
                    &sql,
                    vec![lease_until.into(), now.into(), i64::from(limit).into()],
                )
                .await?
            }
            DbBackend::Sqlite => {
                let sql = format!(
                    "UPDATE published SET next_attempt_at = ? WHERE id IN (\
                       SELECT id FROM published WHERE status = 1 AND next_attempt_at <= ? \
                       ORDER BY next_attempt_at LIMIT ?) \
                     RETURNING {COLUMNS}"
                );
                self.query(
                    &sql,
                    vec![lease_until.into(), now.into(), i64::from(limit).into()],
                )
                .await?
            }
            DbBackend::MySql => {
                // MariaDB has neither UPDATE .. RETURNING nor LIMIT in IN subqueries.
                let txn = self.db.begin().await?;
                let sql = format!(
                    "SELECT {COLUMNS} FROM published WHERE status = 1 AND next_attempt_at <= ? \
                     ORDER BY next_attempt_at LIMIT ? FOR UPDATE SKIP LOCKED"
                );
                let rows = ClaimedRow::find_by_statement(Statement::from_sql_and_values(
                    self.backend,
                    sql,
                    vec![now.into(), i64::from(limit).into()],
                ))
                .all(&txn)
                .await?;
                if !rows.is_empty() {
                    published::Entity::update_many()
                        .col_expr(Column::NextAttemptAt, Expr::value(lease_until))
                        .filter(Column::Id.is_in(rows.iter().map(|r| r.id)))
                        .exec(&txn)
                        .await?;
                }
                txn.commit().await?;
                rows
            }
            #[allow(unreachable_patterns)]
            other => return Err(Error::UnsupportedBackend(format!("{other:?}"))),
        };
        // RETURNING gives no order; publish in creation order.
        rows.sort_by_key(|row| (row.added, row.id));
        Ok(rows)
    }

    async fn query(&self, sql: &str, values: Vec<Value>) -> Result<Vec<ClaimedRow>> {
        Ok(
            ClaimedRow::find_by_statement(Statement::from_sql_and_values(
                self.backend,
                sql,
                values,
            ))
            .all(&self.db)
            .await?,
        )
    }

    /// Mark confirmed rows sent, a few hundred per statement. The claim lease is cleared
    /// too, so a row set back to SCHEDULE by hand (the django-outbox-pattern
    /// way to resend) is sent again at once, not when the lease would expire.
    pub(crate) async fn mark_sent(&self, ids: &[Uuid]) -> Result<()> {
        // Statements over ~16 KB stall ~40 ms on the client: sqlx 0.9.0 does
        // not set TCP_NODELAY (launchbadge/sqlx#4335). 250 ids stay well under.
        for chunk in ids.chunks(250) {
            self.mark_chunk_sent(chunk).await?;
        }
        Ok(())
    }

    async fn mark_chunk_sent(&self, ids: &[Uuid]) -> Result<()> {
        published::Entity::update_many()
            .col_expr(Column::Status, Expr::value(Status::Succeeded.code()))
            .col_expr(Column::NextAttemptAt, Expr::value(Utc::now()))
            .col_expr(Column::LastError, Expr::value(Option::<String>::None))
            .filter(Column::Id.is_in(ids.iter().copied()))
            .exec(&self.db)
            .await?;
        Ok(())
    }

    /// Record one failed attempt: schedule the next one, or give up.
    pub(crate) async fn mark_failed(
        &self,
        id: Uuid,
        retry: i32,
        next_attempt_at: Option<DateTime<Utc>>,
        error: &str,
    ) -> Result<()> {
        let status = if next_attempt_at.is_some() {
            Status::Schedule
        } else {
            Status::Failed
        };
        published::Entity::update_many()
            .col_expr(Column::Retry, Expr::value(retry))
            .col_expr(Column::Status, Expr::value(status.code()))
            .col_expr(
                Column::NextAttemptAt,
                Expr::value(next_attempt_at.unwrap_or_else(Utc::now)),
            )
            .col_expr(Column::LastError, Expr::value(Some(truncate(error))))
            .filter(Column::Id.eq(id))
            .exec(&self.db)
            .await?;
        Ok(())
    }

    /// Give claimed rows back untouched (no attempt counted): the broker went
    /// away, or the relay is stopping before publishing them.
    pub(crate) async fn release(&self, ids: &[Uuid]) -> Result<()> {
        for chunk in ids.chunks(250) {
            published::Entity::update_many()
                .col_expr(Column::NextAttemptAt, Expr::col(Column::Added))
                .filter(Column::Id.is_in(chunk.iter().copied()))
                .filter(Column::Status.eq(Status::Schedule.code()))
                .exec(&self.db)
                .await?;
        }
        Ok(())
    }

    /// Schedulable rows, the oldest one's creation time, and the next due time.
    pub(crate) async fn backlog(&self) -> Result<Backlog> {
        #[derive(FromQueryResult)]
        struct Row {
            pending: i64,
            oldest: Option<DateTime<Utc>>,
            next_due: Option<DateTime<Utc>>,
        }
        let row = Row::find_by_statement(Statement::from_string(
            self.backend,
            "SELECT COUNT(*) AS pending, MIN(added) AS oldest, MIN(next_attempt_at) AS next_due \
             FROM published WHERE status = 1",
        ))
        .one(&self.db)
        .await?;
        Ok(row.map_or(Backlog::default(), |row| Backlog {
            pending: u64::try_from(row.pending).unwrap_or(0),
            oldest: row.oldest,
            next_due: row.next_due,
        }))
    }
}

/// What waits in the outbox.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Backlog {
    pub(crate) pending: u64,
    pub(crate) oldest: Option<DateTime<Utc>>,
    pub(crate) next_due: Option<DateTime<Utc>>,
}

/// Error texts can be long (a whole HTML page from a proxy); keep the start.
fn truncate(error: &str) -> String {
    const MAX: usize = 2000;
    if error.len() <= MAX {
        return error.to_owned();
    }
    let mut end = MAX;
    while !error.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &error[..end])
}
