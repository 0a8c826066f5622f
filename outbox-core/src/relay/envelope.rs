//! A claimed row as the transport gets it, or why it can never be sent.
//!
//! The relay always stamps the row id as `dop-msg-id` (and the transport
//! as its message id), and fills the other `dop-*` headers when a row
//! written by another tool lacks them, so every message can be matched to
//! its row and deduplicated by its consumers.

use std::collections::BTreeMap;

use serde_json::Value;

use super::claim::ClaimedRow;
use crate::broker::Envelope;
use crate::encode::iso_datetime;
use crate::{Destination, headers, report};

/// `row` ready for the wire; `Err` says why it never can be. `trusted_json`
/// skips the body check where the column type guarantees JSON (jsonb).
pub(crate) fn envelope(row: &ClaimedRow, trusted_json: bool) -> Result<Envelope, String> {
    let destination = Destination::parse(&row.destination).map_err(|err| report(&err))?;
    if !trusted_json {
        serde_json::from_str::<serde::de::IgnoredAny>(&row.body)
            .map_err(|err| format!("the body is not JSON ({err})"))?;
    }
    let stored: Value = serde_json::from_str(&row.headers)
        .map_err(|err| format!("the headers are not JSON ({err})"))?;
    let mut map = match stored {
        Value::Object(map) => map
            .into_iter()
            .map(|(name, value)| {
                let value = match value {
                    Value::String(text) => text,
                    other => other.to_string(),
                };
                (name, value)
            })
            .collect::<BTreeMap<String, String>>(),
        Value::Null => BTreeMap::new(),
        other => {
            return Err(format!(
                "the headers are a JSON {}, not an object of names to values",
                kind(&other)
            ));
        }
    };
    // The limits a `Message` is held to when written, for rows written by SQL.
    for (name, value) in &map {
        headers::check(name, value).map_err(|err| report(&err))?;
    }
    let id = row.id.hyphenated().to_string();
    map.insert(headers::MSG_ID.to_owned(), id.clone());
    map.entry(headers::MSG_DESTINATION.to_owned())
        .or_insert_with(|| row.destination.clone());
    map.entry(headers::MSG_TYPE.to_owned())
        .or_insert_with(|| headers::MSG_TYPE_PUBLISHED.to_owned());
    map.entry(headers::MSG_SENT_TIME.to_owned())
        .or_insert_with(|| iso_datetime(&row.added.naive_utc(), Some(0)));
    match map.get(headers::CORRELATION_ID) {
        Some(correlation) if !correlation.is_empty() => {}
        _ => {
            map.insert(headers::CORRELATION_ID.to_owned(), id);
        }
    }
    Ok(Envelope {
        id: row.id,
        destination,
        body: row.body.clone().into_bytes(),
        headers: map,
    })
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;
    use uuid::Uuid;

    fn row(body: &str, headers: &str) -> ClaimedRow {
        ClaimedRow {
            id: Uuid::new_v4(),
            destination: "/topic/orders".to_owned(),
            body: body.to_owned(),
            headers: headers.to_owned(),
            retry: 0,
            added: Utc::now(),
        }
    }

    #[test]
    fn the_row_id_is_stamped_and_missing_headers_are_filled() {
        let row = row(
            "{}",
            r#"{"dop-msg-id": "forged", "tenant": "acme", "n": 1}"#,
        );
        let envelope = envelope(&row, false).unwrap();
        assert_eq!(envelope.headers[headers::MSG_ID], row.id.to_string());
        assert_eq!(envelope.headers["tenant"], "acme");
        assert_eq!(envelope.headers["n"], "1");
        assert_eq!(envelope.headers[headers::MSG_DESTINATION], "/topic/orders");
        assert_eq!(envelope.headers[headers::MSG_TYPE], "Published");
        assert_eq!(
            envelope.headers[headers::CORRELATION_ID],
            row.id.to_string()
        );
        assert!(envelope.headers[headers::MSG_SENT_TIME].ends_with('Z'));
        let bare = envelope_of(&row_with_headers("{}"));
        assert_eq!(bare.headers[headers::MSG_ID], bare.id.to_string());
    }

    fn row_with_headers(headers: &str) -> ClaimedRow {
        row("{\"a\": 1}", headers)
    }

    fn envelope_of(row: &ClaimedRow) -> Envelope {
        envelope(row, false).unwrap()
    }

    #[test]
    fn rows_that_can_never_be_sent_say_why() {
        let err = envelope(&row("not json {", "{}"), false).unwrap_err();
        assert!(err.starts_with("the body is not JSON"), "{err}");
        let err = envelope(&row("{}", "[1]"), false).unwrap_err();
        assert!(err.contains("array"), "{err}");
        let mut bad = row("{}", "{}");
        bad.destination = "/nowhere/x".to_owned();
        let err = envelope(&bad, false).unwrap_err();
        assert!(err.contains("invalid destination"), "{err}");
    }
}
