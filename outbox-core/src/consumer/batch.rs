//! Group commit: a batch of deliveries → their `received` rows in one
//! statement → their callbacks, one after another, in that one transaction
//! (or one call of a batch callback for all the new ones) → one commit →
//! the acks.
//!
//! Without savepoints: when any callback of the batch does not save (it
//! nacks, fails, panics or drops its transaction), the batch rolls back and
//! each of its new messages runs again alone, in a transaction of its own,
//! with the retries of a single message. A failed commit gives the whole
//! batch back to the queue; the inbox skips whatever did commit.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use sea_orm::TransactionTrait;
use tracing::{debug, info, warn};
use uuid::Uuid;

use super::batch_callback::Batch;
use super::callback::Handler;
use super::payload::{BatchTxn, Decision};
use super::{MAX_MSG_ID_LEN, Ran, Shared, correlation_id, inbox, message_id};
use crate::broker::{Delivery, Settler};
use crate::{Destination, Payload, report};

/// One delivery of a batch, with what the consumer derived from it.
struct Member {
    delivery: Delivery,
    msg_id: Option<String>,
    correlation_id: String,
    payload: Payload,
}

/// What running a batch together came to.
enum Together {
    /// One decision per member: saved or duplicate after the commit, or all
    /// back to the queue when the commit failed.
    Decided(Vec<Decision>),
    /// Not committed because a callback did not save (or the database
    /// failed, `cause`): run each member alone, except these duplicates and
    /// the one whose run stands.
    Alone {
        duplicates: HashSet<usize>,
        stands: Option<(usize, Ran)>,
        cause: Option<String>,
    },
}

/// Handle `deliveries` (the first taken at `taken`), settling each.
pub(super) async fn handle(
    shared: &Shared,
    destination: &Destination,
    deliveries: Vec<Delivery>,
    settler: &Settler,
    taken: Instant,
) {
    let count = deliveries.len();
    let mut pending = deliveries;
    // A second delivery of an id already in this round waits for the next
    // round: by then the first has committed (a duplicate) or has not.
    while !pending.is_empty() {
        pending = round(shared, destination, pending, settler).await;
    }
    // From the batch's first delivery to its last settle: the wait to fill
    // the batch counts.
    let elapsed = taken.elapsed();
    for _ in 0..count {
        shared.metrics.handle_latency.observe(elapsed);
    }
}

/// One transaction's worth of `deliveries`; returns the repeats of an id
/// seen earlier in them, for the next round.
async fn round(
    shared: &Shared,
    destination: &Destination,
    deliveries: Vec<Delivery>,
    settler: &Settler,
) -> Vec<Delivery> {
    let mut members = Vec::with_capacity(deliveries.len());
    let mut repeats = Vec::new();
    let mut ids = HashSet::new();
    let batch = Arc::new(BatchTxn::new(&shared.db));
    for delivery in deliveries {
        let msg_id = message_id(&delivery);
        if let Some(id) = &msg_id {
            if id.len() > MAX_MSG_ID_LEN {
                let reason = format!(
                    "the message id is {} characters; the inbox (`received.msg_id`) holds at most {MAX_MSG_ID_LEN}",
                    id.len()
                );
                super::settle(
                    shared,
                    settler,
                    delivery.tag,
                    Some(id),
                    Decision::Nack(reason),
                );
                continue;
            }
            if !ids.insert(id.clone()) {
                repeats.push(delivery);
                continue;
            }
        } else {
            warn!(destination = %destination, "message has no cap-msg-id, dop-msg-id or message_id; it cannot be deduplicated");
        }
        let correlation_id = correlation_id(&delivery.headers, msg_id.as_deref());
        members.push(Member {
            payload: super::payload(
                shared,
                &delivery,
                &msg_id,
                &correlation_id,
                Some(Arc::clone(&batch)),
            ),
            delivery,
            msg_id,
            correlation_id,
        });
    }
    match run_together(shared, &members, &batch).await {
        Together::Decided(decisions) => {
            for (member, decision) in members.iter().zip(decisions) {
                super::settle(
                    shared,
                    settler,
                    member.delivery.tag,
                    member.msg_id.as_deref(),
                    decision,
                );
            }
        }
        Together::Alone {
            duplicates,
            mut stands,
            ..
        } => {
            // Once one message found the database unreachable past its
            // retries, the rest go back to the queue without their own.
            let mut down: Option<String> = None;
            for (index, member) in members.into_iter().enumerate() {
                let Member {
                    delivery,
                    msg_id,
                    correlation_id,
                    ..
                } = member;
                let tag = delivery.tag;
                let id = msg_id.as_deref().unwrap_or("<none>");
                let ran = stands.take_if(|(at, _)| *at == index).map(|(_, ran)| ran);
                let decision = match ran {
                    _ if duplicates.contains(&index) => Decision::Duplicate,
                    _ if down.is_some() => Decision::Requeue(down.clone().unwrap_or_default()),
                    Some(Ran::Decided(decision)) => decision,
                    Some(Ran::Failed(text)) => super::failure(id, text),
                    Some(Ran::Transient(text)) => {
                        super::alone(shared, delivery, msg_id.clone(), correlation_id, Some(text))
                            .await
                    }
                    None => {
                        super::alone(shared, delivery, msg_id.clone(), correlation_id, None).await
                    }
                };
                if let Decision::Requeue(reason) = &decision {
                    down = Some(reason.clone());
                }
                super::settle(shared, settler, tag, msg_id.as_deref(), decision);
            }
        }
    }
    repeats
}

/// Run one delivery in a batch of its own: how a batch callback runs a
/// message alone.
pub(super) async fn one(
    shared: &Shared,
    delivery: &Delivery,
    msg_id: &Option<String>,
    correlation_id: &str,
) -> Ran {
    let batch = Arc::new(BatchTxn::new(&shared.db));
    let member = Member {
        payload: super::payload(
            shared,
            delivery,
            msg_id,
            correlation_id,
            Some(Arc::clone(&batch)),
        ),
        delivery: delivery.clone(),
        msg_id: msg_id.clone(),
        correlation_id: correlation_id.to_owned(),
    };
    match run_together(shared, std::slice::from_ref(&member), &batch).await {
        Together::Decided(mut decisions) => match decisions.pop() {
            Some(decision) => Ran::Decided(decision),
            None => Ran::Transient("the batch decided nothing".to_owned()),
        },
        Together::Alone {
            duplicates,
            stands,
            cause,
        } => match stands {
            _ if duplicates.contains(&0) => Ran::Decided(Decision::Duplicate),
            Some((_, ran)) => ran,
            None => Ran::Transient(cause.unwrap_or_else(|| "the batch rolled back".to_owned())),
        },
    }
}

async fn run_together(shared: &Shared, members: &[Member], batch: &Arc<BatchTxn>) -> Together {
    let everyone = |cause: String| Together::Alone {
        duplicates: HashSet::new(),
        stands: None,
        cause: Some(cause),
    };
    if members.is_empty() {
        return Together::Decided(Vec::new());
    }
    let txn = match shared.db.begin().await {
        Ok(txn) => txn,
        Err(err) => {
            let cause = report(&crate::Error::from(err));
            debug!(error = %cause, "cannot begin the batch's transaction; running its messages alone");
            return everyone(cause);
        }
    };
    let rows: Vec<_> = members.iter().map(|m| m.payload.received_row()).collect();
    let row_ids: Vec<Uuid> = rows.iter().map(|row| row.id).collect();
    let inserted = match inbox::insert_new(&txn, rows).await {
        Ok(inserted) => inserted,
        Err(err) => {
            let cause = report(&err);
            debug!(error = %cause, "cannot write the batch's inbox rows; running its messages alone");
            let _ = txn.rollback().await;
            return everyone(cause);
        }
    };
    batch.put(txn).await;
    let duplicates: HashSet<usize> = (0..members.len())
        .filter(|&index| !inserted.contains(&row_ids[index]))
        .collect();
    for index in &duplicates {
        info!(
            msg_id = members[*index].msg_id.as_deref().unwrap_or("<none>"),
            "message already received; acking without running the callback"
        );
    }
    let new: Vec<usize> = (0..members.len())
        .filter(|index| !duplicates.contains(index))
        .collect();
    let (all_saved, stands, nacks) = match &shared.handler {
        Handler::Message(_) => each(shared, members, &new).await,
        Handler::Batch(_) => together(shared, members, &new, batch).await,
    };
    let (txn, abandoned) = batch.take().await;
    let Some(txn) = txn else {
        return Together::Alone {
            duplicates,
            stands,
            cause: None,
        };
    };
    if !all_saved || abandoned {
        debug!(
            messages = members.len(),
            "a callback of the batch did not save; rolling back and running each message alone"
        );
        // Roll back now: a dropped transaction would keep its locks until
        // its connection is used again, and the reruns need those rows.
        let _ = txn.rollback().await;
        return Together::Alone {
            duplicates,
            stands,
            cause: None,
        };
    }
    // A nacked message of a batch callback leaves no trace in the inbox.
    if !nacks.is_empty() {
        let ids: Vec<Uuid> = nacks.keys().map(|index| row_ids[*index]).collect();
        if let Err(err) = inbox::delete(&txn, ids).await {
            let cause = report(&err);
            debug!(error = %cause, "cannot remove the nacked messages' inbox rows; running the batch's messages alone");
            let _ = txn.rollback().await;
            return Together::Alone {
                duplicates,
                stands: None,
                cause: Some(cause),
            };
        }
    }
    let decisions = match txn.commit().await {
        Ok(()) => (0..members.len())
            .map(|index| {
                if duplicates.contains(&index) {
                    Decision::Duplicate
                } else if let Some(reason) = nacks.get(&index) {
                    Decision::Nack(reason.clone())
                } else {
                    Decision::Saved
                }
            })
            .collect(),
        Err(err) => {
            let reason = report(&crate::Error::from(err));
            warn!(messages = members.len(), error = %reason, "the batch's commit failed; its messages go back to the queue");
            vec![Decision::Requeue(reason); members.len()]
        }
    };
    Together::Decided(decisions)
}

/// Whether every callback saved, and the run that stands when one did not.
type Outcome = (bool, Option<(usize, Ran)>, BTreeMap<usize, String>);

/// The per-message callback on each new member, one after another, until
/// one does not save.
async fn each(shared: &Shared, members: &[Member], new: &[usize]) -> Outcome {
    for (position, &index) in new.iter().enumerate() {
        let member = &members[index];
        let ran = super::call(
            shared,
            member.payload.clone(),
            &member.correlation_id,
            member.msg_id.as_deref(),
        )
        .await;
        if !matches!(ran, Ran::Decided(Decision::Saved)) {
            // Its run stands when nothing else could have caused it: an
            // explicit nack, or the transaction's first callback (so a batch
            // of one runs its callback once, as without batching).
            let stands = (position == 0 || matches!(ran, Ran::Decided(_))).then_some((index, ran));
            return (false, stands, BTreeMap::new());
        }
    }
    (true, None, BTreeMap::new())
}

/// The batch callback, once, on every new member.
async fn together(
    shared: &Shared,
    members: &[Member],
    new: &[usize],
    txn: &Arc<BatchTxn>,
) -> Outcome {
    if new.is_empty() {
        return (true, None, BTreeMap::new());
    }
    let payloads = new.iter().map(|&i| members[i].payload.clone()).collect();
    let batch = Batch::new(payloads, Arc::clone(txn), shared.db.clone(), shared.token());
    // A batch of one runs under its message's correlation id; a larger one
    // under a new id (use `with_correlation_id(payload.correlation_id(), …)`
    // around what you emit per message).
    let correlation_id = match new {
        [only] => members[*only].correlation_id.clone(),
        _ => Uuid::new_v4().to_string(),
    };
    match super::call_batch(shared, batch.clone(), &correlation_id).await {
        Ran::Decided(Decision::Saved) => {
            let by_token = batch.nacks();
            let nacks = new
                .iter()
                .filter_map(|&i| {
                    by_token
                        .get(&members[i].payload.token())
                        .map(|reason| (i, reason.clone()))
                })
                .collect();
            (true, None, nacks)
        }
        // Alone, its failure is its own; in company, each runs again alone.
        ran => {
            let stands = match new {
                [only] => Some((*only, ran)),
                _ => None,
            };
            (false, stands, BTreeMap::new())
        }
    }
}
