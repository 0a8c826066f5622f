use std::sync::Arc;

use anyhow::Context as _;
use outbox_core::{Metrics, Relay, Settings};
use tracing::info;

use crate::cli::PublishArgs;
use crate::commands::serve_metrics::serve_metrics;
use crate::progress::Progress;
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
    let report = if args.until_empty {
        // A drain is a long operation: show how far it got, on terminals.
        let total = outbox_core::outbox_status(&db).await?.pending;
        let counter = Arc::clone(&metrics);
        let display = tokio::spawn(async move {
            let mut progress = Progress::new();
            loop {
                progress.update("relayed", Metrics::get(&counter.published), Some(total));
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
        });
        let report = Relay::new(db, settings)
            .with_metrics(metrics)
            .run_until_empty(shutdown)
            .await;
        display.abort();
        Progress::new().end_line();
        report?
    } else {
        Relay::new(db, settings)
            .with_metrics(metrics)
            .run(shutdown)
            .await?
    };
    info!(
        published = report.published,
        retried = report.retried,
        failed = report.failed,
        "done"
    );
    Ok(())
}
