use outbox_core::Publish;
use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel, Publish)]
#[sea_orm(table_name = "accounts")]
#[publish(destination = "/topic/accounts.changed")]
#[publish(destination = "account-audit", version = "v2")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    pub owner: String,
    pub active: bool,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}

fn main() {
    let model = Model {
        id: 3,
        owner: "grace".to_owned(),
        active: true,
    };
    let messages = model.outbox_messages().unwrap();
    let destinations: Vec<&str> = messages.iter().map(|m| m.destination().as_str()).collect();
    // attribute order; the version suffix only on the second
    assert_eq!(
        destinations,
        ["/topic/accounts.changed", "account-audit.v2"]
    );
    let expected = serde_json::json!({ "id": 3, "owner": "grace", "active": true });
    assert_eq!(messages[0].body(), &expected);
    assert_eq!(messages[1].body(), &expected);
    assert_eq!(messages[1].version(), Some("v2"));
}
