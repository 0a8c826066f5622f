#![allow(unreachable_pub)]
//! A Rust service and a Python django-outbox-pattern service exchanging events both ways.
//!
//! This is the Rust half: an "orders" service with its own PostgreSQL database.
//!
//! - **Rust → Python.** Saving an [`order`] writes the order row and its event
//!   (`/topic/django_interop.orders.created.v1`) in one transaction, through
//!   `#[derive(Publish)]`; the relay then moves the event to RabbitMQ. A Django service runs
//!   `manage.py subscribe` on that destination, with the unmodified Python library.
//! - **Python → Rust.** The Django service emits invoice events the documented Python way
//!   (`Published.objects.create(...)`, sent by `manage.py publish`) on
//!   `/topic/django_interop.invoices`. [`on_invoice`], a `#[callback]`, stores each one as an
//!   [`invoice`] row, in the same transaction as the `received` row that makes a redelivery a
//!   no-op.
//!
//! Run both halves together with `examples/django_interop.sh`, which sets up the Python side in
//! a virtual environment and tells the story of what went each way. On its own:
//!
//! ```sh
//! DATABASE_URL=postgres://postgres@127.0.0.1/orders cargo run -p outbox-examples --example django_interop
//! ```
//!
//! Environment: `DATABASE_URL` (required), `AMQP_URL` (default the local broker),
//! `EXPECT_INVOICES` (how many Python events to wait for; default 3), `WAIT_SECONDS`
//! (default 60).

use std::time::Duration;

use outbox_core::{
    CallbackResult, Consumer, Payload, PublishExt, Relay, Settings, Shutdown, callback,
    find_callback, shutdown_channel,
};
use rust_decimal::Decimal;
use sea_orm::{
    ActiveModelTrait, ActiveValue::Set, ConnectionTrait, EntityTrait, PaginatorTrait, QueryOrder,
    Schema,
};
use serde::Deserialize;

/// Where our order events go. `version = "v1"` below makes the routing key `….created.v1`.
const ORDERS: &str = "/topic/django_interop.orders.created";
/// What the Python service publishes, and the queue we consume it from.
const INVOICES: &str = "/topic/django_interop.invoices";
const INVOICE_QUEUE: &str = "django_interop_rust_invoices";

/// Our own model. Every save through `insert_and_publish` also writes the event
/// `{"id", "customer", "total", "placed_at"}`, encoded as the Python library encodes it
/// (the decimal as a string, the datetime ISO 8601 to the millisecond with `Z`).
mod order {
    use outbox_core::Publish;
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel, Publish)]
    #[sea_orm(table_name = "orders")]
    #[publish(destination = "/topic/django_interop.orders.created", version = "v1")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i32,
        pub customer: String,
        #[sea_orm(column_type = "Decimal(Some((10, 2)))")]
        pub total: Decimal,
        pub placed_at: DateTimeUtc,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// What we keep of each invoice event the Python service sent.
mod invoice {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "invoices")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i32,
        /// The `id` in the Python event's body.
        pub python_id: i64,
        #[sea_orm(column_type = "Decimal(Some((10, 2)))")]
        pub price: Decimal,
        /// The `dop-msg-id` header: the Python outbox row's id.
        pub msg_id: String,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// The body of a Python invoice event: `{"id": 1, "price": "1.50", "source": "python"}`
/// (django-outbox-pattern sends decimals as strings).
#[derive(Debug, Deserialize)]
struct InvoiceEvent {
    id: i64,
    price: String,
}

/// Handle one invoice event from the Python service.
///
/// `#[callback]` registers this function as `django_interop::on_invoice`: a service binary whose
/// `main` is `outbox_cli::main()` can run it with
/// `subscribe django_interop::on_invoice /topic/django_interop.invoices <queue>`. Here `main`
/// looks it up by that path and consumes in-process.
#[callback]
pub async fn on_invoice(payload: Payload) -> CallbackResult {
    let event: InvoiceEvent = payload.json()?;
    let txn = payload.begin().await?;
    invoice::ActiveModel {
        python_id: Set(event.id),
        price: Set(event.price.parse::<Decimal>()?),
        msg_id: Set(payload.msg_id().unwrap_or_default().to_owned()),
        ..Default::default()
    }
    .insert(&txn)
    .await?;
    // Writes `received` in the same transaction and commits; the ack follows the commit.
    Ok(payload.save(txn).await?)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
        .init();
    let expect: u64 = env_or("EXPECT_INVOICES", 3)?;
    let wait = Duration::from_secs(env_or("WAIT_SECONDS", 60)?);

    // Settings as every outbox process reads them: DATABASE_URL, AMQP_URL, OUTBOX_*.
    let settings = Settings::load(None)?;
    let db = outbox_core::connect(&settings).await?;
    outbox_core::migrate(&db).await?; // the `published` and `received` tables
    let backend = db.get_database_backend();
    let schema = Schema::new(backend);
    db.execute(
        schema
            .create_table_from_entity(order::Entity)
            .if_not_exists(),
    )
    .await?;
    db.execute(
        schema
            .create_table_from_entity(invoice::Entity)
            .if_not_exists(),
    )
    .await?;

    // Python → Rust, part 1: declare our queue (exactly as a Python subscriber would) and
    // start consuming, so the Python events have somewhere to go.
    let consumer = Consumer::new(
        db.clone(),
        settings.clone(),
        INVOICES,
        Some(INVOICE_QUEUE),
        find_callback("django_interop::on_invoice")?,
    )?;
    let queues = consumer.declare().await?;
    let (stop, shutdown) = shutdown_channel();
    let consuming = tokio::spawn(consumer.run(shutdown));
    say(format!(
        "consuming {INVOICES} from queue {} (dead letters: {})",
        queues.queue, queues.dead_letter_queue
    ));

    // Rust → Python: save orders; each save commits the order and its outbox row together.
    for (customer, cents) in [("ada", 1250), ("grace", 999), ("linus", 4200)] {
        let order = order::ActiveModel {
            customer: Set(customer.to_owned()),
            total: Set(Decimal::new(cents, 2)),
            placed_at: Set(chrono::Utc::now()),
            ..Default::default()
        }
        .insert_and_publish(&db)
        .await?;
        say(format!(
            "saved order {} ({customer}, {}) and its event",
            order.id, order.total
        ));
    }
    // The relay (what `outbox-cli publish` runs): publish with confirms, mark sent.
    let report = Relay::new(db.clone(), settings.clone())
        .run_until_empty(Shutdown::never())
        .await?;
    say(format!(
        "relayed {} events to {ORDERS}.v1 (confirmed by RabbitMQ)",
        report.published
    ));
    anyhow::ensure!(report.published == 3, "expected to relay 3 events");

    // Python → Rust, part 2: wait for the Python service's invoices.
    say(format!("waiting for {expect} invoice events from Python"));
    let deadline = tokio::time::Instant::now() + wait;
    while invoice::Entity::find().count(&db).await? < expect {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "timed out after {wait:?} waiting for {expect} invoices from Python"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.trigger();
    let consumed = consuming.await??;
    for invoice in invoice::Entity::find()
        .order_by_asc(invoice::Column::Id)
        .all(&db)
        .await?
    {
        say(format!(
            "invoice {} for {} from Python (dop-msg-id {})",
            invoice.python_id, invoice.price, invoice.msg_id
        ));
    }
    say(format!(
        "consumed {} invoice events ({} duplicates skipped, {} dead-lettered)",
        consumed.saved, consumed.duplicates, consumed.dead_lettered
    ));
    anyhow::ensure!(
        consumed.saved == expect && consumed.dead_lettered == 0,
        "expected {expect} invoices saved and none dead-lettered"
    );
    Ok(())
}

fn say(line: String) {
    println!("[rust]   {line}");
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> anyhow::Result<T> {
    match std::env::var(name) {
        Ok(value) => value
            .parse()
            .map_err(|_| anyhow::anyhow!("{name}={value} is not valid")),
        Err(_) => Ok(default),
    }
}
