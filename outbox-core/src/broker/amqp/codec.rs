//! Headers and properties on the AMQP wire, both ways.
//!
//! Outgoing headers are AMQP long strings (what the STOMP plugin turns into
//! STOMP headers, spec §8.5-A), plus `message_id` (always the row id) and
//! `correlation_id` for plain AMQP consumers. Names and those two
//! properties are short strings, at most 255 bytes: checked here, so a bad
//! row becomes FAILED instead of panicking inside lapin.

use std::collections::BTreeMap;

use lapin::BasicProperties;
use lapin::message::Delivery as LapinDelivery;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};

use crate::broker::{Delivery, Envelope};
use crate::headers;

/// The longest AMQP short string.
pub(crate) const MAX_SHORT: usize = 255;

/// Persistent JSON with every header, or why this message cannot be encoded.
pub(crate) fn properties(envelope: &Envelope) -> Result<BasicProperties, String> {
    let mut table = FieldTable::default();
    for (name, value) in &envelope.headers {
        let key = ShortString::try_new(name.as_str()).map_err(|_| {
            format!(
                "header name `{}…` is {} bytes; AMQP allows at most {MAX_SHORT}",
                preview(name),
                name.len()
            )
        })?;
        table.insert(key, AMQPValue::LongString(LongString::from(value.as_str())));
    }
    let mut properties = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type(ShortString::from("application/json"))
        .with_message_id(ShortString::from(envelope.id.hyphenated().to_string()))
        .with_headers(table);
    if let Some(id) = envelope.headers.get(headers::CORRELATION_ID) {
        let id = ShortString::try_new(id.as_str()).map_err(|_| {
            format!(
                "{} is {} bytes; AMQP allows at most {MAX_SHORT} in correlation_id",
                headers::CORRELATION_ID,
                id.len()
            )
        })?;
        properties = properties.with_correlation_id(id);
    }
    Ok(properties)
}

/// A name (exchange, routing key, queue) as a short string.
pub(crate) fn short(name: &str) -> Result<ShortString, String> {
    ShortString::try_new(name).map_err(|_| {
        format!(
            "`{}…` is {} bytes; AMQP names hold at most {MAX_SHORT}",
            preview(name),
            name.len()
        )
    })
}

/// The first few characters, for an error about something too long.
fn preview(text: &str) -> &str {
    let mut end = text.len().min(40);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// A lapin delivery as the consumer sees it: headers as text, plus what a
/// STOMP subscriber would see (`destination` rebuilt from the delivery,
/// `subscription-destination`, `redelivered`, `amqp-message-id`).
pub(crate) fn delivery(delivery: LapinDelivery, subscribed: &str) -> Delivery {
    let mut map = BTreeMap::new();
    if let Some(table) = delivery.properties.headers() {
        for (name, value) in table.inner() {
            if let Some(text) = value_text(value) {
                map.insert(name.to_string(), text);
            }
        }
    }
    let exchange = delivery.exchange.as_str();
    let routing_key = delivery.routing_key.as_str();
    let delivered_to = match exchange {
        "" => format!("/queue/{routing_key}"),
        "amq.topic" => format!("/topic/{routing_key}"),
        _ if routing_key.is_empty() => format!("/exchange/{exchange}"),
        _ => format!("/exchange/{exchange}/{routing_key}"),
    };
    map.insert("destination".to_owned(), delivered_to);
    map.insert("subscription-destination".to_owned(), subscribed.to_owned());
    map.insert("redelivered".to_owned(), delivery.redelivered.to_string());
    let transport_id = delivery
        .properties
        .message_id()
        .as_ref()
        .map(|id| id.to_string());
    if let Some(id) = &transport_id {
        map.insert("amqp-message-id".to_owned(), id.clone());
    }
    Delivery {
        tag: delivery.delivery_tag,
        headers: map,
        transport_id,
        body: delivery.data,
        redelivered: delivery.redelivered,
    }
}

/// A header value as text; arrays (x-death), tables and byte arrays have no
/// text form, and the STOMP plugin drops them too.
pub(crate) fn value_text(value: &AMQPValue) -> Option<String> {
    Some(match value {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.to_string(),
        AMQPValue::Boolean(b) => b.to_string(),
        AMQPValue::ShortShortInt(n) => n.to_string(),
        AMQPValue::ShortShortUInt(n) => n.to_string(),
        AMQPValue::ShortInt(n) => n.to_string(),
        AMQPValue::ShortUInt(n) => n.to_string(),
        AMQPValue::LongInt(n) => n.to_string(),
        AMQPValue::LongUInt(n) => n.to_string(),
        AMQPValue::LongLongInt(n) => n.to_string(),
        AMQPValue::Float(n) => n.to_string(),
        AMQPValue::Double(n) => n.to_string(),
        AMQPValue::Timestamp(n) => n.to_string(),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    fn envelope(headers: &[(&str, &str)]) -> Envelope {
        Envelope {
            id: Uuid::new_v4(),
            destination: crate::Destination::parse("/topic/x").unwrap(),
            body: b"{}".to_vec(),
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn long_names_and_correlation_ids_are_errors_not_panics() {
        let name = "h".repeat(256);
        let err = properties(&envelope(&[(&name, "v")])).unwrap_err();
        assert!(err.contains("256 bytes"), "{err}");
        let id = "c".repeat(300);
        let err = properties(&envelope(&[(headers::CORRELATION_ID, &id)])).unwrap_err();
        assert!(
            err.contains("300 bytes") && err.contains("correlation_id"),
            "{err}"
        );
        let ok = properties(&envelope(&[(&"h".repeat(255), &"v".repeat(10_000))])).unwrap();
        assert_eq!(ok.delivery_mode(), &Some(2));
    }

    #[test]
    fn the_row_id_is_always_the_message_id() {
        let envelope = envelope(&[]);
        let properties = properties(&envelope).unwrap();
        assert_eq!(
            properties.message_id().as_ref().map(|id| id.to_string()),
            Some(envelope.id.to_string())
        );
    }
}
