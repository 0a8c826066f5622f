//! `Payload`: one received message, handed to the callback.

use std::collections::BTreeMap;
use std::sync::Arc;

use chrono::{Duration, SubsecRound, Utc};
use sea_orm::prelude::async_trait::async_trait;
use sea_orm::{
    AccessMode, ConnectionTrait, DatabaseConnection, DatabaseTransaction, DbBackend, DbErr,
    EntityTrait, ExecResult, IntoActiveModel, IsolationLevel, QueryResult, SqlErr, Statement,
    TransactionError, TransactionOptions, TransactionTrait,
};
use serde::de::DeserializeOwned;
use serde_json::Value;
use uuid::Uuid;

use crate::entity::received;
use crate::{Error, Result, Status};

/// The callback's decision. Only [`Payload::save`], [`Payload::save_alone`]
/// and [`Payload::nack`] make one, so every callback ends with a decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handled {
    pub(crate) decision: Decision,
    pub(crate) token: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Decision {
    /// The `received` row committed: ack.
    Saved,
    /// Another delivery of the same id committed first: ack, nothing saved.
    Duplicate,
    /// Failed for good: to the dead-letter queue, with why.
    Nack(String),
    /// Not processed because the database stayed unreachable: back to the queue.
    Requeue(String),
}

impl Handled {
    /// Whether the message was recorded as processed (or already was).
    pub fn is_saved(&self) -> bool {
        matches!(self.decision, Decision::Saved | Decision::Duplicate)
    }

    /// Whether the message goes to the dead-letter queue.
    pub fn is_nack(&self) -> bool {
        matches!(self.decision, Decision::Nack(_))
    }
}

/// A message as the callback sees it.
#[derive(Debug, Clone)]
pub struct Payload {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    body: Value,
    body_error: Option<String>,
    raw: Arc<Vec<u8>>,
    headers: BTreeMap<String, String>,
    msg_id: Option<String>,
    correlation_id: String,
    db: DatabaseConnection,
    token: u64,
}

impl Payload {
    pub(crate) fn new(
        raw: Arc<Vec<u8>>,
        headers: BTreeMap<String, String>,
        msg_id: Option<String>,
        correlation_id: String,
        db: DatabaseConnection,
        token: u64,
    ) -> Payload {
        // As in the Python library: a body that is not JSON reaches the
        // callback as a string, and the parse error is kept.
        let (body, body_error) = match serde_json::from_slice::<Value>(&raw) {
            Ok(body) => (body, None),
            Err(err) => (
                Value::String(String::from_utf8_lossy(&raw).into_owned()),
                Some(err.to_string()),
            ),
        };
        Payload {
            inner: Arc::new(Inner {
                body,
                body_error,
                raw,
                headers,
                msg_id,
                correlation_id,
                db,
                token,
            }),
        }
    }

    /// The parsed JSON body; a body that is not JSON is a JSON string of its text.
    pub fn body(&self) -> &Value {
        &self.inner.body
    }

    /// Why the body is not JSON, if it is not.
    pub fn body_error(&self) -> Option<&str> {
        self.inner.body_error.as_deref()
    }

    /// The body as a typed value.
    pub fn json<T: DeserializeOwned>(&self) -> std::result::Result<T, serde_json::Error> {
        serde_json::from_slice(&self.inner.raw)
    }

    /// The body bytes as received.
    pub fn raw(&self) -> &[u8] {
        &self.inner.raw
    }

    /// Every header, as text (`destination` and `redelivered` are added, as
    /// a STOMP subscriber would see them).
    pub fn headers(&self) -> &BTreeMap<String, String> {
        &self.inner.headers
    }

    /// One header.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.inner.headers.get(name).map(String::as_str)
    }

    /// The deduplication key: `cap-msg-id`, else `dop-msg-id`, else the AMQP `message_id`.
    pub fn msg_id(&self) -> Option<&str> {
        self.inner.msg_id.as_deref()
    }

    /// The correlation id the callback runs under (from `dop-correlation-id`, else new).
    pub fn correlation_id(&self) -> &str {
        &self.inner.correlation_id
    }

    /// The consumer's database.
    pub fn db(&self) -> &DatabaseConnection {
        &self.inner.db
    }

    /// Begin the transaction to write business data in; finish with
    /// [`Payload::save`]. It is a SeaORM connection: pass `&txn` to
    /// `insert`, `update`, queries and `insert_and_publish`.
    pub async fn begin(&self) -> Result<Transaction> {
        Ok(Transaction {
            inner: self.inner.db.begin().await?,
            token: self.inner.token,
        })
    }

    /// Record the message as processed inside `txn` and commit `txn`: your
    /// writes and the deduplication row commit together, and the ack is sent
    /// after the commit. If another delivery of the same message committed
    /// first, `txn` is rolled back and the message is acked as a duplicate.
    /// `txn` must come from this payload's [`Payload::begin`].
    pub async fn save(&self, txn: Transaction) -> Result<Handled> {
        if txn.token != self.inner.token {
            let _ = txn.inner.rollback().await;
            return Err(Error::ForeignTransaction);
        }
        let txn = txn.inner;
        match received::Entity::insert(self.received_row().into_active_model())
            .exec_without_returning(&txn)
            .await
        {
            Ok(_) => {
                txn.commit().await?;
                Ok(self.decide(Decision::Saved))
            }
            Err(err) if matches!(err.sql_err(), Some(SqlErr::UniqueConstraintViolation(_))) => {
                txn.rollback().await?;
                Ok(self.decide(Decision::Duplicate))
            }
            Err(err) => {
                let _ = txn.rollback().await;
                Err(err.into())
            }
        }
    }

    /// [`Payload::save`] in a transaction of its own, for callbacks that write nothing else.
    pub async fn save_alone(&self) -> Result<Handled> {
        self.save(self.begin().await?).await
    }

    /// Reject the message without requeue: it goes to `DLQ.<queue>`. Nothing
    /// is written. `reason` is logged with the message id.
    pub fn nack(&self, reason: impl Into<String>) -> Handled {
        self.decide(Decision::Nack(reason.into()))
    }

    fn decide(&self, decision: Decision) -> Handled {
        Handled {
            decision,
            token: self.inner.token,
        }
    }

    pub(crate) fn token(&self) -> u64 {
        self.inner.token
    }

    fn received_row(&self) -> received::Model {
        let now = Utc::now().trunc_subsecs(6);
        received::Model {
            id: Uuid::new_v4(),
            msg_id: self.inner.msg_id.clone(),
            headers: Some(Value::Object(
                self.inner
                    .headers
                    .iter()
                    .map(|(k, v)| (k.clone(), Value::String(v.clone())))
                    .collect(),
            )),
            body: Some(self.inner.body.clone()),
            added: now,
            expires_at: now + Duration::days(1),
            retry: 0,
            status: Status::Succeeded,
        }
    }
}

/// The transaction a callback writes in: begun by [`Payload::begin`], ended
/// by [`Payload::save`] (which commits it with the inbox row) or by dropping
/// it (which rolls it back). Use `&txn` wherever SeaORM takes a connection.
#[derive(Debug)]
pub struct Transaction {
    inner: DatabaseTransaction,
    token: u64,
}

impl Transaction {
    /// Roll back explicitly (dropping it also rolls back, later).
    pub async fn rollback(self) -> Result<()> {
        Ok(self.inner.rollback().await?)
    }
}

#[async_trait]
impl ConnectionTrait for Transaction {
    fn get_database_backend(&self) -> DbBackend {
        self.inner.get_database_backend()
    }

    async fn execute_raw(&self, stmt: Statement) -> std::result::Result<ExecResult, DbErr> {
        self.inner.execute_raw(stmt).await
    }

    async fn execute_unprepared(&self, sql: &str) -> std::result::Result<ExecResult, DbErr> {
        self.inner.execute_unprepared(sql).await
    }

    async fn query_one_raw(
        &self,
        stmt: Statement,
    ) -> std::result::Result<Option<QueryResult>, DbErr> {
        self.inner.query_one_raw(stmt).await
    }

    async fn query_all_raw(&self, stmt: Statement) -> std::result::Result<Vec<QueryResult>, DbErr> {
        self.inner.query_all_raw(stmt).await
    }

    fn support_returning(&self) -> bool {
        self.inner.support_returning()
    }
}

/// Nested transactions are savepoints inside this one.
#[async_trait]
impl TransactionTrait for Transaction {
    type Transaction = DatabaseTransaction;

    async fn begin(&self) -> std::result::Result<DatabaseTransaction, DbErr> {
        self.inner.begin().await
    }

    async fn begin_with_config(
        &self,
        isolation_level: Option<IsolationLevel>,
        access_mode: Option<AccessMode>,
    ) -> std::result::Result<DatabaseTransaction, DbErr> {
        self.inner
            .begin_with_config(isolation_level, access_mode)
            .await
    }

    async fn begin_with_options(
        &self,
        options: TransactionOptions,
    ) -> std::result::Result<DatabaseTransaction, DbErr> {
        self.inner.begin_with_options(options).await
    }

    async fn transaction<F, T, E>(&self, callback: F) -> std::result::Result<T, TransactionError<E>>
    where
        F: for<'c> FnOnce(
                &'c DatabaseTransaction,
            ) -> std::pin::Pin<
                Box<dyn std::future::Future<Output = std::result::Result<T, E>> + Send + 'c>,
            > + Send,
        T: Send,
        E: std::fmt::Display + std::fmt::Debug + Send,
    {
        self.inner.transaction(callback).await
    }

    async fn transaction_with_config<F, T, E>(
        &self,
        callback: F,
        isolation_level: Option<IsolationLevel>,
        access_mode: Option<AccessMode>,
    ) -> std::result::Result<T, TransactionError<E>>
    where
        F: for<'c> FnOnce(
                &'c DatabaseTransaction,
            ) -> std::pin::Pin<
                Box<dyn std::future::Future<Output = std::result::Result<T, E>> + Send + 'c>,
            > + Send,
        T: Send,
        E: std::fmt::Display + std::fmt::Debug + Send,
    {
        self.inner
            .transaction_with_config(callback, isolation_level, access_mode)
            .await
    }
}
