//! Provisioning for log-tailing capture: the publication the slot streams,
//! the logical slot itself, and the server settings both need, each
//! checked with the fix in the error.

use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, Statement, Value};

use crate::settings::WalSettings;
use crate::{Error, Result};

/// What `wal setup` found or did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalSetup {
    /// Whether the publication was created now (else it existed).
    pub publication_created: bool,
    /// The tables it publishes.
    pub tables: Vec<String>,
    /// Whether the slot was created now (else it existed).
    pub slot_created: bool,
}

/// The slot as `pg_replication_slots` shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct SlotState {
    /// Its name.
    pub name: String,
    /// Whether a relay reads it now, and the PID of that walsender.
    pub active_pid: Option<i32>,
    /// `reserved`, `extended`, `unreserved` or `lost`.
    pub wal_status: Option<String>,
    /// Where a relay resumes.
    pub confirmed_flush_lsn: Option<String>,
    /// WAL the slot holds beyond its confirmed position, in bytes.
    pub lag_bytes: u64,
    /// Seconds since the reader last reported a position (active slots).
    pub reply_age_secs: Option<f64>,
}

/// `wal status`.
#[derive(Debug, Clone, PartialEq)]
pub struct WalStatus {
    /// The server's `wal_level`.
    pub wal_level: String,
    /// The publication's tables, if it exists.
    pub publication: Option<Vec<String>>,
    /// The slot, if it exists.
    pub slot: Option<SlotState>,
}

fn postgres_only(db: &DatabaseConnection) -> Result<()> {
    if db.get_database_backend() == DbBackend::Postgres {
        Ok(())
    } else {
        Err(Error::Capture {
            problem: "log-tailing capture reads PostgreSQL's logical replication".to_owned(),
            fix: "use relay.capture = \"claim\" with MariaDB and SQLite".to_owned(),
        })
    }
}

async fn text(db: &DatabaseConnection, sql: &str, values: Vec<Value>) -> Result<Option<String>> {
    let row = db
        .query_one_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            sql,
            values,
        ))
        .await?;
    Ok(match row {
        Some(row) => row.try_get_by_index::<Option<String>>(0)?,
        None => None,
    })
}

/// The server settings capture needs, each with its fix.
async fn check_server(db: &DatabaseConnection) -> Result<()> {
    let level = text(db, "SELECT current_setting('wal_level')", vec![])
        .await?
        .unwrap_or_default();
    if level != "logical" {
        return Err(Error::Capture {
            problem: format!("the server's wal_level is `{level}`, logical decoding needs `logical`"),
            fix: "run `ALTER SYSTEM SET wal_level = logical` as a superuser and restart PostgreSQL (scripts/services.sh does both on a development machine)".to_owned(),
        });
    }
    let may = text(
        db,
        "SELECT (rolreplication OR rolsuper)::text FROM pg_roles WHERE rolname = current_user",
        vec![],
    )
    .await?;
    if may.as_deref() != Some("true") {
        return Err(Error::Capture {
            problem: "the database user may not open replication connections".to_owned(),
            fix: "run `ALTER ROLE <user> REPLICATION` as a superuser".to_owned(),
        });
    }
    Ok(())
}

async fn publication_tables(db: &DatabaseConnection, name: &str) -> Result<Option<Vec<String>>> {
    let exists = text(
        db,
        "SELECT pubname::text FROM pg_publication WHERE pubname = $1",
        vec![name.into()],
    )
    .await?;
    if exists.is_none() {
        return Ok(None);
    }
    let rows = db
        .query_all_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "SELECT tablename::text FROM pg_publication_tables WHERE pubname = $1 ORDER BY 1",
            vec![name.into()],
        ))
        .await?;
    let mut tables = Vec::with_capacity(rows.len());
    for row in rows {
        tables.push(row.try_get_by_index::<String>(0)?);
    }
    Ok(Some(tables))
}

/// Create what is missing: the publication (on `published`, inserts only)
/// and the logical slot (pgoutput). Running it again changes nothing.
pub async fn wal_setup(db: &DatabaseConnection, wal: &WalSettings) -> Result<WalSetup> {
    postgres_only(db)?;
    check_server(db).await?;
    crate::schema::check(db, crate::schema::Need::Outbox).await?;
    let publication_created = match publication_tables(db, &wal.publication).await? {
        Some(_) => false,
        None => {
            // Names are checked to be [a-z0-9_] by the settings.
            db.execute_unprepared(&format!(
                "CREATE PUBLICATION {} FOR TABLE published WITH (publish = 'insert')",
                wal.publication
            ))
            .await?;
            true
        }
    };
    let tables = publication_tables(db, &wal.publication)
        .await?
        .unwrap_or_default();
    let slot_created = if slot_state(db, &wal.slot).await?.is_some() {
        false
    } else {
        create_slot(db, &wal.slot).await?;
        true
    };
    Ok(WalSetup {
        publication_created,
        tables,
        slot_created,
    })
}

async fn slot_state(db: &DatabaseConnection, slot: &str) -> Result<Option<SlotState>> {
    let row = db
        .query_one_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "SELECT s.slot_name::text, s.active_pid, s.wal_status, s.confirmed_flush_lsn::text, \
               COALESCE(pg_wal_lsn_diff(pg_current_wal_lsn(), s.confirmed_flush_lsn), 0)::bigint, \
               EXTRACT(EPOCH FROM now() - r.reply_time)::float8 \
             FROM pg_replication_slots s LEFT JOIN pg_stat_replication r ON r.pid = s.active_pid \
             WHERE s.slot_name = $1",
            vec![slot.into()],
        ))
        .await?;
    let Some(row) = row else {
        return Ok(None);
    };
    Ok(Some(SlotState {
        name: row.try_get_by_index(0)?,
        active_pid: row.try_get_by_index(1)?,
        wal_status: row.try_get_by_index(2)?,
        confirmed_flush_lsn: row.try_get_by_index(3)?,
        lag_bytes: u64::try_from(row.try_get_by_index::<i64>(4)?).unwrap_or(0),
        reply_age_secs: row.try_get_by_index(5)?,
    }))
}

async fn create_slot(db: &DatabaseConnection, slot: &str) -> Result<()> {
    let created = db
        .execute_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
            vec![slot.into()],
        ))
        .await;
    match created {
        Ok(_) => Ok(()),
        Err(err) if err.to_string().contains("all replication slots are in use") => {
            Err(Error::Capture {
                problem: "every replication slot of the server is in use".to_owned(),
                fix: "raise max_replication_slots (a restart) or drop an unused slot".to_owned(),
            })
        }
        Err(err) => Err(err.into()),
    }
}

/// A slot that is missing or lost (`wal_status = lost`) is made anew;
/// `false` when it is there and fine (the problem is elsewhere).
pub(crate) async fn recreate_if_gone(db: &DatabaseConnection, wal: &WalSettings) -> Result<bool> {
    match slot_state(db, &wal.slot).await? {
        None => {}
        Some(SlotState {
            wal_status: Some(status),
            active_pid: None,
            ..
        }) if status == "lost" => {
            db.execute_raw(Statement::from_sql_and_values(
                DbBackend::Postgres,
                "SELECT pg_drop_replication_slot($1)",
                vec![wal.slot.clone().into()],
            ))
            .await?;
        }
        Some(_) => return Ok(false),
    }
    create_slot(db, &wal.slot).await?;
    Ok(true)
}

/// The publication, the slot and its lag.
pub async fn wal_status(db: &DatabaseConnection, wal: &WalSettings) -> Result<WalStatus> {
    postgres_only(db)?;
    Ok(WalStatus {
        wal_level: text(db, "SELECT current_setting('wal_level')", vec![])
            .await?
            .unwrap_or_default(),
        publication: publication_tables(db, &wal.publication).await?,
        slot: slot_state(db, &wal.slot).await?,
    })
}

/// Drop the slot and the publication. A slot a relay is reading is
/// refused: stop that relay first. Returns what existed.
pub async fn wal_drop(db: &DatabaseConnection, wal: &WalSettings) -> Result<(bool, bool)> {
    postgres_only(db)?;
    let slot = slot_state(db, &wal.slot).await?;
    if let Some(SlotState {
        active_pid: Some(pid),
        ..
    }) = &slot
    {
        return Err(Error::Capture {
            problem: format!(
                "the slot `{}` is being read (walsender PID {pid})",
                wal.slot
            ),
            fix: "stop the relay that reads it (relay.capture = \"wal\") first".to_owned(),
        });
    }
    if slot.is_some() {
        db.execute_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "SELECT pg_drop_replication_slot($1)",
            vec![wal.slot.clone().into()],
        ))
        .await?;
    }
    let publication = publication_tables(db, &wal.publication).await?.is_some();
    if publication {
        db.execute_unprepared(&format!("DROP PUBLICATION {}", wal.publication))
            .await?;
    }
    Ok((slot.is_some(), publication))
}

/// The publication `wal.publication` is not there, with the fix.
pub(crate) fn missing_publication(wal: &WalSettings) -> Error {
    Error::Capture {
        problem: format!("the publication `{}` does not exist", wal.publication),
        fix: "run `outbox-cli wal setup`, or set wal.publication to an existing publication"
            .to_owned(),
    }
}

/// The slot `wal.slot` is not there, with the fix.
pub(crate) fn missing_slot(wal: &WalSettings) -> Error {
    Error::Capture {
        problem: format!("the replication slot `{}` does not exist", wal.slot),
        fix: "run `outbox-cli wal setup` (it creates the slot and the publication)".to_owned(),
    }
}

/// Before a relay starts reading: the server, the publication and the slot.
pub(crate) async fn check(db: &DatabaseConnection, wal: &WalSettings) -> Result<()> {
    postgres_only(db)?;
    check_server(db).await?;
    if publication_tables(db, &wal.publication).await?.is_none() {
        return Err(missing_publication(wal));
    }
    match slot_state(db, &wal.slot).await? {
        None => Err(missing_slot(wal)),
        Some(SlotState {
            wal_status: Some(status),
            ..
        }) if status == "lost" => Err(Error::Capture {
            problem: format!(
                "the replication slot `{}` lost WAL it needed (wal_status = lost; max_slot_wal_keep_size was reached)",
                wal.slot
            ),
            fix: "run `outbox-cli wal drop` then `outbox-cli wal setup`; rows of `published` not sent meanwhile go out through the claim path after wal.sweep_after".to_owned(),
        }),
        Some(_) => Ok(()),
    }
}
