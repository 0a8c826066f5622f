use outbox_core::{callback, Batch, BatchResult};

#[callback(batch)]
pub async fn on_orders(batch: Batch, extra: u32) -> BatchResult {
    let _ = extra;
    let txn = batch.begin().await?;
    Ok(batch.save(txn).await?)
}

fn main() {}
