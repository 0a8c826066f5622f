use std::io::Read as _;

use anyhow::{Context as _, bail};
use outbox_core::{Message, Settings};

use crate::cli::SendArgs;

/// `outbox-cli send <destination> <json> [--header NAME=VALUE].. [--version V]`
pub(crate) async fn send(settings: &Settings, args: SendArgs) -> anyhow::Result<()> {
    let message = message(args)?;
    let db = super::database(settings).await?;
    let row = outbox_core::write(&db, message).await?;
    println!(
        "wrote {} to {} (`outbox-cli publish --until-empty` sends it)",
        row.id, row.destination
    );
    Ok(())
}

/// Everything is checked before the database is touched.
fn message(args: SendArgs) -> anyhow::Result<Message> {
    let text = if args.body == "-" {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .context("cannot read the body from standard input")?;
        text
    } else {
        args.body
    };
    let body: serde_json::Value = serde_json::from_str(&text).map_err(|err| {
        anyhow::anyhow!(
            "the body is not JSON ({err}); give it as one argument, quoted for the shell, e.g. '{{\"id\": 1}}'"
        )
    })?;
    let mut message = Message::new(&args.destination, body)?;
    if let Some(version) = args.version {
        message = message.with_version(version)?;
    }
    for header in args.headers {
        let Some((name, value)) = header.split_once('=') else {
            bail!("--header {header:?} has no `=`; write it as NAME=VALUE");
        };
        message = message.with_header(name, value)?;
    }
    Ok(message)
}
