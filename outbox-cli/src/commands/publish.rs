use std::sync::Arc;

use anyhow::Context as _;
use outbox_core::{Metrics, Relay, Settings};
use tracing::info;

use crate::cli::PublishArgs;
use crate::commands::serve_metrics::serve_metrics;
use crate::signals::on_signals;

/// `outbox-cli publish [--until-empty] [--metrics-addr ADDR]`
pub(crate) async fn publish(settings: Settings, args: PublishArgs) -> anyhow::Result<()> {
    let shutdown = on_signals()?;
    let db = outbox_core::connect(&settings)
        .await
        .context("cannot connect to the database")?;
    let metrics = Arc::new(Metrics::default());
    if let Some(addr) = args.metrics_addr {
        serve_metrics(addr, Arc::clone(&metrics)).await?;
    }
    let relay = Relay::new(db, settings).with_metrics(metrics);
    let report = if args.until_empty {
        relay.run_until_empty(shutdown).await?
    } else {
        relay.run(shutdown).await?
    };
    info!(
        published = report.published,
        retried = report.retried,
        failed = report.failed,
        "done"
    );
    Ok(())
}
