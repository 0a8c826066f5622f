//! PostgreSQL LISTEN: wake the relay as soon as new rows commit.

use std::sync::Arc;
use std::time::Duration;

use sea_orm::sqlx::postgres::PgListener;
use tokio::sync::Notify;
use tracing::{debug, warn};

use crate::backoff::Backoff;
use crate::migration::NOTIFY_CHANNEL;

/// Listen forever, reconnecting with backoff; polling covers the gaps.
pub(crate) async fn listen(url: String, wake: Arc<Notify>, maximum_backoff: Duration) {
    let mut backoff = Backoff::new(maximum_backoff);
    loop {
        match PgListener::connect(&url).await {
            Ok(mut listener) => {
                if let Err(err) = listener.listen(NOTIFY_CHANNEL).await {
                    warn!(error = %err, "LISTEN failed; relying on polling");
                } else {
                    debug!(channel = NOTIFY_CHANNEL, "listening for new outbox rows");
                    backoff.reset();
                    // Rows may have committed while we were not listening.
                    wake.notify_one();
                    loop {
                        match listener.recv().await {
                            Ok(_) => wake.notify_one(),
                            Err(err) => {
                                warn!(error = %err, "LISTEN connection lost; relying on polling until it is back");
                                break;
                            }
                        }
                    }
                }
            }
            Err(err) => {
                warn!(error = %err, "cannot open the LISTEN connection; relying on polling")
            }
        }
        tokio::time::sleep(backoff.next_delay()).await;
    }
}
