use outbox_core::{Publish, PublishExt};
use sea_orm::{Set, entity::prelude::*};

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel, Publish)]
#[sea_orm(table_name = "orders")]
#[publish(destination = "/topic/orders.created", version = "v1")]                 // all fields
#[publish(destination = "/exchange/audit/orders", fields = [customer, total])]    // some fields
#[publish(destination = "/queue/order-summaries", serializer = summary)]          // your own body
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i32,
    pub customer: String,
    pub total: Decimal,
    pub placed_at: DateTimeUtc,
}

impl Model {
    fn summary(&self) -> serde_json::Value { serde_json::json!({"order": self.id}) }
}

// The order row and its three outbox rows commit in one transaction.
async fn place_order(db: &DatabaseConnection) -> outbox_core::Result<Model> {
    ActiveModel { customer: Set("ada".into()), /* … */ ..Default::default() }
        .insert_and_publish(db)    // also: update_and_publish, save_and_publish
        .await
}
