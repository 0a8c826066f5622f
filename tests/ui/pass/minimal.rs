use outbox_core::Publish;
use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel, Publish)]
#[sea_orm(table_name = "widgets")]
#[publish(destination = "/topic/x")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i32,
    pub name: String,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}

fn main() {
    let model = Model {
        id: 7,
        name: "bolt".to_owned(),
    };
    let messages = model.outbox_messages().unwrap();
    assert_eq!(messages.len(), 1);
    assert_eq!(messages[0].destination().as_str(), "/topic/x");
    assert_eq!(messages[0].version(), None);
    assert_eq!(
        messages[0].body(),
        &serde_json::json!({ "id": 7, "name": "bolt" })
    );
}
