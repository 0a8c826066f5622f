//! Entities the tests save.

pub mod order {
    use outbox_core::Publish;
    use sea_orm::entity::prelude::*;
    use serde::Serialize;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel, Publish)]
    #[sea_orm(table_name = "orders")]
    #[publish(destination = "/topic/orders.created", version = "v1")]
    #[publish(destination = "/exchange/audit/orders", fields = [customer, total])]
    #[publish(destination = "/queue/order-summaries", serializer = summary)]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i32,
        pub customer: String,
        #[sea_orm(column_type = "Decimal(Some((10, 2)))")]
        pub total: Decimal,
        pub placed_at: DateTimeUtc,
        pub reference: Uuid,
        pub note: Option<String>,
        pub due: Date,
        pub paid: bool,
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

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// An entity that opts into publishing from SeaORM's `after_save` hook.
pub mod shipment {
    use outbox_core::Publish;
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel, Publish)]
    #[sea_orm(table_name = "shipments")]
    #[publish(destination = "/topic/shipments")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: Uuid,
        pub order_id: i32,
        pub carrier: String,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    outbox_core::active_model_behavior!();
}
