//! The command line, as clap types. Doc comments are the `--help` text.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Transactional outbox for SeaORM and RabbitMQ, wire-compatible with django-outbox-pattern.
#[derive(Debug, Parser)]
#[command(name = "outbox-cli", version, about)]
pub struct Cli {
    /// Settings file (TOML). Default: $OUTBOX_CONFIG, else ./outbox.toml when present.
    #[arg(long, global = true, value_name = "PATH")]
    pub config: Option<PathBuf>,

    /// Log as JSON lines instead of text.
    #[arg(long, global = true)]
    pub json_logs: bool,

    #[command(subcommand)]
    pub command: Command,
}

/// Everything `outbox-cli` does.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create or upgrade the `published` and `received` tables (idempotent).
    Migrate,
    /// Relay outbox rows to RabbitMQ until SIGTERM/SIGINT.
    Publish(PublishArgs),
    /// Consume a destination with a registered callback until SIGTERM/SIGINT.
    Subscribe(SubscribeArgs),
    /// List the callbacks this binary can run.
    Callbacks,
}

/// `publish`
#[derive(Debug, Args)]
pub struct PublishArgs {
    /// Relay what is schedulable now, then exit (for batch jobs and benchmarks).
    #[arg(long)]
    pub until_empty: bool,

    /// Serve Prometheus metrics on this address (e.g. 127.0.0.1:9187).
    #[arg(long, value_name = "ADDR")]
    pub metrics_addr: Option<SocketAddr>,
}

/// `subscribe <callback> <destination> [queue]`
#[derive(Debug, Args)]
pub struct SubscribeArgs {
    /// The callback's full path, e.g. `my_service::handlers::on_order` (see `outbox-cli callbacks`).
    pub callback: String,

    /// The destination, e.g. /topic/orders.created.v1, /exchange/ex/key, /queue/name.
    pub destination: String,

    /// The queue to consume. Default: the text after the last `/` of the destination.
    pub queue: Option<String>,

    /// Serve Prometheus metrics on this address (e.g. 127.0.0.1:9188).
    #[arg(long, value_name = "ADDR")]
    pub metrics_addr: Option<SocketAddr>,
}
