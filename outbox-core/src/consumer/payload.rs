//! `Payload`: one received message, handed to the callback.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use chrono::{Duration, SubsecRound, Utc};
use sea_orm::prelude::async_trait::async_trait;
use sea_orm::{
    AccessMode, ConnectionTrait, DatabaseConnection, DatabaseTransaction, DbBackend, DbErr,
    ExecResult, IsolationLevel, QueryResult, Statement, TransactionError, TransactionOptions,
    TransactionTrait,
};
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::sync::Mutex;
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
    /// Set when the payload runs in a batch: the batch's transaction, which
    /// already holds this message's `received` row.
    batch: Option<Arc<BatchTxn>>,
    token: u64,
}

/// One transaction shared by a batch's callbacks, run one after another.
/// The batch takes it back to commit; a handle used after that errors.
#[derive(Debug)]
pub(crate) struct BatchTxn {
    txn: Mutex<Option<DatabaseTransaction>>,
    backend: DbBackend,
    returning: bool,
    /// A callback ended its transaction without saving: the batch must not
    /// commit, and each message runs again alone.
    abandoned: AtomicBool,
}

impl BatchTxn {
    /// Empty until [`BatchTxn::put`]: the payloads are made before the
    /// transaction begins.
    pub(crate) fn new(db: &DatabaseConnection) -> BatchTxn {
        BatchTxn {
            backend: db.get_database_backend(),
            returning: db.support_returning(),
            txn: Mutex::new(None),
            abandoned: AtomicBool::new(false),
        }
    }

    pub(crate) async fn put(&self, txn: DatabaseTransaction) {
        *self.txn.lock().await = Some(txn);
    }

    /// The transaction back, and whether a callback gave it up; handles
    /// held after this get [`Error::TransactionOver`].
    pub(crate) async fn take(&self) -> (Option<DatabaseTransaction>, bool) {
        let txn = self.txn.lock().await.take();
        (txn, self.abandoned.load(Ordering::Acquire))
    }
}

impl Payload {
    pub(crate) fn new(
        raw: Arc<Vec<u8>>,
        headers: BTreeMap<String, String>,
        msg_id: Option<String>,
        correlation_id: String,
        db: DatabaseConnection,
        batch: Option<Arc<BatchTxn>>,
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
                batch,
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
    /// `insert`, `update`, queries and `insert_and_publish`. In a batch
    /// (`consumer.batch_size` > 1) it is the batch's transaction, which
    /// commits once every callback of the batch has saved.
    pub async fn begin(&self) -> Result<Transaction> {
        let conn = match &self.inner.batch {
            Some(shared) => Conn::Batch(Arc::clone(shared)),
            None => Conn::Own(self.inner.db.begin().await?),
        };
        Ok(Transaction {
            conn: Some(conn),
            token: self.inner.token,
        })
    }

    /// Record the message as processed inside `txn` and commit `txn`: your
    /// writes and the deduplication row commit together, and the ack is sent
    /// after the commit. If another delivery of the same message committed
    /// first, `txn` is rolled back and the message is acked as a duplicate.
    /// `txn` must come from this payload's [`Payload::begin`]. In a batch the
    /// commit is the batch's, after the last callback.
    pub async fn save(&self, mut txn: Transaction) -> Result<Handled> {
        if txn.token != self.inner.token {
            return Err(Error::ForeignTransaction);
        }
        match txn.conn.take() {
            // The batch wrote the received row before the callbacks ran.
            Some(Conn::Batch(_)) => Ok(self.decide(Decision::Saved)),
            Some(Conn::Own(txn)) => {
                let row = self.received_row();
                match super::inbox::insert_new(&txn, vec![row]).await {
                    Ok(inserted) if inserted.is_empty() => {
                        txn.rollback().await?;
                        Ok(self.decide(Decision::Duplicate))
                    }
                    Ok(_) => {
                        txn.commit().await?;
                        Ok(self.decide(Decision::Saved))
                    }
                    Err(err) => {
                        let _ = txn.rollback().await;
                        Err(err)
                    }
                }
            }
            None => Err(Error::TransactionOver),
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

    pub(crate) fn received_row(&self) -> received::Model {
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
/// it (which rolls it back; in a batch, the batch rolls back and each of its
/// messages runs again alone). Use `&txn` wherever SeaORM takes a connection.
#[derive(Debug)]
pub struct Transaction {
    conn: Option<Conn>,
    token: u64,
}

#[derive(Debug)]
enum Conn {
    Own(DatabaseTransaction),
    Batch(Arc<BatchTxn>),
}

impl Transaction {
    /// A handle on the batch's transaction, for the callback holding `token`.
    pub(super) fn in_batch(shared: Arc<BatchTxn>, token: u64) -> Transaction {
        Transaction {
            conn: Some(Conn::Batch(shared)),
            token,
        }
    }

    pub(super) fn token(&self) -> u64 {
        self.token
    }

    /// End the handle without abandoning the batch (it commits later);
    /// `false` if it was not a handle on a batch's live transaction.
    pub(super) fn release(&mut self) -> bool {
        matches!(self.conn.take(), Some(Conn::Batch(_)))
    }

    /// Roll back explicitly (dropping it also rolls back, later).
    pub async fn rollback(mut self) -> Result<()> {
        match self.conn.take() {
            Some(Conn::Own(txn)) => Ok(txn.rollback().await?),
            Some(Conn::Batch(shared)) => {
                shared.abandoned.store(true, Ordering::Release);
                Ok(())
            }
            None => Ok(()),
        }
    }

    fn backend(&self) -> DbBackend {
        match &self.conn {
            Some(Conn::Own(txn)) => txn.get_database_backend(),
            Some(Conn::Batch(shared)) => shared.backend,
            None => DbBackend::Postgres,
        }
    }
}

impl Drop for Transaction {
    fn drop(&mut self) {
        if let Some(Conn::Batch(shared)) = &self.conn {
            shared.abandoned.store(true, Ordering::Release);
        }
    }
}

fn over() -> DbErr {
    DbErr::Custom(Error::TransactionOver.to_string())
}

/// Run `$call` on the transaction behind `$self`, whichever kind it is.
macro_rules! on_txn {
    ($self:ident, |$txn:ident| $call:expr) => {
        match &$self.conn {
            Some(Conn::Own($txn)) => $call.await,
            Some(Conn::Batch(shared)) => match shared.txn.lock().await.as_ref() {
                Some($txn) => $call.await,
                None => Err(over()),
            },
            None => Err(over()),
        }
    };
}

#[async_trait]
impl ConnectionTrait for Transaction {
    fn get_database_backend(&self) -> DbBackend {
        self.backend()
    }

    async fn execute_raw(&self, stmt: Statement) -> std::result::Result<ExecResult, DbErr> {
        on_txn!(self, |txn| txn.execute_raw(stmt))
    }

    async fn execute_unprepared(&self, sql: &str) -> std::result::Result<ExecResult, DbErr> {
        on_txn!(self, |txn| txn.execute_unprepared(sql))
    }

    async fn query_one_raw(
        &self,
        stmt: Statement,
    ) -> std::result::Result<Option<QueryResult>, DbErr> {
        on_txn!(self, |txn| txn.query_one_raw(stmt))
    }

    async fn query_all_raw(&self, stmt: Statement) -> std::result::Result<Vec<QueryResult>, DbErr> {
        on_txn!(self, |txn| txn.query_all_raw(stmt))
    }

    fn support_returning(&self) -> bool {
        match &self.conn {
            Some(Conn::Own(txn)) => txn.support_returning(),
            Some(Conn::Batch(shared)) => shared.returning,
            None => false,
        }
    }
}

/// Nested transactions are savepoints inside this one.
#[async_trait]
impl TransactionTrait for Transaction {
    type Transaction = DatabaseTransaction;

    async fn begin(&self) -> std::result::Result<DatabaseTransaction, DbErr> {
        on_txn!(self, |txn| txn.begin())
    }

    async fn begin_with_config(
        &self,
        isolation_level: Option<IsolationLevel>,
        access_mode: Option<AccessMode>,
    ) -> std::result::Result<DatabaseTransaction, DbErr> {
        on_txn!(self, |txn| txn
            .begin_with_config(isolation_level, access_mode))
    }

    async fn begin_with_options(
        &self,
        options: TransactionOptions,
    ) -> std::result::Result<DatabaseTransaction, DbErr> {
        on_txn!(self, |txn| txn.begin_with_options(options))
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
        match &self.conn {
            Some(Conn::Own(txn)) => txn.transaction(callback).await,
            Some(Conn::Batch(shared)) => match shared.txn.lock().await.as_ref() {
                Some(txn) => txn.transaction(callback).await,
                None => Err(TransactionError::Connection(over())),
            },
            None => Err(TransactionError::Connection(over())),
        }
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
        match &self.conn {
            Some(Conn::Own(txn)) => {
                txn.transaction_with_config(callback, isolation_level, access_mode)
                    .await
            }
            Some(Conn::Batch(shared)) => match shared.txn.lock().await.as_ref() {
                Some(txn) => {
                    txn.transaction_with_config(callback, isolation_level, access_mode)
                        .await
                }
                None => Err(TransactionError::Connection(over())),
            },
            None => Err(TransactionError::Connection(over())),
        }
    }
}
