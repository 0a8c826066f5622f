use std::sync::Arc;

use anyhow::Context as _;
use outbox_core::{Consumer, Metrics, Settings, find_callback, registered_callbacks};

use crate::cli::SubscribeArgs;
use crate::commands::serve_metrics::serve_metrics;
use crate::signals::on_signals;

/// `outbox-cli subscribe <callback> <destination> [queue]`
pub(crate) async fn subscribe(settings: Settings, args: SubscribeArgs) -> anyhow::Result<()> {
    // Check the cheap things first, before any connection.
    let callback = find_callback(&args.callback)?;
    let shutdown = on_signals()?;
    let db = outbox_core::connect(&settings)
        .await
        .context("cannot connect to the database")?;
    let metrics = Arc::new(Metrics::default());
    if let Some(addr) = args.metrics_addr {
        serve_metrics(addr, Arc::clone(&metrics)).await?;
    }
    let consumer = Consumer::new(
        db,
        settings,
        &args.destination,
        args.queue.as_deref(),
        callback,
    )?
    .with_metrics(metrics);
    consumer.run(shutdown).await?;
    Ok(())
}

/// `outbox-cli callbacks`
pub(crate) fn callbacks() -> anyhow::Result<()> {
    for path in registered_callbacks() {
        println!("{path}");
    }
    Ok(())
}
