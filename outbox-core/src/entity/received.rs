//! `received`: the inbox table that makes consumers idempotent.

use sea_orm::entity::prelude::*;

use crate::Status;

/// One processed message.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "received")]
pub struct Model {
    /// Row id.
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    /// The deduplication key: `cap-msg-id`, else `dop-msg-id`, else the AMQP `message_id`.
    #[sea_orm(unique)]
    pub msg_id: Option<String>,
    /// Every header the message arrived with.
    pub headers: Option<Json>,
    /// The parsed JSON body, or the raw text as a JSON string.
    pub body: Option<Json>,
    /// When it was processed.
    pub added: DateTimeUtc,
    /// Kept for column compatibility (never read, as in the Python library).
    pub expires_at: DateTimeUtc,
    /// Kept for column compatibility (never written, as in the Python library).
    pub retry: i32,
    /// Always `Succeeded`.
    pub status: Status,
}

/// No relations.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
