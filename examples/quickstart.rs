#![allow(unreachable_pub)]
//! Quick start: save models, relay their events to RabbitMQ, consume them.
//!
//! Needs only RabbitMQ on localhost (the database is a SQLite file):
//!
//!     scripts/demo.sh            # or: cargo run --example quickstart
//!     scripts/demo.sh nats       # the same over NATS JetStream (AMQP_URL=nats://127.0.0.1:4222)
//!
//! `DATABASE_URL` (default `sqlite://target/quickstart.db?mode=rwc`) and
//! `AMQP_URL` (default `amqp://guest:guest@127.0.0.1:5672/%2f`) override.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use outbox_core::{
    CallbackResult, Consumer, Payload, PublishExt, Relay, Settings, Shutdown, shutdown_channel,
};
use sea_orm::{
    ActiveValue::Set, ConnectionTrait, EntityTrait, PaginatorTrait, Schema, TransactionTrait,
};

mod order {
    use outbox_core::Publish;
    use sea_orm::entity::prelude::*;

    /// An order; every save emits `/topic/quickstart.orders.v1`.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel, Publish)]
    #[sea_orm(table_name = "quickstart_orders")]
    #[publish(destination = "/topic/quickstart.orders", fields = [customer, total], version = "v1")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i32,
        pub customer: String,
        #[sea_orm(column_type = "Decimal(Some((10, 2)))")]
        pub total: Decimal,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// The consumer's callback: print the event, record it as processed.
async fn on_order(payload: Payload) -> CallbackResult {
    println!(
        "  consumed {} {} (correlation {})",
        payload.header("destination").unwrap_or("?"),
        payload.body(),
        payload.correlation_id()
    );
    Ok(payload.save_alone().await?)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
        .init();

    let mut settings = Settings::load(None)?;
    if settings.database.url.is_none() {
        std::fs::create_dir_all("target")?;
        let _ = std::fs::remove_file("target/quickstart.db");
        settings.database.url = Some("sqlite://target/quickstart.db?mode=rwc".to_owned());
    }
    // Shown without passwords: URLs in output always go through redact.
    println!(
        "database: {}",
        outbox_core::redact::url(settings.database_url()?)
    );
    println!(
        "broker:   {}",
        outbox_core::redact::url(&settings.broker.url)
    );

    let run = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    let nats = settings.broker.is_nats();
    if nats {
        // JetStream keeps messages in a stream: this run's own (the server
        // may be shared), made here and removed at the end.
        settings.nats.stream = format!("QUICKSTART_{run}");
        settings.nats.subject_prefix = format!("quickstart{run}");
        let (change, stream) = outbox_core::ensure_stream(&settings).await?;
        println!(
            "stream:   {} on {} ({change:?})",
            stream.name,
            stream.subjects.join(",")
        );
    }

    // 1. Schema: the outbox tables, and our own table.
    let db = outbox_core::connect(&settings).await?;
    outbox_core::migrate(&db).await?;
    let backend = db.get_database_backend();
    let mut create = Schema::new(backend).create_table_from_entity(order::Entity);
    db.execute(create.if_not_exists()).await?;

    // 2. The consumer declares its queue first, so nothing published is unroutable.
    // The queue is this run's own (the broker may be shared), removed at the end.
    let queue_name = format!(
        "quickstart-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let handled = Arc::new(Mutex::new(BTreeSet::new()));
    let seen = Arc::clone(&handled);
    let consumer = Consumer::new(
        db.clone(),
        settings.clone(),
        "/topic/quickstart.orders.v1",
        Some(&queue_name),
        move |payload: Payload| {
            let seen = Arc::clone(&seen);
            async move {
                let id = payload.msg_id().unwrap_or_default().to_owned();
                let handled = on_order(payload).await;
                seen.lock().map(|mut seen| seen.insert(id)).ok();
                handled
            }
        },
    )?;
    let queue = consumer.declare().await?;
    println!(
        "queue:    {} (dead letters: {})",
        queue.queue, queue.dead_letter_queue
    );

    // 3. Save orders: each save and its outbox row commit in one transaction.
    println!("saving three orders, and one in a transaction that rolls back");
    for (customer, cents) in [("ada", 1250), ("grace", 999), ("linus", 4200)] {
        order::ActiveModel {
            customer: Set(customer.to_owned()),
            total: Set(rust_decimal::Decimal::new(cents, 2)),
            ..Default::default()
        }
        .insert_and_publish(&db)
        .await?;
    }
    let txn = db.begin().await?;
    order::ActiveModel {
        customer: Set("nobody".to_owned()),
        total: Set(rust_decimal::Decimal::new(1, 2)),
        ..Default::default()
    }
    .insert_and_publish(&txn)
    .await?;
    txn.rollback().await?;
    // The outbox row ids are the message ids the consumer will see.
    let ours: BTreeSet<String> = outbox_core::entity::published::Entity::find()
        .all(&db)
        .await?
        .iter()
        .map(|row| row.id.to_string())
        .collect();
    println!(
        "  {} orders, {} outbox rows",
        order::Entity::find().count(&db).await?,
        ours.len()
    );

    // 4. Relay the outbox to the broker (publisher confirms / PubAcks), then stop.
    let report = Relay::new(db.clone(), settings.clone())
        .run_until_empty(Shutdown::never())
        .await?;
    println!(
        "relayed {} messages (confirmed by the broker)",
        report.published
    );

    // 5. Consume them.
    let (stop, shutdown) = shutdown_channel();
    let running = tokio::spawn(consumer.run(shutdown));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !handled.lock().is_ok_and(|seen| seen.is_superset(&ours)) {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for the consumer"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.trigger();
    let consumed = running.await??;
    let received = outbox_core::entity::received::Entity::find()
        .count(&db)
        .await?;
    println!(
        "consumed {} messages, {received} recorded in `received`",
        consumed.saved
    );
    if nats {
        delete_stream(&settings).await?;
    } else {
        delete_queue(&settings.broker.url, &queue).await?;
    }
    anyhow::ensure!(
        report.published == 3 && ours.len() == 3 && consumed.saved >= 3,
        "expected 3 messages end to end"
    );
    println!(
        "done: save → outbox → {} → callback, nothing lost, nothing twice",
        if nats { "NATS JetStream" } else { "RabbitMQ" }
    );
    Ok(())
}

/// Remove this run's queues (the consumer's declaration leaves them for the
/// next run, as a service wants; a demo does not).
async fn delete_queue(url: &str, queue: &outbox_core::QueueDeclaration) -> anyhow::Result<()> {
    use lapin::options::QueueDeleteOptions;
    let connection =
        lapin::Connection::connect(url, lapin::ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    for name in [&queue.queue, &queue.dead_letter_queue] {
        channel
            .queue_delete(name.as_str().into(), QueueDeleteOptions::default())
            .await?;
    }
    connection.close(0, "".into()).await?;
    Ok(())
}

/// The NATS counterpart: remove this run's streams (and so its durable).
async fn delete_stream(settings: &Settings) -> anyhow::Result<()> {
    let client = async_nats::connect(&settings.broker.url).await?;
    let jetstream = async_nats::jetstream::new(client);
    jetstream.delete_stream(&settings.nats.stream).await?;
    jetstream
        .delete_stream(format!("{}_DLQ", settings.nats.stream))
        .await?;
    Ok(())
}
