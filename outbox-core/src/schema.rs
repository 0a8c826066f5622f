//! Checking at start that the tables a command needs are there, so a
//! missing migration is one clear error instead of a failure per message.

use sea_orm::{ConnectionTrait, DatabaseConnection, Statement};

use crate::{Error, Result};

/// What a command reads and writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Need {
    /// `published` with the relay's columns.
    Outbox,
    /// `received`.
    Inbox,
}

/// Fail with [`Error::SchemaMissing`] when a needed table or column is
/// missing; other database errors (an outage) pass through as they are.
pub(crate) async fn check(db: &DatabaseConnection, need: Need) -> Result<()> {
    let (what, sql) = match need {
        Need::Outbox => (
            "`published` table with the relay's columns (next_attempt_at, last_error, claim_token)",
            "SELECT id, next_attempt_at, last_error, claim_token FROM published WHERE 1 = 0",
        ),
        Need::Inbox => (
            "`received` table",
            "SELECT id, msg_id FROM received WHERE 1 = 0",
        ),
    };
    let backend = db.get_database_backend();
    match db.query_all_raw(Statement::from_string(backend, sql)).await {
        Ok(_) => Ok(()),
        Err(err) if is_missing(&err) => Err(Error::SchemaMissing {
            what: what.to_owned(),
            source: err,
        }),
        Err(err) => Err(err.into()),
    }
}

/// Undefined table or column, in each backend's words.
pub(crate) fn is_missing(err: &sea_orm::DbErr) -> bool {
    use sea_orm::{DbErr, RuntimeErr};
    let (DbErr::Exec(RuntimeErr::SqlxError(e)) | DbErr::Query(RuntimeErr::SqlxError(e))) = err
    else {
        return false;
    };
    let sea_orm::sqlx::Error::Database(db) = e.as_ref() else {
        return false;
    };
    // PostgreSQL undefined_table / undefined_column; MySQL 1146 / 1054.
    if matches!(
        db.code().as_deref(),
        Some("42P01" | "42703" | "42S02" | "42S22")
    ) {
        return true;
    }
    let message = db.message();
    message.contains("no such table") || message.contains("no such column")
}
