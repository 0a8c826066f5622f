use outbox_core::Publish;
use sea_orm::entity::prelude::*;
use serde::Serialize;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel, Publish)]
#[sea_orm(table_name = "orders")]
#[publish(destination = "/topic/orders.created", fields = [customer, total], version = "v1")]
#[publish(destination = "/queue/order-summaries", serializer = summary)]
#[publish(destination = "/exchange/audit/orders", serializer = self::to_json)]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i32,
    pub customer: String,
    #[sea_orm(column_type = "Decimal(Some((10, 2)))")]
    pub total: Decimal,
    pub note: Option<String>,
}

#[derive(Serialize)]
pub struct Summary {
    pub order: i32,
    pub who: String,
}

impl Model {
    pub fn summary(&self) -> Summary {
        Summary {
            order: self.id,
            who: self.customer.to_uppercase(),
        }
    }
}

fn to_json(m: &Model) -> serde_json::Value {
    serde_json::json!({ "order": m.id, "audited": true })
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}

fn main() {
    let model = Model {
        id: 42,
        customer: "ada".to_owned(),
        total: Decimal::new(1250, 2),
        note: None,
    };
    let messages = model.outbox_messages().unwrap();
    assert_eq!(messages.len(), 3);

    // fields + version: suffix on the destination, only the listed fields (and "id")
    assert_eq!(
        messages[0].destination().as_str(),
        "/topic/orders.created.v1"
    );
    assert_eq!(messages[0].version(), Some("v1"));
    let body = messages[0].body().as_object().unwrap();
    let mut keys: Vec<&str> = body.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["customer", "id", "total"]);
    assert_eq!(body["id"], 42);
    assert_eq!(body["customer"], "ada");
    assert_eq!(body["total"], "12.50");

    // serializer = method name
    assert_eq!(messages[1].destination().as_str(), "/queue/order-summaries");
    assert_eq!(messages[1].version(), None);
    assert_eq!(
        messages[1].body(),
        &serde_json::json!({ "order": 42, "who": "ADA" })
    );

    // serializer = path to a free function
    assert_eq!(messages[2].destination().as_str(), "/exchange/audit/orders");
    assert_eq!(
        messages[2].body(),
        &serde_json::json!({ "order": 42, "audited": true })
    );
}
