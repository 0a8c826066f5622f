use outbox_core::Publish;
use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel, Publish)]
#[sea_orm(table_name = "orders")]
#[publish(destination = "/topic/orders", fields = [customer, total, customer])]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i32,
    pub customer: String,
    pub total: i64,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}

fn main() {
    // The derive still emits an impl, so using it adds no follow-up error.
    fn publishes<T: Publish>() {}
    publishes::<Model>();
}
