//! Publishing to JetStream with pipelined PubAcks, one outcome per row id.
//!
//! Facts about async-nats 0.51 that shape this file:
//! - `send_publish` takes one of `max_ack_inflight` slots and, with
//!   backpressure on, waits for a free one without reading acks: holding
//!   more un-awaited ack futures than slots hangs. So this publisher never
//!   holds more than `nats.publish_window` (the slots it gives the context)
//!   and reads acks itself when the window is full;
//! - a publish to a subject no stream captures comes back as "no
//!   responders" (`StreamNotFound`), and so does one sent while JetStream is
//!   still starting. The JetStream API is asked which it is before the row
//!   is charged an attempt;
//! - header names and values that NATS cannot carry make async-nats panic,
//!   so they are checked here first.

use std::collections::HashMap;
use std::str::FromStr;
use std::time::{Duration, Instant};

use async_nats::jetstream::context::{
    GetStreamByNameErrorKind, PublishAckFuture, PublishError, PublishErrorKind,
};
use async_nats::jetstream::message::PublishMessage;
use async_nats::{HeaderMap, HeaderName, HeaderValue};
use futures_util::FutureExt as _;
use futures_util::future::BoxFuture;
use futures_util::stream::{FuturesUnordered, StreamExt as _};
use tracing::debug;
use uuid::Uuid;

use super::{Nats, subject};
use crate::broker::{Envelope, Outcome};
use crate::{Error, Result};

/// How long "no stream captures this subject" is believed without asking again.
const NO_STREAM_CACHE: Duration = Duration::from_secs(10);

type Acked = (Uuid, String, std::result::Result<(), PublishError>);

/// A JetStream context and the PubAcks awaited on it.
pub(crate) struct NatsPublisher {
    nats: Nats,
    client: async_nats::Client,
    jetstream: async_nats::jetstream::Context,
    /// Awaiting their PubAck, at most `nats.publish_window`.
    pending: FuturesUnordered<BoxFuture<'static, Acked>>,
    /// Outcomes decided and not yet handed out.
    ready: Vec<(Uuid, Outcome)>,
    /// "No responders" answers whose stream check has not finished: kept
    /// here across the await, so a caller that drops `outcomes()` midway
    /// (a `select!`) loses none of them.
    unchecked: Vec<(Uuid, String)>,
    /// Subjects JetStream said no stream captures, and since when.
    no_stream: HashMap<String, Instant>,
}

impl std::fmt::Debug for NatsPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsPublisher")
            .field("endpoint", &self.nats.endpoint())
            .field("pending", &self.pending.len())
            .field("ready", &self.ready.len())
            .finish_non_exhaustive()
    }
}

impl NatsPublisher {
    pub(crate) async fn open(nats: &Nats, name: &str) -> Result<NatsPublisher> {
        let client = nats.connect(name).await?;
        Ok(NatsPublisher {
            nats: nats.clone(),
            jetstream: nats.jetstream(client.clone()),
            client,
            pending: FuturesUnordered::new(),
            ready: Vec::new(),
            unchecked: Vec::new(),
            no_stream: HashMap::new(),
        })
    }

    pub(crate) async fn publish(&mut self, messages: Vec<Envelope>) -> Result<()> {
        for envelope in messages {
            while self.pending.len() >= self.nats.settings().publish_window {
                if let Some(acked) = self.pending.next().await {
                    self.settle(acked);
                }
            }
            self.publish_one(envelope).await?;
        }
        Ok(())
    }

    async fn publish_one(&mut self, envelope: Envelope) -> Result<()> {
        let id = envelope.id;
        let prefix = &self.nats.settings().subject_prefix;
        let subject = match subject(prefix, &envelope.destination) {
            Ok(subject) => subject,
            Err(err) => {
                self.ready.push((id, Outcome::Invalid(err.to_string())));
                return Ok(());
            }
        };
        if self.known_without_stream(&subject) {
            self.ready
                .push((id, Outcome::Rejected(no_stream(&subject))));
            return Ok(());
        }
        let headers = match headers(&envelope) {
            Ok(headers) => headers,
            Err(reason) => {
                self.ready.push((id, Outcome::Invalid(reason)));
                return Ok(());
            }
        };
        let message = PublishMessage::build()
            .payload(envelope.body.into())
            .headers(headers);
        match self.jetstream.send_publish(subject.clone(), message).await {
            Ok(ack) => {
                self.pending.push(wait_for(id, subject, ack));
                Ok(())
            }
            Err(err) => match err.kind() {
                PublishErrorKind::MaxPayloadExceeded => {
                    self.ready.push((id, Outcome::Rejected(err.to_string())));
                    Ok(())
                }
                _ => Err(Error::Broker {
                    operation: "publish",
                    endpoint: self.nats.endpoint(),
                    source: Box::new(err),
                }),
            },
        }
    }

    /// Turn one PubAck (or its absence) into an outcome; a "no responders"
    /// waits in `unchecked` for its stream check.
    fn settle(&mut self, (id, subject, acked): Acked) {
        let outcome = match acked {
            // A duplicate ack means JetStream has it already: delivered.
            Ok(()) => Outcome::Confirmed,
            Err(err) => match err.kind() {
                PublishErrorKind::StreamNotFound => {
                    self.unchecked.push((id, subject));
                    return;
                }
                PublishErrorKind::TimedOut | PublishErrorKind::BrokenPipe => {
                    Outcome::Unknown(format!("no PubAck from {}: {err}", self.nats.endpoint()))
                }
                _ => Outcome::Rejected(format!("JetStream refused it: {err}")),
            },
        };
        self.ready.push((id, outcome));
    }

    /// Whether JetStream said, recently enough, that no stream captures
    /// `subject`; an answer too old to trust is forgotten.
    fn known_without_stream(&mut self, subject: &str) -> bool {
        match self.no_stream.get(subject) {
            Some(since) if since.elapsed() < NO_STREAM_CACHE => true,
            Some(_) => {
                self.no_stream.remove(subject);
                false
            }
            None => false,
        }
    }

    /// "No responders": the message's fault only if JetStream is up and
    /// says no stream captures the subject.
    async fn no_stream_outcome(&mut self, subject: &str) -> Outcome {
        if self.known_without_stream(subject) {
            return Outcome::Rejected(no_stream(subject));
        }
        let asked = tokio::time::timeout(
            self.nats.timeout(),
            self.jetstream.stream_by_subject(subject),
        )
        .await;
        match asked {
            Ok(Err(err)) if err.kind() == GetStreamByNameErrorKind::NotFound => {
                debug!(subject, "no JetStream stream captures this subject");
                self.no_stream.insert(subject.to_owned(), Instant::now());
                Outcome::Rejected(no_stream(subject))
            }
            Ok(Ok(stream)) => Outcome::Unknown(format!(
                "no responders for {subject}, though stream {stream} captures it now"
            )),
            Ok(Err(err)) => {
                Outcome::Unknown(format!("JetStream did not answer for {subject}: {err}"))
            }
            Err(_) => Outcome::Unknown(format!("JetStream did not answer for {subject}")),
        }
    }

    pub(crate) async fn outcomes(&mut self) -> Result<Vec<(Uuid, Outcome)>> {
        if self.ready.is_empty() && self.unchecked.is_empty() {
            match self.pending.next().await {
                Some(acked) => self.settle(acked),
                None => return Ok(Vec::new()),
            }
        }
        // Whatever else has arrived, without waiting.
        while let Some(Some(acked)) = self.pending.next().now_or_never() {
            self.settle(acked);
        }
        self.check_unchecked().await;
        Ok(std::mem::take(&mut self.ready))
    }

    /// Decide the "no responders" answers, each removed only once decided.
    async fn check_unchecked(&mut self) {
        while let Some((id, subject)) = self.unchecked.last().cloned() {
            let outcome = self.no_stream_outcome(&subject).await;
            self.unchecked.pop();
            self.ready.push((id, outcome));
        }
    }

    pub(crate) fn in_flight(&self) -> usize {
        self.pending.len() + self.ready.len() + self.unchecked.len()
    }

    pub(crate) fn is_connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    pub(crate) async fn close(self) {
        let _ = tokio::time::timeout(self.nats.timeout(), self.client.flush()).await;
    }
}

fn wait_for(id: Uuid, subject: String, ack: PublishAckFuture) -> BoxFuture<'static, Acked> {
    async move {
        let acked = ack.await.map(|_ack| ());
        (id, subject, acked)
    }
    .boxed()
}

fn no_stream(subject: &str) -> String {
    format!(
        "no JetStream stream captures subject {subject}; create one (`outbox-cli stream create`) or change nats.subject_prefix"
    )
}

/// The envelope's headers as NATS headers, `Nats-Msg-Id` = row id.
fn headers(envelope: &Envelope) -> std::result::Result<HeaderMap, String> {
    let mut headers = HeaderMap::new();
    for (name, value) in &envelope.headers {
        let header = HeaderName::from_str(name)
            .map_err(|_| format!("header name {name:?} cannot be sent over NATS (control characters, non-ASCII or ':')"))?;
        let text = HeaderValue::from_str(value).map_err(|_| {
            format!(
                "header {name} has a value NATS cannot carry (a line break or control character)"
            )
        })?;
        headers.insert(header, text);
    }
    headers.insert(
        async_nats::header::NATS_MESSAGE_ID,
        envelope.id.to_string().as_str(),
    );
    Ok(headers)
}
