//! One module per subcommand.

mod admin;
mod migrate;
mod publish;
mod send;
mod serve_metrics;
mod subscribe;
mod wal;

pub(crate) use admin::{dlq, failed, status, stream};
pub(crate) use migrate::migrate;
pub(crate) use publish::publish;
pub(crate) use send::send;
pub(crate) use subscribe::{callbacks, subscribe};
pub(crate) use wal::wal;

use anyhow::Context as _;

/// The database `database.url` names, for any command.
async fn database(settings: &outbox_core::Settings) -> anyhow::Result<sea_orm::DatabaseConnection> {
    outbox_core::connect(settings)
        .await
        .context("cannot connect to the database")
}
