#![allow(unreachable_pub)]
//! The shipment service of the orders example: it consumes the order service's events into
//! its own database.
//!
//! - [`handlers::on_order_created`] prepares a shipment with one item per order line;
//! - [`handlers::on_line_cancelled`] takes the cancelled line out of its shipment (and copes with
//!   a cancellation that arrives before its order: the two destinations are separate queues,
//!   so nothing orders them).
//!
//! Each callback writes its rows and a line of the shipment log in the payload's transaction
//! and finishes with `payload.save(txn)`, which records the message id in `received` in that
//! same transaction: a message delivered twice changes nothing the second time.
//!
//! ```sh
//! export DATABASE_URL=postgres://postgres@127.0.0.1/shipments
//! shipment_service migrate && shipment_service setup
//! shipment_service subscribe shipment_service::handlers::on_order_created /topic/orders.created.v1 shipments.order_created &
//! shipment_service subscribe shipment_service::handlers::on_line_cancelled /topic/orders.line_cancelled.v1 shipments.line_cancelled &
//! shipment_service log
//! ```
//!
//! `examples/orders/run.sh` runs it together with the order service.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use sea_orm::{
    ColumnTrait, ConnectionTrait, DatabaseConnection, EntityTrait, PaginatorTrait, QueryFilter,
    QueryOrder, Schema,
};

/// A shipment, one per order.
mod shipment {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "shipments")]
    pub struct Model {
        /// The order's id in the order service.
        #[sea_orm(primary_key, auto_increment = false)]
        pub order_id: i32,
        pub customer: String,
        pub prepared_at: DateTimeUtc,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// One item to ship, one per order line.
mod shipment_item {
    use sea_orm::entity::prelude::*;

    pub const TO_SHIP: &str = "to_ship";
    pub const CANCELLED: &str = "cancelled";

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "shipment_items")]
    pub struct Model {
        /// The order line's id in the order service.
        #[sea_orm(primary_key, auto_increment = false)]
        pub line_id: i32,
        pub order_id: i32,
        pub sku: String,
        pub quantity: i32,
        /// `to_ship` or `cancelled`.
        pub status: String,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// What the shipment service did, one row per message processed.
mod log_entry {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "shipment_log")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i32,
        pub logged_at: DateTimeUtc,
        /// The message's destination, e.g. `/topic/orders.created.v1`.
        pub event: String,
        /// The message id (`dop-msg-id`: the order service's outbox row id).
        pub msg_id: String,
        pub text: String,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// The callbacks, registered as `shipment_service::handlers::*` (see `shipment_service callbacks`).
pub mod handlers {
    use outbox_core::{CallbackResult, Payload, callback};
    use sea_orm::sea_query::OnConflict;
    use sea_orm::{
        ActiveModelTrait, ActiveValue::Set, ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter,
        QueryOrder,
    };
    use serde::Deserialize;

    use super::{log_entry, shipment, shipment_item};

    /// The body of `/topic/orders.created.v1`.
    #[derive(Debug, Deserialize)]
    struct OrderCreated {
        id: i32,
        customer: String,
        total: String,
        lines: Vec<Line>,
    }

    #[derive(Debug, Deserialize)]
    struct Line {
        id: i32,
        sku: String,
        quantity: i32,
    }

    /// The body of `/topic/orders.line_cancelled.v1` (the fields we use).
    #[derive(Debug, Deserialize)]
    struct LineCancelled {
        id: i32,
        order_id: i32,
        sku: String,
        quantity: i32,
    }

    /// An order was placed: prepare its shipment.
    #[callback]
    pub async fn on_order_created(payload: Payload) -> CallbackResult {
        let order: OrderCreated = payload.json()?;
        let txn = payload.begin().await?;
        shipment::ActiveModel {
            order_id: Set(order.id),
            customer: Set(order.customer.clone()),
            prepared_at: Set(chrono::Utc::now()),
        }
        .insert(&txn)
        .await?;
        for line in &order.lines {
            // A cancellation that arrived first already wrote this line as cancelled: keep it.
            shipment_item::Entity::insert(shipment_item::ActiveModel {
                line_id: Set(line.id),
                order_id: Set(order.id),
                sku: Set(line.sku.clone()),
                quantity: Set(line.quantity),
                status: Set(shipment_item::TO_SHIP.to_owned()),
            })
            .on_conflict(
                OnConflict::column(shipment_item::Column::LineId)
                    .do_nothing()
                    .to_owned(),
            )
            .exec_without_returning(&txn)
            .await?;
        }
        let to_ship = items(&txn, order.id, shipment_item::TO_SHIP).await?;
        log(
            &txn,
            &payload,
            format!(
                "order {} for {} (total {}): shipment prepared, {} item(s) to ship",
                order.id,
                order.customer,
                order.total,
                to_ship.len(),
            ) + &listed(&to_ship),
        )
        .await?;
        // `received` is written in `txn`, which commits; the ack follows the commit.
        Ok(payload.save(txn).await?)
    }

    /// A line was cancelled: take it out of its shipment.
    #[callback]
    pub async fn on_line_cancelled(payload: Payload) -> CallbackResult {
        let line: LineCancelled = payload.json()?;
        let txn = payload.begin().await?;
        // Insert or update, in one statement: if the order's event is still on its way (it comes
        // through another queue), the line is recorded as cancelled already, and
        // `on_order_created` (which inserts with ON CONFLICT DO NOTHING) will not ship it.
        shipment_item::Entity::insert(shipment_item::ActiveModel {
            line_id: Set(line.id),
            order_id: Set(line.order_id),
            sku: Set(line.sku.clone()),
            quantity: Set(line.quantity),
            status: Set(shipment_item::CANCELLED.to_owned()),
        })
        .on_conflict(
            OnConflict::column(shipment_item::Column::LineId)
                .update_column(shipment_item::Column::Status)
                .to_owned(),
        )
        .exec_without_returning(&txn)
        .await?;
        let text = if shipment::Entity::find_by_id(line.order_id)
            .one(&txn)
            .await?
            .is_none()
        {
            format!(
                "order {}: line {} ({} x {}) cancelled before the order arrived; it will not be shipped",
                line.order_id, line.id, line.quantity, line.sku
            )
        } else {
            let to_ship = items(&txn, line.order_id, shipment_item::TO_SHIP).await?;
            format!(
                "order {}: line {} ({} x {}) cancelled and taken out of the shipment, {} item(s) left to ship",
                line.order_id,
                line.id,
                line.quantity,
                line.sku,
                to_ship.len()
            ) + &listed(&to_ship)
        };
        log(&txn, &payload, text).await?;
        Ok(payload.save(txn).await?)
    }

    async fn items<C: ConnectionTrait>(
        db: &C,
        order_id: i32,
        status: &str,
    ) -> Result<Vec<shipment_item::Model>, sea_orm::DbErr> {
        shipment_item::Entity::find()
            .filter(shipment_item::Column::OrderId.eq(order_id))
            .filter(shipment_item::Column::Status.eq(status))
            .order_by_asc(shipment_item::Column::LineId)
            .all(db)
            .await
    }

    fn listed(items: &[shipment_item::Model]) -> String {
        if items.is_empty() {
            return String::new();
        }
        let items: Vec<String> = items
            .iter()
            .map(|item| format!("{} x {}", item.quantity, item.sku))
            .collect();
        format!(": {}", items.join(", "))
    }

    async fn log<C: ConnectionTrait>(
        db: &C,
        payload: &Payload,
        text: String,
    ) -> Result<(), sea_orm::DbErr> {
        log_entry::ActiveModel {
            logged_at: Set(chrono::Utc::now()),
            event: Set(payload.header("destination").unwrap_or("?").to_owned()),
            msg_id: Set(payload.msg_id().unwrap_or("?").to_owned()),
            text: Set(text),
            ..Default::default()
        }
        .insert(db)
        .await?;
        Ok(())
    }
}

/// The shipment service: its own commands, plus every `outbox-cli` command (`migrate`, `subscribe`, …).
#[derive(Debug, Parser)]
#[command(name = "shipment_service")]
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
    /// Create the `shipments`, `shipment_items` and `shipment_log` tables (idempotent).
    Setup,
    /// Print the shipment log and the shipments.
    Log,
    #[command(flatten)]
    Outbox(outbox_cli::Command),
}

fn main() {
    let cli = Cli::parse();
    // Same logging, runtime and error exit as `outbox-cli` itself.
    outbox_cli::run_main(cli.json_logs, || run(cli));
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let connect = || async {
        let settings = outbox_core::Settings::load(cli.config.as_deref())?;
        outbox_core::connect(&settings)
            .await
            .context("cannot connect to the database")
    };
    match cli.command {
        Command::Setup => setup(&connect().await?).await,
        Command::Log => print_log(&connect().await?).await,
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
            .create_table_from_entity(shipment::Entity)
            .if_not_exists(),
    )
    .await?;
    db.execute(
        schema
            .create_table_from_entity(shipment_item::Entity)
            .if_not_exists(),
    )
    .await?;
    db.execute(
        schema
            .create_table_from_entity(log_entry::Entity)
            .if_not_exists(),
    )
    .await?;
    println!("tables shipments, shipment_items and shipment_log are ready");
    Ok(())
}

async fn print_log(db: &DatabaseConnection) -> anyhow::Result<()> {
    let entries = log_entry::Entity::find()
        .order_by_asc(log_entry::Column::Id)
        .all(db)
        .await?;
    println!("shipment log ({} entries):", entries.len());
    for entry in &entries {
        let event = entry.event.rsplit('/').next().unwrap_or(&entry.event);
        println!(
            "  #{:<3} {:<24} msg {}  {}",
            entry.id, event, entry.msg_id, entry.text
        );
    }
    let shipments = shipment::Entity::find()
        .order_by_asc(shipment::Column::OrderId)
        .all(db)
        .await?;
    println!("shipments ({}):", shipments.len());
    for shipment in &shipments {
        let items = shipment_item::Entity::find()
            .filter(shipment_item::Column::OrderId.eq(shipment.order_id))
            .order_by_asc(shipment_item::Column::LineId)
            .all(db)
            .await?;
        let items: Vec<String> = items
            .iter()
            .map(|item| {
                let cancelled = if item.status == shipment_item::CANCELLED {
                    " (cancelled)"
                } else {
                    ""
                };
                format!("{} x {}{cancelled}", item.quantity, item.sku)
            })
            .collect();
        println!(
            "  order {} for {}: {}",
            shipment.order_id,
            shipment.customer,
            items.join(", ")
        );
    }
    let received = outbox_core::entity::received::Entity::find()
        .count(db)
        .await?;
    println!("messages processed (rows in `received`): {received}");
    Ok(())
}
