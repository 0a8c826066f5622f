use outbox_core::{callback, CallbackResult, Payload};

#[callback]   // registered as my_service::handlers::on_order
pub async fn on_order(payload: Payload) -> CallbackResult {
    let order: OrderCreated = payload.json()?;
    let txn = payload.begin().await?;
    shipment::ActiveModel { order_id: Set(order.id), ..Default::default() }.insert(&txn).await?;
    Ok(payload.save(txn).await?)       // writes `received`, commits; the ack follows
    // or: Ok(payload.nack("reason"))  // to DLQ.<queue>
}

fn main() { outbox_cli::main() }       // your binary: every outbox-cli command + your callbacks
