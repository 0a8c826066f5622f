//! A minimal HTTP endpoint for Prometheus: every request gets the metrics.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use outbox_core::Metrics;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;
use tracing::{info, warn};

/// Connect to the database and, when asked, serve a fresh `Metrics` for the
/// long-running commands (`publish`, `subscribe`).
pub(crate) async fn connect_with_metrics(
    settings: &outbox_core::Settings,
    metrics_addr: Option<SocketAddr>,
) -> anyhow::Result<(sea_orm::DatabaseConnection, Arc<Metrics>)> {
    let db = super::database(settings).await?;
    let metrics = Arc::new(Metrics::default());
    if let Some(addr) = metrics_addr {
        serve_metrics(addr, Arc::clone(&metrics)).await?;
    }
    Ok((db, metrics))
}

async fn serve_metrics(addr: SocketAddr, metrics: Arc<Metrics>) -> anyhow::Result<()> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} for metrics"))?;
    info!(%addr, "serving Prometheus metrics at /metrics");
    tokio::spawn(async move {
        loop {
            let (mut socket, _) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(err) => {
                    warn!(error = %err, "metrics listener failed");
                    continue;
                }
            };
            let metrics = Arc::clone(&metrics);
            tokio::spawn(async move {
                let mut request = [0u8; 1024];
                let _ = socket.read(&mut request).await;
                let body = metrics.render();
                let response = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = socket.write_all(response.as_bytes()).await;
                let _ = socket.shutdown().await;
            });
        }
    });
    Ok(())
}
