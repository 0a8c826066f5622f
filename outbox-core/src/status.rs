//! The three status values shared with django-outbox-pattern.

use sea_orm::entity::prelude::*;
use serde::{Deserialize, Serialize};

/// Where an outbox (or inbox) row stands. Same integers as the Python library.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, EnumIter, DeriveActiveEnum, Serialize, Deserialize,
)]
#[sea_orm(rs_type = "i32", db_type = "Integer")]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Gave up after the configured number of attempts; `last_error` says why.
    #[sea_orm(num_value = -1)]
    Failed,
    /// Waiting to be published.
    #[sea_orm(num_value = 1)]
    Schedule,
    /// Published and confirmed by the broker (outbox), or processed (inbox).
    #[sea_orm(num_value = 2)]
    Succeeded,
}

impl Status {
    /// The integer stored in the `status` column.
    pub const fn code(self) -> i32 {
        match self {
            Status::Failed => -1,
            Status::Schedule => 1,
            Status::Succeeded => 2,
        }
    }

    /// The name used in logs and `outbox-cli status`.
    pub const fn name(self) -> &'static str {
        match self {
            Status::Failed => "failed",
            Status::Schedule => "schedule",
            Status::Succeeded => "succeeded",
        }
    }
}
