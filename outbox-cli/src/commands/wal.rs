//! `outbox-cli wal setup|status|drop`

use outbox_core::Settings;

use super::database;
use crate::WalCommand;

#[cfg(feature = "postgres")]
pub(crate) async fn wal(settings: &Settings, command: WalCommand) -> anyhow::Result<()> {
    let db = database(settings).await?;
    let wal = &settings.wal;
    match command {
        WalCommand::Setup => {
            let setup = outbox_core::wal_setup(&db, wal).await?;
            println!(
                "publication {}: {} (tables: {})",
                wal.publication,
                if setup.publication_created {
                    "created"
                } else {
                    "exists"
                },
                setup.tables.join(", ")
            );
            println!(
                "slot {}: {} (pgoutput)",
                wal.slot,
                if setup.slot_created {
                    "created"
                } else {
                    "exists"
                }
            );
            println!(
                "set relay.capture = \"wal\" (OUTBOX_RELAY_CAPTURE=wal) for `outbox-cli publish`"
            );
        }
        WalCommand::Status { json } => {
            let status = outbox_core::wal_status(&db, wal).await?;
            if json {
                let slot = status.slot.as_ref().map(|s| {
                    serde_json::json!({
                        "name": s.name,
                        "active_pid": s.active_pid,
                        "wal_status": s.wal_status,
                        "confirmed_flush_lsn": s.confirmed_flush_lsn,
                        "lag_bytes": s.lag_bytes,
                        "reply_age_secs": s.reply_age_secs,
                    })
                });
                println!(
                    "{}",
                    serde_json::json!({
                        "wal_level": status.wal_level,
                        "publication": status.publication,
                        "slot": slot,
                    })
                );
                return Ok(());
            }
            println!("wal_level: {}", status.wal_level);
            match &status.publication {
                Some(tables) => println!("publication {}: {}", wal.publication, tables.join(", ")),
                None => println!(
                    "publication {}: missing (run `outbox-cli wal setup`)",
                    wal.publication
                ),
            }
            match &status.slot {
                Some(slot) => {
                    println!(
                        "slot {}: {}, wal_status {}, confirmed up to {}, holding {} bytes of WAL{}",
                        slot.name,
                        match slot.active_pid {
                            Some(pid) => format!("read by walsender PID {pid}"),
                            None => "not being read".to_owned(),
                        },
                        slot.wal_status.as_deref().unwrap_or("-"),
                        slot.confirmed_flush_lsn.as_deref().unwrap_or("-"),
                        slot.lag_bytes,
                        slot.reply_age_secs
                            .map(|age| format!(", last reply {age:.1} s ago"))
                            .unwrap_or_default()
                    );
                    if slot.lag_bytes > wal.lag_warning {
                        println!(
                            "warning: the slot holds more than wal.lag_warning ({} bytes); PostgreSQL keeps that WAL on disk until a relay confirms it",
                            wal.lag_warning
                        );
                    }
                }
                None => println!("slot {}: missing (run `outbox-cli wal setup`)", wal.slot),
            }
        }
        WalCommand::Drop => {
            let (slot, publication) = outbox_core::wal_drop(&db, wal).await?;
            println!(
                "slot {}: {}",
                wal.slot,
                if slot { "dropped" } else { "did not exist" }
            );
            println!(
                "publication {}: {}",
                wal.publication,
                if publication {
                    "dropped"
                } else {
                    "did not exist"
                }
            );
        }
    }
    Ok(())
}

#[cfg(not(feature = "postgres"))]
pub(crate) async fn wal(_settings: &Settings, _command: WalCommand) -> anyhow::Result<()> {
    anyhow::bail!(
        "this outbox-cli was built without PostgreSQL (its `postgres` feature); log-tailing capture needs it"
    )
}
