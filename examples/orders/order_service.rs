#![allow(unreachable_pub)]
//! The order service of the orders example: it owns the `orders` and `order_lines` tables in
//! its own database and tells the world about them through the outbox.
//!
//! - `place` writes an order, its lines and the event `/topic/orders.created.v1` (the order with
//!   its lines and total) in one transaction.
//! - `cancel-line` marks one line cancelled and writes `/topic/orders.line_cancelled.v1` in the
//!   same transaction, through `update_and_publish`.
//! - `migrate`, `publish` and every other `outbox-cli` command are passed through, so this one
//!   binary is also the service's relay.
//!
//! ```sh
//! export DATABASE_URL=postgres://postgres@127.0.0.1/orders
//! order_service migrate && order_service setup
//! order_service publish &                       # the relay, until SIGTERM
//! order_service place --customer ada --item BOOK-1:2:12.50 --item PEN-2:1:3.20
//! order_service cancel-line --order 1 --line 2
//! ```
//!
//! `examples/orders/run.sh` runs it together with the shipment service.

use std::path::PathBuf;
use std::str::FromStr;

use anyhow::{Context as _, bail, ensure};
use clap::{Parser, Subcommand};
use outbox_core::{PublishExt, Settings};
use rust_decimal::Decimal;
use sea_orm::{
    ActiveModelTrait, ActiveValue::Set, ConnectionTrait, DatabaseConnection, EntityTrait,
    IntoActiveModel, QuerySelect, Schema, TransactionTrait,
};

/// An order. Placing one emits `/topic/orders.created.v1`, whose body is the whole order:
/// `{"id", "customer", "placed_at", "total", "lines": [{"id", "sku", "quantity", "price"}]}`.
mod order {
    use outbox_core::{BodyValue, Publish};
    use sea_orm::entity::prelude::*;
    use serde_json::{Value, json};

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel, Publish)]
    #[sea_orm(table_name = "orders")]
    #[publish(destination = "/topic/orders.created", version = "v1", serializer = created_event)]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i32,
        pub customer: String,
        pub placed_at: DateTimeUtc,
        /// Not a column: the order's lines, so that the event (which a serializer builds from
        /// the model alone) can carry them. `place` fills it in before emitting.
        #[sea_orm(ignore)]
        pub lines: Vec<super::order_line::Model>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {
        #[sea_orm(has_many = "super::order_line::Entity")]
        Lines,
    }

    impl Related<super::order_line::Entity> for Entity {
        fn to() -> RelationDef {
            Relation::Lines.def()
        }
    }

    impl ActiveModelBehavior for ActiveModel {}

    impl Model {
        /// The body of `orders.created`, encoded as the Python library would (decimals and
        /// datetimes as strings) through `BodyValue`.
        fn created_event(&self) -> Value {
            let lines: Vec<Value> = self
                .lines
                .iter()
                .map(|line| {
                    json!({
                        "id": line.id,
                        "sku": line.sku,
                        "quantity": line.quantity,
                        "price": line.price.to_body_value(),
                    })
                })
                .collect();
            json!({
                "id": self.id,
                "customer": self.customer,
                "placed_at": self.placed_at.to_body_value(),
                "total": self.total().to_body_value(),
                "lines": lines,
            })
        }

        pub fn total(&self) -> Decimal {
            self.lines
                .iter()
                .map(|line| line.price * Decimal::from(line.quantity))
                .sum()
        }
    }
}

/// One line of an order. Cancelling it emits `/topic/orders.line_cancelled.v1` with the line's
/// columns: `{"id", "order_id", "sku", "quantity", "price", "status", "cancelled_at"}`.
///
/// The derive emits on every save made through the `*_and_publish` helpers, so lines are
/// inserted with plain `insert` when an order is placed (the `orders.created` event carries
/// them) and only a cancellation goes through `update_and_publish`.
mod order_line {
    use outbox_core::Publish;
    use sea_orm::entity::prelude::*;

    pub const OPEN: &str = "open";
    pub const CANCELLED: &str = "cancelled";

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel, Publish)]
    #[sea_orm(table_name = "order_lines")]
    #[publish(destination = "/topic/orders.line_cancelled", version = "v1")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i32,
        pub order_id: i32,
        pub sku: String,
        pub quantity: i32,
        #[sea_orm(column_type = "Decimal(Some((10, 2)))")]
        pub price: Decimal,
        /// `open` or `cancelled`.
        pub status: String,
        pub cancelled_at: Option<DateTimeUtc>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {
        #[sea_orm(
            belongs_to = "super::order::Entity",
            from = "Column::OrderId",
            to = "super::order::Column::Id"
        )]
        Order,
    }

    impl Related<super::order::Entity> for Entity {
        fn to() -> RelationDef {
            Relation::Order.def()
        }
    }

    impl ActiveModelBehavior for ActiveModel {}
}

/// The order service: its own commands, plus every `outbox-cli` command (`migrate`, `publish`, …).
#[derive(Debug, Parser)]
#[command(name = "order_service")]
struct Cli {
    /// Settings file (TOML). Default: $OUTBOX_CONFIG, else ./outbox.toml when present.
    #[arg(long, global = true, value_name = "PATH")]
    config: Option<PathBuf>,

    /// Log as JSON lines instead of text.
    #[arg(long, global = true)]
    json_logs: bool,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create the `orders` and `order_lines` tables (idempotent; `migrate` creates the outbox's).
    Setup,
    /// Place an order: the order, its lines and `orders.created.v1` commit together.
    Place {
        /// Who ordered.
        #[arg(long)]
        customer: String,
        /// A line, as SKU:QUANTITY:PRICE (e.g. BOOK-1:2:12.50); repeat for more lines.
        #[arg(long = "item", value_name = "SKU:QTY:PRICE", required = true)]
        items: Vec<Item>,
    },
    /// Cancel one line of an order: the change and `orders.line_cancelled.v1` commit together.
    CancelLine {
        /// The order id.
        #[arg(long)]
        order: i32,
        /// The line id.
        #[arg(long)]
        line: i32,
    },
    #[command(flatten)]
    Outbox(outbox_cli::Command),
}

/// `SKU:QTY:PRICE`
#[derive(Debug, Clone)]
struct Item {
    sku: String,
    quantity: i32,
    price: Decimal,
}

impl FromStr for Item {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let usage = || format!("`{text}` is not SKU:QUANTITY:PRICE (e.g. BOOK-1:2:12.50)");
        let mut parts = text.split(':');
        let (Some(sku), Some(quantity), Some(price), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(usage());
        };
        let quantity: i32 = quantity.parse().map_err(|_| usage())?;
        let price: Decimal = price.parse().map_err(|_| usage())?;
        if sku.is_empty() || quantity <= 0 || price.is_sign_negative() {
            return Err(format!(
                "`{text}`: the SKU must not be empty, the quantity must be positive and the price not negative"
            ));
        }
        Ok(Item {
            sku: sku.to_owned(),
            quantity,
            price: price.round_dp(2),
        })
    }
}

fn main() {
    let cli = Cli::parse();
    // Same logging, runtime and error exit as `outbox-cli` itself.
    outbox_cli::run_main(cli.json_logs, || run(cli));
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let connect = || async {
        let settings = Settings::load(cli.config.as_deref())?;
        outbox_core::connect(&settings)
            .await
            .context("cannot connect to the database")
    };
    match cli.command {
        Command::Setup => setup(&connect().await?).await,
        Command::Place { customer, items } => place(&connect().await?, customer, items).await,
        Command::CancelLine { order, line } => cancel_line(&connect().await?, order, line).await,
        Command::Outbox(command) => {
            outbox_cli::run(outbox_cli::Cli {
                config: cli.config,
                json_logs: cli.json_logs,
                command,
            })
            .await
        }
    }
}

async fn setup(db: &DatabaseConnection) -> anyhow::Result<()> {
    let schema = Schema::new(db.get_database_backend());
    db.execute(
        schema
            .create_table_from_entity(order::Entity)
            .if_not_exists(),
    )
    .await?;
    db.execute(
        schema
            .create_table_from_entity(order_line::Entity)
            .if_not_exists(),
    )
    .await?;
    println!("tables orders and order_lines are ready");
    Ok(())
}

async fn place(db: &DatabaseConnection, customer: String, items: Vec<Item>) -> anyhow::Result<()> {
    let txn = db.begin().await?;
    // Plain inserts: the order's event needs its lines, which need the order's id.
    let order = order::ActiveModel {
        customer: Set(customer),
        placed_at: Set(chrono::Utc::now()),
        ..Default::default()
    }
    .insert(&txn)
    .await?;
    let mut lines = Vec::with_capacity(items.len());
    for item in items {
        let line = order_line::ActiveModel {
            order_id: Set(order.id),
            sku: Set(item.sku),
            quantity: Set(item.quantity),
            price: Set(item.price),
            status: Set(order_line::OPEN.to_owned()),
            cancelled_at: Set(None),
            ..Default::default()
        }
        .insert(&txn)
        .await?;
        lines.push(line);
    }
    // Then the event, from the complete order, in the same transaction.
    let order = order::Model { lines, ..order };
    let events = outbox_core::emit(&txn, &order).await?;
    txn.commit().await?;

    let lines: Vec<String> = order
        .lines
        .iter()
        .map(|line| {
            format!(
                "line {} {} x {} @ {}",
                line.id, line.quantity, line.sku, line.price
            )
        })
        .collect();
    println!(
        "order {} placed for {}: {}; total {}",
        order.id,
        order.customer,
        lines.join(", "),
        order.total()
    );
    for event in events {
        println!("  event {} {}", event.destination, event.id);
    }
    Ok(())
}

async fn cancel_line(db: &DatabaseConnection, order_id: i32, line_id: i32) -> anyhow::Result<()> {
    let txn = db.begin().await?;
    let Some(line) = order_line::Entity::find_by_id(line_id)
        .lock_exclusive()
        .one(&txn)
        .await?
    else {
        bail!("there is no order line {line_id}");
    };
    ensure!(
        line.order_id == order_id,
        "line {line_id} belongs to order {}, not to order {order_id}",
        line.order_id
    );
    ensure!(
        line.status == order_line::OPEN,
        "line {line_id} of order {order_id} is already {}",
        line.status
    );
    let mut change = line.into_active_model();
    change.status = Set(order_line::CANCELLED.to_owned());
    change.cancelled_at = Set(Some(chrono::Utc::now()));
    // Joins `txn` (a savepoint): the update and its event commit with the lock released below.
    let line = change.update_and_publish(&txn).await?;
    txn.commit().await?;
    println!(
        "order {} line {} cancelled ({} x {})",
        line.order_id, line.id, line.quantity, line.sku
    );
    Ok(())
}
