//! The two tables, as SeaORM entities, column-compatible with django-outbox-pattern.

pub mod published;
pub mod received;
