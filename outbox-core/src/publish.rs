//! Writing outbox rows: the `Publish` trait, the manual API and the atomic save helpers.

use std::future::Future;

use chrono::{DateTime, Duration, SubsecRound, Utc};
use sea_orm::{
    ActiveModelBehavior, ActiveModelTrait, ConnectionTrait, EntityTrait, IntoActiveModel,
    TransactionSession, TransactionTrait, TryIntoModel,
};
use serde_json::Value;
use tracing::warn;
use uuid::Uuid;

use crate::entity::published;
use crate::headers::outbox_headers;
use crate::{Message, Result, Status};

/// A model whose saves emit outbox messages. Implemented by `#[derive(Publish)]`.
pub trait Publish {
    /// The messages one save of `self` writes, in `#[publish(...)]` order.
    ///
    /// Nothing is written: this doubles as a preview for unit tests.
    fn outbox_messages(&self) -> Result<Vec<Message>>;
}

/// Write `message` as one outbox row on `db`.
///
/// Pass the transaction that writes your business data: the row then commits
/// or rolls back with it.
pub async fn write<C: ConnectionTrait>(db: &C, message: Message) -> Result<published::Model> {
    let mut rows = write_all(db, vec![message]).await?;
    Ok(rows.remove(0))
}

/// Write several messages as outbox rows with one statement, in order.
pub async fn write_all<C: ConnectionTrait>(
    db: &C,
    messages: Vec<Message>,
) -> Result<Vec<published::Model>> {
    if messages.is_empty() {
        return Ok(Vec::new());
    }
    let now = Utc::now().trunc_subsecs(6);
    // One save, one correlation id: rows written together share it.
    let correlation = crate::correlation::current_or_new()?;
    let rows: Vec<published::Model> = messages
        .into_iter()
        .enumerate()
        .map(|(i, message)| {
            // Distinct, increasing `added` keeps attribute order stable for the relay.
            new_row(
                message,
                now + Duration::microseconds(i as i64),
                &correlation,
            )
        })
        .collect();
    published::Entity::insert_many(rows.iter().cloned().map(IntoActiveModel::into_active_model))
        .exec_without_returning(db)
        .await?;
    Ok(rows)
}

/// Write `messages` into PostgreSQL's WAL only, with
/// `pg_logical_emit_message(true, 'outbox', ..)`: no table row, so no bloat
/// and nothing to delete. Only a relay with `relay.capture = "wal"` sends
/// them (at commit of `db`'s transaction; a rollback discards them). The
/// returned models are what a row would have held; none is stored. A
/// message the broker refuses becomes a `published` row then, retried as
/// any row.
#[cfg(feature = "postgres")]
pub async fn write_to_wal<C: ConnectionTrait>(
    db: &C,
    messages: Vec<Message>,
) -> Result<Vec<published::Model>> {
    use sea_orm::{DbBackend, Statement};
    if db.get_database_backend() != DbBackend::Postgres {
        return Err(crate::Error::Capture {
            problem: "write_to_wal writes PostgreSQL's WAL".to_owned(),
            fix: "use outbox_core::write_all with MariaDB and SQLite".to_owned(),
        });
    }
    let now = Utc::now().trunc_subsecs(6);
    let correlation = crate::correlation::current_or_new()?;
    let mut rows = Vec::with_capacity(messages.len());
    for (i, message) in messages.into_iter().enumerate() {
        let row = new_row(
            message,
            now + Duration::microseconds(i as i64),
            &correlation,
        );
        let content = serde_json::json!({
            "id": row.id,
            "destination": row.destination,
            "body": row.body,
            "headers": row.headers,
            "added": row.added.to_rfc3339(),
        });
        db.execute_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "SELECT pg_logical_emit_message(true, 'outbox', $1::text)",
            vec![content.to_string().into()],
        ))
        .await?;
        rows.push(row);
    }
    Ok(rows)
}

/// Write the outbox rows `model` emits on `db`.
///
/// For a `ActiveModelBehavior::after_save` hook; see [`active_model_behavior!`](crate::active_model_behavior).
pub async fn emit<C, M>(db: &C, model: &M) -> Result<Vec<published::Model>>
where
    C: ConnectionTrait,
    M: Publish + ?Sized,
{
    write_all(db, model.outbox_messages()?).await
}

fn new_row(message: Message, added: DateTime<Utc>, correlation: &str) -> published::Model {
    // Time-ordered (UUIDv7): new rows land at the right edge of the primary
    // key, and the claim's and the mark's new index entries near each other,
    // instead of all over an index larger than the cache (a 1,000,000-row
    // drain ran 16% faster, docs/PERFORMANCE.md section 9). Rows the Python
    // library writes keep its uuid4s; both are just ids to everyone else.
    let id = Uuid::now_v7();
    let destination = message.destination().to_string();
    let headers = outbox_headers(id, &destination, added, message.headers(), correlation);
    published::Model {
        id,
        version: message.version().map(str::to_owned),
        destination,
        body: message.body().clone(),
        added,
        expires_at: added + Duration::days(1),
        retry: 0,
        status: Status::Schedule,
        headers: Value::Object(
            headers
                .into_iter()
                .map(|(k, v)| (k, Value::String(v)))
                .collect(),
        ),
        next_attempt_at: added,
        last_error: None,
        claim_token: None,
    }
}

type ModelOf<A> = <<A as ActiveModelTrait>::Entity as EntityTrait>::Model;

/// Insert `model` and its outbox rows in one transaction.
///
/// Given a connection, it opens and commits a transaction; given a
/// transaction, it joins it (through a savepoint), so it commits with yours.
pub async fn insert<C, A>(db: &C, model: A) -> Result<ModelOf<A>>
where
    C: TransactionTrait,
    A: ActiveModelTrait + ActiveModelBehavior + Send,
    ModelOf<A>: Publish + IntoActiveModel<A> + Send + Sync,
{
    let txn = db.begin().await?;
    let written = async {
        let model = model.insert(&txn).await?;
        emit(&txn, &model).await?;
        Ok(model)
    }
    .await;
    commit_or_roll_back(txn, written).await
}

/// Update `model` and write its outbox rows in one transaction (see [`insert`]).
pub async fn update<C, A>(db: &C, model: A) -> Result<ModelOf<A>>
where
    C: TransactionTrait,
    A: ActiveModelTrait + ActiveModelBehavior + Send,
    ModelOf<A>: Publish + IntoActiveModel<A> + Send + Sync,
{
    let txn = db.begin().await?;
    let written = async {
        let model = model.update(&txn).await?;
        emit(&txn, &model).await?;
        Ok(model)
    }
    .await;
    commit_or_roll_back(txn, written).await
}

/// Insert when the primary key is unset, update otherwise (SeaORM's `save`),
/// with the outbox rows, in one transaction (see [`insert`]).
pub async fn save<C, A>(db: &C, model: A) -> Result<ModelOf<A>>
where
    C: TransactionTrait,
    A: ActiveModelTrait + ActiveModelBehavior + TryIntoModel<ModelOf<A>> + Send,
    ModelOf<A>: Publish + IntoActiveModel<A> + Send + Sync,
{
    let txn = db.begin().await?;
    let written = async {
        let model = model.save(&txn).await?.try_into_model()?;
        emit(&txn, &model).await?;
        Ok(model)
    }
    .await;
    commit_or_roll_back(txn, written).await
}

/// Commit what was written, or roll back before returning the error: dropping
/// a SeaORM transaction only queues its rollback for a background task, and
/// until that runs, the failed statement's locks stay held.
async fn commit_or_roll_back<S: TransactionSession, T>(txn: S, written: Result<T>) -> Result<T> {
    match written {
        Ok(value) => {
            txn.commit().await?;
            Ok(value)
        }
        Err(err) => {
            if let Err(rollback) = txn.rollback().await {
                warn!(error = %rollback, "could not roll back a failed save");
            }
            Err(err)
        }
    }
}

/// `insert`/`update`/`save` as methods on every `ActiveModel` whose model derives `Publish`.
///
/// ```ignore
/// let order = order::ActiveModel { .. }.insert_and_publish(&db).await?;
/// ```
pub trait PublishExt:
    ActiveModelTrait + ActiveModelBehavior + TryIntoModel<ModelOf<Self>> + Send + Sized
where
    ModelOf<Self>: Publish + IntoActiveModel<Self> + Send + Sync,
{
    /// See [`insert`].
    fn insert_and_publish<C: TransactionTrait>(
        self,
        db: &C,
    ) -> impl Future<Output = Result<ModelOf<Self>>> + Send {
        insert(db, self)
    }

    /// See [`update`].
    fn update_and_publish<C: TransactionTrait>(
        self,
        db: &C,
    ) -> impl Future<Output = Result<ModelOf<Self>>> + Send {
        update(db, self)
    }

    /// See [`save`].
    fn save_and_publish<C: TransactionTrait>(
        self,
        db: &C,
    ) -> impl Future<Output = Result<ModelOf<Self>>> + Send {
        save(db, self)
    }
}

impl<A> PublishExt for A
where
    A: ActiveModelTrait + ActiveModelBehavior + TryIntoModel<ModelOf<A>> + Send,
    ModelOf<A>: Publish + IntoActiveModel<A> + Send + Sync,
{
}

/// Implement SeaORM's `ActiveModelBehavior` for the entity in scope so that
/// every `insert`/`update`/`save` also writes the outbox rows, through the
/// `after_save` hook. Opt-in: use it only on entities without hooks of their
/// own; otherwise call [`emit`] from your own `after_save`.
///
/// Atomic only when the handle passed to `insert`/`save` is a transaction;
/// bulk operations (`insert_many`, `update_many`) never run hooks.
#[macro_export]
macro_rules! active_model_behavior {
    () => {
        #[$crate::__private::sea_orm::prelude::async_trait::async_trait]
        impl $crate::__private::sea_orm::ActiveModelBehavior for ActiveModel {
            async fn after_save<C>(
                model: Model,
                db: &C,
                _insert: bool,
            ) -> ::std::result::Result<Model, $crate::__private::sea_orm::DbErr>
            where
                C: $crate::__private::sea_orm::ConnectionTrait,
            {
                $crate::__private::emit_for_hook(db, &model).await?;
                Ok(model)
            }
        }
    };
}

/// `emit` with its error mapped to `DbErr`, for the `after_save` hook.
#[doc(hidden)]
pub async fn emit_for_hook<C, M>(db: &C, model: &M) -> std::result::Result<(), sea_orm::DbErr>
where
    C: ConnectionTrait,
    M: Publish + ?Sized,
{
    match emit(db, model).await {
        Ok(_) => Ok(()),
        Err(crate::Error::Database(err)) => Err(err),
        Err(err) => Err(sea_orm::DbErr::Custom(crate::report(&err))),
    }
}
