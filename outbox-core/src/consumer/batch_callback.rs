//! `#[callback(batch)]`: one call for a batch's new messages, in the batch's
//! one transaction, for callbacks that write set-based. Each message is
//! still decided on its own: saved with the batch, or nacked to the
//! dead-letter queue (its `received` row is taken out before the commit).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use sea_orm::DatabaseConnection;

use super::payload::BatchTxn;
use crate::{BoxError, Error, Payload, Result, Transaction};

/// What a batch callback returns: [`BatchHandled`] comes only from
/// [`Batch::save`]. An `Err` (or a panic) rolls the batch back; then each
/// message runs again in a batch of its own, where an error is that
/// message's and sends it to the dead-letter queue (after retries, for
/// transient database errors).
pub type BatchResult = std::result::Result<BatchHandled, BoxError>;

/// The batch callback's decision: every payload not nacked is saved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchHandled {
    pub(crate) token: u64,
}

/// The new messages of one batch, as a batch callback sees them. Messages
/// already received are acked without reaching it.
#[derive(Debug, Clone)]
pub struct Batch {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    payloads: Vec<Payload>,
    txn: Arc<BatchTxn>,
    db: DatabaseConnection,
    /// Nacked payloads by token, with why.
    nacked: Mutex<BTreeMap<u64, String>>,
    token: u64,
}

impl Batch {
    pub(crate) fn new(
        payloads: Vec<Payload>,
        txn: Arc<BatchTxn>,
        db: DatabaseConnection,
        token: u64,
    ) -> Batch {
        Batch {
            inner: Arc::new(Inner {
                payloads,
                txn,
                db,
                nacked: Mutex::new(BTreeMap::new()),
                token,
            }),
        }
    }

    /// The messages, in delivery order.
    pub fn payloads(&self) -> &[Payload] {
        &self.inner.payloads
    }

    /// How many messages.
    pub fn len(&self) -> usize {
        self.inner.payloads.len()
    }

    /// Whether there are none (never, for a batch a consumer hands over).
    pub fn is_empty(&self) -> bool {
        self.inner.payloads.is_empty()
    }

    /// The consumer's database. Write through [`Batch::begin`]'s
    /// transaction instead: another connection waits for the batch's locks.
    pub fn db(&self) -> &DatabaseConnection {
        &self.inner.db
    }

    /// The batch's transaction, which already holds every message's
    /// `received` row; finish with [`Batch::save`]. Dropping it, or rolling
    /// it back, rolls the batch back.
    pub async fn begin(&self) -> Result<Transaction> {
        Ok(Transaction::in_batch(
            Arc::clone(&self.inner.txn),
            self.inner.token,
        ))
    }

    /// Send `payload` to the dead-letter queue with `reason` instead of
    /// saving it; the others are unaffected. Nothing of it is recorded as
    /// received, but your own writes for it in the batch's transaction stay:
    /// nack before writing, or leave its rows out.
    pub fn nack(&self, payload: &Payload, reason: impl Into<String>) -> Result<()> {
        let token = payload.token();
        if !self.inner.payloads.iter().any(|p| p.token() == token) {
            return Err(Error::NotInBatch);
        }
        self.nacked().insert(token, reason.into());
        Ok(())
    }

    /// Save every payload not nacked: the batch commits with your writes
    /// once this returns, then the messages are acked. `txn` must come from
    /// this batch's [`Batch::begin`].
    pub async fn save(&self, mut txn: Transaction) -> Result<BatchHandled> {
        if txn.token() != self.inner.token {
            return Err(Error::ForeignTransaction);
        }
        if !txn.release() {
            return Err(Error::TransactionOver);
        }
        Ok(BatchHandled {
            token: self.inner.token,
        })
    }

    pub(crate) fn token(&self) -> u64 {
        self.inner.token
    }

    /// Why each nacked payload was nacked, by token.
    pub(crate) fn nacks(&self) -> BTreeMap<u64, String> {
        self.nacked().clone()
    }

    fn nacked(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, String>> {
        // A panic while holding the lock leaves the map as it was: use it.
        self.inner
            .nacked
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}
