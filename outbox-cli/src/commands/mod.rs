//! One module per subcommand.

mod migrate;
mod publish;
mod serve_metrics;
mod subscribe;

pub(crate) use migrate::migrate;
pub(crate) use publish::publish;
pub(crate) use subscribe::{callbacks, subscribe};
