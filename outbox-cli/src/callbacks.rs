//! Callbacks that ship with `outbox-cli`, so `subscribe` is usable out of the box.

use std::io::Write as _;

use outbox_core::{CallbackResult, Payload, callback};

/// Print each message as one JSON line on stdout (`msg_id`, `headers`,
/// `body`, `received_at`) and record it in `received`, so a redelivery is
/// skipped. `outbox-cli subscribe outbox_cli::callbacks::json_lines /topic/x`
#[callback]
pub async fn json_lines(payload: Payload) -> CallbackResult {
    let line = serde_json::json!({
        "msg_id": payload.msg_id(),
        "headers": payload.headers(),
        "body": payload.body(),
        "body_error": payload.body_error(),
        "received_at": chrono::Utc::now().to_rfc3339(),
    });
    let handled = payload.save_alone().await?;
    if handled.is_saved() {
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "{line}")?;
        stdout.flush()?;
    }
    Ok(handled)
}
