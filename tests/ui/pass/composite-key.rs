use outbox_core::Publish;
use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel, Publish)]
#[sea_orm(table_name = "order_lines")]
#[publish(destination = "/topic/order-lines", fields = [quantity])]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub order_id: i32,
    #[sea_orm(primary_key, auto_increment = false)]
    pub line: i32,
    pub quantity: i32,
    pub sku: String,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}

fn main() {
    let model = Model {
        order_id: 10,
        line: 2,
        quantity: 5,
        sku: "A-1".to_owned(),
    };
    let messages = model.outbox_messages().unwrap();
    assert_eq!(messages.len(), 1);
    assert_eq!(messages[0].destination().as_str(), "/topic/order-lines");
    // a composite key is the body's "id" as an array, in field order
    assert_eq!(
        messages[0].body(),
        &serde_json::json!({ "id": [10, 2], "quantity": 5 })
    );
}
