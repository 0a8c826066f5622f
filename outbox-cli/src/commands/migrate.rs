use outbox_core::Settings;

/// `outbox-cli migrate`
pub(crate) async fn migrate(settings: &Settings) -> anyhow::Result<()> {
    let db = super::database(settings).await?;
    let migration = outbox_core::migrate(&db).await?;
    if !migration.created.is_empty() {
        println!("created tables: {}", migration.created.join(", "));
    }
    if !migration.added.is_empty() {
        println!("added columns: {}", migration.added.join(", "));
    }
    if migration.created.is_empty() && migration.added.is_empty() {
        println!("outbox tables are up to date");
    }
    Ok(())
}
