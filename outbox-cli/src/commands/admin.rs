//! `status`, `failed ...`, `dlq ...` and `stream ...`.

use outbox_core::{FailedSelection, Settings};

use super::database;
use crate::cli::{DlqCommand, FailedCommand, StreamCommand};
use crate::progress::Progress;

/// `outbox-cli status [--json]`
pub(crate) async fn status(settings: &Settings, json: bool) -> anyhow::Result<()> {
    let status = outbox_core::outbox_status(&database(settings).await?).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&status)?);
        return Ok(());
    }
    println!(
        "{:<60} {:>10} {:>10} {:>10}",
        "DESTINATION", "SCHEDULE", "SUCCEEDED", "FAILED"
    );
    for d in &status.destinations {
        println!(
            "{:<60} {:>10} {:>10} {:>10}",
            d.destination, d.schedule, d.succeeded, d.failed
        );
    }
    println!(
        "{:<60} {:>10} {:>10} {:>10}",
        "TOTAL", status.pending, status.succeeded, status.failed
    );
    match status.oldest_pending_age_seconds {
        Some(age) => println!("oldest pending: {age:.1} s"),
        None => println!("oldest pending: none"),
    }
    println!("received (inbox): {}", status.received);
    if status.failed > 0 {
        println!("{} FAILED: see `outbox-cli failed list`", status.failed);
    }
    if settings.broker.is_nats() {
        match outbox_core::stream_info(settings).await? {
            Some(stream) => print_stream(&stream),
            None => println!(
                "stream {}: does not exist (create it with `outbox-cli stream create`)",
                settings.nats.stream
            ),
        }
    }
    Ok(())
}

fn print_stream(stream: &outbox_core::StreamInfo) {
    println!(
        "stream {}: subjects {}, {} storage, duplicate window {} s, {} replica(s), {} messages, {} bytes",
        stream.name,
        stream.subjects.join(","),
        stream.storage,
        stream.duplicate_window_secs,
        stream.replicas,
        stream.messages,
        stream.bytes
    );
}

/// `outbox-cli stream create|show`
pub(crate) async fn stream(settings: &Settings, command: StreamCommand) -> anyhow::Result<()> {
    match command {
        StreamCommand::Create => {
            let (change, stream) = outbox_core::ensure_stream(settings).await?;
            let done = match change {
                outbox_core::StreamChange::Created => "created",
                outbox_core::StreamChange::Updated => "updated",
                outbox_core::StreamChange::Unchanged => "already as configured",
            };
            println!("{done}");
            print_stream(&stream);
        }
        StreamCommand::Show => match outbox_core::stream_info(settings).await? {
            Some(stream) => print_stream(&stream),
            None => anyhow::bail!(
                "stream {} does not exist; create it with `outbox-cli stream create`",
                settings.nats.stream
            ),
        },
    }
    Ok(())
}

/// `outbox-cli failed list|show|retry|discard`
pub(crate) async fn failed(settings: &Settings, command: FailedCommand) -> anyhow::Result<()> {
    let db = database(settings).await?;
    match command {
        FailedCommand::List {
            destination,
            limit,
            json,
        } => {
            let rows = outbox_core::failed_messages(&db, destination.as_deref(), limit).await?;
            for row in &rows {
                if json {
                    println!("{}", row_json(row));
                } else {
                    println!(
                        "{}  {}  attempts={}  added={}  error: {}",
                        row.id,
                        row.destination,
                        row.retry,
                        row.added.to_rfc3339(),
                        row.last_error.as_deref().unwrap_or("-")
                    );
                }
            }
            if !json {
                eprintln!("{} FAILED row(s) shown", rows.len());
            }
        }
        FailedCommand::Show { id } => {
            let row = outbox_core::failed_message(&db, id).await?;
            println!("{}", serde_json::to_string_pretty(&row_json(&row))?);
        }
        FailedCommand::Retry {
            id,
            all,
            destination,
        } => {
            let selection = match (id, all, destination) {
                (Some(id), _, _) => FailedSelection::Id(id),
                (None, true, _) => FailedSelection::All,
                (None, false, Some(destination)) => FailedSelection::Destination(destination),
                (None, false, None) => anyhow::bail!("give a row id, --all or --destination"),
            };
            let rows = outbox_core::retry_failed(&db, &selection).await?;
            println!("{rows} row(s) scheduled again");
        }
        FailedCommand::Discard { id } => {
            let row = outbox_core::discard_failed(&db, id).await?;
            println!("discarded {} ({})", row.id, row.destination);
        }
    }
    Ok(())
}

fn row_json(row: &outbox_core::entity::published::Model) -> serde_json::Value {
    serde_json::json!({
        "id": row.id,
        "destination": row.destination,
        "version": row.version,
        "status": row.status.name(),
        "attempts": row.retry,
        "last_error": row.last_error,
        "added": row.added,
        "headers": row.headers,
        "body": row.body,
    })
}

/// `outbox-cli dlq list|replay <queue>`
pub(crate) async fn dlq(settings: &Settings, command: DlqCommand) -> anyhow::Result<()> {
    match command {
        DlqCommand::List { queue, limit, json } => {
            let letters = outbox_core::dead_letters(settings, &queue, limit).await?;
            for letter in &letters {
                if json {
                    println!("{}", serde_json::to_string(letter)?);
                } else {
                    println!(
                        "{}  {}  error: {}  {}",
                        letter.msg_id.as_deref().unwrap_or("<no id>"),
                        letter.death.as_deref().unwrap_or("-"),
                        letter.error.as_deref().unwrap_or("- (rejected without a reason; consumer.dead_letter = \"publish\" keeps it)"),
                        letter.body
                    );
                }
            }
            if !json {
                eprintln!(
                    "{} dead letter(s) of {queue} shown (left in place)",
                    letters.len()
                );
            }
        }
        DlqCommand::Replay { queue, limit } => {
            let mut progress = Progress::new();
            let moved = outbox_core::replay_dead_letters(settings, &queue, limit, |n| {
                progress.update("replayed", n, limit)
            })
            .await?;
            progress.end_line();
            println!("replayed {moved} dead letter(s) of {queue}");
        }
    }
    Ok(())
}
