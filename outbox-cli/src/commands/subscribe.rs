use outbox_core::{Consumer, Settings, find_callback, registered_callbacks};

use crate::cli::SubscribeArgs;
use crate::commands::serve_metrics::connect_with_metrics;
use crate::signals::on_signals;

/// `outbox-cli subscribe <callback> <destination> [queue]`
pub(crate) async fn subscribe(settings: Settings, args: SubscribeArgs) -> anyhow::Result<()> {
    // Check the cheap things first, before any connection.
    let callback = find_callback(&args.callback)?;
    let shutdown = on_signals()?;
    let (db, metrics) = connect_with_metrics(&settings, args.metrics_addr).await?;
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
