//! src/main.rs of a whole service: an entity whose saves emit an event, a
//! callback that consumes it, and every outbox-cli command plus one of ours.
use outbox_core::{CallbackResult, Payload, PublishExt, Settings, callback};
use sea_orm::{ConnectionTrait, Schema, Set};

mod orders {
    use outbox_core::Publish;
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel, Publish)]
    #[sea_orm(table_name = "orders")]
    #[publish(destination = "/topic/orders.created", version = "v1")]
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

#[callback] // `minimal-service callbacks` lists it as minimal_service::on_order
pub async fn on_order(payload: Payload) -> CallbackResult {
    let order: serde_json::Value = payload.json()?;
    println!("order {} for {}", order["id"], order["customer"]);
    Ok(payload.save_alone().await?) // records the message id in `received`, then acks
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::args().nth(1).as_deref() != Some("place-order") {
        outbox_cli::main(); // migrate, publish, subscribe, status, …
        return Ok(());
    }
    // Our own command, with a runtime of its own: save an order and its event.
    tokio::runtime::Runtime::new()?.block_on(async {
        let db = outbox_core::connect(&Settings::load(None)?).await?;
        let mut table =
            Schema::new(db.get_database_backend()).create_table_from_entity(orders::Entity);
        db.execute(table.if_not_exists()).await?;
        let order = orders::ActiveModel {
            customer: Set("ada".into()),
            total: Set("12.50".parse()?),
            ..Default::default()
        }
        .insert_and_publish(&db) // the order row and its outbox row, one transaction
        .await?;
        println!("placed order {}", order.id);
        Ok(())
    })
}
