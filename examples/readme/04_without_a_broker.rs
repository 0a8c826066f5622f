use outbox_core::{Consumer, MemoryBroker, PublishFault, Relay, Settings, Shutdown};

async fn without_a_broker(db: DatabaseConnection, settings: Settings) -> outbox_core::Result<()> {
    let broker = MemoryBroker::new();
    broker.script_publishes(|envelope| {
        if envelope.destination.as_str().ends_with(".flaky") { PublishFault::Nack } else { PublishFault::Deliver }
    });
    let consumer = Consumer::new(db.clone(), settings.clone(), "/topic/orders.created", Some("shipping"), on_order)?
        .with_transport(broker.clone());
    consumer.declare().await?;
    Relay::new(db, settings).with_transport(broker.clone()).run_until_empty(Shutdown::never()).await?;
    assert!(broker.messages("DLQ.shipping").is_empty());
    Ok(())
}
