//! Deleting old rows in bounded batches, at most once per
//! `remove_data_cache_ttl` per process.
//!
//! Unlike the Python library, the outbox side deletes only SUCCEEDED rows:
//! a row that was never sent, or FAILED, stays until someone acts on it.

use std::sync::Arc;
use std::time::Instant;

use chrono::{Duration, Utc};
use moka::future::Cache;
use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, Statement};
use tracing::{info, warn};

use crate::settings::RetentionSettings;
use crate::{Result, report};

/// Which table to clean.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Table {
    /// `published`, SUCCEEDED rows only.
    Published,
    /// `received`.
    Received,
}

impl Table {
    /// The Python library's cache keys, kept for recognisability in logs.
    fn key(self) -> &'static str {
        match self {
            Table::Published => "remove_old_messages_django_outbox_pattern_publisher",
            Table::Received => "remove_old_messages_django_outbox_pattern_consumer",
        }
    }
}

/// The per-process gate plus the delete.
#[derive(Clone, Debug)]
pub(crate) struct Retention {
    gate: Cache<&'static str, ()>,
    settings: RetentionSettings,
}

impl Retention {
    pub(crate) fn new(settings: RetentionSettings) -> Self {
        Retention {
            gate: Cache::builder()
                .time_to_live(settings.remove_data_cache_ttl)
                .build(),
            settings,
        }
    }

    /// Clean `table` unless it was cleaned within the TTL. Runs in the
    /// background so the caller's loop never waits on a long delete.
    pub(crate) async fn maybe_spawn(self: &Arc<Self>, db: &DatabaseConnection, table: Table) {
        let entry = self.gate.entry(table.key()).or_insert(()).await;
        if !entry.is_fresh() {
            return;
        }
        let this = Arc::clone(self);
        let db = db.clone();
        tokio::spawn(async move {
            if let Err(err) = this.clean(&db, table).await {
                warn!(table = ?table, error = %report(&err), "retention cleanup failed; will try again after the TTL");
            }
        });
    }

    /// Delete rows older than `days_to_keep`, `batch_size` at a time.
    pub(crate) async fn clean(&self, db: &DatabaseConnection, table: Table) -> Result<u64> {
        let started = Instant::now();
        let cutoff = Utc::now() - Duration::days(i64::from(self.settings.days_to_keep));
        let backend = db.get_database_backend();
        let filter = match table {
            Table::Published => "status = 2 AND added < ",
            Table::Received => "added < ",
        };
        let name = match table {
            Table::Published => "published",
            Table::Received => "received",
        };
        let (placeholder_1, placeholder_2) = match backend {
            DbBackend::Postgres => ("$1", "$2"),
            _ => ("?", "?"),
        };
        let sql = match backend {
            DbBackend::MySql => {
                format!("DELETE FROM {name} WHERE {filter}{placeholder_1} LIMIT {placeholder_2}")
            }
            _ => format!(
                "DELETE FROM {name} WHERE id IN (SELECT id FROM {name} WHERE {filter}{placeholder_1} LIMIT {placeholder_2})"
            ),
        };
        let mut deleted = 0;
        loop {
            let result = db
                .execute_raw(Statement::from_sql_and_values(
                    backend,
                    &sql,
                    vec![cutoff.into(), i64::from(self.settings.batch_size).into()],
                ))
                .await?;
            deleted += result.rows_affected();
            if result.rows_affected() < u64::from(self.settings.batch_size) {
                break;
            }
        }
        if deleted > 0 {
            info!(table = name, deleted, days_to_keep = self.settings.days_to_keep, elapsed = ?started.elapsed(), "deleted old rows");
        }
        Ok(deleted)
    }
}
