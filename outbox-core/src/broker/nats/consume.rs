//! Consuming a JetStream stream through a durable pull consumer with
//! explicit acks.
//!
//! The durable is the subscription's queue name (`.` becomes `_`, which
//! JetStream names cannot hold); it filters the stream on the destination's
//! subject and remembers its position across restarts. Each delivery is
//! acked after its transaction commits, `nak`ed with a delay when it must
//! come again, and a failed one is copied to `DLQ.<stream>.<durable>` (kept
//! by the stream `<stream>_DLQ` that `outbox-cli stream create` makes) with
//! why it failed, then acked.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::AckKind;
use async_nats::jetstream::consumer::{AckPolicy, pull};
use futures_util::StreamExt as _;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{debug, warn};

use super::{Nats, subject};
use crate::broker::{Delivery, QueueDeclaration, Settle, SettleEvent, Settler, SubscriptionSpec};
use crate::{Error, Result};

type Held = Arc<Mutex<HashMap<u64, async_nats::jetstream::Message>>>;

/// A durable pull consumer on its own connection.
pub(crate) struct NatsSubscription {
    nats: Nats,
    client: async_nats::Client,
    /// What the puller took from the server, in order.
    incoming: mpsc::UnboundedReceiver<Pulled>,
    puller: JoinHandle<()>,
    declaration: QueueDeclaration,
    subscribed: String,
    settler: Settler,
    acker: JoinHandle<()>,
}

/// One item the puller took: a message (already held, with its tag), an
/// error, or the end of the consumer.
type Pulled = Option<std::result::Result<(u64, async_nats::jetstream::Message), String>>;

impl std::fmt::Debug for NatsSubscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsSubscription")
            .field("durable", &self.declaration.queue)
            .field("subject", &self.subscribed)
            .finish_non_exhaustive()
    }
}

/// The JetStream durable name for a queue name.
pub(crate) fn durable_name(queue: &str) -> std::result::Result<String, String> {
    let durable = queue.replace('.', "_");
    if durable.is_empty()
        || durable.contains(|c: char| c.is_whitespace() || matches!(c, '*' | '>' | '/' | '\\'))
    {
        return Err(format!(
            "`{queue}` cannot name a JetStream durable consumer (no spaces, `*`, `>`, `/` or `\\`)"
        ));
    }
    Ok(durable)
}

/// The stream that keeps the dead letters of `stream`.
pub(crate) fn dead_letter_stream(stream: &str) -> String {
    format!("{stream}_DLQ")
}

/// Where the durable consumer `durable` of `stream` copies what failed.
pub(crate) fn dead_letter_subject(stream: &str, durable: &str) -> String {
    format!("DLQ.{stream}.{durable}")
}

impl NatsSubscription {
    pub(crate) async fn open(nats: &Nats, spec: &SubscriptionSpec) -> Result<NatsSubscription> {
        let refused = |reason: String, fix: &str| Error::SubscriptionRefused {
            destination: spec.destination.to_string(),
            reason,
            fix: fix.to_owned(),
        };
        let settings = nats.settings();
        let filter = subject::filter(&settings.subject_prefix, &spec.destination)?;
        let durable = durable_name(&spec.queue).map_err(|reason| {
            refused(reason, "give a queue name of letters, digits, `-` and `_`")
        })?;
        let client = nats.connect(&spec.name).await?;
        let jetstream = nats.jetstream(client.clone());
        let stream_name = &settings.stream;
        let stream = jetstream.get_stream(stream_name).await.map_err(|err| {
            if super::stream::is_not_found(&err) {
                refused(
                    format!("the JetStream stream {stream_name} does not exist"),
                    "create it with `outbox-cli stream create` (nats.stream names it)",
                )
            } else {
                nats.api_error("stream info", &err)
            }
        })?;
        let dead_letters = dead_letter_stream(stream_name);
        if let Err(err) = jetstream.get_stream(&dead_letters).await {
            return Err(if super::stream::is_not_found(&err) {
                refused(
                    format!("the dead-letter stream {dead_letters} does not exist"),
                    "create it with `outbox-cli stream create`, which makes both",
                )
            } else {
                nats.api_error("stream info", &err)
            });
        }
        let config = pull::Config {
            durable_name: Some(durable.clone()),
            filter_subject: filter.clone(),
            ack_policy: AckPolicy::Explicit,
            max_deliver: i64::from(spec.consumer.delivery_limit),
            max_ack_pending: i64::from(spec.consumer.effective_prefetch()),
            ack_wait: nats.timeout(),
            ..pull::Config::default()
        };
        let consumer = stream
            .get_or_create_consumer(&durable, config)
            .await
            .map_err(|err| {
                refused(
                    format!("JetStream refused the durable consumer {durable}: {err}"),
                    "check that nats.stream_subjects capture the destination's subject, or delete the durable if it was made with another filter",
                )
            })?;
        let messages = consumer
            .stream()
            .max_messages_per_batch(usize::from(spec.consumer.effective_prefetch()))
            .messages()
            .await
            .map_err(|err| nats.api_error("consume", &err))?;
        let dead_letter_subject = dead_letter_subject(stream_name, &durable);
        let held = Held::default();
        let (settler, events) = Settler::channel();
        let acker = tokio::spawn(run_acker(
            Acker {
                jetstream,
                held: held.clone(),
                dead_letter_subject: dead_letter_subject.clone(),
                durable: durable.clone(),
                retry_wait: spec.consumer.retry_wait,
                ack_wait: nats.timeout(),
                failed: false,
            },
            events,
        ));
        let (pulled, incoming) = mpsc::unbounded_channel();
        let puller = tokio::spawn(pull(messages, held, settler.sender(), pulled));
        debug!(durable, subject = %filter, stream = %stream_name, "consuming JetStream");
        Ok(NatsSubscription {
            nats: nats.clone(),
            client,
            incoming,
            puller,
            declaration: QueueDeclaration {
                queue: durable.clone(),
                dead_letter_queue: dead_letter_subject,
            },
            subscribed: spec.destination.to_string(),
            settler,
            acker,
        })
    }

    pub(crate) fn declaration(&self) -> &QueueDeclaration {
        &self.declaration
    }

    pub(crate) fn settler(&self) -> Settler {
        self.settler.clone()
    }

    pub(crate) async fn next(&mut self) -> Result<Delivery> {
        match self.incoming.recv().await.flatten() {
            Some(Ok((tag, message))) => Ok(self.delivery(tag, &message)),
            Some(Err(err)) => Err(Error::Broker {
                operation: "consume",
                endpoint: self.nats.endpoint(),
                source: err.into(),
            }),
            None => Err(Error::BrokerTimeout {
                operation: "consume (the server ended the consumer)",
                timeout: self.nats.timeout(),
            }),
        }
    }

    fn delivery(&self, tag: u64, message: &async_nats::jetstream::Message) -> Delivery {
        let mut headers = BTreeMap::new();
        let mut transport_id = None;
        if let Some(map) = &message.headers {
            for (name, values) in map.iter() {
                let (Some(value), name) = (values.first(), name.to_string()) else {
                    continue;
                };
                if name.eq_ignore_ascii_case("Nats-Msg-Id") {
                    transport_id = Some(value.as_str().to_owned());
                }
                headers.insert(name, value.as_str().to_owned());
            }
        }
        let redelivered = message.info().is_ok_and(|info| info.delivered > 1);
        headers.insert("destination".to_owned(), self.subscribed.clone());
        headers.insert("redelivered".to_owned(), redelivered.to_string());
        Delivery {
            tag,
            headers,
            transport_id,
            body: message.payload.to_vec(),
            redelivered,
        }
    }

    pub(crate) async fn close(self) {
        // Stop pulling; what was pulled and not handed out comes again after
        // the ack wait.
        self.puller.abort();
        let _ = self.puller.await;
        drop(self.incoming);
        drop(self.settler);
        let _ = self.acker.await;
        let _ = tokio::time::timeout(Duration::from_secs(2), self.client.flush()).await;
    }
}

/// Take every message the server sends as soon as it arrives, so that all
/// it counts as delivered and unacknowledged is held (and kept in progress
/// by the acker), not waiting unseen in the client's buffer.
async fn pull(
    mut messages: pull::Stream,
    held: Held,
    events: mpsc::UnboundedSender<SettleEvent>,
    pulled: mpsc::UnboundedSender<Pulled>,
) {
    let mut next_tag = 0;
    loop {
        let item = match messages.next().await {
            Some(Ok(message)) => {
                next_tag += 1;
                let _ = events.send(SettleEvent::Delivered(next_tag));
                if let Ok(mut held) = held.lock() {
                    held.insert(next_tag, message.clone());
                }
                Some(Ok((next_tag, message)))
            }
            Some(Err(err)) => Some(Err(err.to_string())),
            None => None,
        };
        let end = item.is_none();
        if pulled.send(item).is_err() || end {
            return;
        }
    }
}

async fn run_acker(mut acker: Acker, mut events: mpsc::UnboundedReceiver<SettleEvent>) {
    // Messages held longer than the ack wait (a slow callback, a batch
    // behind one) are marked in progress, three times per ack wait, so
    // JetStream does not deliver them again meanwhile.
    let mut progress = tokio::time::interval((acker.ack_wait / 3).max(Duration::from_millis(100)));
    progress.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    progress.tick().await;
    loop {
        tokio::select! {
            event = events.recv() => match event {
                Some(SettleEvent::Settled(tag, settle)) => acker.settle(tag, settle).await,
                Some(_) => {}
                None => break,
            },
            _ = progress.tick() => acker.in_progress().await,
        }
    }
}

struct Acker {
    jetstream: async_nats::jetstream::Context,
    held: Held,
    dead_letter_subject: String,
    durable: String,
    retry_wait: Duration,
    /// The durable's ack wait.
    ack_wait: Duration,
    /// Whether an ack already failed (logged once).
    failed: bool,
}

impl Acker {
    async fn settle(&mut self, tag: u64, settle: Settle) {
        let Some(message) = self.held.lock().ok().and_then(|mut held| held.remove(&tag)) else {
            return;
        };
        let acked = match settle {
            Settle::Ack => message.ack().await,
            Settle::Retry => message.ack_with(AckKind::Nak(Some(self.retry_wait))).await,
            Settle::DeadLetter(reason) => match self.copy(&message, &reason).await {
                Ok(()) => message.ack().await,
                Err(err) => {
                    warn!(error = %err, subject = %self.dead_letter_subject, "could not copy a failed message to the dead-letter subject; it comes again");
                    message.ack_with(AckKind::Nak(Some(self.retry_wait))).await
                }
            },
        };
        if let Err(err) = acked
            && !self.failed
        {
            self.failed = true;
            warn!(error = %err, "could not ack/nak; JetStream will deliver those messages again and the duplicates are skipped");
        }
    }

    /// Tell JetStream every held message is still being worked on.
    async fn in_progress(&mut self) {
        let held: Vec<async_nats::jetstream::Message> = match self.held.lock() {
            Ok(held) => held.values().cloned().collect(),
            Err(_) => return,
        };
        for message in held {
            if let Err(err) = message.ack_with(AckKind::Progress).await {
                debug!(error = %err, "could not mark a message in progress");
            }
        }
    }

    /// Publish the delivery to the dead-letter subject with why it failed,
    /// and wait for the PubAck.
    async fn copy(
        &self,
        message: &async_nats::jetstream::Message,
        reason: &str,
    ) -> std::result::Result<(), String> {
        let mut headers = message.headers.clone().unwrap_or_default();
        // Nats-Msg-Id stays: a message dead-lettered again (its ack lost)
        // is dropped by the dead-letter stream as a duplicate.
        let reason: String = reason
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        headers.insert("x-outbox-error", reason.as_str());
        headers.insert("x-outbox-queue", self.durable.as_str());
        headers.insert(
            super::dead_letters::SUBJECT_HEADER,
            message.subject.as_str(),
        );
        let ack = self
            .jetstream
            .publish_with_headers(
                self.dead_letter_subject.clone(),
                headers,
                message.payload.clone(),
            )
            .await
            .map_err(|err| err.to_string())?;
        ack.await.map_err(|err| err.to_string())?;
        debug!(subject = %self.dead_letter_subject, "failed message copied to the dead-letter subject");
        Ok(())
    }
}
