//! Publishing with pipelined publisher confirms, one outcome per row id.
//!
//! Three lapin/RabbitMQ facts shape this file:
//! - lapin hands a returned (unroutable) message to whichever confirm it
//!   completes next, and completes a `multiple` ack's confirms in hash
//!   order; so returns are matched to messages by `message_id` (always the
//!   row id), never by the confirm that carried them;
//! - a publish RabbitMQ refuses for itself (an exchange that does not exist
//!   or may not be written to, a body over `max_message_size`) closes the
//!   channel, and every confirm still pending fails with the same error; so
//!   the culprit is found from the broker's reply text, the others are
//!   `Unknown` (sent again, no attempt counted), and when the text does not
//!   name the culprit, each of them is sent again alone, which pins it;
//! - after such a refusal the same destination is refused again for a while
//!   without publishing, so one bad destination cannot close the channel
//!   under every good message behind it.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use futures_util::FutureExt as _;
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Confirmation, Connection, ExchangeKind, PublisherConfirm};
use tracing::{debug, warn};
use uuid::Uuid;

use super::{Amqp, channel_error, codec};
use crate::broker::{Envelope, Outcome};
use crate::{Destination, DestinationKind, Error, Result};

/// How long what the broker said about a destination is trusted.
const TOPOLOGY_CACHE: Duration = Duration::from_secs(30);

/// A confirm-mode channel and everything in flight on it.
pub(crate) struct AmqpPublisher {
    amqp: Amqp,
    connection: Connection,
    channel: Channel,
    topology: Topology,
    /// Sent, in publish order, without an outcome yet.
    pending: VecDeque<Pending>,
    /// Outcomes decided and not yet handed out.
    ready: Vec<(Uuid, Outcome)>,
    /// Row ids the broker returned as unroutable.
    returns: Returned,
    /// Rows caught in a channel close whose culprit was not named: each is
    /// sent alone next time.
    suspects: HashSet<Uuid>,
}

impl std::fmt::Debug for AmqpPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpPublisher")
            .field("endpoint", &self.amqp.endpoint())
            .field("pending", &self.pending.len())
            .field("ready", &self.ready.len())
            .finish_non_exhaustive()
    }
}

struct Pending {
    id: Uuid,
    exchange: String,
    body_len: usize,
    deadline: tokio::time::Instant,
    confirm: PublisherConfirm,
    /// The broker's answer once it came: acked or nacked, or the error.
    answer: Option<std::result::Result<bool, lapin::Error>>,
}

impl AmqpPublisher {
    pub(crate) async fn open(amqp: &Amqp, name: &str) -> Result<AmqpPublisher> {
        let connection = amqp.connect(name).await?;
        let channel = confirm_channel(amqp, &connection).await?;
        let topology = amqp
            .call("channel.open", connection.create_channel())
            .await?;
        Ok(AmqpPublisher {
            amqp: amqp.clone(),
            connection,
            channel,
            topology: Topology::new(topology),
            pending: VecDeque::new(),
            ready: Vec::new(),
            returns: Returned::default(),
            suspects: HashSet::new(),
        })
    }

    pub(crate) async fn publish(&mut self, messages: Vec<Envelope>) -> Result<()> {
        for envelope in messages {
            self.publish_one(envelope).await?;
        }
        Ok(())
    }

    async fn publish_one(&mut self, envelope: Envelope) -> Result<()> {
        let id = envelope.id;
        let encoded = codec::properties(&envelope).and_then(|properties| {
            Ok((
                properties,
                codec::short(envelope.destination.exchange())?,
                codec::short(envelope.destination.routing_key())?,
            ))
        });
        let (properties, exchange, routing_key) = match encoded {
            Ok(encoded) => encoded,
            Err(reason) => {
                self.ready.push((id, Outcome::Invalid(reason)));
                return Ok(());
            }
        };
        if let Some(problem) = self
            .topology
            .check(
                &self.amqp,
                &self.connection,
                &envelope.destination,
                envelope.body.len(),
            )
            .await?
        {
            self.ready.push((id, Outcome::Rejected(problem)));
            return Ok(());
        }
        let alone = self.suspects.contains(&id);
        if alone {
            // Nothing else on the wire, so a channel close names this one.
            self.settle_all().await?;
        }
        for attempt in 0..2 {
            let sent = self
                .amqp
                .call(
                    "basic.publish",
                    self.channel.basic_publish(
                        exchange.clone(),
                        routing_key.clone(),
                        BasicPublishOptions {
                            mandatory: true,
                            immediate: false,
                        },
                        &envelope.body,
                        properties.clone(),
                    ),
                )
                .await;
            match sent {
                Ok(confirm) => {
                    self.pending.push_back(Pending {
                        id,
                        exchange: envelope.destination.exchange().to_owned(),
                        body_len: envelope.body.len(),
                        deadline: tokio::time::Instant::now() + self.amqp.timeout(),
                        confirm,
                        answer: None,
                    });
                    break;
                }
                // The channel was closed by an earlier message: settle what
                // it affected, reopen, and send this one on the new channel.
                Err(_) if attempt == 0 && self.connection.status().connected() => {
                    self.settle_all().await?;
                    if !self.channel.status().connected() {
                        self.channel = confirm_channel(&self.amqp, &self.connection).await?;
                    }
                }
                Err(err) => return Err(err),
            }
        }
        if alone {
            self.settle_all().await?;
        }
        Ok(())
    }

    pub(crate) async fn outcomes(&mut self) -> Result<Vec<(Uuid, Outcome)>> {
        if self.ready.is_empty()
            && let Some(front) = self.pending.front_mut()
            && front.answer.is_none()
        {
            // Cancel-safe: the confirm keeps its state if this is dropped.
            match tokio::time::timeout_at(front.deadline, &mut front.confirm).await {
                Err(_) => {
                    return Err(Error::BrokerTimeout {
                        operation: "publisher confirm",
                        timeout: self.amqp.timeout(),
                    });
                }
                Ok(answer) => front.answer = Some(self.returns.record(answer)),
            }
        }
        self.harvest();
        self.settle_answered().await?;
        Ok(std::mem::take(&mut self.ready))
    }

    pub(crate) fn in_flight(&self) -> usize {
        self.pending.len() + self.ready.len()
    }

    pub(crate) fn is_connected(&self) -> bool {
        self.connection.status().connected()
    }

    pub(crate) async fn close(self) {
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            self.connection.close(200, "bye".into()),
        )
        .await;
    }

    /// Wait until every pending message has an outcome (in `ready`).
    async fn settle_all(&mut self) -> Result<()> {
        while !self.pending.is_empty() {
            let front = self.pending.front_mut().expect("not empty");
            if front.answer.is_none() {
                match tokio::time::timeout_at(front.deadline, &mut front.confirm).await {
                    Err(_) => {
                        return Err(Error::BrokerTimeout {
                            operation: "publisher confirm",
                            timeout: self.amqp.timeout(),
                        });
                    }
                    Ok(answer) => front.answer = Some(self.returns.record(answer)),
                }
            }
            self.harvest();
            self.settle_answered().await?;
        }
        Ok(())
    }

    /// Note every answer that already arrived, without waiting: a return
    /// may ride on any of them.
    fn harvest(&mut self) {
        for pending in &mut self.pending {
            if pending.answer.is_none()
                && let Some(answer) = (&mut pending.confirm).now_or_never()
            {
                pending.answer = Some(self.returns.record(answer));
            }
        }
    }

    /// Turn answered messages into outcomes; a channel error settles
    /// everything still pending.
    async fn settle_answered(&mut self) -> Result<()> {
        let mut closed = None;
        let mut still = VecDeque::with_capacity(self.pending.len());
        for pending in std::mem::take(&mut self.pending) {
            match &pending.answer {
                Some(Ok(acked)) => {
                    let outcome = if self.returns.take(pending.id) {
                        Outcome::Unroutable(
                            "unroutable: the broker returned it (312 NO_ROUTE); bind a queue to the destination"
                                .to_owned(),
                        )
                    } else if *acked {
                        Outcome::Confirmed
                    } else {
                        Outcome::Rejected("the broker refused the message (nack)".to_owned())
                    };
                    self.suspects.remove(&pending.id);
                    self.ready.push((pending.id, outcome));
                }
                Some(Err(err)) => {
                    if closed.is_none() {
                        closed = Some(match channel_error(err) {
                            Some(reply) if self.connection.status().connected() => Ok(reply),
                            _ => Err(self.amqp.error("publisher confirm", err.clone())),
                        });
                    }
                    still.push_back(pending);
                }
                None => still.push_back(pending),
            }
        }
        self.pending = still;
        match closed {
            None => {
                if !self.returns.is_empty() && self.pending.is_empty() {
                    self.returns.clear();
                }
                Ok(())
            }
            Some(Err(err)) => Err(err),
            Some(Ok((code, text))) => self.on_channel_closed(code, &text).await,
        }
    }

    /// The broker closed the channel because of one message: find it, give
    /// the others back, open a new channel.
    async fn on_channel_closed(&mut self, code: u16, text: &str) -> Result<()> {
        let affected: Vec<Pending> = self.pending.drain(..).collect();
        let culprit = culprit(&affected, code, text);
        self.topology
            .learn(code, text, culprit.and_then(|i| affected.get(i)));
        let reason = format!("the broker closed the channel ({code}): {text}");
        match culprit {
            Some(i) => {
                warn!(id = %affected[i].id, code, reason = text, others = affected.len() - 1, "a message closed the publishing channel; it is refused alone, the others are sent again")
            }
            None => {
                warn!(
                    code,
                    reason = text,
                    affected = affected.len(),
                    "the publishing channel was closed and the reply does not name the message; each affected message is sent again alone"
                )
            }
        }
        for (i, pending) in affected.into_iter().enumerate() {
            if Some(i) == culprit {
                self.suspects.remove(&pending.id);
                self.ready
                    .push((pending.id, Outcome::Rejected(reason.clone())));
            } else {
                if culprit.is_none() {
                    self.suspects.insert(pending.id);
                }
                self.ready.push((
                    pending.id,
                    Outcome::Unknown(format!(
                        "sent on a channel another message closed ({code}: {text})"
                    )),
                ));
            }
        }
        self.returns.clear();
        self.channel = confirm_channel(&self.amqp, &self.connection).await?;
        debug!("publishing channel reopened");
        Ok(())
    }
}

async fn confirm_channel(amqp: &Amqp, connection: &Connection) -> Result<Channel> {
    let channel = amqp
        .call("channel.open", connection.create_channel())
        .await?;
    amqp.call(
        "confirm.select",
        channel.confirm_select(ConfirmSelectOptions::default()),
    )
    .await?;
    Ok(channel)
}

/// Which of `affected` (in publish order) the broker's reply is about.
fn culprit(affected: &[Pending], code: u16, text: &str) -> Option<usize> {
    if affected.len() == 1 {
        return Some(0);
    }
    if let Some(exchange) = quoted_after(text, "exchange '") {
        return affected.iter().position(|p| p.exchange == exchange);
    }
    if code == 406
        && let Some(size) = number_after(text, "message size ")
    {
        return affected
            .iter()
            .position(|p| p.body_len == size)
            .or_else(|| {
                let max = number_after(text, "max size ")?;
                affected.iter().position(|p| p.body_len > max)
            });
    }
    None
}

/// `name` in `... <prefix>name' ...`.
fn quoted_after<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    let start = text.find(prefix)? + prefix.len();
    let end = text[start..].find('\'')? + start;
    Some(&text[start..end])
}

fn number_after(text: &str, prefix: &str) -> Option<usize> {
    let start = text.find(prefix)? + prefix.len();
    let digits: String = text[start..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// Returned messages, counted by row id until their own confirm arrives
/// (the same row can be in flight twice after its lease was taken over).
#[derive(Debug, Default)]
struct Returned(HashMap<Uuid, u32>);

impl Returned {
    /// The broker's answer to one publish, noting the return it carries.
    fn record(
        &mut self,
        answer: lapin::Result<Confirmation>,
    ) -> std::result::Result<bool, lapin::Error> {
        let (acked, returned) = match answer? {
            Confirmation::Ack(returned) => (true, returned),
            Confirmation::Nack(returned) => (false, returned),
            Confirmation::NotRequested => (true, None),
        };
        if let Some(returned) = returned {
            let id = returned
                .delivery
                .properties
                .message_id()
                .as_ref()
                .and_then(|id| Uuid::parse_str(id.as_str()).ok());
            match id {
                Some(id) => *self.0.entry(id).or_default() += 1,
                None => {
                    warn!("the broker returned a message without a row id; it cannot be matched")
                }
            }
        }
        Ok(acked)
    }

    /// Whether `id` was returned (once per return).
    fn take(&mut self, id: Uuid) -> bool {
        match self.0.get_mut(&id) {
            Some(n) if *n > 1 => {
                *n -= 1;
                true
            }
            Some(_) => {
                self.0.remove(&id);
                true
            }
            None => false,
        }
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn clear(&mut self) {
        self.0.clear();
    }
}

/// What the broker said about exchanges and queues lately, checked on a
/// channel of its own (a refused declare closes its channel).
struct Topology {
    channel: Channel,
    known: HashMap<String, (Option<String>, Instant)>,
    /// The largest body the broker took, per its last 406.
    max_body: Option<(usize, Instant)>,
}

impl Topology {
    fn new(channel: Channel) -> Topology {
        Topology {
            channel,
            known: HashMap::new(),
            max_body: None,
        }
    }

    /// Why a message to `destination` with a body of `body_len` bytes
    /// cannot be sent now, if the broker said so; `/queue/<q>` destinations
    /// are declared durable when missing, as the STOMP plugin does.
    async fn check(
        &mut self,
        amqp: &Amqp,
        connection: &Connection,
        destination: &Destination,
        body_len: usize,
    ) -> Result<Option<String>> {
        if let Some((max, at)) = self.max_body
            && body_len > max
        {
            if at.elapsed() < TOPOLOGY_CACHE {
                return Ok(Some(format!(
                    "the body is {body_len} bytes; the broker takes at most {max} (max_message_size)"
                )));
            }
            self.max_body = None;
        }
        let Some(key) = key(destination) else {
            return Ok(None);
        };
        if let Some((problem, at)) = self.known.get(&key)
            && at.elapsed() < TOPOLOGY_CACHE
        {
            return Ok(problem.clone());
        }
        let problem = self.ask(amqp, connection, destination).await?;
        if let Some(problem) = &problem {
            warn!(destination = %destination, problem = %problem, "destination refused");
        }
        self.known.insert(key, (problem.clone(), Instant::now()));
        Ok(problem)
    }

    async fn ask(
        &mut self,
        amqp: &Amqp,
        connection: &Connection,
        destination: &Destination,
    ) -> Result<Option<String>> {
        let passive = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        let answer = match destination.kind() {
            DestinationKind::Topic { .. } => return Ok(None),
            DestinationKind::Exchange { exchange, .. } => {
                let declare = self.channel.exchange_declare(
                    codec::short(exchange).map_err(invalid(destination))?,
                    ExchangeKind::Topic,
                    ExchangeDeclareOptions {
                        passive: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                );
                amqp.call("exchange.declare", declare).await.map(|_| ())
            }
            DestinationKind::Queue { name } | DestinationKind::AmqQueue { name } => {
                let declare = self.channel.queue_declare(
                    codec::short(name).map_err(invalid(destination))?,
                    passive,
                    FieldTable::default(),
                );
                amqp.call("queue.declare", declare).await.map(|_| ())
            }
        };
        let refused = match answer {
            Ok(()) => return Ok(None),
            Err(err) => self.refusal(amqp, connection, err).await?,
        };
        match (destination.kind(), refused) {
            (DestinationKind::Queue { name }, (404, _)) => {
                let declare = self.channel.queue_declare(
                    codec::short(name).map_err(invalid(destination))?,
                    QueueDeclareOptions {
                        durable: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                );
                match amqp.call("queue.declare", declare).await {
                    Ok(_) => {
                        debug!(queue = %name, "declared durable queue for a /queue destination");
                        Ok(None)
                    }
                    Err(err) => {
                        let (code, text) = self.refusal(amqp, connection, err).await?;
                        Ok(Some(format!(
                            "queue `{name}` cannot be declared ({code}): {text}"
                        )))
                    }
                }
            }
            (DestinationKind::Exchange { exchange, .. }, (404, _)) => Ok(Some(format!(
                "exchange `{exchange}` does not exist on the broker; create it or fix the destination `{destination}`"
            ))),
            (DestinationKind::AmqQueue { name }, (404, _)) => Ok(Some(format!(
                "queue `{name}` does not exist on the broker; /amq/queue/ destinations are never declared: create it or use /queue/{name}"
            ))),
            (_, (code, text)) => Ok(Some(format!(
                "the broker refused `{destination}` ({code}): {text}"
            ))),
        }
    }

    /// A refused declare closed the topology channel: reopen it and say
    /// why, or fail when the connection itself is gone.
    async fn refusal(
        &mut self,
        amqp: &Amqp,
        connection: &Connection,
        err: Error,
    ) -> Result<(u16, String)> {
        let reply = super::lapin_error(&err).and_then(channel_error);
        match reply {
            Some(reply) if connection.status().connected() => {
                self.channel = amqp
                    .call("channel.open", connection.create_channel())
                    .await?;
                Ok(reply)
            }
            _ => Err(err),
        }
    }

    /// Remember what a publish refusal said, so the same destination or
    /// size is refused without closing the channel again.
    fn learn(&mut self, code: u16, text: &str, culprit: Option<&Pending>) {
        if let Some(exchange) = quoted_after(text, "exchange '") {
            self.known.insert(
                format!("e:{exchange}"),
                (
                    Some(format!(
                        "the broker refused exchange `{exchange}` ({code}): {text}"
                    )),
                    Instant::now(),
                ),
            );
        } else if code == 406
            && let Some(max) = number_after(text, "max size ")
        {
            self.max_body = Some((max, Instant::now()));
        } else if let Some(culprit) = culprit {
            debug!(id = %culprit.id, "refusal not cached: the reply names no exchange or size");
        }
    }
}

fn invalid(destination: &Destination) -> impl Fn(String) -> Error + '_ {
    move |_| Error::InvalidDestination {
        destination: destination.to_string(),
        reason: "a name in it is longer than 255 bytes",
    }
}

/// The cache key of what a destination needs to exist; `/topic/` needs
/// nothing (`amq.topic` always exists).
fn key(destination: &Destination) -> Option<String> {
    match destination.kind() {
        DestinationKind::Topic { .. } => None,
        DestinationKind::Exchange { exchange, .. } => Some(format!("e:{exchange}")),
        DestinationKind::Queue { name } | DestinationKind::AmqQueue { name } => {
            Some(format!("q:{name}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_texts_name_exchanges_and_sizes() {
        assert_eq!(
            quoted_after(
                "NOT_FOUND - no exchange 'amq.nosuch' in vhost '/'",
                "exchange '"
            ),
            Some("amq.nosuch")
        );
        assert_eq!(
            quoted_after(
                "ACCESS_REFUSED - access to exchange 'locked' in vhost '/' refused for user 'u'",
                "exchange '"
            ),
            Some("locked")
        );
        let text =
            "PRECONDITION_FAILED - message size 2097152 is larger than configured max size 1048576";
        assert_eq!(number_after(text, "message size "), Some(2_097_152));
        assert_eq!(number_after(text, "max size "), Some(1_048_576));
        assert_eq!(number_after("nothing here", "max size "), None);
    }
}
