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
        last_error text NULL
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

/// Create or upgrade the outbox tables on `db`. Safe to run any number of times.
pub async fn migrate<C: ConnectionTrait>(db: &C) -> Result<()> {
    let backend = db.get_database_backend();
    let statements = match backend {
        DbBackend::Postgres => POSTGRES,
        DbBackend::MySql => MYSQL,
        DbBackend::Sqlite => SQLITE,
        #[allow(unreachable_patterns)]
        other => return Err(Error::UnsupportedBackend(format!("{other:?}"))),
    };
    if backend == DbBackend::MySql {
        mysql_upgrade(db).await?;
    }
    for statement in statements {
        db.execute_unprepared(statement).await?;
    }
    info!(backend = ?backend, "outbox tables are up to date");
    Ok(())
}

/// Tables created by the Python library lack the relay's columns; MySQL has
/// no `ADD COLUMN IF NOT EXISTS` before MariaDB, so check first.
async fn mysql_upgrade<C: ConnectionTrait>(db: &C) -> Result<()> {
    let exists = db
        .query_one_raw(sea_orm::Statement::from_string(
            DbBackend::MySql,
            "SELECT COUNT(*) AS n FROM information_schema.columns \
             WHERE table_schema = DATABASE() AND table_name = 'published' AND column_name = 'next_attempt_at'",
        ))
        .await?
        .map(|row| row.try_get::<i64>("", "n"))
        .transpose()?
        .unwrap_or(0);
    let table = db
        .query_one_raw(sea_orm::Statement::from_string(
            DbBackend::MySql,
            "SELECT COUNT(*) AS n FROM information_schema.tables \
             WHERE table_schema = DATABASE() AND table_name = 'published'",
        ))
        .await?
        .map(|row| row.try_get::<i64>("", "n"))
        .transpose()?
        .unwrap_or(0);
    if table > 0 && exists == 0 {
        db.execute_unprepared(
            "ALTER TABLE published \
             ADD COLUMN next_attempt_at datetime(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6), \
             ADD COLUMN last_error text NULL, \
             ADD INDEX published_schedulable (status, next_attempt_at)",
        )
        .await?;
    }
    Ok(())
}
