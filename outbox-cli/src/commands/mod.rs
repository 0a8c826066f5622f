//! One module per subcommand.

mod admin;
mod migrate;
mod publish;
mod send;
mod serve_metrics;
mod subscribe;

pub(crate) use admin::{dlq, failed, status};
pub(crate) use migrate::migrate;
pub(crate) use publish::publish;
pub(crate) use send::send;
pub(crate) use subscribe::{callbacks, subscribe};
