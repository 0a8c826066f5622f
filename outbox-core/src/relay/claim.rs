//! The relay's SQL: claim a batch, then change each claimed row only
//! through the claim that holds it.
//!
//! A claim moves `next_attempt_at` a lease into the future and stamps a
//! fresh `claim_token`, in one short transaction (`FOR UPDATE SKIP LOCKED`
//! on PostgreSQL and MariaDB, one `UPDATE .. RETURNING` on SQLite, whose one
//! writer serializes claims). Publishing happens after it committed. Every
//! later statement — mark sent, record a failure, give back, renew — is
//! conditional on `claim_token`: once a lease ran out and another relay
//! claimed the row, the first relay's statements touch nothing.
//!
//! Rows are read column by column, so one row that cannot be decoded (SQLite
//! keeps whatever was written) becomes FAILED on its own instead of failing
//! the claim.

use chrono::{DateTime, Utc};
use sea_orm::sea_query::{Expr, ExprTrait as _};
use sea_orm::{
    ColumnTrait, ConnectionTrait, DatabaseConnection, DbBackend, DbErr, EntityTrait, QueryFilter,
    QueryResult, Statement, TransactionTrait, Value,
};
use uuid::Uuid;

use crate::entity::published::{self, Column};
use crate::{Error, Result, Status};

/// Ids per statement: statements over ~16 KB stall ~40 ms on the client
/// (sqlx 0.9.0 does not set TCP_NODELAY, launchbadge/sqlx#4335).
const CHUNK: usize = 250;

/// A claimed row as stored: what the relay needs to publish it.
#[derive(Debug, Clone)]
pub(crate) struct ClaimedRow {
    pub(crate) id: Uuid,
    pub(crate) destination: String,
    /// The body as JSON text.
    pub(crate) body: String,
    /// The headers as JSON text.
    pub(crate) headers: String,
    pub(crate) retry: i32,
    pub(crate) added: DateTime<Utc>,
}

/// A claimed row that cannot be read.
#[derive(Debug, Clone)]
pub(crate) struct BadRow {
    pub(crate) key: RowKey,
    /// The id as best it could be shown.
    pub(crate) shown: String,
    pub(crate) reason: String,
}

/// How to address a row whose id may not be a UUID.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum RowKey {
    Id(Uuid),
    /// SQLite's `rowid`.
    Rowid(i64),
}

/// One claim: its token, its lease, its rows.
#[derive(Debug, Clone)]
pub(crate) struct Claim {
    pub(crate) token: Uuid,
    pub(crate) lease_until: DateTime<Utc>,
    pub(crate) rows: Vec<ClaimedRow>,
    pub(crate) bad: Vec<BadRow>,
    /// Rows of this claim already marked FAILED because they cannot be read.
    pub(crate) unreadable: u64,
}

impl Claim {
    /// Every row the claim took, readable or not (a full claim means more is due).
    pub(crate) fn len(&self) -> usize {
        self.rows.len() + self.bad.len() + self.unreadable as usize
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One failed attempt to record.
#[derive(Debug, Clone)]
pub(crate) struct Failure {
    pub(crate) id: Uuid,
    /// Failed attempts so far, this one included.
    pub(crate) retry: i32,
    /// When to try again; `None` makes it FAILED.
    pub(crate) next_attempt_at: Option<DateTime<Utc>>,
    pub(crate) error: String,
}

#[derive(Debug, Clone)]
pub(crate) struct Store {
    db: DatabaseConnection,
    backend: DbBackend,
    /// With log-tailing capture: rows never attempted are left to the
    /// stream for this long after they were written.
    sweep_after: Option<chrono::Duration>,
}

impl Store {
    pub(crate) fn new(db: DatabaseConnection) -> Self {
        let backend = db.get_database_backend();
        Store {
            db,
            backend,
            sweep_after: None,
        }
    }

    /// Claim only what the replication stream does not send: rows with a
    /// failed attempt, and rows older than `after` (PostgreSQL).
    pub(crate) fn sweeping(mut self, after: std::time::Duration) -> Self {
        self.sweep_after = Some(chrono::Duration::from_std(after).unwrap_or(chrono::Duration::MAX));
        self
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
    ) -> Result<Claim> {
        let token = Uuid::new_v4();
        let limit = i64::from(limit);
        let results = match self.backend {
            DbBackend::Postgres => match self.sweep_after {
                None => {
                    self.query(
                        "UPDATE published SET next_attempt_at = $1, claim_token = $2 WHERE id IN (\
                           SELECT id FROM published WHERE status = 1 AND next_attempt_at <= $3 \
                           ORDER BY next_attempt_at LIMIT $4 FOR UPDATE SKIP LOCKED) \
                         RETURNING id, destination, body::text AS body, headers::text AS headers, retry, added",
                        vec![lease_until.into(), token.into(), now.into(), limit.into()],
                    )
                    .await?
                }
                Some(after) => {
                    self.query(
                        "UPDATE published SET next_attempt_at = $1, claim_token = $2 WHERE id IN (\
                           SELECT id FROM published WHERE status = 1 AND next_attempt_at <= $3 \
                             AND (retry > 0 OR added < $5) \
                           ORDER BY next_attempt_at LIMIT $4 FOR UPDATE SKIP LOCKED) \
                         RETURNING id, destination, body::text AS body, headers::text AS headers, retry, added",
                        vec![
                            lease_until.into(),
                            token.into(),
                            now.into(),
                            limit.into(),
                            (now - after).into(),
                        ],
                    )
                    .await?
                }
            },
            DbBackend::Sqlite => {
                self.query(
                    "UPDATE published SET next_attempt_at = ?, claim_token = ? WHERE id IN (\
                       SELECT id FROM published WHERE status = 1 AND next_attempt_at <= ? \
                       ORDER BY next_attempt_at LIMIT ?) \
                     RETURNING rowid AS row_key, id, destination, body, headers, retry, added",
                    vec![lease_until.into(), token.into(), now.into(), limit.into()],
                )
                .await?
            }
            DbBackend::MySql => self.claim_mysql(token, limit, now, lease_until).await?,
            #[allow(unreachable_patterns)]
            other => return Err(Error::UnsupportedBackend(format!("{other:?}"))),
        };
        let mut claim = Claim {
            token,
            lease_until,
            rows: Vec::with_capacity(results.len()),
            bad: Vec::new(),
            unreadable: 0,
        };
        for result in &results {
            match self.decode(result) {
                Ok(row) => claim.rows.push(row),
                Err(bad) => claim.bad.push(bad),
            }
        }
        // RETURNING gives no order; publish in creation order.
        claim.rows.sort_by_key(|row| (row.added, row.id));
        Ok(claim)
    }

    /// MariaDB has neither `UPDATE .. RETURNING` nor `LIMIT` in `IN` subqueries.
    async fn claim_mysql(
        &self,
        token: Uuid,
        limit: i64,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
    ) -> Result<Vec<QueryResult>> {
        let txn = self.db.begin().await?;
        let claimed = async {
            let rows = txn
                .query_all_raw(Statement::from_sql_and_values(
                    self.backend,
                    "SELECT id, destination, CAST(body AS CHAR) AS body, CAST(headers AS CHAR) AS headers, \
                       retry, added FROM published WHERE status = 1 AND next_attempt_at <= ? \
                     ORDER BY next_attempt_at LIMIT ? FOR UPDATE SKIP LOCKED",
                    vec![now.into(), limit.into()],
                ))
                .await?;
            let ids: Vec<Uuid> = rows
                .iter()
                .filter_map(|row| row.try_get::<Uuid>("", "id").ok())
                .collect();
            if !ids.is_empty() {
                published::Entity::update_many()
                    .col_expr(Column::NextAttemptAt, Expr::value(lease_until))
                    .col_expr(Column::ClaimToken, Expr::value(Some(token)))
                    .filter(Column::Id.is_in(ids))
                    .exec(&txn)
                    .await?;
            }
            Ok::<_, DbErr>(rows)
        }
        .await;
        match claimed {
            Ok(rows) => {
                txn.commit().await?;
                Ok(rows)
            }
            Err(err) => {
                // Dropping only queues the rollback; the locks would stay meanwhile.
                let _ = txn.rollback().await;
                Err(err.into())
            }
        }
    }

    async fn query(&self, sql: &str, values: Vec<Value>) -> Result<Vec<QueryResult>> {
        Ok(self
            .db
            .query_all_raw(Statement::from_sql_and_values(self.backend, sql, values))
            .await?)
    }

    fn decode(&self, result: &QueryResult) -> std::result::Result<ClaimedRow, BadRow> {
        let id = result.try_get::<Uuid>("", "id");
        let key = match (&id, self.backend) {
            (_, DbBackend::Sqlite) => result.try_get::<i64>("", "row_key").map(RowKey::Rowid),
            (Ok(id), _) => Ok(RowKey::Id(*id)),
            (Err(err), _) => Err(err.clone()),
        };
        let shown = match &id {
            Ok(id) => id.to_string(),
            Err(_) => result
                .try_get::<String>("", "id")
                .map(|text| format!("{text:?}"))
                .unwrap_or_else(|_| "<unreadable id>".to_owned()),
        };
        let bad = |reason: String| match &key {
            Ok(key) => BadRow {
                key: key.clone(),
                shown: shown.clone(),
                reason,
            },
            // Without a key the row cannot be addressed; its lease runs out
            // and the next claim meets it again.
            Err(_) => BadRow {
                key: RowKey::Rowid(-1),
                shown: shown.clone(),
                reason,
            },
        };
        let id = match id {
            Ok(id) => id,
            Err(_) => {
                return Err(bad(format!(
                    "the id {shown} is not a 16-byte UUID (rows written by other tools must store \
                     `id` as a binary UUID, as the relay's own writes do)"
                )));
            }
        };
        let column = |name: &str| -> std::result::Result<String, BadRow> {
            result
                .try_get::<String>("", name)
                .map_err(|err| bad(format!("column `{name}` cannot be read as text: {err}")))
        };
        let destination = column("destination")?;
        let body = column("body")?;
        let headers = column("headers")?;
        let retry = result
            .try_get::<i32>("", "retry")
            .map_err(|err| bad(format!("column `retry` is not an integer: {err}")))?;
        let added = result
            .try_get::<DateTime<Utc>>("", "added")
            .map_err(|err| bad(format!("column `added` is not a timestamp: {err}")))?;
        Ok(ClaimedRow {
            id,
            destination,
            body,
            headers,
            retry,
            added,
        })
    }

    /// Mark rows of claim `token` sent. Returns how many were still held.
    pub(crate) async fn mark_sent(
        &self,
        token: Uuid,
        ids: &[Uuid],
        now: DateTime<Utc>,
    ) -> Result<u64> {
        let mut marked = 0;
        for chunk in ids.chunks(CHUNK) {
            // The lease is cleared too, so a row set back to SCHEDULE by hand
            // (the django-outbox-pattern way to resend) goes out at once.
            marked += published::Entity::update_many()
                .col_expr(Column::Status, Expr::value(Status::Succeeded.code()))
                .col_expr(Column::NextAttemptAt, Expr::value(now))
                .col_expr(Column::LastError, Expr::value(Option::<String>::None))
                .col_expr(Column::ClaimToken, Expr::value(Option::<Uuid>::None))
                .filter(Column::ClaimToken.eq(token))
                .filter(Column::Id.is_in(chunk.iter().copied()))
                .exec(&self.db)
                .await?
                .rows_affected;
        }
        Ok(marked)
    }

    /// Record failed attempts of claim `token`: rows with the same attempt
    /// count, schedule and error share one statement. Returns how many rows
    /// were still held: `(scheduled again, FAILED)`.
    pub(crate) async fn mark_failed(
        &self,
        token: Uuid,
        failures: &[Failure],
        now: DateTime<Utc>,
    ) -> Result<(u64, u64)> {
        let mut groups: Vec<(&Failure, Vec<Uuid>)> = Vec::new();
        for failure in failures {
            match groups.iter_mut().find(|(first, _)| {
                first.retry == failure.retry
                    && first.next_attempt_at == failure.next_attempt_at
                    && first.error == failure.error
            }) {
                Some((_, ids)) => ids.push(failure.id),
                None => groups.push((failure, vec![failure.id])),
            }
        }
        let (mut scheduled, mut failed) = (0, 0);
        for (failure, ids) in groups {
            let (status, marked) = if failure.next_attempt_at.is_some() {
                (Status::Schedule, &mut scheduled)
            } else {
                (Status::Failed, &mut failed)
            };
            for chunk in ids.chunks(CHUNK) {
                *marked += published::Entity::update_many()
                    .col_expr(Column::Retry, Expr::value(failure.retry))
                    .col_expr(Column::Status, Expr::value(status.code()))
                    .col_expr(
                        Column::NextAttemptAt,
                        Expr::value(failure.next_attempt_at.unwrap_or(now)),
                    )
                    .col_expr(
                        Column::LastError,
                        Expr::value(Some(truncate(&failure.error))),
                    )
                    .col_expr(Column::ClaimToken, Expr::value(Option::<Uuid>::None))
                    .filter(Column::ClaimToken.eq(token))
                    .filter(Column::Id.is_in(chunk.iter().copied()))
                    .exec(&self.db)
                    .await?
                    .rows_affected;
            }
        }
        Ok((scheduled, failed))
    }

    /// FAILED at once: a row of claim `token` that can never be sent.
    pub(crate) async fn mark_unreadable(
        &self,
        token: Uuid,
        row: &BadRow,
        now: DateTime<Utc>,
    ) -> Result<u64> {
        let error = truncate(&row.reason);
        let failed = Status::Failed.code();
        let result = match (&row.key, self.backend) {
            (RowKey::Id(id), _) => {
                published::Entity::update_many()
                    .col_expr(Column::Retry, Expr::col(Column::Retry).add(1))
                    .col_expr(Column::Status, Expr::value(failed))
                    .col_expr(Column::NextAttemptAt, Expr::value(now))
                    .col_expr(Column::LastError, Expr::value(Some(error)))
                    .col_expr(Column::ClaimToken, Expr::value(Option::<Uuid>::None))
                    .filter(Column::ClaimToken.eq(token))
                    .filter(Column::Id.eq(*id))
                    .exec(&self.db)
                    .await?
                    .rows_affected
            }
            (RowKey::Rowid(rowid), DbBackend::Sqlite) if *rowid >= 0 => self
                .db
                .execute_raw(Statement::from_sql_and_values(
                    self.backend,
                    "UPDATE published SET retry = retry + 1, status = ?, next_attempt_at = ?, \
                           last_error = ?, claim_token = NULL WHERE claim_token = ? AND rowid = ?",
                    vec![
                        failed.into(),
                        now.into(),
                        error.into(),
                        token.into(),
                        (*rowid).into(),
                    ],
                ))
                .await?
                .rows_affected(),
            _ => 0,
        };
        Ok(result)
    }

    /// Give rows of claim `token` back untouched (no attempt counted).
    pub(crate) async fn release(&self, token: Uuid, ids: &[Uuid]) -> Result<u64> {
        let mut released = 0;
        for chunk in ids.chunks(CHUNK) {
            released += published::Entity::update_many()
                .col_expr(Column::NextAttemptAt, Expr::col(Column::Added))
                .col_expr(Column::ClaimToken, Expr::value(Option::<Uuid>::None))
                .filter(Column::ClaimToken.eq(token))
                .filter(Column::Id.is_in(chunk.iter().copied()))
                .filter(Column::Status.eq(Status::Schedule.code()))
                .exec(&self.db)
                .await?
                .rows_affected;
        }
        Ok(released)
    }

    /// Extend the lease of rows of claim `token` that are still in flight.
    pub(crate) async fn renew(
        &self,
        token: Uuid,
        ids: &[Uuid],
        lease_until: DateTime<Utc>,
    ) -> Result<u64> {
        let mut renewed = 0;
        for chunk in ids.chunks(CHUNK) {
            renewed += published::Entity::update_many()
                .col_expr(Column::NextAttemptAt, Expr::value(lease_until))
                .filter(Column::ClaimToken.eq(token))
                .filter(Column::Id.is_in(chunk.iter().copied()))
                .filter(Column::Status.eq(Status::Schedule.code()))
                .exec(&self.db)
                .await?
                .rows_affected;
        }
        Ok(renewed)
    }

    /// What waits in the outbox, as of `now`.
    pub(crate) async fn backlog(&self, now: DateTime<Utc>) -> Result<Backlog> {
        let sql = match self.backend {
            DbBackend::Postgres => {
                "SELECT COUNT(*) AS pending, MIN(added) AS oldest, \
                   COUNT(CASE WHEN next_attempt_at <= $1 THEN 1 END) AS due, \
                   COUNT(CASE WHEN claim_token IS NOT NULL AND next_attempt_at > $1 THEN 1 END) AS leased, \
                   MIN(CASE WHEN claim_token IS NULL THEN next_attempt_at END) AS next_due, \
                   MIN(CASE WHEN claim_token IS NOT NULL THEN next_attempt_at END) AS next_lease_end \
                 FROM published WHERE status = 1"
            }
            _ => {
                "SELECT COUNT(*) AS pending, MIN(added) AS oldest, \
                   COUNT(CASE WHEN next_attempt_at <= ? THEN 1 END) AS due, \
                   COUNT(CASE WHEN claim_token IS NOT NULL AND next_attempt_at > ? THEN 1 END) AS leased, \
                   MIN(CASE WHEN claim_token IS NULL THEN next_attempt_at END) AS next_due, \
                   MIN(CASE WHEN claim_token IS NOT NULL THEN next_attempt_at END) AS next_lease_end \
                 FROM published WHERE status = 1"
            }
        };
        let values: Vec<Value> = match self.backend {
            DbBackend::Postgres => vec![now.into()],
            _ => vec![now.into(), now.into()],
        };
        let row = self
            .db
            .query_one_raw(Statement::from_sql_and_values(self.backend, sql, values))
            .await?;
        let Some(row) = row else {
            return Ok(Backlog::default());
        };
        let count = |name: &str| -> Result<u64> {
            Ok(u64::try_from(row.try_get::<i64>("", name)?).unwrap_or(0))
        };
        let time = |name: &str| -> Result<Option<DateTime<Utc>>> {
            Ok(row.try_get::<Option<DateTime<Utc>>>("", name)?)
        };
        Ok(Backlog {
            pending: count("pending")?,
            due: count("due")?,
            leased: count("leased")?,
            oldest: time("oldest")?,
            next_due: time("next_due")?,
            next_lease_end: time("next_lease_end")?,
        })
    }
}

/// What waits in the outbox.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Backlog {
    /// Rows not yet sent (status SCHEDULE).
    pub(crate) pending: u64,
    /// Of those, claimable now.
    pub(crate) due: u64,
    /// Of those, held by a live claim.
    pub(crate) leased: u64,
    pub(crate) oldest: Option<DateTime<Utc>>,
    /// The earliest retry time of rows no one holds.
    pub(crate) next_due: Option<DateTime<Utc>>,
    /// The earliest end of a lease.
    pub(crate) next_lease_end: Option<DateTime<Utc>>,
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
