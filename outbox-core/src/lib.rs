//! A transactional outbox for SeaORM services and RabbitMQ, wire-compatible
//! with the Python library django-outbox-pattern.
//!
//! A save of a model and the events about it commit in one transaction; the
//! relay (`outbox-cli publish`) moves the events to RabbitMQ with publisher
//! confirms; the consumer (`outbox-cli subscribe`) runs a callback per
//! message exactly once per database.
//!
//! ```ignore
//! use outbox_core::{Publish, PublishExt};
//! use sea_orm::entity::prelude::*;
//!
//! #[derive(Clone, Debug, PartialEq, DeriveEntityModel, Publish)]
//! #[sea_orm(table_name = "orders")]
//! #[publish(destination = "/topic/orders.created", fields = [customer, total], version = "v1")]
//! pub struct Model {
//!     #[sea_orm(primary_key)]
//!     pub id: i32,
//!     pub customer: String,
//!     pub total: Decimal,
//! }
//!
//! // one transaction: the order row and its outbox row
//! let order = ActiveModel { customer: Set("ada".into()), total: Set(dec!(12.50)), ..Default::default() }
//!     .insert_and_publish(&db)
//!     .await?;
//! ```
//!
//! Details:
//! - each `#[publish(..)]` writes one `published` row per save, in attribute
//!   order, with body `{"id": <pk>, <field>: <value>, ..}` encoded as the
//!   Python library encodes it (decimals as strings, datetimes ISO 8601 to the
//!   millisecond with `Z`, UUIDs hyphenated);
//! - bulk operations (`insert_many`, `update_many`, raw SQL) emit nothing;
//! - [`write`] is the manual API; [`Publish::outbox_messages`] previews a save.

#![deny(clippy::print_stdout, clippy::print_stderr, clippy::unwrap_used)]
#![cfg_attr(test, allow(clippy::unwrap_used))]

#[cfg(not(any(feature = "postgres", feature = "mysql", feature = "sqlite")))]
compile_error!(
    "outbox-core needs a database driver: enable at least one of its features \"postgres\", \"mysql\", \"sqlite\""
);

mod admin;
mod backoff;
mod broker;
mod clock;
mod connect;
mod consumer;
mod correlation;
mod destination;
mod encode;
pub mod entity;
mod error;
pub mod headers;
mod message;
mod metrics;
mod migration;
mod publish;
pub mod redact;
mod relay;
mod retention;
mod schema;
mod settings;
mod shutdown;
mod status;
mod tls;
mod url;

pub use admin::{
    DeadLetter, DestinationCounts, FailedSelection, OutboxStatus, dead_letters, discard_failed,
    ensure_stream, failed_message, failed_messages, outbox_status, replay_dead_letters,
    retry_failed, stream_info,
};
#[cfg(feature = "memory")]
pub use broker::memory::{DeliveryFault, MemoryBroker, PublishFault, StoredMessage};
pub use broker::nats::stream::{StreamChange, StreamInfo};
pub use broker::{Broker, Envelope, QueueDeclaration, Transport};
pub use clock::Clock;
pub use connect::connect;
pub use consumer::{
    Batch, BatchCallback, BatchHandled, BatchResult, Callback, CallbackFuture, CallbackResult,
    Consumer, ConsumerReport, Handled, Handler, MAX_MSG_ID_LEN, Payload, Transaction,
    find_callback, registered_callbacks,
};
pub use correlation::{correlation_id, with_correlation_id};
pub use destination::{Destination, Kind as DestinationKind, MAX_DESTINATION_LEN};
pub use encode::BodyValue;
pub use error::{BoxError, Error, Result, report};
pub use message::Message;
pub use metrics::{Histogram, Metrics};
pub use migration::{Migration, NOTIFY_CHANNEL, migrate};
#[cfg(feature = "postgres")]
pub use publish::write_to_wal;
pub use publish::{Publish, PublishExt, emit, insert, save, update, write, write_all};
#[cfg(feature = "postgres")]
pub use relay::wal::slot::{SlotState, WalSetup, WalStatus, wal_drop, wal_setup, wal_status};
pub use relay::{Relay, RelayReport};
pub use settings::{
    BrokerSettings, Capture, ConsumerSettings, DatabaseSettings, DeadLetter as DeadLetterMode,
    NatsSettings, QueueType, RelaySettings, RetentionSettings, Settings, StreamStorage, Unroutable,
    WalSettings,
};
pub use shutdown::{Shutdown, ShutdownTrigger, shutdown_channel};
pub use status::Status;

#[cfg(feature = "derive")]
pub use outbox_derive::{Publish, callback};

// Lets the derive's `::outbox_core::..` paths resolve inside this crate's own tests.
extern crate self as outbox_core;

/// Not public API: what generated code refers to.
#[doc(hidden)]
pub mod __private {
    pub use crate::consumer::{BatchFuture, CallbackEntry, CallbackFuture};
    pub use crate::encode::{Encoder, ViaBodyValue, ViaSerialize};
    pub use crate::publish::emit_for_hook;
    pub use inventory;
    pub use sea_orm;
    pub use serde_json;

    use crate::{Destination, Error, Message, Result};
    use serde_json::Value;

    /// A message for a destination the derive already checked.
    pub fn message(destination: &str, body: Value) -> Result<Message> {
        Ok(Message::from_parts(Destination::parse(destination)?, body))
    }

    /// One encoded field, its error tied to the destination.
    pub fn field(destination: &str, value: serde_json::Result<Value>) -> Result<Value> {
        value.map_err(|source| Error::Body {
            destination: destination.to_owned(),
            source,
        })
    }

    /// A decimal (encoded as a string) at its column's declared scale:
    /// SQLite hands `12.50` back as `12.5`. Anything else passes through.
    pub fn with_scale(value: serde_json::Result<Value>, scale: u32) -> serde_json::Result<Value> {
        let value = value?;
        if let Value::String(text) = &value
            && let Ok(mut decimal) = text.parse::<rust_decimal::Decimal>()
            && decimal.scale() < scale
        {
            decimal.rescale(scale);
            return Ok(Value::String(decimal.to_string()));
        }
        Ok(value)
    }

    /// What a `serializer` returned, as the body.
    pub fn serialize_body<T: serde::Serialize + ?Sized>(
        destination: &str,
        body: &T,
    ) -> Result<Value> {
        field(destination, serde_json::to_value(body))
    }
}
