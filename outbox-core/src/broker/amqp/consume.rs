//! Consuming a queue, and settling in bulk.
//!
//! One `basic.ack` with `multiple` covers every run of finished deliveries,
//! instead of one per message (a per-message ack costs the broker and lapin
//! more than the message itself); it never covers a delivery still in
//! flight. A finished delivery waiting behind a slow one is acked on its own
//! after a short hold, so a slow callback never holds up the prefetch
//! window. Dead letters are copied to `DLQ.<queue>` with why they failed
//! (`x-outbox-error`), confirmed, then acked; with `consumer.dead_letter =
//! "nack"` they are rejected without requeue instead, as django-outbox-pattern
//! does, and the queue's dead-letter arguments route them.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use futures_util::StreamExt as _;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions,
    BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{debug, warn};
use uuid::Uuid;

use super::{Amqp, codec, topology};
use crate::broker::{Delivery, QueueDeclaration, Settle, SettleEvent, Settler, SubscriptionSpec};
use crate::settings::DeadLetter;
use crate::{Error, Result};

/// How long a finished delivery may wait for the ones before it.
const HOLD: Duration = Duration::from_millis(20);

/// A consumer on its own connection.
pub(crate) struct AmqpSubscription {
    amqp: Amqp,
    connection: Connection,
    channel: Channel,
    consumer: lapin::Consumer,
    tag: String,
    declaration: QueueDeclaration,
    subscribed: String,
    settler: Settler,
    events: mpsc::UnboundedSender<SettleEvent>,
    acker: JoinHandle<()>,
    /// With `dead_letter = "publish"`: what each delivery was, to copy it.
    copies: Option<Copies>,
}

type Copies = std::sync::Arc<std::sync::Mutex<HashMap<u64, (Vec<u8>, BasicProperties)>>>;

impl std::fmt::Debug for AmqpSubscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpSubscription")
            .field("queue", &self.declaration.queue)
            .field("tag", &self.tag)
            .finish_non_exhaustive()
    }
}

impl AmqpSubscription {
    pub(crate) async fn open(amqp: &Amqp, spec: &SubscriptionSpec) -> Result<AmqpSubscription> {
        let connection = amqp.connect(&spec.name).await?;
        let channel = amqp
            .call("channel.open", connection.create_channel())
            .await?;
        let declaration = topology::declare_subscription(amqp, &channel, spec).await?;
        amqp.call(
            "basic.qos",
            channel.basic_qos(
                spec.consumer.effective_prefetch(),
                BasicQosOptions::default(),
            ),
        )
        .await?;
        let tag = format!("outbox-{}", Uuid::new_v4().simple());
        let consumer = amqp
            .call(
                "basic.consume",
                channel.basic_consume(
                    codec::short(&declaration.queue).map_err(|reason| {
                        Error::SubscriptionRefused {
                            destination: spec.destination.to_string(),
                            reason,
                            fix: "use a shorter queue name".to_owned(),
                        }
                    })?,
                    ShortString::from(tag.as_str()),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                ),
            )
            .await?;
        let copies = if spec.consumer.dead_letter == DeadLetter::Publish {
            Some(Copies::default())
        } else {
            None
        };
        let dead_letters = match &copies {
            Some(copies) => {
                let channel = amqp
                    .call("channel.open", connection.create_channel())
                    .await?;
                amqp.call(
                    "confirm.select",
                    channel.confirm_select(ConfirmSelectOptions::default()),
                )
                .await?;
                Some(DeadLetters {
                    channel,
                    queue: declaration.dead_letter_queue.clone(),
                    from: declaration.queue.clone(),
                    copies: copies.clone(),
                })
            }
            None => None,
        };
        let (settler, events) = Settler::channel();
        let acker = tokio::spawn(run_acker(
            Acker {
                amqp: amqp.clone(),
                channel: channel.clone(),
                outstanding: BTreeSet::new(),
                finished: BTreeSet::new(),
                failed: false,
                dead_letters,
            },
            events,
        ));
        Ok(AmqpSubscription {
            amqp: amqp.clone(),
            connection,
            channel,
            consumer,
            tag,
            declaration,
            subscribed: spec.destination.to_string(),
            events: settler.sender(),
            settler,
            acker,
            copies,
        })
    }

    pub(crate) fn declaration(&self) -> &QueueDeclaration {
        &self.declaration
    }

    pub(crate) fn settler(&self) -> Settler {
        self.settler.clone()
    }

    pub(crate) async fn next(&mut self) -> Result<Delivery> {
        match self.consumer.next().await {
            Some(Ok(delivery)) => {
                // Before anyone can settle it, so a bulk ack never passes it.
                let _ = self
                    .events
                    .send(SettleEvent::Delivered(delivery.delivery_tag));
                if let Some(copies) = &self.copies
                    && let Ok(mut copies) = copies.lock()
                {
                    copies.insert(
                        delivery.delivery_tag,
                        (delivery.data.clone(), delivery.properties.clone()),
                    );
                }
                Ok(codec::delivery(delivery, &self.subscribed))
            }
            Some(Err(err)) => Err(self.amqp.error("consume", err)),
            None => Err(Error::BrokerTimeout {
                operation: "consume (the broker ended the consumer)",
                timeout: self.amqp.timeout(),
            }),
        }
    }

    pub(crate) async fn close(self) {
        // Stop new deliveries; unstarted prefetched ones return to the queue.
        let _ = self
            .amqp
            .call(
                "basic.cancel",
                self.channel.basic_cancel(
                    ShortString::from(self.tag.as_str()),
                    BasicCancelOptions::default(),
                ),
            )
            .await;
        drop(self.events);
        drop(self.settler);
        let _ = self.acker.await;
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            self.connection.close(200, "bye".into()),
        )
        .await;
    }
}

async fn run_acker(mut acker: Acker, mut events: mpsc::UnboundedReceiver<SettleEvent>) {
    loop {
        let event = if acker.finished.is_empty() {
            events.recv().await
        } else {
            tokio::select! {
                event = events.recv() => event,
                () = tokio::time::sleep(HOLD) => {
                    acker.ack_each().await;
                    continue;
                }
            }
        };
        let Some(event) = event else {
            acker.ack_prefix().await;
            acker.ack_each().await;
            // Closed here, not by lapin when it is dropped: a channel still
            // closing when the connection closes makes lapin log an ERROR.
            if let Some(dead_letters) = acker.dead_letters.take() {
                let _ = dead_letters.channel.close(200, "bye".into()).await;
            }
            return;
        };
        acker.apply(event).await;
        // Take everything already queued before acking: natural batching.
        while let Ok(event) = events.try_recv() {
            acker.apply(event).await;
        }
        acker.ack_prefix().await;
    }
}

struct Acker {
    amqp: Amqp,
    channel: Channel,
    /// Delivered and not yet acked or nacked.
    outstanding: BTreeSet<u64>,
    /// Finished with an ack, waiting for an earlier delivery to finish.
    finished: BTreeSet<u64>,
    /// Whether an ack already failed (logged once).
    failed: bool,
    dead_letters: Option<DeadLetters>,
}

/// Copies failed deliveries to `DLQ.<queue>` (`dead_letter = "publish"`).
struct DeadLetters {
    channel: Channel,
    queue: String,
    from: String,
    copies: Copies,
}

impl Acker {
    async fn apply(&mut self, event: SettleEvent) {
        match event {
            SettleEvent::Delivered(tag) => {
                self.outstanding.insert(tag);
            }
            SettleEvent::Settled(tag, Settle::Ack) => {
                self.forget_copy(tag);
                self.finished.insert(tag);
            }
            SettleEvent::Settled(tag, Settle::Retry) => {
                self.forget_copy(tag);
                self.outstanding.remove(&tag);
                self.nack(tag, true).await;
            }
            SettleEvent::Settled(tag, Settle::DeadLetter(reason)) => {
                self.outstanding.remove(&tag);
                let copied = match self.dead_letters.as_ref() {
                    Some(dead_letters) => Some(dead_letters.copy(&self.amqp, tag, &reason).await),
                    None => None,
                };
                match copied {
                    None => self.nack(tag, false).await,
                    Some(Ok(())) => {
                        let result = self
                            .amqp
                            .call(
                                "basic.ack",
                                self.channel
                                    .basic_ack(tag, BasicAckOptions { multiple: false }),
                            )
                            .await;
                        self.check(result);
                    }
                    Some(Err(err)) => {
                        // Not copied: requeue rather than lose it.
                        warn!(tag, error = %crate::report(&err), "could not copy a failed message to the dead-letter queue; it goes back to its queue");
                        self.nack(tag, true).await;
                    }
                }
            }
        }
    }

    fn forget_copy(&self, tag: u64) {
        if let Some(dead_letters) = &self.dead_letters
            && let Ok(mut copies) = dead_letters.copies.lock()
        {
            copies.remove(&tag);
        }
    }

    async fn nack(&mut self, tag: u64, requeue: bool) {
        let result = self
            .amqp
            .call(
                "basic.nack",
                self.channel.basic_nack(
                    tag,
                    BasicNackOptions {
                        requeue,
                        multiple: false,
                    },
                ),
            )
            .await;
        self.check(result);
    }

    /// One `multiple` ack for the run of finished deliveries at the front.
    async fn ack_prefix(&mut self) {
        let mut last = None;
        while let Some(&first) = self.outstanding.first() {
            if !self.finished.remove(&first) {
                break;
            }
            self.outstanding.pop_first();
            last = Some(first);
        }
        if let Some(tag) = last {
            let result = self
                .amqp
                .call(
                    "basic.ack",
                    self.channel
                        .basic_ack(tag, BasicAckOptions { multiple: true }),
                )
                .await;
            self.check(result);
        }
    }

    /// Ack finished deliveries one by one: they waited long enough.
    async fn ack_each(&mut self) {
        for tag in std::mem::take(&mut self.finished) {
            self.outstanding.remove(&tag);
            let result = self
                .amqp
                .call(
                    "basic.ack",
                    self.channel
                        .basic_ack(tag, BasicAckOptions { multiple: false }),
                )
                .await;
            self.check(result);
        }
    }

    fn check(&mut self, result: Result<()>) {
        if let Err(err) = result
            && !self.failed
        {
            self.failed = true;
            warn!(error = %crate::report(&err), "could not ack/nack; the broker will redeliver those messages and the duplicates are skipped");
        }
    }
}

impl DeadLetters {
    /// Publish the delivery to the dead-letter queue with why it failed,
    /// and wait for the broker's confirm.
    async fn copy(&self, amqp: &Amqp, tag: u64, reason: &str) -> Result<()> {
        let copy = self
            .copies
            .lock()
            .ok()
            .and_then(|mut copies| copies.remove(&tag));
        let Some((body, properties)) = copy else {
            return Err(Error::NotDelivered {
                destination: format!("/queue/{}", self.queue),
                reason: "the delivery was not kept".to_owned(),
            });
        };
        let mut headers = properties.headers().clone().unwrap_or_default();
        headers.insert(
            ShortString::from("x-outbox-error"),
            AMQPValue::LongString(LongString::from(reason)),
        );
        headers.insert(
            ShortString::from("x-outbox-queue"),
            AMQPValue::LongString(LongString::from(self.from.as_str())),
        );
        let confirm = amqp
            .call(
                "basic.publish",
                self.channel.basic_publish(
                    ShortString::from(""),
                    codec::short(&self.queue).map_err(|reason| Error::NotDelivered {
                        destination: self.queue.clone(),
                        reason,
                    })?,
                    BasicPublishOptions {
                        mandatory: true,
                        immediate: false,
                    },
                    &body,
                    properties.with_headers(headers),
                ),
            )
            .await?;
        match amqp.call("publisher confirm", confirm).await? {
            Confirmation::Ack(None) => {
                debug!(tag, queue = %self.queue, "failed message copied to the dead-letter queue");
                Ok(())
            }
            Confirmation::Ack(Some(_)) => Err(Error::NotDelivered {
                destination: format!("/queue/{}", self.queue),
                reason: "the copy was returned as unroutable".to_owned(),
            }),
            Confirmation::Nack(_) | Confirmation::NotRequested => Err(Error::NotDelivered {
                destination: format!("/queue/{}", self.queue),
                reason: "the broker refused the copy (nack)".to_owned(),
            }),
        }
    }
}
