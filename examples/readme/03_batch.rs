use outbox_core::{callback, Batch, BatchResult};
use sea_orm::EntityTrait;

#[callback(batch)]   // one call per batch: its new messages (duplicates are acked before)
pub async fn on_orders(batch: Batch) -> BatchResult {
    let txn = batch.begin().await?;    // the batch's transaction; its `received` rows are in it
    let mut shipments = Vec::new();
    for payload in batch.payloads() {
        match payload.json::<OrderCreated>() {
            Ok(order) => shipments.push(shipment::ActiveModel { order_id: Set(order.id), ..Default::default() }),
            Err(err) => batch.nack(payload, format!("not an order: {err}"))?,   // this one to DLQ.<queue>
        }
    }
    if !shipments.is_empty() {
        shipment::Entity::insert_many(shipments).exec(&txn).await?;       // one statement for all
    }
    Ok(batch.save(txn).await?)         // the others commit together; then the acks
}
