use outbox_core::Settings;

use crate::cli::SubscribeArgs;

/// `outbox-cli subscribe <callback> <destination> [queue]`
pub(crate) async fn subscribe(_settings: Settings, _args: SubscribeArgs) -> anyhow::Result<()> {
    anyhow::bail!("subscribe is not available yet")
}

/// `outbox-cli callbacks`
pub(crate) fn callbacks() -> anyhow::Result<()> {
    anyhow::bail!("callbacks are not available yet")
}
