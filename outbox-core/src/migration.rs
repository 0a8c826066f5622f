//! The schema: `published` and `received`, as django-outbox-pattern lays them
//! out, plus the relay's columns and indexes. Every statement is idempotent,
//! so `migrate` can run at every deploy, and it upgrades tables the Python
//! library created.

use sea_orm::{ConnectionTrait, DbBackend};
use tracing::info;

use crate::{Error, Result};

/// The PostgreSQL channel the relay listens on; a trigger notifies it when
/// rows become schedulable.
pub const NOTIFY_CHANNEL: &str = "outbox_published";

const POSTGRES: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS published (
        id uuid PRIMARY KEY,
        version varchar(100) NULL,
        destination varchar(255) NOT NULL,
        body jsonb NOT NULL,
        added timestamptz NOT NULL,
        expires_at timestamptz NOT NULL,
        retry integer NOT NULL DEFAULT 0 CHECK (retry >= 0),
        status integer NOT NULL DEFAULT 1,
        headers jsonb NOT NULL DEFAULT '{}'
    )",
    "CREATE INDEX IF NOT EXISTS published_added_9200ad78 ON published (added)",
    "CREATE INDEX IF NOT EXISTS published_status_27c9ec_btree ON published (status)",
    "ALTER TABLE published ADD COLUMN IF NOT EXISTS next_attempt_at timestamptz NOT NULL DEFAULT now()",
    "ALTER TABLE published ADD COLUMN IF NOT EXISTS last_error text NULL",
    "ALTER TABLE published ADD COLUMN IF NOT EXISTS claim_token uuid NULL",
    // Only schedulable rows: the claim stays fast however many sent rows pile up.
    "CREATE INDEX IF NOT EXISTS published_schedulable ON published (next_attempt_at) WHERE status = 1",
    "CREATE TABLE IF NOT EXISTS received (
        id uuid PRIMARY KEY,
        msg_id varchar(100) NULL,
        headers jsonb NULL,
        body jsonb NULL,
        added timestamptz NOT NULL,
        expires_at timestamptz NOT NULL,
        retry integer NOT NULL DEFAULT 0 CHECK (retry >= 0),
        status integer NOT NULL DEFAULT 2
    )",
    "CREATE UNIQUE INDEX IF NOT EXISTS received_msg_id_b112b413_uniq ON received (msg_id)",
    "CREATE INDEX IF NOT EXISTS received_added_0e9924c0 ON received (added)",
    "CREATE OR REPLACE FUNCTION outbox_notify_published() RETURNS trigger LANGUAGE plpgsql AS $$
     BEGIN
        PERFORM pg_notify('outbox_published', '');
        RETURN NULL;
     END $$",
    "DROP TRIGGER IF EXISTS outbox_published_notify ON published",
    "CREATE TRIGGER outbox_published_notify AFTER INSERT OR UPDATE OF status ON published
     FOR EACH ROW WHEN (NEW.status = 1) EXECUTE FUNCTION outbox_notify_published()",
];

const MYSQL: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS published (
        id binary(16) NOT NULL PRIMARY KEY,
        version varchar(100) NULL,
        destination varchar(255) NOT NULL,
        body json NOT NULL,
        added datetime(6) NOT NULL,
        expires_at datetime(6) NOT NULL,
        retry integer NOT NULL DEFAULT 0 CHECK (retry >= 0),
        status integer NOT NULL DEFAULT 1,
        headers json NOT NULL DEFAULT ('{}'),
        next_attempt_at datetime(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
        last_error text NULL,
        claim_token binary(16) NULL,
        INDEX published_added_9200ad78 (added),
        INDEX published_status_27c9ec_btree (status),
        INDEX published_schedulable (status, next_attempt_at)
    )",
    "CREATE TABLE IF NOT EXISTS received (
        id binary(16) NOT NULL PRIMARY KEY,
        msg_id varchar(100) NULL,
        headers json NULL,
        body json NULL,
        added datetime(6) NOT NULL,
        expires_at datetime(6) NOT NULL,
        retry integer NOT NULL DEFAULT 0 CHECK (retry >= 0),
        status integer NOT NULL DEFAULT 2,
        UNIQUE INDEX received_msg_id_b112b413_uniq (msg_id),
        INDEX received_added_0e9924c0 (added)
    )",
];

const SQLITE: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS published (
        id blob NOT NULL PRIMARY KEY,
        version varchar(100) NULL,
        destination varchar(255) NOT NULL,
        body text NOT NULL,
        added text NOT NULL,
        expires_at text NOT NULL,
        retry integer NOT NULL DEFAULT 0 CHECK (retry >= 0),
        status integer NOT NULL DEFAULT 1,
        headers text NOT NULL DEFAULT '{}',
        next_attempt_at text NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%f+00:00', 'now')),
        last_error text NULL,
        claim_token blob NULL
    )",
    "CREATE INDEX IF NOT EXISTS published_added_9200ad78 ON published (added)",
    "CREATE INDEX IF NOT EXISTS published_status_27c9ec_btree ON published (status)",
    "CREATE INDEX IF NOT EXISTS published_schedulable ON published (next_attempt_at) WHERE status = 1",
    "CREATE TABLE IF NOT EXISTS received (
        id blob NOT NULL PRIMARY KEY,
        msg_id varchar(100) NULL UNIQUE,
        headers text NULL,
        body text NULL,
        added text NOT NULL,
        expires_at text NOT NULL,
        retry integer NOT NULL DEFAULT 0 CHECK (retry >= 0),
        status integer NOT NULL DEFAULT 2
    )",
    "CREATE INDEX IF NOT EXISTS received_added_0e9924c0 ON received (added)",
];

/// What [`migrate`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Migration {
    /// Tables that did not exist and were created.
    pub created: Vec<&'static str>,
    /// Columns added to tables that existed (e.g. created by the Python library).
    pub added: Vec<String>,
}

/// Create or upgrade the outbox tables on `db`. Safe to run any number of times.
pub async fn migrate<C: ConnectionTrait>(db: &C) -> Result<Migration> {
    let backend = db.get_database_backend();
    let statements = match backend {
        DbBackend::Postgres => POSTGRES,
        DbBackend::MySql => MYSQL,
        DbBackend::Sqlite => SQLITE,
        #[allow(unreachable_patterns)]
        other => return Err(Error::UnsupportedBackend(format!("{other:?}"))),
    };
    let mut migration = Migration::default();
    for table in ["published", "received"] {
        if !table_exists(db, table).await? {
            migration.created.push(table);
        }
    }
    // Tables from the Python library or an older outbox lack the relay's
    // columns; neither MySQL nor SQLite has `ADD COLUMN IF NOT EXISTS`.
    if backend != DbBackend::Postgres && !migration.created.contains(&"published") {
        for (column, mysql, sqlite) in UPGRADES {
            if !column_exists(db, "published", column).await? {
                let ddl = if backend == DbBackend::MySql {
                    mysql
                } else {
                    sqlite
                };
                db.execute_unprepared(ddl).await?;
                migration.added.push(format!("published.{column}"));
            }
        }
    }
    if backend == DbBackend::Postgres && !migration.created.contains(&"published") {
        for (column, _, _) in UPGRADES {
            if !column_exists(db, "published", column).await? {
                migration.added.push(format!("published.{column}"));
            }
        }
    }
    for statement in statements {
        db.execute_unprepared(statement).await?;
    }
    if migration.created.is_empty() && migration.added.is_empty() {
        info!(backend = ?backend, "outbox tables are up to date");
    } else {
        info!(backend = ?backend, created = ?migration.created, added = ?migration.added, "outbox tables migrated");
    }
    Ok(migration)
}

/// Columns added after the first release, as `(name, MySQL DDL, SQLite DDL)`;
/// PostgreSQL's statements add them with `IF NOT EXISTS`.
const UPGRADES: &[(&str, &str, &str)] = &[
    (
        "next_attempt_at",
        "ALTER TABLE published ADD COLUMN next_attempt_at datetime(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6), \
         ADD INDEX published_schedulable (status, next_attempt_at)",
        "ALTER TABLE published ADD COLUMN next_attempt_at text NOT NULL DEFAULT '1970-01-01T00:00:00+00:00'",
    ),
    (
        "last_error",
        "ALTER TABLE published ADD COLUMN last_error text NULL",
        "ALTER TABLE published ADD COLUMN last_error text NULL",
    ),
    (
        "claim_token",
        "ALTER TABLE published ADD COLUMN claim_token binary(16) NULL",
        "ALTER TABLE published ADD COLUMN claim_token blob NULL",
    ),
];

async fn table_exists<C: ConnectionTrait>(db: &C, table: &str) -> Result<bool> {
    let backend = db.get_database_backend();
    let sql = match backend {
        DbBackend::Postgres => format!(
            "SELECT COUNT(*) AS n FROM information_schema.tables \
             WHERE table_schema = current_schema() AND table_name = '{table}'"
        ),
        DbBackend::MySql => format!(
            "SELECT COUNT(*) AS n FROM information_schema.tables \
             WHERE table_schema = DATABASE() AND table_name = '{table}'"
        ),
        _ => format!(
            "SELECT COUNT(*) AS n FROM sqlite_master WHERE type = 'table' AND name = '{table}'"
        ),
    };
    count(db, sql).await.map(|n| n > 0)
}

async fn column_exists<C: ConnectionTrait>(db: &C, table: &str, column: &str) -> Result<bool> {
    let backend = db.get_database_backend();
    let sql = match backend {
        DbBackend::Postgres => format!(
            "SELECT COUNT(*) AS n FROM information_schema.columns \
             WHERE table_schema = current_schema() AND table_name = '{table}' AND column_name = '{column}'"
        ),
        DbBackend::MySql => format!(
            "SELECT COUNT(*) AS n FROM information_schema.columns \
             WHERE table_schema = DATABASE() AND table_name = '{table}' AND column_name = '{column}'"
        ),
        _ => format!(
            "SELECT COUNT(*) AS n FROM pragma_table_info('{table}') WHERE name = '{column}'"
        ),
    };
    count(db, sql).await.map(|n| n > 0)
}

async fn count<C: ConnectionTrait>(db: &C, sql: String) -> Result<i64> {
    let backend = db.get_database_backend();
    Ok(db
        .query_one_raw(sea_orm::Statement::from_string(backend, sql))
        .await?
        .map(|row| row.try_get::<i64>("", "n"))
        .transpose()?
        .unwrap_or(0))
}
