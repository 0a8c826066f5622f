use std::sync::Arc;

use outbox_core::{Metrics, Relay, Settings};
use tracing::info;

use crate::cli::PublishArgs;
use crate::commands::serve_metrics::connect_with_metrics;
use crate::progress::Progress;
use crate::signals::on_signals;

/// `outbox-cli publish [--until-empty] [--metrics-addr ADDR]`
pub(crate) async fn publish(settings: Settings, args: PublishArgs) -> anyhow::Result<()> {
    let shutdown = on_signals()?;
    let (db, metrics) = connect_with_metrics(&settings, args.metrics_addr).await?;
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
        unsent = report.unsent,
        "done"
    );
    if report.unsent > 0 {
        anyhow::bail!(
            "{} row(s) left unsent: they wait for a later attempt or another relay holds them \
             (see `outbox-cli status` and `outbox-cli failed list`)",
            report.unsent
        );
    }
    Ok(())
}
