//! Opening the database the way the relay and the consumer need it.

use std::time::Duration;

use sea_orm::{ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DbBackend};

use crate::{Result, Settings};

/// Connect to `database.url` with the configured pool size. SQLite gets WAL
/// mode, so the relay can read while the application writes.
pub async fn connect(settings: &Settings) -> Result<DatabaseConnection> {
    let mut options = ConnectOptions::new(settings.database_url()?.to_owned());
    options
        .max_connections(settings.database.max_connections)
        // Open a few connections up front: a connection opened mid-run
        // costs ~90 ms (sqlx 0.9.0), a visible latency spike.
        .min_connections(settings.database.max_connections.min(4))
        .connect_timeout(Duration::from_secs(10))
        .acquire_timeout(Duration::from_secs(30))
        .sqlx_logging(false);
    let db = Database::connect(options).await?;
    if db.get_database_backend() == DbBackend::Sqlite {
        db.execute_unprepared("PRAGMA journal_mode=WAL").await?;
    }
    Ok(db)
}
