//! Dead letters on JetStream: the consumer copies a failed message to
//! `DLQ.<stream>.<durable>`, kept by the stream `<stream>_DLQ`. They are
//! read in place by sequence (nothing is taken), and a replay publishes each
//! back to the subject it failed on, then deletes it from the dead-letter
//! stream once the PubAck came.

use std::collections::BTreeMap;

use async_nats::HeaderMap;
use async_nats::jetstream::stream::{RawMessageErrorKind, Stream};
use async_nats::jetstream::{Context, message::StreamMessage};
use tracing::info;

use super::Nats;
use super::consume::{dead_letter_stream, dead_letter_subject, durable_name};
use crate::{DeadLetter, Error, Result, headers};

/// Header the consumer adds to a dead letter: the subject it was consumed
/// from, where a replay sends it.
pub(crate) const SUBJECT_HEADER: &str = "x-outbox-subject";

/// Up to `limit` dead letters of the durable consumer `queue`, oldest first.
pub(crate) async fn dead_letters(
    nats: &Nats,
    queue: &str,
    limit: usize,
) -> Result<Vec<DeadLetter>> {
    let client = nats.connect("outbox-cli dlq list").await?;
    let place = Place::open(nats, &nats.jetstream(client.clone()), queue).await?;
    let mut letters = Vec::new();
    let mut next = 1;
    while letters.len() < limit {
        let Some(message) = place.next(next).await? else {
            break;
        };
        next = message.sequence + 1;
        letters.push(dead_letter(&message));
    }
    let _ = client.flush().await;
    Ok(letters)
}

/// Move up to `limit` dead letters of `queue` back to the subjects they
/// failed on; each is deleted from the dead-letter stream only after the
/// stream it goes back to acknowledged it.
pub(crate) async fn replay_dead_letters(
    nats: &Nats,
    queue: &str,
    limit: Option<u64>,
    mut progress: impl FnMut(u64),
) -> Result<u64> {
    let client = nats.connect("outbox-cli dlq replay").await?;
    let jetstream = nats.jetstream(client.clone());
    let place = Place::open(nats, &jetstream, queue).await?;
    let mut moved = 0;
    let mut next = 1;
    while limit.is_none_or(|limit| moved < limit) {
        let Some(message) = place.next(next).await? else {
            break;
        };
        next = message.sequence + 1;
        let subject = message
            .headers
            .get(SUBJECT_HEADER)
            .map(|s| s.as_str().to_owned())
            .ok_or_else(|| Error::NotDelivered {
                destination: place.subject.clone(),
                reason: format!(
                    "dead letter {} has no {SUBJECT_HEADER} header, so where it came from is unknown; it stays in {}",
                    message.sequence, place.stream_name
                ),
            })?;
        let ack = jetstream
            .publish_with_headers(
                subject.clone(),
                replayed_headers(&message),
                message.payload.clone(),
            )
            .await
            .map_err(|err| nats.api_error("publish", &err))?;
        ack.await.map_err(|err| Error::NotDelivered {
            destination: subject.clone(),
            reason: format!(
                "the stream did not take the replayed message ({err}); it stays in {}",
                place.stream_name
            ),
        })?;
        place
            .stream
            .delete_message(message.sequence)
            .await
            .map_err(|err| nats.api_error("delete dead letter", &err))?;
        moved += 1;
        progress(moved);
    }
    info!(queue, dead_letters = %place.subject, moved, "dead letters replayed");
    let _ = client.flush().await;
    Ok(moved)
}

/// Where one durable's dead letters are.
struct Place {
    stream: Stream,
    stream_name: String,
    subject: String,
}

impl Place {
    async fn open(nats: &Nats, jetstream: &Context, queue: &str) -> Result<Place> {
        let durable = durable_name(queue).map_err(|reason| Error::NotDelivered {
            destination: queue.to_owned(),
            reason,
        })?;
        let main = &nats.settings().stream;
        let subject = dead_letter_subject(main, &durable);
        let stream_name = dead_letter_stream(main);
        let stream = jetstream.get_stream(&stream_name).await.map_err(|err| {
            if super::stream::is_not_found(&err) {
                Error::NotDelivered {
                    destination: subject.clone(),
                    reason: format!(
                        "the dead-letter stream {stream_name} does not exist (`outbox-cli stream create` makes it beside {main})"
                    ),
                }
            } else {
                nats.api_error("stream info", &err)
            }
        })?;
        Ok(Place {
            stream,
            stream_name,
            subject,
        })
    }

    /// The first dead letter at or after sequence `from`.
    async fn next(&self, from: u64) -> Result<Option<StreamMessage>> {
        match self
            .stream
            .raw_message_builder()
            .sequence(from)
            .next_by_subject(self.subject.clone())
            .send()
            .await
        {
            Ok(message) => Ok(Some(message)),
            Err(err) if err.kind() == RawMessageErrorKind::NoMessageFound => Ok(None),
            Err(err) => Err(Error::Broker {
                operation: "read dead letters",
                endpoint: self.stream_name.clone(),
                source: err.to_string().into(),
            }),
        }
    }
}

/// The original headers: without ours, and with a `Nats-Msg-Id` of its own
/// (the original one is still inside the stream's duplicate window, which
/// would drop the replay as a repeat). The inbox keys on `dop-msg-id`.
fn replayed_headers(message: &StreamMessage) -> HeaderMap {
    let mut kept = HeaderMap::new();
    for (name, values) in message.headers.iter() {
        let name = name.to_string();
        if name.starts_with("x-outbox-") || name.eq_ignore_ascii_case("Nats-Msg-Id") {
            continue;
        }
        for value in values {
            kept.append(name.as_str(), value.as_str());
        }
    }
    if let Some(id) = message.headers.get("Nats-Msg-Id") {
        kept.insert(
            "Nats-Msg-Id",
            format!("{}:replay:{}", id.as_str(), message.sequence).as_str(),
        );
    }
    kept
}

fn dead_letter(message: &StreamMessage) -> DeadLetter {
    let headers: BTreeMap<String, String> = message
        .headers
        .iter()
        .filter_map(|(name, values)| {
            values
                .first()
                .map(|value| (name.to_string(), value.as_str().to_owned()))
        })
        .collect();
    let msg_id = headers
        .get(headers::CAP_MSG_ID)
        .or_else(|| headers.get(headers::MSG_ID))
        .or_else(|| headers.get("Nats-Msg-Id"))
        .cloned();
    DeadLetter {
        msg_id,
        death: headers
            .get("x-outbox-queue")
            .map(|from| format!("copied from {from}")),
        count: None,
        error: headers.get("x-outbox-error").cloned(),
        body: String::from_utf8_lossy(&message.payload).into_owned(),
        headers,
    }
}
