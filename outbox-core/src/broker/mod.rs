//! The transport seam: the only place that knows which broker is behind the
//! relay and the consumer.
//!
//! Relay side: a [`Publisher`] takes [`Envelope`]s (row id, destination,
//! body, headers) and reports one [`Outcome`] per row id, in any order.
//! Consumer side: a [`Subscription`] yields decoded [`Delivery`]s and takes
//! one [`Settle`] per delivery through its [`Settler`]. Windows, confirm
//! matching, header codecs and reconnect details live inside each transport
//! (`amqp/`, `memory/`); no client-library type crosses this module.
//!
//! Who is at fault is decided here, per transport and per error: a message
//! the broker refuses for itself (a missing exchange, a permission, a size
//! limit, a nack) gets [`Outcome::Rejected`] and costs that row one attempt;
//! a dropped connection is an outage ([`Error::is_transient`]); refused
//! credentials are a permanent [`Error::BrokerRefused`].

pub(crate) mod amqp;
#[cfg(feature = "memory")]
pub(crate) mod memory;
pub(crate) mod nats;

use std::collections::BTreeMap;
use std::future::Future;

use tokio::sync::mpsc;
use uuid::Uuid;

use crate::settings::{ConsumerSettings, Settings};
use crate::{Destination, Error, Message, Result};

/// One outbox row on its way to the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// The row id: the message id on the wire and the key of its [`Outcome`].
    pub id: Uuid,
    /// Where it goes.
    pub destination: Destination,
    /// The body bytes (UTF-8 JSON).
    pub body: Vec<u8>,
    /// Every header, `dop-msg-id` equal to `id` included.
    pub headers: BTreeMap<String, String>,
}

/// What became of one published message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// The broker took responsibility for it.
    Confirmed,
    /// The broker took it but no queue was bound to its destination.
    Unroutable(String),
    /// The broker refused it because of this message (a nack, a missing
    /// exchange, a permission, a size limit): one failed attempt.
    Rejected(String),
    /// It can never be sent as it is (it cannot be encoded for this
    /// transport): FAILED at once.
    Invalid(String),
    /// The broker's answer was lost (the channel or connection went away
    /// because of something else): no attempt is counted, the row goes back.
    Unknown(String),
}

/// A message as the consumer receives it, decoded by its transport.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Delivery {
    /// The transport's handle for settling this delivery.
    pub tag: u64,
    /// Every header as text, plus what a STOMP subscriber would see
    /// (`destination`, `redelivered`).
    pub headers: BTreeMap<String, String>,
    /// The transport's own message id (AMQP `message_id`), if any.
    pub transport_id: Option<String>,
    /// The body bytes.
    pub body: Vec<u8>,
    /// Whether the broker delivered it before.
    pub redelivered: bool,
}

/// How a delivery ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Settle {
    /// Processed (or a duplicate): remove it from the queue.
    Ack,
    /// Failed for good: move it to the dead-letter queue, with why.
    DeadLetter(String),
    /// Not processed because of an outage: deliver it again later.
    Retry,
}

/// What to consume and how to set the queues up.
#[derive(Debug, Clone)]
pub(crate) struct SubscriptionSpec {
    pub(crate) destination: Destination,
    pub(crate) queue: String,
    pub(crate) consumer: ConsumerSettings,
    pub(crate) name: String,
}

/// The queues a subscription uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueDeclaration {
    /// The queue consumed from.
    pub queue: String,
    /// Where failed messages go, `DLQ.<queue>`.
    pub dead_letter_queue: String,
}

/// What a transport's settling task hears, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SettleEvent {
    /// A delivery was handed out (sent before it can be settled).
    Delivered(u64),
    /// Its decision.
    Settled(u64, Settle),
}

/// Hands settle decisions to the transport from any task.
#[derive(Debug, Clone)]
pub(crate) struct Settler(mpsc::UnboundedSender<SettleEvent>);

impl Settler {
    pub(crate) fn channel() -> (Settler, mpsc::UnboundedReceiver<SettleEvent>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Settler(tx), rx)
    }

    /// The raw sender, for the transport's own `Delivered` events.
    pub(crate) fn sender(&self) -> mpsc::UnboundedSender<SettleEvent> {
        self.0.clone()
    }

    /// Settle delivery `tag`. A transport that is gone drops the decision:
    /// the broker delivers the message again and the inbox skips it.
    pub(crate) fn settle(&self, tag: u64, settle: Settle) {
        let _ = self.0.send(SettleEvent::Settled(tag, settle));
    }
}

/// The relay side of a transport.
///
/// A row id is in flight at most once per publisher. Futures must be
/// cancel-safe: dropping one loses no state.
pub(crate) trait Publisher: Send {
    /// Hand `messages` to the broker; their outcomes come from
    /// [`Publisher::outcomes`]. `Err` means the connection failed: every
    /// message without an outcome yet is unknown.
    fn publish(&mut self, messages: Vec<Envelope>) -> impl Future<Output = Result<()>> + Send;

    /// Outcomes that have arrived, waiting for at least one while messages
    /// are in flight; empty when nothing is in flight.
    fn outcomes(&mut self) -> impl Future<Output = Result<Vec<(Uuid, Outcome)>>> + Send;

    /// Messages handed over and still without an outcome.
    fn in_flight(&self) -> usize;

    /// Whether the connection is usable.
    fn is_connected(&self) -> bool;

    /// Close politely.
    fn close(self) -> impl Future<Output = ()> + Send;
}

/// The consumer side of a transport.
pub(crate) trait Subscription: Send {
    /// The queues in use.
    fn declaration(&self) -> &QueueDeclaration;

    /// Where settle decisions go.
    fn settler(&self) -> Settler;

    /// The next delivery; `Err` when the connection broke.
    fn next(&mut self) -> impl Future<Output = Result<Delivery>> + Send;

    /// Stop new deliveries (prefetched ones go back to the queue), send the
    /// decisions already made, and close.
    fn close(self) -> impl Future<Output = ()> + Send;
}

/// Which broker: chosen by `broker.url` (`amqp://`, `amqps://` for
/// RabbitMQ; `nats://`, `tls://` for NATS JetStream), or an in-memory [`MemoryBroker`](crate::MemoryBroker) (feature `memory`).
#[derive(Debug, Clone)]
pub struct Transport(Kind);

#[derive(Debug, Clone)]
enum Kind {
    Amqp(amqp::Amqp),
    Nats(Box<nats::Nats>),
    #[cfg(feature = "memory")]
    Memory(memory::MemoryBroker),
}

impl Transport {
    /// The transport `settings.url` names.
    pub fn from_settings(settings: &Settings) -> Result<Transport> {
        let broker = &settings.broker;
        if broker.is_nats() {
            return Ok(Transport(Kind::Nats(Box::new(nats::Nats::new(
                broker,
                &settings.nats,
            )))));
        }
        match broker.url.split_once("://").map(|(scheme, _)| scheme) {
            Some("amqp" | "amqps") => Ok(Transport(Kind::Amqp(amqp::Amqp::new(broker)))),
            _ => Err(Error::InvalidSetting {
                key: "broker.url".to_owned(),
                value: crate::redact::url(&broker.url),
                allowed: "expected a URL like amqp://user:password@host:5672/vhost (or amqps://), \
                          or nats://host:4222 (or tls://) for NATS JetStream"
                    .to_owned(),
            }),
        }
    }

    /// Where it connects, without credentials (for logs and errors).
    pub fn endpoint(&self) -> String {
        match &self.0 {
            Kind::Amqp(amqp) => amqp.endpoint(),
            Kind::Nats(nats) => nats.endpoint(),
            #[cfg(feature = "memory")]
            Kind::Memory(_) => "memory".to_owned(),
        }
    }

    pub(crate) async fn publisher(&self, name: &str) -> Result<AnyPublisher> {
        Ok(match &self.0 {
            Kind::Amqp(amqp) => AnyPublisher::Amqp(Box::new(amqp.publisher(name).await?)),
            Kind::Nats(nats) => AnyPublisher::Nats(Box::new(nats.publisher(name).await?)),
            #[cfg(feature = "memory")]
            Kind::Memory(broker) => AnyPublisher::Memory(broker.publisher()?),
        })
    }

    pub(crate) async fn subscribe(&self, spec: &SubscriptionSpec) -> Result<AnySubscription> {
        Ok(match &self.0 {
            Kind::Amqp(amqp) => AnySubscription::Amqp(Box::new(amqp.subscribe(spec).await?)),
            Kind::Nats(nats) => AnySubscription::Nats(Box::new(nats.subscribe(spec).await?)),
            #[cfg(feature = "memory")]
            Kind::Memory(broker) => AnySubscription::Memory(broker.subscribe(spec)?),
        })
    }

    /// The AMQP side, for the dead-letter tools.
    pub(crate) fn amqp(&self) -> Option<&amqp::Amqp> {
        match &self.0 {
            Kind::Amqp(amqp) => Some(amqp),
            _ => None,
        }
    }

    /// The NATS side, for the stream tools.
    pub(crate) fn nats(&self) -> Option<&nats::Nats> {
        match &self.0 {
            Kind::Nats(nats) => Some(nats),
            _ => None,
        }
    }
}

#[cfg(feature = "memory")]
impl From<memory::MemoryBroker> for Transport {
    fn from(broker: memory::MemoryBroker) -> Self {
        Transport(Kind::Memory(broker))
    }
}

/// A connected publisher of any transport.
#[derive(Debug)]
pub(crate) enum AnyPublisher {
    Amqp(Box<amqp::AmqpPublisher>),
    Nats(Box<nats::NatsPublisher>),
    #[cfg(feature = "memory")]
    Memory(memory::MemoryPublisher),
}

impl Publisher for AnyPublisher {
    async fn publish(&mut self, messages: Vec<Envelope>) -> Result<()> {
        match self {
            AnyPublisher::Amqp(p) => p.publish(messages).await,
            AnyPublisher::Nats(p) => p.publish(messages).await,
            #[cfg(feature = "memory")]
            AnyPublisher::Memory(p) => p.publish(messages).await,
        }
    }

    async fn outcomes(&mut self) -> Result<Vec<(Uuid, Outcome)>> {
        match self {
            AnyPublisher::Amqp(p) => p.outcomes().await,
            AnyPublisher::Nats(p) => p.outcomes().await,
            #[cfg(feature = "memory")]
            AnyPublisher::Memory(p) => p.outcomes().await,
        }
    }

    fn in_flight(&self) -> usize {
        match self {
            AnyPublisher::Amqp(p) => p.in_flight(),
            AnyPublisher::Nats(p) => p.in_flight(),
            #[cfg(feature = "memory")]
            AnyPublisher::Memory(p) => p.in_flight(),
        }
    }

    fn is_connected(&self) -> bool {
        match self {
            AnyPublisher::Amqp(p) => p.is_connected(),
            AnyPublisher::Nats(p) => p.is_connected(),
            #[cfg(feature = "memory")]
            AnyPublisher::Memory(p) => p.is_connected(),
        }
    }

    async fn close(self) {
        match self {
            AnyPublisher::Amqp(p) => (*p).close().await,
            AnyPublisher::Nats(p) => (*p).close().await,
            #[cfg(feature = "memory")]
            AnyPublisher::Memory(p) => p.close().await,
        }
    }
}

/// A subscription of any transport.
#[derive(Debug)]
pub(crate) enum AnySubscription {
    Amqp(Box<amqp::AmqpSubscription>),
    Nats(Box<nats::NatsSubscription>),
    #[cfg(feature = "memory")]
    Memory(memory::MemorySubscription),
}

impl Subscription for AnySubscription {
    fn declaration(&self) -> &QueueDeclaration {
        match self {
            AnySubscription::Amqp(s) => s.declaration(),
            AnySubscription::Nats(s) => s.declaration(),
            #[cfg(feature = "memory")]
            AnySubscription::Memory(s) => s.declaration(),
        }
    }

    fn settler(&self) -> Settler {
        match self {
            AnySubscription::Amqp(s) => s.settler(),
            AnySubscription::Nats(s) => s.settler(),
            #[cfg(feature = "memory")]
            AnySubscription::Memory(s) => s.settler(),
        }
    }

    async fn next(&mut self) -> Result<Delivery> {
        match self {
            AnySubscription::Amqp(s) => s.next().await,
            AnySubscription::Nats(s) => s.next().await,
            #[cfg(feature = "memory")]
            AnySubscription::Memory(s) => s.next().await,
        }
    }

    async fn close(self) {
        match self {
            AnySubscription::Amqp(s) => (*s).close().await,
            AnySubscription::Nats(s) => (*s).close().await,
            #[cfg(feature = "memory")]
            AnySubscription::Memory(s) => s.close().await,
        }
    }
}

/// A connection for sending messages directly, without the outbox (the
/// Python library's `send_event`).
#[derive(Debug)]
pub struct Broker {
    publisher: AnyPublisher,
}

impl Broker {
    /// Connect to the broker `settings.url` names.
    pub async fn connect(settings: &Settings, name: &str) -> Result<Broker> {
        Broker::connect_to(&Transport::from_settings(settings)?, name).await
    }

    /// Connect through `transport`.
    pub async fn connect_to(transport: &Transport, name: &str) -> Result<Broker> {
        Ok(Broker {
            publisher: transport.publisher(name).await?,
        })
    }

    /// Send one message with the same `dop-*` headers an outbox row gets and
    /// wait for the broker's confirm. Returns the message id (`dop-msg-id`).
    /// Nothing is stored, so nothing retries it: prefer the outbox.
    pub async fn send(&mut self, message: &Message) -> Result<Uuid> {
        let id = Uuid::new_v4();
        let correlation = crate::correlation::current_or_new()?;
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
        self.publisher
            .publish(vec![Envelope {
                id,
                destination: message.destination().clone(),
                body,
                headers,
            }])
            .await?;
        loop {
            let outcomes = self.publisher.outcomes().await?;
            if outcomes.is_empty() && self.publisher.in_flight() == 0 {
                return Err(Error::NotDelivered {
                    destination: message.destination().to_string(),
                    reason: "no confirm received".to_owned(),
                });
            }
            if let Some((_, outcome)) = outcomes.into_iter().find(|(of, _)| *of == id) {
                return match outcome {
                    Outcome::Confirmed => Ok(id),
                    Outcome::Unroutable(reason)
                    | Outcome::Rejected(reason)
                    | Outcome::Invalid(reason)
                    | Outcome::Unknown(reason) => Err(Error::NotDelivered {
                        destination: message.destination().to_string(),
                        reason,
                    }),
                };
            }
        }
    }

    /// Close the connection politely.
    pub async fn close(self) {
        self.publisher.close().await;
    }
}
