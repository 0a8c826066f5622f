//! An in-process broker (feature `memory`): run the relay and consumers
//! of a service in its own tests with no RabbitMQ, and script the faults a
//! real broker has — nacks, returns, a channel closed by one message, lost
//! connections, late and reordered confirms, duplicate and redelivered
//! deliveries.
//!
//! Routing follows the AMQP destinations: `/topic/<rk>` and
//! `/exchange/<ex>/<rk>` reach every queue bound with a matching pattern
//! (`*` one word, `#` any), `/queue/<q>` the queue `<q>` (created on first
//! use), `/amq/queue/<q>` an existing queue. A message no queue takes is
//! unroutable; an exchange other than `amq.topic` must be declared.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;
use uuid::Uuid;

use super::{
    Delivery, Envelope, Outcome, QueueDeclaration, Settle, SettleEvent, Settler, SubscriptionSpec,
};
use crate::{DestinationKind, Error, Result, headers};

/// What the broker does with one published message.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum PublishFault {
    /// Route it and confirm it.
    #[default]
    Deliver,
    /// Refuse it (a nack): nothing is routed.
    Nack,
    /// Confirm it as unroutable, as if no queue were bound.
    Return,
    /// Close the channel because of it (like a 404 or 406): it is refused
    /// with this reason, every message still unanswered gets an unknown
    /// outcome.
    CloseChannel(String),
    /// Drop the connection before answering it: it and every message
    /// still unanswered have no outcome; the publisher fails.
    DropConnection,
    /// Route it, and answer it only after the next round of answers.
    Delay,
    /// Route it, and answer it only after [`MemoryBroker::release_held`]
    /// (a confirm slower than any lease).
    Hold,
    /// Route it; its confirm is lost with the connection, which drops
    /// right after (it is in the queue, but the relay cannot know).
    DeliverThenDropConnection,
}

/// What the broker does with one delivery.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum DeliveryFault {
    /// Deliver it once.
    #[default]
    Deliver,
    /// Deliver it, and deliver a copy again later (redelivered).
    Duplicate,
    /// Deliver it, then drop the consumer's connection: everything it had
    /// not settled goes back to the queue, redelivered.
    DropConnection,
}

/// A message held in a memory queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    /// The publisher's message id (the outbox row id).
    pub id: Option<Uuid>,
    /// Where it was sent.
    pub destination: String,
    /// Its headers.
    pub headers: BTreeMap<String, String>,
    /// Its body.
    pub body: Vec<u8>,
    /// Whether it was delivered before.
    pub redelivered: bool,
}

type PublishScript = Box<dyn FnMut(&Envelope) -> PublishFault + Send>;
type DeliveryScript = Box<dyn FnMut(&StoredMessage) -> DeliveryFault + Send>;

/// An in-process broker. Clones share it.
#[derive(Clone)]
pub struct MemoryBroker {
    state: Arc<Mutex<State>>,
    // Scripts run without the state locked, so they may call the broker.
    publish_script: Arc<Mutex<Option<PublishScript>>>,
    delivery_script: Arc<Mutex<Option<DeliveryScript>>>,
    changed: Arc<Notify>,
}

impl std::fmt::Debug for MemoryBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryBroker").finish_non_exhaustive()
    }
}

#[derive(Default)]
struct State {
    exchanges: HashSet<String>,
    queues: BTreeMap<String, Queue>,
    bindings: Vec<Binding>,
    /// Connection attempts still to refuse.
    refuse_connections: u32,
    /// Bumped when connections drop: older publishers and consumers are dead.
    epoch: u64,
    /// Bumped by `release_held`: answers held before it are let go.
    released: u64,
    next_tag: u64,
    /// Every confirm handed to a publisher, in order.
    confirmed: Vec<Uuid>,
    /// Every publish, by row id.
    publishes: HashMap<Uuid, u32>,
    /// Every ack, by message id.
    acked: Vec<Option<Uuid>>,
}

#[derive(Default)]
struct Queue {
    ready: VecDeque<StoredMessage>,
    unacked: HashMap<u64, (u64, StoredMessage)>,
}

struct Binding {
    exchange: String,
    pattern: String,
    queue: String,
}

impl Default for MemoryBroker {
    fn default() -> Self {
        MemoryBroker::new()
    }
}

impl MemoryBroker {
    /// An empty broker that delivers everything.
    pub fn new() -> MemoryBroker {
        let mut state = State::default();
        state.exchanges.insert("amq.topic".to_owned());
        MemoryBroker {
            state: Arc::new(Mutex::new(state)),
            publish_script: Arc::new(Mutex::new(None)),
            delivery_script: Arc::new(Mutex::new(None)),
            changed: Arc::new(Notify::new()),
        }
    }

    /// Decide each publish with `script` (called once per message, in order).
    pub fn script_publishes(&self, script: impl FnMut(&Envelope) -> PublishFault + Send + 'static) {
        *self
            .publish_script
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(Box::new(script));
    }

    /// Decide each delivery with `script`.
    pub fn script_deliveries(
        &self,
        script: impl FnMut(&StoredMessage) -> DeliveryFault + Send + 'static,
    ) {
        *self
            .delivery_script
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(Box::new(script));
    }

    /// Refuse the next `attempts` connections (an outage).
    pub fn refuse_connections(&self, attempts: u32) {
        self.lock().refuse_connections = attempts;
    }

    /// Let go of every answer held by [`PublishFault::Hold`].
    pub fn release_held(&self) {
        self.lock().released += 1;
        self.changed.notify_waiters();
    }

    /// Drop every connection now.
    pub fn drop_connections(&self) {
        self.lock().drop_connections();
        self.changed.notify_waiters();
    }

    /// Declare an exchange for `/exchange/<name>/…` destinations.
    pub fn declare_exchange(&self, name: &str) {
        self.lock().exchanges.insert(name.to_owned());
    }

    /// Declare `queue` and bind it to `destination` (as a subscriber would).
    pub fn bind(&self, queue: &str, destination: &str) -> Result<()> {
        let destination = crate::Destination::parse(destination)?;
        let mut state = self.lock();
        state.queues.entry(queue.to_owned()).or_default();
        if let Some((exchange, pattern)) = route_of(&destination) {
            state.bindings.push(Binding {
                exchange,
                pattern,
                queue: queue.to_owned(),
            });
        }
        Ok(())
    }

    /// Messages waiting in `queue` (not those delivered and unsettled).
    pub fn messages(&self, queue: &str) -> Vec<StoredMessage> {
        self.lock()
            .queues
            .get(queue)
            .map(|q| q.ready.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Messages delivered from `queue` and not settled yet.
    pub fn unsettled(&self, queue: &str) -> usize {
        self.lock().queues.get(queue).map_or(0, |q| q.unacked.len())
    }

    /// Row ids the broker confirmed to a publisher, in order (a row sent
    /// twice appears twice).
    pub fn confirmed(&self) -> Vec<Uuid> {
        self.lock().confirmed.clone()
    }

    /// How often each row id was published.
    pub fn publishes(&self) -> HashMap<Uuid, u32> {
        self.lock().publishes.clone()
    }

    /// The message ids of every ack, in order.
    pub fn acked(&self) -> Vec<Option<Uuid>> {
        self.lock().acked.clone()
    }

    /// Put a message in as another producer would, without confirms.
    pub fn inject(
        &self,
        destination: &str,
        headers: BTreeMap<String, String>,
        body: &[u8],
    ) -> Result<()> {
        let destination = crate::Destination::parse(destination)?;
        let message = StoredMessage {
            id: headers
                .get(headers::MSG_ID)
                .and_then(|id| Uuid::parse_str(id).ok()),
            destination: destination.to_string(),
            headers,
            body: body.to_vec(),
            redelivered: false,
        };
        self.lock().route(&destination, message);
        self.changed.notify_waiters();
        Ok(())
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn publisher(&self) -> Result<MemoryPublisher> {
        let epoch = self.connect()?;
        Ok(MemoryPublisher {
            broker: self.clone(),
            epoch,
            pending: VecDeque::new(),
            broken: false,
        })
    }

    fn connect(&self) -> Result<u64> {
        let mut state = self.lock();
        if state.refuse_connections > 0 {
            state.refuse_connections -= 1;
            return Err(Error::Broker {
                operation: "connect",
                endpoint: "memory".to_owned(),
                source: "connection refused (scripted outage)".into(),
            });
        }
        Ok(state.epoch)
    }

    pub(crate) fn subscribe(&self, spec: &SubscriptionSpec) -> Result<MemorySubscription> {
        let epoch = self.connect()?;
        let queue = match spec.destination.kind() {
            DestinationKind::Queue { name } | DestinationKind::AmqQueue { name } => name.clone(),
            _ => spec.queue.clone(),
        };
        self.bind(&queue, spec.destination.as_str())?;
        let declaration = QueueDeclaration {
            dead_letter_queue: format!("DLQ.{queue}"),
            queue,
        };
        self.lock()
            .queues
            .entry(declaration.dead_letter_queue.clone())
            .or_default();
        let (settler, events) = Settler::channel();
        let settling = tokio::spawn(settle_loop(
            self.clone(),
            declaration.clone(),
            epoch,
            events,
        ));
        Ok(MemorySubscription {
            broker: self.clone(),
            declaration,
            epoch,
            prefetch: usize::from(spec.consumer.effective_prefetch().max(1)),
            settler,
            settling,
        })
    }
}

impl State {
    fn drop_connections(&mut self) {
        self.epoch += 1;
        for queue in self.queues.values_mut() {
            let mut back: Vec<(u64, StoredMessage)> = queue
                .unacked
                .drain()
                .map(|(tag, (_, m))| (tag, m))
                .collect();
            back.sort_by_key(|(tag, _)| *tag);
            for (_, mut message) in back.into_iter().rev() {
                message.redelivered = true;
                queue.ready.push_front(message);
            }
        }
    }

    /// Put `message` in every queue it routes to; `false` when none takes it.
    fn route(&mut self, destination: &crate::Destination, message: StoredMessage) -> bool {
        let targets: Vec<String> = match destination.kind() {
            DestinationKind::Queue { name } => {
                self.queues.entry(name.clone()).or_default();
                vec![name.clone()]
            }
            DestinationKind::AmqQueue { name } => {
                if self.queues.contains_key(name) {
                    vec![name.clone()]
                } else {
                    vec![]
                }
            }
            _ => {
                let (exchange, key) = route_of(destination).unwrap_or_default();
                let mut targets: Vec<String> = self
                    .bindings
                    .iter()
                    .filter(|b| b.exchange == exchange && topic_matches(&b.pattern, &key))
                    .map(|b| b.queue.clone())
                    .collect();
                targets.sort();
                targets.dedup();
                targets
            }
        };
        for target in &targets {
            self.queues
                .entry(target.clone())
                .or_default()
                .ready
                .push_back(message.clone());
        }
        !targets.is_empty()
    }

    /// Why `destination` cannot take messages, if it cannot.
    fn refusal(&self, destination: &crate::Destination) -> Option<String> {
        match destination.kind() {
            DestinationKind::Exchange { exchange, .. } if !self.exchanges.contains(exchange) => {
                Some(format!(
                    "exchange `{exchange}` does not exist on the broker"
                ))
            }
            DestinationKind::AmqQueue { name } if !self.queues.contains_key(name) => {
                Some(format!("queue `{name}` does not exist on the broker"))
            }
            _ => None,
        }
    }
}

/// `(exchange, routing key)` of a topic or exchange destination.
fn route_of(destination: &crate::Destination) -> Option<(String, String)> {
    match destination.kind() {
        DestinationKind::Topic { routing_key } => {
            Some(("amq.topic".to_owned(), routing_key.clone()))
        }
        DestinationKind::Exchange {
            exchange,
            routing_key,
        } => Some((exchange.clone(), routing_key.clone())),
        _ => None,
    }
}

/// AMQP topic matching: `*` is one word, `#` zero or more.
fn topic_matches(pattern: &str, key: &str) -> bool {
    fn go(pattern: &[&str], key: &[&str]) -> bool {
        match (pattern.first(), key.first()) {
            (None, None) => true,
            (Some(&"#"), _) => {
                go(&pattern[1..], key) || (!key.is_empty() && go(pattern, &key[1..]))
            }
            (Some(&"*"), Some(_)) => go(&pattern[1..], &key[1..]),
            (Some(p), Some(k)) if p == k => go(&pattern[1..], &key[1..]),
            _ => false,
        }
    }
    let pattern: Vec<&str> = pattern.split('.').collect();
    let key: Vec<&str> = key.split('.').collect();
    go(&pattern, &key)
}

/// A publisher on a memory broker.
#[derive(Debug)]
pub(crate) struct MemoryPublisher {
    broker: MemoryBroker,
    epoch: u64,
    /// Unanswered messages, with their answer and how it is held back.
    pending: VecDeque<(Uuid, Outcome, Held)>,
    broken: bool,
}

impl MemoryPublisher {
    fn alive(&self) -> Result<()> {
        if self.broken || self.broker.lock().epoch != self.epoch {
            return Err(Error::Broker {
                operation: "publish",
                endpoint: "memory".to_owned(),
                source: "connection lost".into(),
            });
        }
        Ok(())
    }

    pub(crate) async fn publish(&mut self, messages: Vec<Envelope>) -> Result<()> {
        self.alive()?;
        let broker = self.broker.clone();
        for envelope in messages {
            let fault = match broker
                .publish_script
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_mut()
            {
                Some(script) => script(&envelope),
                None => PublishFault::Deliver,
            };
            let mut state = broker.lock();
            if state.epoch != self.epoch {
                self.broken = true;
                return Err(Error::Broker {
                    operation: "publish",
                    endpoint: "memory".to_owned(),
                    source: "connection lost".into(),
                });
            }
            *state.publishes.entry(envelope.id).or_default() += 1;
            let message = StoredMessage {
                id: Some(envelope.id),
                destination: envelope.destination.to_string(),
                headers: envelope.headers.clone(),
                body: envelope.body.clone(),
                redelivered: false,
            };
            let (outcome, held) = match fault {
                PublishFault::Nack => (
                    Outcome::Rejected("the broker refused the message (nack)".to_owned()),
                    Held::No,
                ),
                PublishFault::Return => (
                    Outcome::Unroutable("unroutable (scripted)".to_owned()),
                    Held::No,
                ),
                PublishFault::CloseChannel(reason) => {
                    for (_, outcome, held) in &mut self.pending {
                        *outcome = Outcome::Unknown(format!(
                            "sent on a channel another message closed ({reason})"
                        ));
                        *held = Held::No;
                    }
                    (Outcome::Rejected(reason), Held::No)
                }
                PublishFault::DropConnection => {
                    state.drop_connections();
                    self.broken = true;
                    drop(state);
                    broker.changed.notify_waiters();
                    return Err(Error::Broker {
                        operation: "publish",
                        endpoint: "memory".to_owned(),
                        source: "connection lost (scripted)".into(),
                    });
                }
                PublishFault::DeliverThenDropConnection => {
                    state.route(&envelope.destination, message);
                    state.drop_connections();
                    self.broken = true;
                    drop(state);
                    broker.changed.notify_waiters();
                    return Err(Error::Broker {
                        operation: "publish",
                        endpoint: "memory".to_owned(),
                        source: "connection lost after routing (scripted)".into(),
                    });
                }
                PublishFault::Deliver | PublishFault::Delay | PublishFault::Hold => {
                    let held = match fault {
                        PublishFault::Delay => Held::Round,
                        PublishFault::Hold => Held::Until(state.released),
                        _ => Held::No,
                    };
                    match state.refusal(&envelope.destination) {
                        Some(reason) => (Outcome::Rejected(reason), held),
                        None if state.route(&envelope.destination, message) => {
                            (Outcome::Confirmed, held)
                        }
                        None => (
                            Outcome::Unroutable(
                                "unroutable: no queue is bound to the destination".to_owned(),
                            ),
                            held,
                        ),
                    }
                }
            };
            self.pending.push_back((envelope.id, outcome, held));
            drop(state);
            broker.changed.notify_waiters();
        }
        Ok(())
    }

    pub(crate) async fn outcomes(&mut self) -> Result<Vec<(Uuid, Outcome)>> {
        // Let other tasks run first (nothing is taken yet: cancel-safe).
        tokio::task::yield_now().await;
        loop {
            self.alive()?;
            let released = self.broker.lock().released;
            let waiting = |held: &Held| matches!(held, Held::Until(at) if *at >= released);
            if self.pending.is_empty() || !self.pending.iter().all(|(_, _, held)| waiting(held)) {
                break;
            }
            // Everything is held until the test lets go: wait for it.
            let changed = self.broker.changed.notified();
            if self.broker.lock().released == released {
                changed.await;
            }
        }
        let released = self.broker.lock().released;
        // Round-held answers wait one round, unless nothing else would come.
        let all_held = self.pending.iter().all(|(_, _, held)| *held != Held::No);
        let mut out = Vec::new();
        let mut kept = VecDeque::new();
        for (id, outcome, held) in self.pending.drain(..) {
            match held {
                Held::Until(at) if at >= released => kept.push_back((id, outcome, held)),
                Held::Round if !all_held => kept.push_back((id, outcome, Held::No)),
                _ => out.push((id, outcome)),
            }
        }
        self.pending = kept;
        let mut state = self.broker.lock();
        for (id, outcome) in &out {
            if *outcome == Outcome::Confirmed {
                state.confirmed.push(*id);
            }
        }
        Ok(out)
    }

    pub(crate) fn in_flight(&self) -> usize {
        self.pending.len()
    }

    pub(crate) fn is_connected(&self) -> bool {
        self.alive().is_ok()
    }

    pub(crate) async fn close(self) {}
}

/// How an answer is held back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Held {
    No,
    /// One round of answers.
    Round,
    /// Until `release_held` moves past this count.
    Until(u64),
}

/// A consumer on a memory broker.
#[derive(Debug)]
pub(crate) struct MemorySubscription {
    broker: MemoryBroker,
    declaration: QueueDeclaration,
    epoch: u64,
    prefetch: usize,
    settler: Settler,
    settling: JoinHandle<()>,
}

impl MemorySubscription {
    pub(crate) fn declaration(&self) -> &QueueDeclaration {
        &self.declaration
    }

    pub(crate) fn settler(&self) -> Settler {
        self.settler.clone()
    }

    pub(crate) async fn next(&mut self) -> Result<Delivery> {
        loop {
            let changed = self.broker.changed.notified();
            {
                let broker = self.broker.clone();
                let mut state = broker.lock();
                if state.epoch != self.epoch {
                    return Err(Error::Broker {
                        operation: "consume",
                        endpoint: "memory".to_owned(),
                        source: "connection lost".into(),
                    });
                }
                let epoch = self.epoch;
                let picked = {
                    let State {
                        queues, next_tag, ..
                    } = &mut *state;
                    let queue = queues.entry(self.declaration.queue.clone()).or_default();
                    let mine = queue.unacked.values().filter(|(e, _)| *e == epoch).count();
                    if mine < self.prefetch
                        && let Some(message) = queue.ready.pop_front()
                    {
                        *next_tag += 1;
                        let tag = *next_tag;
                        queue.unacked.insert(tag, (epoch, message.clone()));
                        Some((tag, message))
                    } else {
                        None
                    }
                };
                drop(state);
                let picked = picked.map(|(tag, message)| {
                    let fault = match broker
                        .delivery_script
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .as_mut()
                    {
                        Some(script) => script(&message),
                        None => DeliveryFault::Deliver,
                    };
                    (tag, message, fault)
                });
                let mut state = broker.lock();
                if let Some((_, message, DeliveryFault::Duplicate)) = &picked {
                    let mut copy = message.clone();
                    copy.redelivered = true;
                    state
                        .queues
                        .entry(self.declaration.queue.clone())
                        .or_default()
                        .ready
                        .push_back(copy);
                }
                if let Some((tag, message, fault)) = picked {
                    let _ = self.settler.sender().send(SettleEvent::Delivered(tag));
                    if fault == DeliveryFault::DropConnection {
                        state.drop_connections();
                    }
                    drop(state);
                    broker.changed.notify_waiters();
                    return Ok(delivery(tag, &message, &self.declaration));
                }
            }
            changed.await;
        }
    }

    pub(crate) async fn close(self) {
        drop(self.settler);
        let _ = self.settling.await;
        // What was delivered and not settled goes back, as on a real broker.
        let mut state = self.broker.lock();
        if let Some(queue) = state.queues.get_mut(&self.declaration.queue) {
            let mut back: Vec<(u64, StoredMessage)> = queue
                .unacked
                .iter()
                .filter(|(_, (epoch, _))| *epoch == self.epoch)
                .map(|(tag, (_, m))| (*tag, m.clone()))
                .collect();
            back.sort_by_key(|(tag, _)| *tag);
            for (tag, _) in &back {
                queue.unacked.remove(tag);
            }
            for (_, mut message) in back.into_iter().rev() {
                message.redelivered = true;
                queue.ready.push_front(message);
            }
        }
        drop(state);
        self.broker.changed.notify_waiters();
    }
}

fn delivery(tag: u64, message: &StoredMessage, declaration: &QueueDeclaration) -> Delivery {
    let mut headers = message.headers.clone();
    headers.insert("destination".to_owned(), message.destination.clone());
    headers.insert("redelivered".to_owned(), message.redelivered.to_string());
    headers.insert(
        "subscription-destination".to_owned(),
        declaration.queue.clone(),
    );
    Delivery {
        tag,
        headers,
        transport_id: message.id.map(|id| id.to_string()),
        body: message.body.clone(),
        redelivered: message.redelivered,
    }
}

async fn settle_loop(
    broker: MemoryBroker,
    declaration: QueueDeclaration,
    epoch: u64,
    mut events: mpsc::UnboundedReceiver<SettleEvent>,
) {
    while let Some(event) = events.recv().await {
        let SettleEvent::Settled(tag, settle) = event else {
            continue;
        };
        let mut state = broker.lock();
        if state.epoch != epoch {
            // Settling on a dead connection does nothing; the message was requeued.
            continue;
        }
        let Some(queue) = state.queues.get_mut(&declaration.queue) else {
            continue;
        };
        let Some((_, mut message)) = queue.unacked.remove(&tag) else {
            continue;
        };
        match settle {
            Settle::Ack => state.acked.push(message.id),
            Settle::Retry => {
                message.redelivered = true;
                queue.ready.push_front(message);
            }
            Settle::DeadLetter(reason) => {
                message.headers.insert("x-outbox-error".to_owned(), reason);
                state
                    .queues
                    .entry(declaration.dead_letter_queue.clone())
                    .or_default()
                    .ready
                    .push_back(message);
            }
        }
        drop(state);
        broker.changed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_patterns_match_like_amqp() {
        assert!(topic_matches("orders.*", "orders.created"));
        assert!(!topic_matches("orders.*", "orders.created.v1"));
        assert!(topic_matches("orders.#", "orders.created.v1"));
        assert!(topic_matches("orders.#", "orders"));
        assert!(topic_matches("#", "anything.at.all"));
        assert!(!topic_matches("orders.created", "orders.deleted"));
    }
}
