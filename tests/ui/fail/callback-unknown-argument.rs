use outbox_core::{callback, CallbackResult, Payload};

#[callback(each)]
pub async fn on_order(payload: Payload) -> CallbackResult {
    Ok(payload.save_alone().await?)
}

fn main() {}
