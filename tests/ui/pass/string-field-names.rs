use outbox_core::Publish;
use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel, Publish)]
#[sea_orm(table_name = "pairs")]
#[publish(destination = "/topic/pairs", fields = ["a", "b"], version = "v3")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    pub a: String,
    pub b: i32,
    pub c: bool,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}

fn main() {
    let id = Uuid::parse_str("3f2a8c3e-2b7d-4b8e-9a51-6c8d1a0f6f10").unwrap();
    let model = Model {
        id,
        a: "left".to_owned(),
        b: 9,
        c: false,
    };
    let messages = model.outbox_messages().unwrap();
    assert_eq!(messages.len(), 1);
    assert_eq!(messages[0].destination().as_str(), "/topic/pairs.v3");
    // "c" is not listed, so it is not in the body
    assert_eq!(
        messages[0].body(),
        &serde_json::json!({
            "id": "3f2a8c3e-2b7d-4b8e-9a51-6c8d1a0f6f10",
            "a": "left",
            "b": 9,
        })
    );
}
