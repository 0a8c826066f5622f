//! `published`: the outbox table.
//!
//! Same columns as django-outbox-pattern's `Published`, plus three the relay
//! needs: `next_attempt_at` (claim lease and retry schedule), `last_error`,
//! and `claim_token` (which claim holds the row; every change the relay
//! makes to a claimed row is conditional on it).

use sea_orm::entity::prelude::*;

use crate::Status;

/// One message waiting to be (or already) relayed to the broker.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "published")]
pub struct Model {
    /// The message id; also the `dop-msg-id` header.
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    /// The version given at creation, if any (already applied to `destination`).
    pub version: Option<String>,
    /// The full STOMP-style destination, version suffix included.
    pub destination: String,
    /// The JSON body sent to the broker.
    pub body: Json,
    /// When the row was written.
    pub added: DateTimeUtc,
    /// Kept for column compatibility; the relay never drops a row because of it.
    pub expires_at: DateTimeUtc,
    /// Failed attempts so far.
    pub retry: i32,
    /// See [`Status`].
    pub status: Status,
    /// The headers sent with the message (`dop-*` plus user headers), computed once.
    pub headers: Json,
    /// Earliest time the relay may (re)claim the row: the retry schedule and the claim lease.
    pub next_attempt_at: DateTimeUtc,
    /// Why the last attempt failed.
    pub last_error: Option<String>,
    /// The claim that holds the row while a relay sends it; `NULL` otherwise.
    pub claim_token: Option<Uuid>,
}

/// No relations.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
