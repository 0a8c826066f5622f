//! The command line, as clap types. Doc comments are the `--help` text.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Transactional outbox for SeaORM and RabbitMQ, wire-compatible with django-outbox-pattern.
#[derive(Debug, Parser)]
#[command(name = "outbox-cli", version, about, after_help = ENVIRONMENT)]
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

const ENVIRONMENT: &str = "\
Environment:
  DATABASE_URL             postgres://, mysql:// or sqlite:// (database.url)
  AMQP_URL                 amqp://user:password@host:5672/vhost (broker.url)
  OUTBOX_CONFIG            settings file, instead of ./outbox.toml
  OUTBOX_<SECTION>_<KEY>   any setting, e.g. OUTBOX_RELAY_BATCH_SIZE=500
  RUST_LOG                 log filter (default: info,sqlx=warn,lapin=off,async_nats=warn)";

/// Everything `outbox-cli` does.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create or upgrade the `published` and `received` tables (idempotent).
    Migrate,
    /// Write one message into the outbox, with the headers a save writes (for the relay to send).
    Send(SendArgs),
    /// Relay outbox rows to the broker (RabbitMQ or NATS JetStream) until SIGTERM/SIGINT.
    Publish(PublishArgs),
    /// Consume a destination with a registered callback until SIGTERM/SIGINT.
    Subscribe(SubscribeArgs),
    /// List the callbacks this binary can run.
    Callbacks,
    /// Counts per destination and status, oldest pending age, failed count.
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Inspect, retry or discard FAILED outbox rows.
    #[command(subcommand)]
    Failed(FailedCommand),
    /// Inspect or replay a consumer's dead letters (`DLQ.<queue>`; on NATS `DLQ.<stream>.<durable>`).
    #[command(subcommand)]
    Dlq(DlqCommand),
    /// Create or show the NATS JetStream stream the relay writes to (`nats.*` settings).
    #[command(subcommand)]
    Stream(StreamCommand),
    /// Set up, show or remove PostgreSQL log-tailing capture (`relay.capture = "wal"`, `wal.*` settings).
    #[command(subcommand)]
    Wal(WalCommand),
}

/// `wal ...`
#[derive(Debug, Subcommand)]
pub enum WalCommand {
    /// Check the server and create the publication and the logical slot if missing (idempotent).
    Setup,
    /// Show the publication, the slot, who reads it and how much WAL it holds.
    Status {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Drop the slot and the publication (refused while a relay reads the slot).
    Drop,
}

/// `stream ...`
#[derive(Debug, Subcommand)]
pub enum StreamCommand {
    /// Create the stream, or bring an existing one to the settings (idempotent).
    Create,
    /// Show the stream as the server has it.
    Show,
}

/// `failed ...`
#[derive(Debug, Subcommand)]
pub enum FailedCommand {
    /// List FAILED rows with their last error, oldest first.
    List {
        /// Only this destination.
        #[arg(long)]
        destination: Option<String>,
        /// At most this many rows.
        #[arg(long, default_value_t = 100)]
        limit: u64,
        /// Print JSON lines.
        #[arg(long)]
        json: bool,
    },
    /// Show one FAILED row in full.
    Show {
        /// The row id (= dop-msg-id).
        id: uuid::Uuid,
    },
    /// Schedule FAILED rows again with fresh attempts.
    Retry {
        /// The row id; or use --all / --destination.
        #[arg(required_unless_present_any = ["all", "destination"], conflicts_with_all = ["all", "destination"])]
        id: Option<uuid::Uuid>,
        /// Every FAILED row.
        #[arg(long, conflicts_with = "destination")]
        all: bool,
        /// Every FAILED row of this destination.
        #[arg(long)]
        destination: Option<String>,
    },
    /// Delete one FAILED row for good (logged).
    Discard {
        /// The row id.
        id: uuid::Uuid,
    },
}

/// `dlq ...`
#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// Show messages in DLQ.<queue> (NATS: the durable's dead letters) without removing them.
    List {
        /// The consumer's queue (not the DLQ name).
        queue: String,
        /// At most this many messages.
        #[arg(long, default_value_t = 20)]
        limit: usize,
        /// Print JSON lines.
        #[arg(long)]
        json: bool,
    },
    /// Move messages from DLQ.<queue> back to <queue> (NATS: to the subject each failed on), each removed only after the broker confirmed it.
    Replay {
        /// The consumer's queue (not the DLQ name).
        queue: String,
        /// At most this many messages (default: all).
        #[arg(long)]
        limit: Option<u64>,
    },
}

/// `send`
#[derive(Debug, Args)]
pub struct SendArgs {
    /// Where it goes: /topic/<routing key>, /exchange/<exchange>/<routing key>, /queue/<queue>.
    pub destination: String,
    /// The body: JSON text (quote it for the shell), or `-` to read it from standard input.
    pub body: String,
    /// A header to add, as NAME=VALUE (repeat for more). `dop-*` headers are the outbox's own.
    #[arg(long = "header", value_name = "NAME=VALUE")]
    pub headers: Vec<String>,
    /// Append `.<version>` to the destination and send `dop-version: <version>`.
    #[arg(long, value_name = "VERSION")]
    pub version: Option<String>,
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
