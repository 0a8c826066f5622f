//! The `dop-*` headers, named and built exactly as django-outbox-pattern does.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::encode::iso_datetime;

/// The outbox row id; the consumer's deduplication key.
pub const MSG_ID: &str = "dop-msg-id";
/// The destination, version suffix included.
pub const MSG_DESTINATION: &str = "dop-msg-destination";
/// Always `Published`.
pub const MSG_TYPE: &str = "dop-msg-type";
/// When the row was created (ISO 8601, ms, `Z`).
pub const MSG_SENT_TIME: &str = "dop-msg-sent-time";
/// The correlation id.
pub const CORRELATION_ID: &str = "dop-correlation-id";
/// The .NET CAP library's message id; wins over `dop-msg-id` on the consumer side.
pub const CAP_MSG_ID: &str = "cap-msg-id";

/// The value of `dop-msg-type`.
pub const MSG_TYPE_PUBLISHED: &str = "Published";

/// The longest header name: AMQP field-table keys are short strings.
pub const MAX_NAME_LEN: usize = 255;
/// The longest correlation id: it also travels as AMQP `correlation_id`, a short string.
pub const MAX_CORRELATION_ID_LEN: usize = 255;

/// Check a header where data enters (a [`Message`](crate::Message), a
/// correlation scope), so nothing is written that no relay can send.
pub(crate) fn check(name: &str, value: &str) -> crate::Result<()> {
    let shown = || name.chars().take(40).collect::<String>();
    if name.is_empty() {
        return Err(crate::Error::InvalidHeader {
            name: String::new(),
            reason: "a header name cannot be empty".to_owned(),
        });
    }
    if name.len() > MAX_NAME_LEN {
        return Err(crate::Error::InvalidHeader {
            name: shown(),
            reason: format!(
                "the name is {} bytes; header names hold at most {MAX_NAME_LEN} (an AMQP short string)",
                name.len()
            ),
        });
    }
    if name == CORRELATION_ID && value.len() > MAX_CORRELATION_ID_LEN {
        return Err(crate::Error::InvalidHeader {
            name: shown(),
            reason: format!(
                "the correlation id is {} bytes; it holds at most {MAX_CORRELATION_ID_LEN} (it is also the AMQP correlation_id)",
                value.len()
            ),
        });
    }
    Ok(())
}

/// The headers stored with a new outbox row: the user's headers overlaid with
/// the generated `dop-*` ones. As in django-outbox-pattern 3.2.1, the caller
/// may set `dop-correlation-id`; every other `dop-*` header is forced.
pub(crate) fn outbox_headers(
    id: Uuid,
    destination: &str,
    created: DateTime<Utc>,
    user: &BTreeMap<String, String>,
    correlation_id: &str,
) -> BTreeMap<String, String> {
    let mut headers = user.clone();
    let correlation = headers
        .get(CORRELATION_ID)
        .filter(|id| !id.is_empty())
        .cloned()
        .unwrap_or_else(|| correlation_id.to_owned());
    headers.insert(MSG_ID.to_owned(), id.hyphenated().to_string());
    headers.insert(MSG_DESTINATION.to_owned(), destination.to_owned());
    headers.insert(MSG_TYPE.to_owned(), MSG_TYPE_PUBLISHED.to_owned());
    headers.insert(
        MSG_SENT_TIME.to_owned(),
        iso_datetime(&created.naive_utc(), Some(0)),
    );
    headers.insert(CORRELATION_ID.to_owned(), correlation);
    headers
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn generated_headers_win_except_correlation_id() {
        let id = Uuid::new_v4();
        let at = Utc.with_ymd_and_hms(2025, 1, 31, 14, 5, 9).unwrap();
        let mut user = BTreeMap::new();
        user.insert("dop-msg-id".to_owned(), "forged".to_owned());
        user.insert("dop-correlation-id".to_owned(), "mine".to_owned());
        user.insert("key".to_owned(), "value".to_owned());
        let headers = outbox_headers(id, "/topic/a.v1", at, &user, "ctx");
        assert_eq!(headers[MSG_ID], id.to_string());
        assert_eq!(headers[CORRELATION_ID], "mine");
        assert_eq!(headers[MSG_SENT_TIME], "2025-01-31T14:05:09Z");
        assert_eq!(headers[MSG_TYPE], "Published");
        assert_eq!(headers["key"], "value");

        let headers = outbox_headers(id, "/topic/a", at, &BTreeMap::new(), "ctx");
        assert_eq!(headers[CORRELATION_ID], "ctx");
    }
}
