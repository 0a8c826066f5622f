//! `outbox-cli`: the commands over `outbox-core`.
//!
//! A service that owns callbacks builds its own binary that calls
//! [`main`], so `subscribe` finds the callbacks linked into it:
//!
//! ```ignore
//! #[outbox_core::callback]
//! async fn on_order(payload: outbox_core::Payload) -> outbox_core::CallbackResult { .. }
//!
//! fn main() { outbox_cli::main() }
//! ```
//!
//! This crate's API exists for that binary and is not semver-stable otherwise.

pub mod callbacks;
mod cli;
mod commands;
mod progress;
mod signals;

pub use cli::{
    Cli, Command, DlqCommand, FailedCommand, PublishArgs, SendArgs, StreamCommand, SubscribeArgs,
    WalCommand,
};

use std::io::IsTerminal as _;

use clap::Parser;

/// Parse the command line, run the command, print the error chain and exit
/// non-zero on failure.
pub fn main() {
    let cli = Cli::parse();
    run_main(cli.json_logs, || run(cli));
}

/// What [`main`] does around a command, for service binaries that add
/// commands of their own next to the outbox ones (flatten [`Command`] into
/// your clap enum and call [`run`] for it): logging to stderr (`RUST_LOG`,
/// colours only on a terminal), a multi-threaded runtime, and on error the
/// whole chain printed as `error: ...` with exit status 1.
pub fn run_main<F, Fut>(json_logs: bool, command: F)
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    init_logging(json_logs);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            std::process::exit(1);
        }
    };
    if let Err(err) = runtime.block_on(command()) {
        eprintln!("error: {}", report(&err));
        std::process::exit(1);
    }
}

/// Run one command.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let settings = outbox_core::Settings::load(cli.config.as_deref())?;
    for (name, near) in outbox_core::Settings::unknown_environment() {
        match near {
            Some(near) => tracing::warn!(
                "environment variable {name} names no setting and is ignored; did you mean {near}?"
            ),
            None => tracing::warn!(
                "environment variable {name} names no setting and is ignored (`outbox-cli --help` lists them)"
            ),
        }
    }
    match cli.command {
        Command::Migrate => commands::migrate(&settings).await,
        Command::Send(args) => commands::send(&settings, args).await,
        Command::Publish(args) => commands::publish(settings, args).await,
        Command::Subscribe(args) => commands::subscribe(settings, args).await,
        Command::Callbacks => commands::callbacks(),
        Command::Status { json } => commands::status(&settings, json).await,
        Command::Failed(command) => commands::failed(&settings, command).await,
        Command::Dlq(command) => commands::dlq(&settings, command).await,
        Command::Stream(command) => commands::stream(&settings, command).await,
        Command::Wal(command) => commands::wal(&settings, command).await,
    }
}

/// The error and its causes on one line, each text once, secrets masked.
fn report(err: &anyhow::Error) -> String {
    outbox_core::report(err.as_ref())
}

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        // lapin logs returned messages in full (bodies included) and its own
        // view of channel closes we handle; our own lines report both.
        .unwrap_or_else(|_| {
            tracing_subscriber::EnvFilter::new("info,sqlx=warn,lapin=off,async_nats=warn")
        });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}
