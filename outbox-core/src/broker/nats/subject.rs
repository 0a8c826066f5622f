//! Destinations as NATS subjects.
//!
//! | destination               | subject                           |
//! |---------------------------|-----------------------------------|
//! | `/topic/<rk>`             | `<prefix>.<rk>`                   |
//! | `/exchange/<ex>[/<rk>]`   | `<prefix>.<ex>[.<rk>]`            |
//! | `/queue/<q>`, bare `<q>`  | `<prefix>.<q>`                    |
//! | `/amq/queue/<q>`          | refused: it names a RabbitMQ queue |
//!
//! `<prefix>` is `nats.subject_prefix` (`outbox` by default; empty for none).

use crate::destination::Kind;
use crate::{Destination, Error, Result};

/// The subject `destination` is published to.
pub(crate) fn subject(prefix: &str, destination: &Destination) -> Result<String> {
    let subject = name(prefix, destination)?;
    check_subject(&subject, false).map_err(|problem| refused(destination, problem))?;
    Ok(subject)
}

/// The subject filter a subscription to `destination` uses: `*` and a
/// final `>` allowed.
pub(crate) fn filter(prefix: &str, destination: &Destination) -> Result<String> {
    let subject = name(prefix, destination)?;
    check_subject(&subject, true).map_err(|problem| refused(destination, problem))?;
    Ok(subject)
}

fn name(prefix: &str, destination: &Destination) -> Result<String> {
    let name = match destination.kind() {
        Kind::Topic { routing_key } => routing_key.clone(),
        Kind::Exchange {
            exchange,
            routing_key,
        } if routing_key.is_empty() => exchange.clone(),
        Kind::Exchange {
            exchange,
            routing_key,
        } => format!("{exchange}.{routing_key}"),
        Kind::Queue { name } => name.clone(),
        Kind::AmqQueue { .. } => {
            return Err(refused(
                destination,
                "/amq/queue/ names an existing RabbitMQ queue; with NATS use /topic/<subject>"
                    .to_owned(),
            ));
        }
    };
    Ok(if prefix.is_empty() {
        name
    } else {
        format!("{prefix}.{name}")
    })
}

fn refused(destination: &Destination, problem: String) -> Error {
    Error::InvalidSubject {
        destination: destination.to_string(),
        problem,
    }
}

/// Whether `subject` is a valid NATS subject: dot-separated non-empty tokens
/// without whitespace; `*` and a final `>` only when `wildcards` is true.
pub(crate) fn check_subject(subject: &str, wildcards: bool) -> std::result::Result<(), String> {
    if subject.is_empty() {
        return if wildcards {
            Err("a subject is empty".to_owned())
        } else {
            Ok(())
        };
    }
    let tokens: Vec<&str> = subject.split('.').collect();
    for (index, token) in tokens.iter().enumerate() {
        if token.is_empty() {
            return Err(format!(
                "`{subject}` has an empty token (`..` or a leading or trailing `.`)"
            ));
        }
        if token.contains(char::is_whitespace) {
            return Err(format!("`{subject}` holds whitespace"));
        }
        if token.contains('#') {
            return Err(format!(
                "`{subject}` holds `#`, AMQP's multi-word wildcard; NATS writes it `>`{}",
                if wildcards {
                    ""
                } else {
                    ", and a published subject holds no wildcard"
                }
            ));
        }
        let wild = *token == "*" || (*token == ">" && index == tokens.len() - 1);
        if wild && !wildcards {
            return Err(format!(
                "`{subject}` holds the wildcard `{token}`; a published subject names one subject"
            ));
        }
        if !wild && (token.contains('*') || token.contains('>')) {
            return Err(format!(
                "`{subject}`: `*` and `>` are whole tokens (`>` only the last)"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subject_of(prefix: &str, destination: &str) -> std::result::Result<String, String> {
        subject(prefix, &Destination::parse(destination).unwrap()).map_err(|e| e.to_string())
    }

    #[test]
    fn destinations_map_to_subjects() {
        assert_eq!(
            subject_of("outbox", "/topic/orders.created.v1").unwrap(),
            "outbox.orders.created.v1"
        );
        assert_eq!(
            subject_of("", "/topic/orders.created").unwrap(),
            "orders.created"
        );
        assert_eq!(
            subject_of("acme", "/exchange/audit/orders").unwrap(),
            "acme.audit.orders"
        );
        assert_eq!(subject_of("acme", "/exchange/audit").unwrap(), "acme.audit");
        assert_eq!(
            subject_of("outbox", "/queue/summaries").unwrap(),
            "outbox.summaries"
        );
        assert_eq!(
            subject_of("outbox", "summaries").unwrap(),
            "outbox.summaries"
        );
    }

    #[test]
    fn what_is_not_a_subject_is_refused_with_why() {
        let amq = subject_of("outbox", "/amq/queue/q").unwrap_err();
        assert!(
            amq.contains("/amq/queue/") && amq.contains("/topic/"),
            "{amq}"
        );
        let hash = subject_of("outbox", "/topic/orders.#").unwrap_err();
        assert!(hash.contains("`#`") && hash.contains("`>`"), "{hash}");
        let star = subject_of("outbox", "/topic/orders.*").unwrap_err();
        assert!(star.contains("wildcard"), "{star}");
        let empty = subject_of("outbox", "/topic/orders..created").unwrap_err();
        assert!(empty.contains("empty token"), "{empty}");
    }

    #[test]
    fn subscriptions_may_use_nats_wildcards_not_amqp_ones() {
        let filter_of =
            |d: &str| filter("outbox", &Destination::parse(d).unwrap()).map_err(|e| e.to_string());
        assert_eq!(filter_of("/topic/orders.*").unwrap(), "outbox.orders.*");
        assert_eq!(filter_of("/topic/orders.>").unwrap(), "outbox.orders.>");
        assert!(
            filter_of("/topic/orders.#")
                .unwrap_err()
                .contains("NATS writes it `>`")
        );
    }

    #[test]
    fn stream_subjects_may_hold_wildcards() {
        assert!(check_subject("outbox.>", true).is_ok());
        assert!(check_subject("outbox.*.created", true).is_ok());
        assert!(check_subject("outbox.>.x", true).is_err());
        assert!(check_subject("outbox.#", true).unwrap_err().contains("`>`"));
        assert!(check_subject("out*box", true).is_err());
    }
}
