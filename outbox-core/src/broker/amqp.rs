//! Publishing with pipelined publisher confirms over lapin.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::time::{Duration, Instant};

use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
};
use tracing::{debug, warn};

use crate::settings::BrokerSettings;
use crate::{Destination, DestinationKind, Error, Result};

/// Run a broker call with the `operation_timeout`: lapin futures can hang
/// when a broker dies mid-operation.
pub(crate) async fn with_timeout<T, F>(
    timeout: Duration,
    operation: &'static str,
    future: F,
) -> Result<T>
where
    F: Future<Output = lapin::Result<T>>,
{
    match tokio::time::timeout(timeout, future).await {
        Ok(result) => result.map_err(Error::from),
        Err(_) => Err(Error::BrokerTimeout { operation, timeout }),
    }
}

/// One message to publish.
#[derive(Debug, Clone)]
pub struct Outgoing<'a> {
    /// Where it goes.
    pub destination: &'a Destination,
    /// The body bytes (UTF-8 JSON).
    pub body: &'a [u8],
    /// Headers, sent as AMQP long strings (what the STOMP plugin turns into STOMP headers).
    pub headers: &'a BTreeMap<String, String>,
}

/// What the broker said about one published message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Confirmed: the broker took responsibility for it.
    Confirmed,
    /// Confirmed, but returned as unroutable: no queue is bound.
    Returned(String),
    /// Refused by the broker (nack), or refused before sending (e.g. the exchange does not exist).
    Rejected(String),
}

/// Published messages whose confirms are still to come.
///
/// lapin hands a returned (unroutable) message to whichever confirm it
/// completes next, and a `multiple` ack completes its confirms in hash
/// order: the return can ride on another message's confirm, even one of a
/// later batch. So returns are matched to messages by their `message_id`
/// (the `dop-msg-id`), never by the confirm that carried them.
#[derive(Debug)]
pub struct InFlight {
    slots: Vec<Slot>,
    timeout: Duration,
}

#[derive(Debug)]
enum Slot {
    /// Sent; the broker's answer is still to come.
    Waiting {
        id: String,
        confirm: lapin::PublisherConfirm,
    },
    /// Sent and answered.
    Done { id: String, acked: bool },
    /// Not sent (e.g. its exchange does not exist).
    Refused(String),
}

/// Message ids the broker returned as unroutable, not yet matched to their message.
#[derive(Debug, Default)]
pub(crate) struct Returns(std::collections::HashSet<String>);

impl Returns {
    /// Note a confirm's result: its returned message, if any.
    fn record(&mut self, confirmation: Confirmation) -> bool {
        let (acked, returned) = match confirmation {
            Confirmation::Ack(returned) => (true, returned),
            Confirmation::Nack(returned) => (false, returned),
            Confirmation::NotRequested => (true, None),
        };
        if let Some(returned) = returned {
            let properties = &returned.delivery.properties;
            let id = properties
                .message_id()
                .as_ref()
                .map(|id| id.to_string())
                .or_else(|| {
                    properties.headers().as_ref().and_then(|table| {
                        match table.inner().get(crate::headers::MSG_ID) {
                            Some(AMQPValue::LongString(id)) => {
                                Some(String::from_utf8_lossy(id.as_bytes()).into_owned())
                            }
                            _ => None,
                        }
                    })
                });
            match id {
                Some(id) => {
                    self.0.insert(id);
                }
                None => warn!("the broker returned a message without an id; it cannot be matched"),
            }
        }
        acked
    }
}

impl InFlight {
    /// How many messages.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Wait for every confirm (at most `operation_timeout` from now), then say
    /// what happened to each message, in order. `Err` means the connection failed.
    pub async fn outcomes(mut self) -> Result<Vec<Outcome>> {
        let mut returns = Returns::default();
        self.wait(&mut returns).await?;
        Ok(self.finish(&mut returns))
    }

    /// Wait for every confirm of this batch, noting returns.
    pub(crate) async fn wait(&mut self, returns: &mut Returns) -> Result<()> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        for slot in &mut self.slots {
            if let Slot::Waiting { id, confirm } = slot {
                let confirmation = match tokio::time::timeout_at(deadline, confirm).await {
                    Err(_) => {
                        return Err(Error::BrokerTimeout {
                            operation: "publisher confirm",
                            timeout: self.timeout,
                        });
                    }
                    Ok(confirmation) => confirmation?,
                };
                let acked = returns.record(confirmation);
                *slot = Slot::Done {
                    id: std::mem::take(id),
                    acked,
                };
            }
        }
        Ok(())
    }

    /// Note the confirms that already arrived, without waiting: a return for
    /// an earlier batch may ride on one of them.
    pub(crate) fn harvest(&mut self, returns: &mut Returns) {
        use futures_util::FutureExt as _;
        for slot in &mut self.slots {
            if let Slot::Waiting { id, confirm } = slot
                && let Some(Ok(confirmation)) = confirm.now_or_never()
            {
                let acked = returns.record(confirmation);
                *slot = Slot::Done {
                    id: std::mem::take(id),
                    acked,
                };
            }
        }
    }

    /// The outcome of each message, once [`InFlight::wait`] returned and the
    /// later batches were harvested.
    pub(crate) fn finish(self, returns: &mut Returns) -> Vec<Outcome> {
        self.slots
            .into_iter()
            .map(|slot| match slot {
                Slot::Refused(reason) => Outcome::Rejected(reason),
                Slot::Done { id, .. } if returns.0.remove(&id) => Outcome::Returned(
                    "unroutable: the broker returned it (312 NO_ROUTE); bind a queue to the destination"
                        .to_owned(),
                ),
                Slot::Done { acked: true, .. } => Outcome::Confirmed,
                Slot::Done { acked: false, .. } => {
                    Outcome::Rejected("the broker refused the message (nack)".to_owned())
                }
                Slot::Waiting { .. } => Outcome::Rejected("no confirm received".to_owned()),
            })
            .collect()
    }
}

/// How long a positive "this exchange/queue exists" check is trusted.
const TOPOLOGY_CACHE: Duration = Duration::from_secs(30);

/// A connection to RabbitMQ with a confirm-mode channel for publishing and a
/// second channel for topology checks (a failed passive declare closes its
/// channel; it must not be the publishing one).
#[derive(Debug)]
pub struct Broker {
    connection: Connection,
    publish: Channel,
    topology: Channel,
    timeout: Duration,
    checked: HashMap<String, Instant>,
}

impl Broker {
    /// Connect, open the channels and enable publisher confirms.
    pub async fn connect(settings: &BrokerSettings, name: &str) -> Result<Broker> {
        let timeout = settings.operation_timeout;
        let url = with_heartbeat(&settings.url, settings.heartbeat);
        let properties = ConnectionProperties::default().with_connection_name(name.into());
        let connection =
            with_timeout(timeout, "connect", Connection::connect(&url, properties)).await?;
        let publish = with_timeout(timeout, "channel.open", connection.create_channel()).await?;
        with_timeout(
            timeout,
            "confirm.select",
            publish.confirm_select(ConfirmSelectOptions::default()),
        )
        .await?;
        let topology = with_timeout(timeout, "channel.open", connection.create_channel()).await?;
        debug!(name, "connected to the broker");
        Ok(Broker {
            connection,
            publish,
            topology,
            timeout,
            checked: HashMap::new(),
        })
    }

    /// The underlying connection (for consumers, which open their own channels).
    pub fn connection(&self) -> &Connection {
        &self.connection
    }

    /// The confirm-mode channel, for publishing outside [`Broker::publish`].
    pub(crate) fn publish_channel(&self) -> &Channel {
        &self.publish
    }

    /// Whether the connection is still usable.
    pub fn is_connected(&self) -> bool {
        self.connection.status().connected() && self.publish.status().connected()
    }

    /// Publish `messages` persistent and mandatory, all frames first, then
    /// wait for every confirm. One outcome per message, in order.
    ///
    /// An `Err` means the connection failed: outcomes are unknown and the
    /// caller must not count attempts against the messages.
    pub async fn publish(&mut self, messages: &[Outgoing<'_>]) -> Result<Vec<Outcome>> {
        self.start_publish(messages).await?.outcomes().await
    }

    /// Send the frames of `messages` and return without waiting for the
    /// confirms, so the caller can keep several batches in flight.
    pub async fn start_publish(&mut self, messages: &[Outgoing<'_>]) -> Result<InFlight> {
        let refused = self.check_destinations(messages).await?;
        let mut slots = Vec::with_capacity(messages.len());
        for (message, refused) in messages.iter().zip(refused) {
            if let Some(reason) = refused {
                slots.push(Slot::Refused(reason));
                continue;
            }
            let confirm = with_timeout(
                self.timeout,
                "basic.publish",
                self.publish.basic_publish(
                    ShortString::from(message.destination.exchange()),
                    ShortString::from(message.destination.routing_key()),
                    BasicPublishOptions {
                        mandatory: true,
                        immediate: false,
                    },
                    message.body,
                    properties(message.headers),
                ),
            )
            .await?;
            let id = message
                .headers
                .get(crate::headers::MSG_ID)
                .cloned()
                .unwrap_or_default();
            slots.push(Slot::Waiting { id, confirm });
        }
        Ok(InFlight {
            slots,
            timeout: self.timeout,
        })
    }

    /// Send one message directly, without the outbox (the Python library's
    /// `send_event`), with the same `dop-*` headers an outbox row gets, and
    /// wait for the broker's confirm. Returns the message id (`dop-msg-id`).
    pub async fn send(&mut self, message: &crate::Message) -> Result<uuid::Uuid> {
        let id = uuid::Uuid::new_v4();
        let correlation =
            crate::correlation_id().unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        let headers = crate::headers::outbox_headers(
            id,
            message.destination().as_str(),
            chrono::Utc::now(),
            message.headers(),
            &correlation,
        );
        let body = serde_json::to_vec(message.body()).map_err(|source| Error::Body {
            destination: message.destination().to_string(),
            source,
        })?;
        let outcome = self
            .publish(&[Outgoing {
                destination: message.destination(),
                body: &body,
                headers: &headers,
            }])
            .await?;
        match outcome.into_iter().next() {
            Some(Outcome::Confirmed) => Ok(id),
            Some(Outcome::Returned(reason) | Outcome::Rejected(reason)) => {
                Err(Error::NotDelivered {
                    destination: message.destination().to_string(),
                    reason,
                })
            }
            None => Err(Error::NotDelivered {
                destination: message.destination().to_string(),
                reason: "no confirm received".to_owned(),
            }),
        }
    }

    /// Make sure each message's exchange or queue is there before publishing:
    /// publishing to a missing exchange would close the channel and look like
    /// an outage. `/queue/<q>` destinations are declared durable when missing,
    /// as the STOMP plugin does. Returns, per message, why it cannot be sent.
    async fn check_destinations(
        &mut self,
        messages: &[Outgoing<'_>],
    ) -> Result<Vec<Option<String>>> {
        let mut problems: HashMap<String, Option<String>> = HashMap::new();
        let mut result = Vec::with_capacity(messages.len());
        for message in messages {
            let key = topology_key(message.destination);
            let problem = match key {
                None => None,
                Some(key) => {
                    if let Some(problem) = problems.get(&key) {
                        problem.clone()
                    } else {
                        let problem = self.check(message.destination, &key).await?;
                        problems.insert(key, problem.clone());
                        problem
                    }
                }
            };
            result.push(problem);
        }
        Ok(result)
    }

    async fn check(&mut self, destination: &Destination, key: &str) -> Result<Option<String>> {
        if self
            .checked
            .get(key)
            .is_some_and(|at| at.elapsed() < TOPOLOGY_CACHE)
        {
            return Ok(None);
        }
        let exists = match destination.kind() {
            DestinationKind::Exchange { exchange, .. } => {
                passive(
                    &self.connection,
                    self.timeout,
                    self.topology.exchange_declare(
                        exchange.as_str().into(),
                        ExchangeKind::Topic,
                        ExchangeDeclareOptions {
                            passive: true,
                            ..Default::default()
                        },
                        FieldTable::default(),
                    ),
                )
                .await?
            }
            DestinationKind::Queue { name } | DestinationKind::AmqQueue { name } => {
                passive(
                    &self.connection,
                    self.timeout,
                    self.topology.queue_declare(
                        name.as_str().into(),
                        QueueDeclareOptions {
                            passive: true,
                            ..Default::default()
                        },
                        FieldTable::default(),
                    ),
                )
                .await?
            }
            DestinationKind::Topic { .. } => true,
        };
        if !exists {
            // The refused passive declare closed the topology channel.
            self.topology = with_timeout(
                self.timeout,
                "channel.open",
                self.connection.create_channel(),
            )
            .await?;
        }
        let exists = match destination.kind() {
            DestinationKind::Queue { name } if !exists => {
                with_timeout(
                    self.timeout,
                    "queue.declare",
                    self.topology.queue_declare(
                        name.as_str().into(),
                        QueueDeclareOptions {
                            durable: true,
                            ..Default::default()
                        },
                        FieldTable::default(),
                    ),
                )
                .await?;
                debug!(queue = %name, "declared durable queue for a /queue destination");
                true
            }
            _ => exists,
        };
        if exists {
            self.checked.insert(key.to_owned(), Instant::now());
            Ok(None)
        } else {
            let what = match destination.kind() {
                DestinationKind::Exchange { exchange, .. } => format!("exchange `{exchange}`"),
                _ => format!("queue `{}`", destination.routing_key()),
            };
            warn!(destination = %destination, "{what} does not exist");
            Ok(Some(format!(
                "{what} does not exist on the broker; create it or fix the destination `{destination}`"
            )))
        }
    }

    /// Close the connection politely.
    pub async fn close(self) {
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            self.connection.close(200, "bye".into()),
        )
        .await;
    }
}

/// A passive declare: `Ok(false)` when the broker refuses it (404, which
/// closes the channel), `Err` when the connection itself failed. lapin may
/// report the refusal as the channel's closed state rather than the 404, so
/// the connection's health decides.
pub(crate) async fn passive<T>(
    connection: &Connection,
    timeout: Duration,
    declare: impl Future<Output = lapin::Result<T>>,
) -> Result<bool> {
    match with_timeout(timeout, "passive declare", declare).await {
        Ok(_) => Ok(true),
        Err(Error::Broker(err)) if is_not_found(&err) => Ok(false),
        Err(Error::Broker(_)) if connection.status().connected() => Ok(false),
        Err(err) => Err(err),
    }
}

fn topology_key(destination: &Destination) -> Option<String> {
    match destination.kind() {
        DestinationKind::Topic { .. } => None,
        DestinationKind::Exchange { exchange, .. } if exchange.starts_with("amq.") => None,
        DestinationKind::Exchange { exchange, .. } => Some(format!("e:{exchange}")),
        DestinationKind::Queue { name } | DestinationKind::AmqQueue { name } => {
            Some(format!("q:{name}"))
        }
    }
}

fn is_not_found(err: &lapin::Error) -> bool {
    matches!(err.kind(), lapin::ErrorKind::ProtocolError(e) if e.get_id() == 404)
        || err.to_string().contains("NOT_FOUND")
}

/// Persistent JSON with every header as a long string (spec §8.5-A), plus
/// `message_id`/`correlation_id` for plain AMQP consumers.
fn properties(headers: &BTreeMap<String, String>) -> BasicProperties {
    let mut table = FieldTable::default();
    for (name, value) in headers {
        table.insert(
            ShortString::from(name.as_str()),
            AMQPValue::LongString(LongString::from(value.as_str())),
        );
    }
    let mut properties = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into())
        .with_headers(table);
    if let Some(id) = headers.get(crate::headers::MSG_ID) {
        properties = properties.with_message_id(id.as_str().into());
    }
    if let Some(id) = headers.get(crate::headers::CORRELATION_ID) {
        properties = properties.with_correlation_id(id.as_str().into());
    }
    properties
}

/// Add `heartbeat=<secs>` to the URL unless it sets one.
fn with_heartbeat(url: &str, heartbeat: u16) -> String {
    if url.contains("heartbeat=") {
        return url.to_owned();
    }
    let separator = if url.contains('?') { '&' } else { '?' };
    format!("{url}{separator}heartbeat={heartbeat}")
}
