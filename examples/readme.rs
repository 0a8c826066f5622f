//! The README's Rust code, compiled: each file in `examples/readme/` is one
//! ```` ```rust ```` block of README.md, word for word (`tests/readme.rs`
//! checks that they match), and this file gives them what the README leaves
//! out (a table for the callback to write, the message type it reads).
//! `cargo build --examples` compiles it; there is nothing to run.

#![allow(dead_code)]

use sea_orm::{ActiveModelTrait, DatabaseConnection, Set};

/// "Emitting events from a SeaORM model".
pub mod orders {
    include!("readme/01_emit.rs");

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

// "Consuming": a callback and the service's `main`.
include!("readme/02_consume.rs");

// "Group commit": a batch callback (its own module: it imports `callback` too).
pub mod batch {
    use super::*;
    include!("readme/03_batch.rs");
}

// "Testing a service without a broker".
include!("readme/04_without_a_broker.rs");

/// The event the callback reads.
#[derive(Debug, serde::Deserialize)]
struct OrderCreated {
    id: i32,
}

/// The table the callback writes.
pub mod shipment {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "shipments")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i32,
        pub order_id: i32,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}
