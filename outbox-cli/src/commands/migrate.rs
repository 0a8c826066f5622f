use anyhow::Context as _;
use outbox_core::Settings;

/// `outbox-cli migrate`
pub(crate) async fn migrate(settings: &Settings) -> anyhow::Result<()> {
    let db = outbox_core::connect(settings)
        .await
        .context("cannot connect to the database")?;
    outbox_core::migrate(&db).await?;
    Ok(())
}
